"""Waiting for a condition that has no event to await (a metric, a counter in another object)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(predicate: Callable[[], bool | Awaitable[bool]]) -> None:
    """Poll until `predicate` holds; TimeoutError after 10 s."""
    async with asyncio.timeout(10):
        while True:
            result = predicate()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.005)
