"""Webhooks: a job's events POSTed to the URL its request named, signed, at least once.

* A transition the webhook asked for (``started``, ``succeeded``, ``failed``, ``canceled``)
  puts a delivery in the job store's outbox in the same atomic write as the transition, so a
  delivery is never lost between the two.
* :class:`WebhookSender`, a thread of every API process, takes due deliveries (each held by
  one sender for a lease), POSTs them signed with the Standard Webhooks scheme
  (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``; secret
  ``DITMEM_WEBHOOK_SECRET``) and retries failures and timeouts with exponential backoff for
  ``webhook_retry_for_s``. The same ``webhook-id`` on every attempt lets a receiver drop
  duplicates. The job record shows each event's attempts and last status.
* URLs must be http(s) and, unless ``DITMEM_WEBHOOK_ALLOW_PRIVATE``, resolve to public
  addresses only (checked when the job is accepted and again before every attempt), so a
  webhook cannot be used to reach the operator's own network.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook

from runtime.job_events import QueueInfo, event_data
from runtime.jobs import JobRecord, JobStore, WebhookDelivery, with_changes
from runtime.settings import Settings

logger = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
DELIVERY_LEASE_S = 60.0  # a sender that dies mid-delivery hands it on after this long


class WebhookUrlRefused(ValueError):
    """A webhook URL that is malformed or points where webhooks may not go."""


def _refused_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    """``url`` if webhooks may be sent there; raises :class:`WebhookUrlRefused` otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookUrlRefused(f"the webhook URL is longer than {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlRefused("the webhook URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise WebhookUrlRefused("the webhook URL must not carry credentials")
    if allow_private:
        return url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port)}
    except (OSError, ValueError) as error:
        message = f"the webhook host {parts.hostname!r} does not resolve: {error}"
        raise WebhookUrlRefused(message) from None
    refused = sorted(address for address in addresses if _refused_address(address))
    if refused:
        raise WebhookUrlRefused(
            f"the webhook host {parts.hostname!r} resolves to a private, loopback or link-local "
            f"address ({refused[0]}); set DITMEM_WEBHOOK_ALLOW_PRIVATE=true for local receivers"
        )
    return url


def parse_delivery(delivery_id: str) -> tuple[str, int, str]:
    job_id, revision, event = delivery_id.split(".")
    return job_id, int(revision), event


class WebhookSender:
    """Delivers the outbox of ``store``; several senders (one per API process) share it."""

    def __init__(self, store: JobStore, settings: Settings, client: httpx.Client | None = None):
        if settings.webhook_secret is None:
            raise ValueError("webhooks need DITMEM_WEBHOOK_SECRET")
        self.store = store
        self.settings = settings
        self.signer = Webhook(settings.webhook_secret.get_secret_value())
        self.client = client or httpx.Client(timeout=settings.webhook_timeout_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one delivery -----------------------------------------------------------------------

    def deliver_next(self) -> str | None:
        """Attempt the next due delivery; its id, or ``None`` when nothing was due."""
        delivery_id = self.store.claim_delivery(DELIVERY_LEASE_S)
        if delivery_id is None:
            return None
        job_id, _, event = parse_delivery(delivery_id)
        job = self.store.get(job_id)
        if job is None or job.webhook is None:
            self.store.drop_delivery(delivery_id)
            return delivery_id
        started = datetime.now(timezone.utc)
        status, error = self._post(delivery_id, job.webhook.url, event, job)
        previous = job.webhook_deliveries.get(event) or WebhookDelivery()
        attempts = previous.attempts + 1
        first = previous.first_attempt_at or started
        delivered = status is not None and 200 <= status < 300
        elapsed = (datetime.now(timezone.utc) - first).total_seconds()
        refused = (error or "").startswith("refused:")  # retrying would not change the answer
        give_up = not delivered and (refused or elapsed >= self.settings.webhook_retry_for_s)
        state = "delivered" if delivered else "gave_up" if give_up else "pending"
        record = WebhookDelivery(attempts=attempts, last_status=status, last_error=error,
                                 first_attempt_at=first, last_attempt_at=started,
                                 state=state)  # fmt: skip
        self.store.update(
            job_id,
            lambda current: with_changes(
                current, webhook_deliveries=current.webhook_deliveries | {event: record}
            ),
        )
        if delivered or give_up:
            self.store.drop_delivery(delivery_id)
            if give_up:
                logger.warning("webhook %s: gave up after %d attempts (%s)", delivery_id,
                               attempts, error or status)  # fmt: skip
        else:
            wait = min(
                self.settings.webhook_backoff_max_s,
                self.settings.webhook_backoff_s * 2 ** (attempts - 1),
            )
            self.store.schedule_delivery(delivery_id, time.time() + wait)
        return delivery_id

    def _post(
        self, delivery_id: str, url: str, event: str, job: JobRecord
    ) -> tuple[int | None, str | None]:
        """One attempt: the receiver's status (``None``: no answer) and what went wrong."""
        try:
            check_webhook_url(url, allow_private=self.settings.webhook_allow_private)
        except WebhookUrlRefused as error:
            return None, f"refused: {error}"
        sent_at = datetime.now(timezone.utc)
        base = str(self.settings.public_url or "").rstrip("/")
        body = json.dumps({
            "type": f"job.{event}",
            "timestamp": sent_at.isoformat(),
            "data": event_data(job, QueueInfo(None, None), base_url=base),
        })  # fmt: skip
        headers = {
            "content-type": "application/json",
            "user-agent": "ditmem-webhooks",
            "webhook-id": delivery_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": self.signer.sign(delivery_id, sent_at, body),
        }
        try:
            # No redirects: a receiver's redirect could point anywhere the check above refuses.
            response = self.client.post(url, content=body, headers=headers, follow_redirects=False)
        except httpx.HTTPError as error:
            return None, f"{type(error).__name__}: {error}"[:300]
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    # -- the thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.deliver_next() is not None
            except Exception as error:  # the store away a moment: the outbox keeps the work
                logger.warning("webhook sender: %s", error)
                busy = False
            if not busy:
                self._stop.wait(self.settings.webhook_poll_s)

    def start(self) -> WebhookSender:
        self._thread = threading.Thread(target=self._loop, name="ditmem-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.client.close()
