"""Routes: compiled once, captures as arguments, mistakes refused at start-up."""

import subprocess
import sys
import time

import pytest

from lamsonfilter import App, Handler, stateless
from lamsonfilter.app import StartupError
from lamsonfilter.routing import Router, RoutingError, check_regex, unbound_parameters


def make():
    r = Router(defaults={"host": r"lists\.example\.org"})
    r.add("(list)-subscribe@(host)", target="sub", list=r"[a-z0-9][a-z0-9.]*")
    r.add("(list)@(host)", target="post", list=r"[a-z0-9][a-z0-9.]*")
    r.freeze()
    return r


def test_named_captures_and_case_insensitive_full_match():
    m = make().match("Python-Subscribe@LISTS.example.org")
    assert m is not None and m.route.target == "sub"
    assert m.args == {"list": "Python", "host": "LISTS.example.org"}


def test_first_route_wins_and_matches_lists_all():
    r = make()
    assert r.match("python@lists.example.org").route.target == "post"
    assert r.match("python-subscribe@lists.example.org.evil") is None
    assert [m.route.target for m in r.matches("python-subscribe@lists.example.org")] == ["sub"]


def test_duplicate_route_is_a_startup_error_naming_it():
    r = Router()
    r.add("(a)@example.org", target=1)
    with pytest.raises(RoutingError, match=r"\(A\)@EXAMPLE.org.*duplicate of the route for \(a\)@example.org"):
        r.add("(A)@EXAMPLE.org", target=2)


@pytest.mark.parametrize("rx", [r"(a+)+", r"(\w+\.?)+", r"(a|aa)*", r"(x*y?)*"])
def test_catastrophic_patterns_are_refused(rx):
    r = Router()
    with pytest.raises(RoutingError, match="catastrophic backtracking"):
        r.add("(user)@example.org", target=1, user=rx)


# A bounded repeat is as variable as an unbounded one: `(\w{1,30}\.?)+` splits a
# 39-character near miss in 2**38 ways (seconds per address), so it is refused too.
BOUNDED_INSIDE = [r"(\w{1,30}\.?)+", r"(a{1,3})*", r"(?:x\w?){2,}", r"([a-z0-9]{1,63}-?)+", r"(\d{0,3}\.?)*",
                  # a bounded outer repeat multiplies too: 3.4 s for a 25-character near miss
                  r"(\w{1,30}\.?){1,40}", r"(?:[a-z]+\.?){2,10}", r"(\w+){40}"]


@pytest.mark.parametrize("rx", BOUNDED_INSIDE)
def test_bounded_nested_repeats_are_refused(rx):
    with pytest.raises(RoutingError, match="catastrophic backtracking"):
        Router().add("(user)@example.org", target=1, user=rx)


def test_a_bounded_inner_repeat_in_route_defaults_stops_app_start():
    h = Handler("users")

    @h.route("(user)@example.org")
    @stateless
    def ANY(ctx, user):
        ctx.deliver()

    app = App(hosts=["example.org"], handlers=[h], route_defaults={"user": r"(\w{1,30}\.?)+"})

    with pytest.raises(StartupError, match=r"route default 'user'.*catastrophic backtracking"):
        app.start()


def test_a_dangerous_route_default_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    lf = [sys.executable, "-m", "lamsonfilter"]
    app = tmp_path / "demo"
    subprocess.run([*lf, "gen", "demo", "--dest", str(app)], check=True, capture_output=True, timeout=60)
    with (app / "config" / "settings.py").open("a") as f:
        f.write('\nROUTE_DEFAULTS = {"host": r"(\\w{1,30}\\.?)+"}\n')
    r = subprocess.run([*lf, "routes", "--app", str(app)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("lamsonfilter: route default 'host':") and "catastrophic backtracking" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_fixed_repeats_inside_a_repeat_pass():
    for rx in [r"(\w{2})+", r"(?:[0-9a-f]{4}-)+[0-9a-f]{4}", r"(\w{1,30}\.)?x", r"(?:[a-z]+\.)?[a-z]+"]:
        check_regex(rx, "test")


def test_safe_patterns_pass():
    for rx in [r"[a-z0-9][a-z0-9.]*", r"[^@\s]+", r"(?:python|announce)", r"[0-9a-f]{32}", r"a{2,5}"]:
        check_regex(rx, "test")


def test_invalid_regex_names_the_route():
    with pytest.raises(RoutingError, match=r"route '\(u\)@x.org'.*invalid regular expression"):
        Router().add("(u)@x.org", target=1, u="[a-")


def test_route_needs_an_at_sign_and_known_captures():
    with pytest.raises(RoutingError, match="needs an '@'"):
        Router().add("nothing", target=1)
    with pytest.raises(RoutingError, match="does not capture"):
        Router().add("(a)@x.org", target=1, b="x")


def test_frozen_router_refuses_new_routes():
    r = make()
    with pytest.raises(RoutingError, match="after the router was frozen"):
        r.add("new@x.org", target=1)


def test_hostile_recipient_is_answered_quickly():
    # the default capture is linear; a 300-character near miss must not backtrack
    r = make()
    addr = "a" * 250 + "-subscribe@lists.example.org!"
    start = time.process_time()
    for _ in range(100):
        assert r.match(addr) is None
    # 100 matches of a linear pattern take microseconds; exponential would take years
    assert time.process_time() - start < 5


def test_overlong_address_matches_nothing():
    assert make().match("a" * 400 + "@lists.example.org") is None


# ---------------------------------------------------------------- route captures vs. state signatures


def _typo_handler(pattern):
    h = Handler("lists")

    @h.route(pattern)
    def START(ctx, list):
        return None

    @h.state
    def MEMBER(ctx, list, token=""):
        return None

    return h


def test_a_capture_typo_is_refused_at_startup_naming_route_and_parameter():
    app = App(hosts=["example.org"], handlers=[_typo_handler("(lsit)-subscribe@(host)")])
    with pytest.raises(StartupError) as err:
        app.start()
    text = str(err.value)
    assert "(lsit)-subscribe@(host)" in text and "'list'" in text
    assert "START" in text and "MEMBER" in text  # every state the route can reach


def test_matching_captures_start_and_are_passed():
    app = App(hosts=["example.org"], handlers=[_typo_handler("(list)-subscribe@(host)")]).start()
    assert app.match("py-subscribe@example.org").args["list"] == "py"


def test_stateless_route_is_checked_against_its_own_function_only():
    h = Handler("help")

    @h.route("(list)-help@(host)")
    @stateless
    def HELP(ctx, list):
        return None

    @h.route("bounce-(member)@(host)")
    @stateless
    def BOUNCE(ctx, member, **rest):
        return None

    App(handlers=[h]).start()  # neither needs what the other route captures

    h2 = Handler("help2")

    @h2.route("help@(host)")
    @stateless
    def HELP2(ctx, list):
        return None

    with pytest.raises(StartupError, match="'help@\\(host\\)' does not capture 'list'"):
        App(handlers=[h2]).start()


def test_unbound_parameters_ignores_defaults_and_var_arguments():
    def f(ctx, a, b="", *args, c, d=1, **kw):
        return None

    assert unbound_parameters(f, "(a)@(host)") == ["c"]
    assert unbound_parameters(f, "(a)-(c)@(host)") == []
