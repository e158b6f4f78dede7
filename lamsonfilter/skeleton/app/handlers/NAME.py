"""The {{NAME}} handler: a starting point.

hello@{{HOST}} answers with a friendly automatic reply, once per sender
(the framework's guards keep it from answering bounces, lists and other
robots).  Change the routes and states to build your application.
"""

from __future__ import annotations

from typing import Any

from lamsonfilter import Context, Handler

handler = Handler("{{NAME}}")


@handler.route("hello@(host)")
def START(ctx: Context, host: str) -> Any:
    """First message from this sender to this address: reply, then remember them."""
    ctx.reply("hello.msg", host=host)
    return GREETED


@handler.state
def GREETED(ctx: Context, host: str) -> Any:
    """We already answered this sender: take the mail, stay quiet."""
    ctx.data["messages"] = int(ctx.data.get("messages", 0)) + 1
    return None
