"""Taking an expert replica out of service without losing a request.

Attention replicas pick expert replicas from their own copy of the routing table, re-read every
`snapshot_refresh_s`, and keep a long-lived stream to each replica they use. So a replica that is
going away (scale-down, redeploy) first leaves the table, then keeps serving until every attention
replica has re-read it (`wait_s`), then finishes what it is computing and stops: later requests
already go to the group's other replicas, and none is cut. With no other replica in the group
there is no one to hand over to, so it stops at once (the app is going down).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def drain(leave: Callable[[], Awaitable[int]], stop: Callable[[], Awaitable[None]], wait_s: float,
                name: str = "expert replica") -> bool:
    """`leave()` takes the replica out of the routing table and returns how many replicas its group
    still has; `stop()` finishes the requests being computed and closes the server. Returns whether
    it waited for the attention replicas to move."""
    try:
        others = await leave()
    except Exception as e:  # noqa: BLE001 - the router is gone too: its TTL drops us anyway
        log.warning("%s: leaving the routing table failed: %r", name, e)
        others = 0
    if others:
        log.info("%s draining: out of the routing table, serving for %.1f s more", name, wait_s)
        await asyncio.sleep(wait_s)
    await stop()
    return bool(others)
