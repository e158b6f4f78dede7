"""An empty stateless handler on every address of the domain: what Salmon's bench routes to."""

from __future__ import annotations

from lamsonfilter import Context, Handler, stateless

handler = Handler("sink")


@handler.route(r"(address)@(host)", address=r"[^@]+", host=r"lists\.example\.org")
@stateless
def START(ctx: Context, address: str, host: str) -> None:
    ctx.drop()
