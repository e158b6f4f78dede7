"""The milter's internals; `lamsonfilter.milter` is the entry module (the transport).

`plan` is the one table from a `Decision` to milter actions (pure data, no
pymilter).
"""
