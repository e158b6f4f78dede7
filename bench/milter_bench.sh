#!/usr/bin/env bash
# milter_bench.sh - `lamsonfilter milter` against Postfix alone: bench/filter_bench.sh with the
# milter configurations (a mu mi; add tu tc for the pymilter floor).  Every knob of
# filter_bench.sh applies, e.g. BENCH_TAG=1 BENCH_RCPT=tag@lists.example.org for routed mail.
export BENCH_CONFIGS=${BENCH_CONFIGS:-"a mu mi"}
exec bash "$(dirname "${BASH_SOURCE[0]}")/filter_bench.sh" "$@"
