"""What the API process holds while it runs; built in the app's lifespan, reached via deps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from memory_bank.bank import MemoryBank
from service.dispatch import Dispatcher
from service.jobs import JobStore
from service.metrics import MetricsSink
from service.settings import Settings


@dataclass
class AppState:
    settings: Settings
    store: JobStore
    dispatcher: Dispatcher
    bank: MemoryBank
    mode: str  # "celery" or "embedded"
    metrics: MetricsSink
    closers: list[Any] = field(default_factory=list)

    def workers_ready(self) -> int:
        if self.mode == "embedded":
            return 1
        return len(self.store.workers_ready())
