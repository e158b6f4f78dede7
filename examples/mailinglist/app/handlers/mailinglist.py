"""A mailing list, Lamson's classic, as a lamsonfilter state machine.

Addresses (LIST is one of settings.LISTS, HOST one of settings.HOSTS):

=============================  ===========================================
LIST-subscribe@HOST            asks for a confirmation (a reply to
                               LIST-confirm-TOKEN@HOST: the confirmation
                               engine's 128-bit token, bound to the
                               sender, single use, expires after
                               CONFIRM_TTL)
LIST-confirm-TOKEN@HOST        confirms: the sender becomes a member
LIST-unsubscribe@HOST          asks a member to confirm leaving (a reply
                               to LIST-leave-TOKEN@HOST, as above), so a
                               forged sender unsubscribes nobody
LIST-leave-TOKEN@HOST          confirms: the member leaves the list
LIST@HOST                      a post: members' posts go to every member;
                               others get a polite refusal
LIST-bounce-MEMBER@HOST        VERP bounce address of list mail: permanent
                               bounces and complaint reports count against
                               MEMBER, who is disabled after BOUNCE_LIMIT
                               of them
LIST-anything@HOST, help@HOST  a help reply
=============================  ===========================================

One conversation per (list, sender): START → PENDING → MEMBER, back to
START on a confirmed unsubscribe, DISABLED after too many bounces.

The tokens are `lamsonfilter.confirm`'s (``ctx.confirmations``): kept in
the state database (only their SHA-256), so the answer may reach any
filter host sharing it; the kinds are ``subscribe:LIST`` and
``leave:LIST``, so a token of one list or step confirms nothing else.

Every step that mails a token checks that the mail will be sent
(``ctx.reply`` returns False when the sender had its share of replies, or
is a robot): a subscribe whose confirmation is not sent leaves the sender
where it was, with a note in the decision, instead of waiting for a token
nobody received.
"""

from __future__ import annotations

from typing import Any

from lamsonfilter import Context, Handler, stateless
from lamsonfilter.confirm import TOKEN_PATTERN, ConfirmStatus

handler = Handler("mailinglist", key=lambda ctx: (ctx.args["list"].lower(), ctx.sender.lower()))

TOKEN = TOKEN_PATTERN  # 32 hex digits: the confirmation engine's tokens


def _list_info(ctx: Context, list: str) -> dict[str, Any]:
    host = ctx.recipient.rpartition("@")[2].lower()
    name = list.lower()
    return {
        "list": name,
        "host": host,
        "title": ctx.settings["LISTS"].get(name, name),
        "post_addr": f"{name}@{host}",
        "subscribe_addr": f"{name}-subscribe@{host}",
        "unsubscribe_addr": f"{name}-unsubscribe@{host}",
    }


def _ask_confirmation(ctx: Context, list: str) -> Any:
    """Mail a subscription token and wait in PENDING; stay put when the mail cannot go.

    A new request cancels the sender's earlier one (the engine's default).
    """
    info = _list_info(ctx, list)
    asked = ctx.confirmations.ask(
        f"subscribe:{info['list']}",
        template="confirm.msg",
        expires=ctx.settings["CONFIRM_TTL"],
        address=f"{info['list']}-confirm-{{token}}@{info['host']}",
        subject=f"Confirm your subscription to {info['list']}@{info['host']}",
        data={"list": info["list"]},
        **info,
    )
    if asked is None:  # the reason is in the decision's notes already
        ctx.note(f"no confirmation sent: {ctx.sender or '<>'} stays in {ctx.state}")
        return None
    ctx.data["expires"] = asked.expires_at
    return PENDING


def _ask_to_leave(ctx: Context, list: str) -> Any:
    """Mail a token for leaving to the member: only the member can confirm it."""
    info = _list_info(ctx, list)
    asked = ctx.confirmations.ask(
        f"leave:{info['list']}",
        template="confirm_leave.msg",
        expires=ctx.settings["CONFIRM_TTL"],
        address=f"{info['list']}-leave-{{token}}@{info['host']}",
        subject=f"Confirm leaving {info['list']}@{info['host']}",
        **info,
    )
    if asked is None:
        ctx.note(f"no confirmation sent: {ctx.sender} stays subscribed")
    return None


def _verified(ctx: Context, kind: str, list: str, token: str) -> bool:
    """Whether `token` confirms `kind` for this sender (using it up); if not, say so."""
    result = ctx.confirmations.verify(kind, token)
    if result.status is ConfirmStatus.OK:
        return True
    ctx.note(f"confirmation {kind} refused: {result.status.value}")
    _refuse(ctx, list, "bad_confirm.msg")
    return False


def _confirm_leaving(ctx: Context, list: str, token: str) -> Any:
    """LIST-leave-TOKEN: the member's own token, unexpired, once: forget them, say goodbye."""
    info = _list_info(ctx, list)
    if not _verified(ctx, f"leave:{info['list']}", list, token):
        return None
    ctx.data = {}
    ctx.reply("goodbye.msg", subject=f"You left {info['list']}@{info['host']}",
              from_addr=info["post_addr"], **info)
    return START


def _refuse(ctx: Context, list: str, template: str) -> None:
    ctx.reply(template, **_list_info(ctx, list))


