"""The {{NAME}} handler: a starting point.

hello@{{HOST}} answers with a friendly automatic reply, once per sender
(the framework's guards keep it from answering bounces, lists and other
robots).  Change the routes and states to build your application.
"""

from __future__ import annotations

from typing import Any

from lamsonfilter import Context, Handler

# replies="service": this handler answers requests, so a sender may get up to 10
# automatic replies an hour (REPLY_LIMIT in config/settings.py changes it).  For a
# personal responder (a vacation notice) say replies="responder": one reply per
# sender per 7 days, as RFC 3834 asks.  ctx.reply() returns False when a reply
# will not be sent (limit reached, or the sender is a robot, a list, a bounce).
handler = Handler("{{NAME}}", replies="service")


@handler.route("hello@(host)")
def START(ctx: Context, host: str) -> Any:
    """First message from this sender to this address: reply, then remember them."""
    if not ctx.reply("hello.msg", host=host):
        return None  # no reply went out (the decision's notes say why): greet them next time
    return GREETED


@handler.state
def GREETED(ctx: Context, host: str) -> Any:
    """We already answered this sender: take the mail, stay quiet."""
    ctx.data["messages"] = int(ctx.data.get("messages", 0)) + 1
    return None
