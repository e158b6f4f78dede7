"""Listening addresses: the milter's --socket spec and the loopback rule (reliability S1).

Requirement tags (R2, M1, D3, ...) refer to docs/reliability.rst, which states each one.
"""

import pytest

from lamsonfilter.daemon.endpoint import (
    DEFAULT_MILTER_SOCKET,
    EndpointError,
    is_loopback,
    parse_milter_socket,
)


def test_unix_socket() -> None:
    s = parse_milter_socket("unix:/run/lamsonfilter/milter.sock")
    assert (s.kind, s.path) == ("unix", "/run/lamsonfilter/milter.sock")
    assert s.libmilter == s.postfix == "unix:/run/lamsonfilter/milter.sock"
    assert parse_milter_socket("local:/tmp/m.sock").libmilter == "unix:/tmp/m.sock"
    assert parse_milter_socket(DEFAULT_MILTER_SOCKET).kind == "unix"


def test_inet_defaults_to_loopback_and_converts_to_postfix_syntax() -> None:
    s = parse_milter_socket("inet:8891")
    assert (s.kind, s.host, s.port) == ("inet", "127.0.0.1", 8891)
    assert s.libmilter == "inet:8891@127.0.0.1" and s.postfix == "inet:127.0.0.1:8891"
    s6 = parse_milter_socket("inet6:8891@[::1]")
    assert s6.libmilter == "inet6:8891@::1" and s6.postfix == "inet:[::1]:8891"
    assert parse_milter_socket("inet:8891@localhost").host == "localhost"


@pytest.mark.parametrize("spec", ["inet:8891@192.0.2.1", "inet:8891@0.0.0.0", "inet6:8891@::",
                                  "inet:8891@mail.example.org"])
def test_non_loopback_is_refused_unless_asked_for(spec: str) -> None:
    with pytest.raises(EndpointError, match="--allow-remote"):
        parse_milter_socket(spec)
    assert parse_milter_socket(spec, allow_remote=True).port == 8891


@pytest.mark.parametrize("spec, why", [
    ("tcp:8891@127.0.0.1", "expected unix:/path"),
    ("inet:@127.0.0.1", "expected unix:/path"),
    ("inet:70000@127.0.0.1", "out of range"),
    ("unix:relative.sock", "absolute"),
    ("unix:/" + "x" * 120, "longer than"),
])
def test_bad_specs_say_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(EndpointError, match=why):
        parse_milter_socket(spec)


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("192.0.2.1", "0.0.0.0", "::", "example.org"))


def test_every_listener_uses_the_one_loopback_rule() -> None:
    """The milter socket, the content filter's listeners and the metrics endpoint: one `is_loopback`."""
    from lamsonfilter.contentfilter import server
    from lamsonfilter.daemon import metrics

    assert server.is_loopback is is_loopback and metrics.is_loopback is is_loopback
    assert is_loopback("localhost.localdomain") and is_loopback("[::1]") and is_loopback("127.0.0.2")
    assert not is_loopback("192.0.2.1") and not is_loopback("example.org")
