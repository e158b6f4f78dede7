"""Application directories: loading ``config/settings.py`` and the handler modules into an `App`.

An application lives in a directory (``lamsonfilter gen NAME`` makes one):

    NAME/
      app/handlers/       one module per concern; each defines ``handler = Handler(...)``
      app/models.py       optional: SQLAlchemy models on ``Base`` (`lamsonfilter.models`)
      app/templates/      Mako reply templates
      config/settings.py  HOSTS, HANDLERS, DATABASE_URL, RELAY, ...
      tests/              the application's own tests (lamsonfilter.testing)

`load_app(directory, overrides)` imports it under a private package name (so
two applications can live in one process, e.g. in tests), applies the
command line's overrides, validates every setting, builds the `App` and
starts it.  Any problem raises `SettingsError` (or `StartupError`) with a
message naming the file and the setting.

Settings (all optional but HANDLERS):

=================  ===============================================  ==========================
name               meaning                                          default
=================  ===============================================  ==========================
NAME               the application's name (logs, generated mail)    the directory name
HOSTS              domains the application owns (unroutable → 550)  ``[]``
HANDLERS           modules in ``app/handlers/`` to load             required
ROUTE_DEFAULTS     regexes for captures used by many routes         ``host`` = any of HOSTS
DATABASE_URL       SQLAlchemy URL of the state store; ``memory:``   ``sqlite:///var/state.db``
                   relative SQLite paths are relative to the app
                   (SQLite without a file, ``sqlite://``, is refused)
RELAY              ``HOST:PORT`` where the outbox is sent            ``127.0.0.1:10026``
TEMPLATES          template directories, relative to the app        ``["app/templates"]``
REPLY_LIMIT        (replies, seconds) per handler and sender: a     by the handler's kind:
                   pair for every handler, or a dict by handler     ``service`` (10, 3600),
                   name or kind (``Handler(replies=...)``)          ``responder`` (1, 604800)
REPLY_BUDGET       (replies, replies to one domain) per minute      ``(300, 30)``
MAX_HOPS           Received: headers before a loop is assumed       ``30``
                   (below Postfix's hopcount_limit of 50)
METRICS            ``HOST:PORT`` of the Prometheus endpoint of the  none (no endpoint)
                   daemons (loopback only)
REPLAY_TTL         seconds a committed decision is kept, so that    ``604800`` (7 days)
                   the MTA's retry of the message replays it
POISON_LIMIT       content filter: attempts at one message that     ``5``
                   crashed or timed out before it is quarantined
                   (``0``: never; reliability R15, lamsonfilter.daemon.poison);
                   ``deq``: failed attempts (tempfails, dead claims)
QUEUE              the Maildir queue ``lamsonfilter deq`` works     ``var/queue``
                   through (``--queue``); relative to the app
QUEUE_LEASE        seconds a ``deq`` worker's claim on a queued     ``300``
                   message lasts: a dead worker's claims are
                   taken back after it; the handlers' deadline is
                   half of it, a send through RELAY starts only
                   while a quarter is left
OUTBOX_LEASE       seconds an outbox worker's claim on a message    ``300``
                   lasts: a dead worker's claims are taken over
                   after it; longer than any SMTP transaction to
                   RELAY (docs/several-hosts.rst)
OUTBOX_JOURNAL     directory of the outbox senders' sent journals   beside a SQLite database
                   (lamsonfilter.sentjournal): local and writable,  file (``outbox-sent``),
                   relative to the app                              else ``var/outbox-sent``
=================  ===============================================  ==========================

Names in capitals are settings.  An application may add its own (the
example list has ``LISTS``); a name that is close to one of lamsonfilter's
(``HANDLRES``, ``REPLY_LIMITS``, ``Hosts``) is refused at start-up with
"did you mean HANDLERS?", because a misspelt setting would otherwise be
ignored in silence.  An application setting that must have such a name is
listed in ``OWN_SETTINGS = ["HOST"]``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

from .app import App, StartupError
from .apppackage import AppPackageError, import_app_package, package_name, unload
from .fsm import Handler
from .guards import REPLY_KINDS, ReplyBudget, ReplyRateLimit
from .memorystore import MemoryStorage
from .models import load_models
from .state import SchemaMissingError, StateStorage
from .views import ViewError, Views

__all__ = [
    "load_app", "load_settings", "SettingsError", "DatabaseMissingError", "make_storage", "DEFAULTS",
    "parse_hostport", "resolve_database_url", "sqlite_path", "queue_dir", "journal_dir",
]


class DatabaseMissingError(SchemaMissingError, StartupError):
    """The SQLite file of DATABASE_URL does not exist: the application cannot start until ``db init``."""


class SettingsError(StartupError):
    """A setting that is missing, of the wrong type, or pointing nowhere."""


DEFAULTS: dict[str, Any] = {
    "HOSTS": [],
    "ROUTE_DEFAULTS": {},
    "DATABASE_URL": "sqlite:///var/state.db",
    "RELAY": "127.0.0.1:10026",
    "TEMPLATES": ["app/templates"],
    "REPLY_LIMIT": dict(REPLY_KINDS),
    "REPLY_BUDGET": (300, 30),
    "MAX_HOPS": 30,
    "REPLAY_TTL": 7 * 24 * 3600,
    "METRICS": None,
    "POISON_LIMIT": 5,
    "OUTBOX_LEASE": 300,
    "OUTBOX_JOURNAL": None,
    "QUEUE": "var/queue",
    "QUEUE_LEASE": 300,
}


def load_settings(directory: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read ``config/settings.py`` of an application directory, apply overrides, validate."""
    root = Path(directory).resolve()
    path = root / "config" / "settings.py"
    if not root.is_dir():
        raise SettingsError(f"{directory}: no such application directory")
    if not path.is_file():
        raise SettingsError(f"{path}: missing; an application directory needs config/settings.py "
                            "(lamsonfilter gen NAME makes one)")
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "lamsonfilter_settings"}
    try:
        code = compile(path.read_text(encoding="utf-8"), str(path), "exec")
        exec(code, namespace)  # noqa: S102 -- the application's own configuration file
    except Exception as exc:
        raise SettingsError(f"{path}: {type(exc).__name__}: {exc}") from exc
    _refuse_misspelt_names(namespace, path)
    values = dict(DEFAULTS)
    values["NAME"] = root.name
    values.update({k: v for k, v in namespace.items() if k.isupper()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values["APP_DIR"] = str(root)
    _validate(values, path)
    return values


#: Setting names lamsonfilter reads besides `DEFAULTS`.
OTHER_SETTINGS = ("NAME", "HANDLERS", "OWN_SETTINGS")


def known_settings() -> list[str]:
    """Every setting name lamsonfilter itself reads."""
    return sorted({*DEFAULTS, *OTHER_SETTINGS})


def _refuse_misspelt_names(namespace: Mapping[str, Any], path: Path) -> None:
    """Refuse a name in capitals that is not a setting but close to one (``HANDLRES``).

    Names far from every setting are the application's own (``LISTS``);
    names the application lists in ``OWN_SETTINGS`` are never refused.  A
    name in mixed case that is a setting in capitals (``Hosts``) is refused
    too: it would be ignored.  Lower-case names are the file's own helpers.
    """
    known = known_settings()
    own = namespace.get("OWN_SETTINGS", ())
    if isinstance(own, str) or not isinstance(own, (list, tuple)) or not all(isinstance(x, str) for x in own):
        raise SettingsError(f"{path}: OWN_SETTINGS must be a list of setting names, not {own!r}")
    for name in namespace:
        if name.startswith("_") or name in known or name in own:
            continue
        if not name.isupper():
            if not name.islower() and name.upper() in known:  # "Hosts"; "hosts" is a helper variable
                raise SettingsError(f"{path}: {name} is not a setting (settings are in capitals); "
                                    f"did you mean {name.upper()}?")
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
        if close:
            raise SettingsError(
                f"{path}: unknown setting {name}; did you mean {close[0]}? "
                f"(if {name} is the application's own, list it in OWN_SETTINGS)"
            )


def _validate(values: dict[str, Any], path: Path) -> None:
    def fail(name: str, why: str) -> None:
        raise SettingsError(f"{path}: {name} {why}")

    if "HANDLERS" not in values:
        fail("HANDLERS", "is required: a list of module names in app/handlers/")
    for name in ("HOSTS", "HANDLERS", "TEMPLATES"):
        v = values[name]
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            fail(name, f"must be a list of strings, not {v!r}")
    for host in values["HOSTS"]:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            fail("HOSTS", f"contains {host!r}, which is not a domain name")
    if not isinstance(values["ROUTE_DEFAULTS"], dict):
        fail("ROUTE_DEFAULTS", "must be a dict of capture name to regex")
    if not isinstance(values["DATABASE_URL"], str) or not values["DATABASE_URL"]:
        fail("DATABASE_URL", "must be a SQLAlchemy URL such as sqlite:///var/state.db, or memory:")
    if _sqlite_in_memory(values["DATABASE_URL"]):
        fail("DATABASE_URL", f"{values['DATABASE_URL']!r} is a SQLite database in memory, with no file: "
             "nothing would be kept (db init would make the schema and lose it); give a file, such as "
             "sqlite:///var/state.db, or memory: for state in this process only")
    try:
        parse_hostport(values["RELAY"])
    except ValueError as exc:
        fail("RELAY", str(exc))
    if values["METRICS"] is not None:
        try:
            parse_hostport(values["METRICS"])
        except ValueError as exc:
            fail("METRICS", str(exc))
    rl = values["REPLY_LIMIT"]
    for what, pair in (rl.items() if isinstance(rl, dict) else [("", rl)]):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in pair)):
            fail("REPLY_LIMIT", f"must be (replies, seconds) with positive numbers, or a dict of them by "
                                f"handler name or kind (service, responder), not {pair!r}"
                                + (f" for {what!r}" if what else ""))
        if what and not isinstance(what, str):
            fail("REPLY_LIMIT", f"keys are handler names or kinds (service, responder), not {what!r}")
    rb = values["REPLY_BUDGET"]
    if not (isinstance(rb, (list, tuple)) and len(rb) == 2 and all(isinstance(x, int) and x > 0 for x in rb)):
        fail("REPLY_BUDGET", f"must be (replies per minute, replies per minute to one domain), not {rb!r}")
    if not isinstance(values["MAX_HOPS"], int) or values["MAX_HOPS"] < 1:
        fail("MAX_HOPS", "must be a positive integer")
    pl = values["POISON_LIMIT"]
    if not isinstance(pl, int) or isinstance(pl, bool) or pl < 0:
        fail("POISON_LIMIT", f"must be a number of attempts (0: never quarantine), not {pl!r}")
    if not isinstance(values["REPLAY_TTL"], (int, float)) or values["REPLAY_TTL"] < 3600:
        fail("REPLAY_TTL", "must be a number of seconds, at least 3600 (longer than the MTA retries)")
    lease = values["OUTBOX_LEASE"]
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < float("inf"):
        fail("OUTBOX_LEASE", f"must be a positive number of seconds (300: five minutes), not {lease!r}")
    journal = values["OUTBOX_JOURNAL"]
    if journal is not None and (not isinstance(journal, str) or not journal.strip()):
        fail("OUTBOX_JOURNAL", f"must be a directory (absolute, or relative to the application), not {journal!r}")
    queue = values["QUEUE"]
    if not isinstance(queue, str) or not queue.strip():
        fail("QUEUE", f"must be a directory (absolute, or relative to the application), not {queue!r}")
    lease = values["QUEUE_LEASE"]
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not 0 < lease < float("inf"):
        fail("QUEUE_LEASE", f"must be a positive number of seconds (300: five minutes), not {lease!r}")


