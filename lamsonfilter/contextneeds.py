"""What a `Context` needs of the objects around it, as protocols.

`lamsonfilter.context.Context` is built by `App` for one recipient with
the application, the route match and the handler.  Typing those as the
protocols below, rather than importing `App`, `RouteMatch` and `Handler`,
keeps the core's imports one-way: ``app`` -> ``fsm`` -> ``context``, never
back (tests/test_import_cycles.py).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from .guards import ReplyBudget, ReplyRateLimit
from .views import Views

__all__ = ["AppServices", "HandlerInfo", "RouteArgs"]


class AppServices(Protocol):
    """What a `Context` asks of the application (`lamsonfilter.app.App` provides it)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> Mapping[str, Any]: ...
    @property
    def views(self) -> Views: ...
    @property
    def reply_budget(self) -> ReplyBudget: ...
    def reply_limit_for(self, handler: Any) -> ReplyRateLimit: ...
    def owns(self, address: str) -> bool: ...


class HandlerInfo(Protocol):
    """What a `Context` reads of its handler (`lamsonfilter.fsm.Handler` provides it)."""

    @property
    def name(self) -> str: ...
    @property
    def states(self) -> Mapping[str, Any]: ...


class RouteArgs(Protocol):
    """What a `Context` reads of the route match (`lamsonfilter.routing.RouteMatch`)."""

    @property
    def args(self) -> dict[str, str]: ...
