"""The state-machine picture beside the application is the one its code declares."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parents[1]


def graph() -> str:
    proc = subprocess.run([sys.executable, "-m", "lamsonfilter", "graph", "--app", str(APP)],
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout


def test_states_dot_is_what_lamsonfilter_graph_reads_from_the_handlers():
    dot = graph()
    assert (APP / "states.dot").read_text() == dot, "run: lamsonfilter graph --app examples/helpdesk -o examples/helpdesk/states.dot"
    for edge in ('"helpdesk.OPEN" -> "helpdesk.CLOSED"',
                 '"helpdesk.NEW" -> "helpdesk.OPEN" [style=dotted'):
        assert edge in dot
    assert '"helpdesk.CLOSED" -> "helpdesk.OPEN"' not in dot  # a closed ticket stays closed
    assert '"helpdesk.NEW" [label="NEW", shape=box]' in dot  # stateless


def test_states_svg_shows_the_same_states_and_moves():
    """states.svg is states.dot drawn by Graphviz (``-o states.svg``); every node and edge is in it."""
    import re

    svg = (APP / "states.svg").read_text()
    dot = (APP / "states.dot").read_text()
    for node in re.findall(r'^\s*"(helpdesk\.[A-Z]+)" \[', dot, re.MULTILINE):
        assert f"<title>{node}</title>" in svg, node
    for a, b in re.findall(r'^\s*"(helpdesk\.[A-Za-z]+)" -> "(helpdesk\.[A-Z]+)"', dot, re.MULTILINE):
        assert f"<title>{a}&#45;&gt;{b}</title>" in svg, (a, b)