def parse_hostport(value: Any, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``PORT`` → (host, port); ValueError naming the value."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be HOST:PORT, not {value!r}")
    m = re.fullmatch(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)|(?P<only>\d+)", value)
    if not m:
        raise ValueError(f"must be HOST:PORT, not {value!r}")
    port = int(m.group("port") or m.group("only"))
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range in {value!r}")
    host = m.group("v6") or m.group("host") or default_host
    return host, port


def resolve_database_url(url: str, app_dir: str | Path | None) -> str:
    """`url` with a relative SQLite path made absolute against the application directory.

    ``sqlite:///var/state.db`` (three slashes) is ``var/state.db`` *inside the
    application*; ``sqlite:////var/lib/lamsonfilter/state.db`` (four) is absolute.
    Every command resolves it here, so ``db init``, ``check`` and the daemons
    name (and open) the same file, and messages show the absolute form.
    """
    if app_dir is None or not url.startswith("sqlite:///") or url.startswith("sqlite:////"):
        return url
    path = sqlite_path(url, app_dir)
    if path is None:
        return url
    query = url.partition("?")[2]
    return f"sqlite:///{Path(path).absolute()}" + (f"?{query}" if query else "")


def queue_dir(settings: Mapping[str, Any]) -> Path:
    """The queue's directory: the QUEUE setting, a relative one inside the application."""
    path = Path(settings.get("QUEUE") or DEFAULTS["QUEUE"])
    app_dir = settings.get("APP_DIR")
    return path if path.is_absolute() or app_dir is None else Path(app_dir) / path


