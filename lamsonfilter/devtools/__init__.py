"""Development tools: not part of lamsonfilter's product or its API.

These modules serve the tests, the benchmarks and ``lamsonfilter demo``:

``localpostfix``
    a private Postfix (``postfix -c DIR``, loopback ports only) for the
    integration tests, the bench and the demo;
``demo``, ``demobanner``, ``demostop``
    ``lamsonfilter demo``: an application behind a private Postfix, to try by
    hand, its banner, and cleaning up after a demo killed with SIGKILL;
``procinfo``
    which process holds a port, read from /proc (for the demo's messages);
``faults``
    named fault points where the reliability tests stop a daemon.

The product's modules do not import this package, with one documented seam:
the two transports call `faults.reached` at their fault points, which does
nothing unless a test armed the point through the environment.  The command
line imports `demo` only inside the ``demo`` command.  Nothing here is kept
stable between releases.
"""