@handler.route("(list)@(host)", event="post")
@handler.route("(list)-subscribe@(host)", event="subscribe")
@handler.route("(list)-unsubscribe@(host)", event="unsubscribe")
@handler.route("(list)-confirm-(token)@(host)", event="confirm", token=TOKEN)
@handler.route("(list)-leave-(token)@(host)", event="leave", token=TOKEN)
def START(ctx: Context, list: str) -> Any:
    """Not a member."""
    if ctx.event == "subscribe":
        return _ask_confirmation(ctx, list)
    if ctx.event == "post":
        _refuse(ctx, list, "not_member.msg")
    elif ctx.event == "unsubscribe":
        _refuse(ctx, list, "not_subscribed.msg")
    elif ctx.event in ("confirm", "leave"):
        _refuse(ctx, list, "bad_confirm.msg")
    return None


@handler.state
def PENDING(ctx: Context, list: str, token: str = "") -> Any:
    """Asked to subscribe; waiting for the confirmation."""
    if ctx.event == "confirm":
        info = _list_info(ctx, list)
        if not _verified(ctx, f"subscribe:{info['list']}", list, token):
            return None
        ctx.data = {"joined": ctx.now, "bounces": 0}
        # a message of its own, from the list's address (not "Re:" from the used token address)
        ctx.reply("welcome.msg", subject=f"Welcome to {info['list']}@{info['host']}",
                  from_addr=info["post_addr"], **info)
        return MEMBER
    if ctx.event == "subscribe":
        return _ask_confirmation(ctx, list)  # a new token; the old one is cancelled once it is sent
    if ctx.event == "unsubscribe":
        _refuse(ctx, list, "not_subscribed.msg")  # the request expires by itself
        return None
    if ctx.event == "leave":
        _refuse(ctx, list, "bad_confirm.msg")
        return None
    _refuse(ctx, list, "not_member.msg")
    return None


@handler.state
def MEMBER(ctx: Context, list: str, token: str = "") -> Any:
    """Subscribed: may post."""
    if ctx.event == "post":
        _post(ctx, list)
        return None
    if ctx.event == "unsubscribe":
        return _ask_to_leave(ctx, list)
    if ctx.event == "leave":
        return _confirm_leaving(ctx, list, token)
    _refuse(ctx, list, "already_member.msg")
    return None


@handler.state
def DISABLED(ctx: Context, list: str, token: str = "") -> Any:
    """Too many bounces: receives nothing, may subscribe again."""
    if ctx.event == "subscribe":
        return _ask_confirmation(ctx, list)
    if ctx.event == "unsubscribe":
        return _ask_to_leave(ctx, list)
    if ctx.event == "leave":
        return _confirm_leaving(ctx, list, token)
    _refuse(ctx, list, "disabled.msg")
    return None


def _post(ctx: Context, list: str) -> None:
    """Send the post to every member, each copy with its own VERP bounce address."""
    info = _list_info(ctx, list)
    members = [key.split(":", 1)[1] for key, _rec in ctx.find(f"{info['list']}:", state="MEMBER")]
    list_headers = (
        f"List-Id: {info['title']} <{info['list']}.{info['host']}>\r\n"
        f"List-Post: <mailto:{info['post_addr']}>\r\n"
        f"List-Unsubscribe: <mailto:{info['unsubscribe_addr']}>\r\n"
        "Precedence: list\r\n"
    ).encode()
    # The member's copy is the original message with list headers in front:
    # the original bytes stay as they were (signatures of the poster survive).
    copy = list_headers + ctx.request.raw
    for member in members:
        verp = f"{info['list']}-bounce-{member.replace('@', '=')}@{info['host']}"
        # confirmed: members opted in; a post naming one of them (Reply-To) still reaches them
        ctx.send(copy, sender=verp, recipients=[member], confirmed=True)


@handler.route("(list)-bounce-(member)@(host)", member=r"[^@\s]+=[^@\s=]+")
@stateless
def BOUNCE(ctx: Context, list: str, member: str) -> None:
    """A bounce of list mail, or a complaint about it: count permanent failures and
    complaints (ARF or a feedback loop such as Outlook.com's) against the member."""
    address = "@".join(member.rsplit("=", 1)).lower()
    found = ctx.automated  # what kind of automated mail: "bounce", "feedback-report", ...
    report = found.report if found is not None else None
    if report is None or not (report.permanent or found.kind == "feedback-report"):
        return  # neither a permanent failure nor a complaint: ignore, never reply
    failed = {r.address.lower() for r in report.recipients}
    if failed and address not in failed:
        return  # the report is about somebody else
    key = f"{list.lower()}:{address}"
    record = ctx.get_state(key)
    if record is None or record.state != "MEMBER":
        return
    bounces = int(record.data.get("bounces", 0)) + 1
    data = {**record.data, "bounces": bounces}
    ctx.set_state(key, "DISABLED" if bounces >= ctx.settings["BOUNCE_LIMIT"] else "MEMBER", data)


@handler.route("(list)-(command)@(host)", event="help")
@handler.route("help@(host)", event="help")
@stateless
def HELP(ctx: Context, **args: str) -> None:
    """Anything else at the list host: explain the addresses."""
    host = ctx.recipient.rpartition("@")[2].lower()
    ctx.reply("help.msg", host=host, lists=sorted(ctx.settings["LISTS"].items()))
