"""Idempotency keys as payment APIs keep them: an executed command's answer, by request id and content.

The same request id with the same content gets the remembered answer again (a retry never starts a
second run); the same id with other content, another action included, is a conflict. Only commands
that executed are remembered, so a temporary refusal (`busy` at 03:00) is never replayed to a retry
that would now succeed. The memory is bounded in bytes, oldest forgotten first, and an answer is
forgotten 20 hours after it was given (a fixed id such as "nightly" must start tomorrow's run, not
replay today's answer); it lives in the daemon's memory, so a restart forgets it too.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# What one remembered answer costs beyond its text and id (the entry, the digest, dict slots).
ENTRY_OVERHEAD_BYTES = 200
DEFAULT_MAX_BYTES = 1_048_576
DEFAULT_TTL_S = 20 * 3600.0
"""A retry the same day gets the same answer; the same id at the same time the next day (an
automation with a fixed id) starts a new run, however long the first one's count took to answer."""


def fingerprint(content: Any) -> str:
    """A digest of a command's content (JSON-able, request id left out); stable across key order."""
    # ensure_ascii: a lone surrogate in some string must not stop us from hashing it.
    text = json.dumps(content, sort_keys=True, ensure_ascii=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def fingerprint_bytes(payload: bytes) -> str:
    """A digest of a payload that never parsed into a command."""
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class Remembered:
    """One executed command's answer."""

    action: str | None
    digest: str
    response: str
    at: float = 0.0
    """When it was answered (the memory's clock)."""

    @property
    def cost_bytes(self) -> int:
        return len(self.response) + len(self.digest) + ENTRY_OVERHEAD_BYTES


class RequestIdConflict(Exception):
    """The request id was used before for a different command."""

    def __init__(self, request_id: str, earlier: Remembered) -> None:
        what = f"action {earlier.action!r}" if earlier.action else "a command that was refused"
        super().__init__(f"request_id {request_id!r} was already used for a different command ({what})")
        self.earlier = earlier


class RequestMemory:
    """Answers of executed commands by request id, at most `max_bytes` of them."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: collections.OrderedDict[str, Remembered] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        """What the remembered answers cost now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def recall(self, request_id: str, digest: str) -> str | None:
        """The remembered answer for this id and content; `RequestIdConflict` for other content."""
        with self._lock:
            earlier = self._entries.get(request_id)
            if earlier is not None and self.clock() - earlier.at > self.ttl_s:
                del self._entries[request_id]  # expired: the id is free for a new command
                self._bytes -= earlier.cost_bytes + len(request_id)
                earlier = None
        if earlier is None:
            return None
        if earlier.digest != digest:
            raise RequestIdConflict(request_id, earlier)
        return earlier.response

    def remember(self, request_id: str, action: str | None, digest: str, response: str) -> None:
        """Keep an executed command's answer; forget the oldest beyond the byte budget."""
        entry = Remembered(action, digest, response, self.clock())
        cost = entry.cost_bytes + len(request_id)
        if cost > self.max_bytes:
            return  # larger than the whole budget: remembering it would forget everything else
        with self._lock:
            old = self._entries.pop(request_id, None)
            if old is not None:
                self._bytes -= old.cost_bytes + len(request_id)
            self._entries[request_id] = entry
            self._bytes += cost
            while self._bytes > self.max_bytes:
                key, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.cost_bytes + len(key)
