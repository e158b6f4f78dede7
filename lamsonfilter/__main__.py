"""``python -m lamsonfilter``: the same as the ``lamsonfilter`` command."""

from .cli import main

main()