def journal_dir(settings: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the outbox senders keep their sent journals (`lamsonfilter.sentjournal`): the
    OUTBOX_JOURNAL setting (relative: inside the application); by default ``outbox-sent``
    beside a SQLite database's file (writable wherever the database is: SQLite writes its
    own journal there), else in systemd's state directory (``$STATE_DIRECTORY``, set by the
    shipped units' ``StateDirectory=lamsonfilter``: ``/var/lib/lamsonfilter/outbox-sent``),
    else ``APP/var/outbox-sent``.  None for the ``memory:`` store, which dies with the
    process anyway."""
    app_dir = settings.get("APP_DIR")
    url = str(settings.get("DATABASE_URL") or DEFAULTS["DATABASE_URL"])
    if url in ("memory:", "memory://"):
        return None
    value = settings.get("OUTBOX_JOURNAL")
    if value:
        path = Path(value)
        return path if path.is_absolute() or app_dir is None else Path(app_dir) / path
    db = sqlite_path(resolve_database_url(url, app_dir), app_dir or ".")
    if db is not None:
        return db.absolute().parent / "outbox-sent"
    state_dirs = (os.environ if environ is None else environ).get("STATE_DIRECTORY", "")
    if state_dirs:  # systemd: colon-separated when a unit names several; the first is ours
        return Path(state_dirs.split(":")[0]) / "outbox-sent"
    return None if app_dir is None else Path(app_dir) / "var" / "outbox-sent"


def make_storage(url: str, app_dir: str | Path | None = None) -> StateStorage:
    """A storage for a URL: ``memory:`` or a SQLAlchemy URL (relative SQLite paths resolve against the app)."""
    if url in ("memory:", "memory://"):
        return MemoryStorage()
    resolved = resolve_database_url(url, app_dir)
    path = sqlite_path(resolved, app_dir) if app_dir is not None else None
    if path is not None and app_dir is not None and Path(app_dir).absolute() in path.parents:
        path.parent.mkdir(parents=True, exist_ok=True)  # APP/var belongs to the application
    from .store.sql import SQLAlchemyStorage

    return SQLAlchemyStorage(resolved)


def _sqlite_in_memory(url: str) -> bool:
    """``sqlite://``, ``sqlite:///`` or ``sqlite:///:memory:``: SQLite without a file."""
    if not url.startswith("sqlite:"):
        return False
    rest = url[len("sqlite:"):].split("?", 1)[0]
    return rest in ("", "//", "///", "//:memory:", "///:memory:")


