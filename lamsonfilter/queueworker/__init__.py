"""The queue transport's rooms: everything ``lamsonfilter deq`` needs besides the core.

`lamsonfilter.deq` is the entry module (the transport); the modules here are
its rooms: the table from a `Decision` to queue actions (`plan`, pure, so the
dry run and the docs can show it), one message from claim to removal
(`worker`), the feeder and its bounded pool of threads (`pool`), and the
inotify watch on ``new/`` that lets an idle ``deq`` sleep (`watch`).
The queue itself is `lamsonfilter.mailqueue`.
"""
