"""``python -m lamsonfilter.cli``: the same as the ``lamsonfilter`` command."""

from . import main

main()