def sqlite_path(url: str, app_dir: str | Path) -> Path | None:
    """The file of a SQLite URL (resolved like `make_storage`), or None for other databases."""
    if not url.startswith("sqlite:///"):
        return None
    rel = url[len("sqlite:///"):].split("?", 1)[0]
    if not rel or rel == ":memory:":
        return None
    return Path(rel) if rel.startswith("/") else Path(app_dir) / rel


def _import_app_package(root: Path) -> str:
    """Import ``root/app`` under a private name; return that name."""
    try:
        return import_app_package(root)
    except AppPackageError as exc:
        raise SettingsError(str(exc)) from None


def load_handlers(root: Path, modules: list[str], reload: bool = False) -> list[Handler]:
    """Import each handler module and collect its `Handler` objects."""
    if reload:
        unload(package_name(root))
    pkg = _import_app_package(root)
    found: list[Handler] = []
    for mod_name in modules:
        full = f"{pkg}.handlers.{mod_name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name in (full, f"{pkg}.handlers"):
                raise SettingsError(
                    f"{root}/config/settings.py: HANDLERS names {mod_name!r}, but there is no "
                    f"app/handlers/{mod_name}.py"
                ) from None
            raise SettingsError(f"app/handlers/{mod_name}.py: {exc}") from exc
        except Exception as exc:
            raise SettingsError(f"app/handlers/{mod_name}.py: {type(exc).__name__}: {exc}") from exc
        handlers = [v for v in vars(module).values() if isinstance(v, Handler)]
        if not handlers:
            raise SettingsError(f"app/handlers/{mod_name}.py defines no Handler (handler = Handler(...))")
        found.extend(h for h in handlers if h not in found)
    return found


