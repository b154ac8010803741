"""What the API process holds while it runs; built by the composition root, reached via deps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from memory_bank.bank import MemoryBank
from runtime.builders import Storages
from runtime.dispatch import Dispatcher
from runtime.idempotency import IdempotencyKeys
from runtime.jobs import JobStore
from runtime.metrics import MetricsSink
from runtime.settings import Settings


@dataclass
class AppState:
    settings: Settings
    store: JobStore
    dispatcher: Dispatcher
    bank: MemoryBank
    storages: Storages  # uploads waiting for workers, results to serve
    mode: Literal["celery", "embedded"]
    metrics: MetricsSink
    workers_ready: Callable[[], int]  # workers with a loaded model that can take jobs now
    idempotency: IdempotencyKeys
    closers: list[Callable[[], None]] = field(default_factory=list)
