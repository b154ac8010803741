"""The feed that wakes the event streams of ``GET /jobs/{id}/events``.

Events are the job's states (``runtime.job_events``); an event's id is the record's revision,
so a client that reconnects with ``Last-Event-ID`` gets only what is newer.

Streams never poll: the job store announces every stored change (Redis pub/sub from the workers
of the fleet, or the embedded worker's thread), and :class:`JobFeed` wakes the streams of this
process that watch the job, which then read its record once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from runtime.jobs import EVERY_JOB, JobChange, JobStore


@dataclass(eq=False)
class Watch:
    """One stream's interest in one job; ``changed`` is set when it should read it again."""

    job_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Its own job changed since the stream last read it (else only the queue may have moved).
    own: bool = True
    steps: bool = True  # woken by every progress step, not only by status changes
    queued: bool = False  # also woken when other jobs start or finish (its position moves)


class JobFeed:
    """Wakes this process's event streams from the store's change announcements."""

    def __init__(self, store: JobStore, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._unsubscribe: Callable[[], None] = store.subscribe(self._on_change)

    def _on_change(self, change: JobChange) -> None:  # on the store's thread
        with self._lock:
            if change.job_id == EVERY_JOB:
                own = {watch for watches in self._watches.values() for watch in watches}
                others: set[Watch] = set()
            else:
                own = {w for w in self._watches.get(change.job_id, ()) if change.transition
                       or w.steps}  # fmt: skip
                others = set()
                if change.transition:
                    others = {w for ws in self._watches.values() for w in ws if w.queued} - own
        for watch in own:
            self._loop.call_soon_threadsafe(self._wake, watch, True)
        for watch in others:
            self._loop.call_soon_threadsafe(self._wake, watch, False)

    @staticmethod
    def _wake(watch: Watch, own: bool) -> None:  # on the loop
        watch.own = watch.own or own
        watch.changed.set()

    @contextmanager
    def watch(self, job_id: str, *, steps: bool = True) -> Iterator[Watch]:
        """Register before reading the job: a change between the read and the wait still
        wakes the stream. ``steps=False``: woken by status changes only."""
        watch = Watch(job_id, steps=steps)
        with self._lock:
            self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                watches = self._watches.get(job_id, set())
                watches.discard(watch)
                if not watches:
                    self._watches.pop(job_id, None)

    @property
    def watching(self) -> int:
        with self._lock:
            return sum(len(watches) for watches in self._watches.values())

    def close(self) -> None:
        self._unsubscribe()