def load_app(
    directory: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    storage: StateStorage | None = None,
    reload: bool = False,
) -> App:
    """Build and start the `App` of an application directory."""
    settings = load_settings(directory, overrides)
    root = Path(settings["APP_DIR"])
    if reload:
        unload(package_name(root))
    models = load_models(root)  # first: the handlers import it
    handlers = load_handlers(root, list(settings["HANDLERS"]))
    route_defaults = dict(settings["ROUTE_DEFAULTS"])
    if "host" not in route_defaults and settings["HOSTS"]:
        route_defaults["host"] = "|".join(re.escape(h) for h in settings["HOSTS"])
        if len(settings["HOSTS"]) > 1:
            route_defaults["host"] = f"(?:{route_defaults['host']})"
    dirs = [root / d for d in settings["TEMPLATES"]]
    try:
        views = Views(dirs) if dirs else None
    except ViewError as exc:
        raise SettingsError(f"{root}/config/settings.py: TEMPLATES: {exc}") from exc
    if storage is None:
        missing = sqlite_path(settings["DATABASE_URL"], root)
        if missing is not None and not missing.exists():
            # connecting would leave an empty file behind, which later reads as "no schema"
            given = (overrides or {}).get("DATABASE_URL")
            raise DatabaseMissingError(
                f"the state database {missing} does not exist yet; run `lamsonfilter db init --app {root}"
                + (f" --database {resolve_database_url(given, root)}`" if given else "`")
            )
        storage = make_storage(settings["DATABASE_URL"], root)
    reply_limit, reply_limits = _reply_limits(settings["REPLY_LIMIT"], handlers)
    app = App(
        name=settings["NAME"],
        hosts=settings["HOSTS"],
        handlers=handlers,
        storage=storage,
        views=views,
        route_defaults=route_defaults,
        settings=settings,
        reply_limit=reply_limit,
        reply_limits=reply_limits,
        reply_budget=ReplyBudget(*settings["REPLY_BUDGET"]),
        max_hops=settings["MAX_HOPS"],
        models=models,
    )
    return app.start()


def _reply_limits(
    setting: Any, handlers: list[Handler]
) -> tuple[ReplyRateLimit | None, dict[str, ReplyRateLimit]]:
    """REPLY_LIMIT as (one limit for every handler, limits by handler name or kind)."""
    if not isinstance(setting, dict):
        limit, period = setting
        return ReplyRateLimit(int(limit), float(period)), {}
    names = {h.name for h in handlers} | set(REPLY_KINDS)
    for key in setting:
        if key not in names:
            raise SettingsError(
                f"REPLY_LIMIT names {key!r}, which is neither a handler of this application "
                f"({', '.join(sorted(h.name for h in handlers))}) nor a kind (service, responder)"
            )
    return None, {key: ReplyRateLimit(int(n), float(period)) for key, (n, period) in setting.items()}
