"""The state machines as a picture: Graphviz DOT from an application's handlers.

States are nodes; an edge A → B means state function A can return B (a
dotted edge: A puts *other* conversations in state B with ``set_state``).  The
transitions are read from the source (``return NEXT`` and ``return "NEXT"``
in the state function, and in module-level helper functions it returns the
result of, one call deep), so the picture shows what the code declares,
without running it.  Routes are shown as entry edges labelled with the
event, stateless functions as boxes.

    dot = to_dot(app.handlers)
    render(dot, "states.svg")      # needs Graphviz's ``dot`` on PATH
"""

from __future__ import annotations

import ast
import builtins
import inspect
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterable

from .fsm import START, Handler, is_stateless

__all__ = ["transitions", "unknown_returns", "to_dot", "render", "GraphError"]


class GraphError(Exception):
    """The picture could not be made (no ``dot``, or it failed)."""


def _moves(func: Callable[..., Any], states: set[str]) -> set[str]:
    """States that `func` puts *other* conversations in, via ``ctx.set_state(key, "STATE", ...)``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "set_state" and len(node.args) >= 2):
            arg = node.args[1]
            options = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
            for o in options:
                if isinstance(o, ast.Constant) and isinstance(o.value, str) and o.value in states:
                    found.add(o.value)
    return found


def _returns(func: Callable[..., Any], states: set[str], depth: int = 1) -> set[str]:
    try:
        source = textwrap.dedent(inspect.getsource(func))
    except (OSError, TypeError):
        return set()
    tree = ast.parse(source)
    module = inspect.getmodule(func)
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Return) or node.value is None:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id in states:
            found.add(value.id)
        elif isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value in states:
            found.add(value.value)
        elif depth > 0 and isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and module:
            helper = getattr(module, value.func.id, None)
            if callable(helper) and helper is not func:
                found |= _returns(helper, states, depth - 1)
    return found


def _bad_returns(func: Callable[..., Any], states: set[str], depth: int = 1) -> set[str]:
    """Returned names that cannot be states: ``return GREETEDX`` (undefined) or ``return "NOPE"``.

    Only what the source makes certain is reported: a bare name that is
    neither a local variable nor defined in the module (nor a builtin), a
    module-level function or string that is not a state, and a string
    literal that is not a state.  Anything computed is left alone.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return set()
    code = getattr(func, "__code__", None)
    local = set(code.co_varnames + code.co_cellvars + code.co_freevars) if code is not None else set()
    globals_: dict[str, Any] = getattr(func, "__globals__", {})
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Return) or node.value is None:
            continue
        value = node.value
        if isinstance(value, ast.Name) and value.id not in states and value.id not in local:
            if value.id in globals_:
                target = globals_[value.id]
                name = target if isinstance(target, str) else getattr(target, "__name__", None)
                if (isinstance(target, str) or inspect.isfunction(target)) and name not in states:
                    found.add(value.id)
            elif not hasattr(builtins, value.id):
                found.add(value.id)
        elif isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value not in states:
            found.add(repr(value.value))
        elif depth > 0 and isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
            helper = globals_.get(value.func.id)
            if inspect.isfunction(helper) and helper is not func:
                found |= _bad_returns(helper, states, depth - 1)
    return found


def unknown_returns(handler: Handler) -> dict[str, set[str]]:
    """For each state of `handler`, what it returns that is not a state of the handler (read from the source).

    Such a return fails at run time (a ``NameError``, or "returned unknown
    state"), deferring every message that reaches it.
    """
    names = set(handler.states)
    out = {}
    for name, func in handler.states.items():
        bad = _bad_returns(func, names)
        if bad:
            out[name] = bad
    return out


def transitions(handler: Handler) -> dict[str, set[str]]:
    """For each state of `handler`, the states it can move to (read from the source)."""
    names = set(handler.states)
    return {name: _returns(func, names) for name, func in handler.states.items()}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(handlers: Iterable[Handler]) -> str:
    lines = ["digraph lamsonfilter {", "  rankdir=LR;", '  node [shape=ellipse, fontname="Helvetica"];']
    for h in handlers:
        lines.append(f"  subgraph {_q('cluster_' + h.name)} {{")
        lines.append(f"    label={_q(h.name)};")
        for name, func in h.states.items():
            shape = "box" if is_stateless(func) else ("doublecircle" if name == START else "ellipse")
            lines.append(f"    {_q(h.name + '.' + name)} [label={_q(name)}, shape={shape}];")
        entry = _q(h.name + ".routes")
        lines.append(f"    {entry} [label={_q('mail in')}, shape=plaintext];")
        events: dict[str, list[str]] = {}
        for spec in h.routes:
            routed = h.states.get(spec.function)
            target = spec.function if routed is not None and is_stateless(routed) else START
            events.setdefault(target, []).append(spec.event_name)
        for target, evs in events.items():
            label = ", ".join(sorted(set(evs)))
            lines.append(f"    {entry} -> {_q(h.name + '.' + target)} [label={_q(label)}, style=dashed];")
        for src, dsts in transitions(h).items():
            for dst in sorted(dsts):
                lines.append(f"    {_q(h.name + '.' + src)} -> {_q(h.name + '.' + dst)};")
        names = set(h.states)
        for src, func in h.states.items():
            for dst in sorted(_moves(func, names)):
                lines.append(f"    {_q(h.name + '.' + src)} -> {_q(h.name + '.' + dst)} "
                             f"[style=dotted, label={_q('sets others')}];")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render(dot: str, output: Path) -> None:
    """Write `dot` to `output`; ``.svg``/``.png``/``.pdf`` are rendered with Graphviz."""
    fmt = output.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv", ""):
        output.write_text(dot, encoding="utf-8")
        return
    exe = shutil.which("dot")
    if exe is None:
        raise GraphError(f"rendering {output.name} needs Graphviz's 'dot' (apt-get install graphviz); "
                         "write a .dot file instead")
    proc = subprocess.run([exe, f"-T{fmt}", "-o", str(output)], input=dot, text=True,  # noqa: S603 -- argv list
                          capture_output=True, timeout=60)
    if proc.returncode != 0:
        raise GraphError(f"dot failed: {proc.stderr.strip()}")
