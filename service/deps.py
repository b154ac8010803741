"""FastAPI dependencies, each declared once as a typed alias."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request

from memory_bank.bank import MemoryBank
from runtime.jobs import JobStore
from runtime.settings import Settings
from service.auth import AuthError, Caller, authenticate
from service.errors import ApiError
from service.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.ditmem


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings_dep(state: StateDep) -> Settings:
    return state.settings


def get_bank(state: StateDep) -> MemoryBank:
    return state.bank


def get_store(state: StateDep) -> JobStore:
    return state.store


def get_caller(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    settings = state.settings
    return authenticate(authorization, settings.api_keys, open_mode=settings.auth == "open")


def get_writer(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    if not caller.can("write"):
        raise AuthError(f"key '{caller.name}' may not change the memory bank", status=403)
    return caller


def ensure_queue_room(state: AppState, caller: Caller) -> None:
    """429 with ``Retry-After`` once the caller has ``max_queued_per_key`` jobs queued."""
    queued = state.store.queued_count(caller.name)
    if queued >= state.settings.max_queued_per_key:
        raise ApiError(
            429, "too_many_jobs",
            f"{queued} jobs already queued for '{caller.name}'; wait for some to finish",
            headers={"Retry-After": "10"},
        )  # fmt: skip


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
BankDep = Annotated[MemoryBank, Depends(get_bank)]
StoreDep = Annotated[JobStore, Depends(get_store)]
CallerDep = Annotated[Caller, Depends(get_caller)]
WriterDep = Annotated[Caller, Depends(get_writer)]

# Bounded so no request can push an id or offset past what SQLite and Redis accept.
ClipId = Annotated[int, Path(ge=1, le=2**62)]
Offset = Annotated[int, Query(ge=0, le=10**9)]
