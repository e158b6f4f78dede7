#!/usr/bin/env bash
# smtpproxy_bench.sh - `lamsonfilter smtpproxy` (content-filter mode) against Postfix alone:
# bench/filter_bench.sh with the content-filter configurations (a s s2).  Every knob of
# filter_bench.sh applies.
export BENCH_CONFIGS=${BENCH_CONFIGS:-"a s s2"}
exec bash "$(dirname "${BASH_SOURCE[0]}")/filter_bench.sh" "$@"
