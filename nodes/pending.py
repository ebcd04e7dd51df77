"""Shares of secret metadata that came sealed with a small object, held until its commit.

A small put sends its only chunk and the node's share of the object's secret
metadata in one sealed envelope (``oneshot``); the commit that follows then
carries public facts only. The share waits here in memory, never on disk
before the commit makes it part of the version. Bounded: the oldest entries
go first, and a commit whose share is gone (node restarted, or evicted) is
refused, so the client's put fails cleanly instead of committing without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_ENTRIES = 65536


class PendingSecrets:
    """upload_id -> share bytes, in arrival order, each kept at most ``ttl_s``."""

    def __init__(self, ttl_s: float, *, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._items: dict[str, tuple[float, bytes]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, upload_id: str, share: bytes) -> None:
        now = self.clock()
        self._items.pop(upload_id, None)
        self._items[upload_id] = (now, share)
        for key in list(self._items):
            at, _ = self._items[key]
            if len(self._items) <= self.max_entries and now - at <= self.ttl_s:
                break  # arrival order: the rest are younger
            del self._items[key]

    def get(self, upload_id: str) -> bytes | None:
        item = self._items.get(upload_id)
        if item is None or self.clock() - item[0] > self.ttl_s:
            return None
        return item[1]

    def drop(self, upload_id: str) -> None:
        self._items.pop(upload_id, None)
