"""The milter's internals; `lamsonfilter.milter` is the entry module (the transport).

`callbacks` is `LamsonMilter`, one method per protocol step; `plan` is the
one table from a `Decision` to milter actions (pure data, no pymilter).
"""
