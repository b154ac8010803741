"""The ``webhook`` of a submitted job, checked where the request is accepted."""

from __future__ import annotations

from runtime.jobs import WebhookTarget
from runtime.webhooks import WebhookUrlRefused, check_webhook_url
from service.errors import ApiError
from service.schemas import WebhookRequest
from service.state import AppState


def accepted_webhook(state: AppState, webhook: WebhookRequest | None) -> WebhookTarget | None:
    """The job's webhook target; 422 for a URL webhooks may not reach or a service without
    a signing secret. Resolves the host: call it off the event loop."""
    if webhook is None:
        return None
    if state.settings.webhook_secret is None:
        raise ApiError(422, "webhooks_not_configured",
                       "this service has no DITMEM_WEBHOOK_SECRET: webhooks are off",
                       [{"field": "webhook"}])  # fmt: skip
    try:
        url = check_webhook_url(webhook.url, allow_private=state.settings.webhook_allow_private)
    except WebhookUrlRefused as error:
        raise ApiError(422, "webhook_refused", str(error), [{"field": "webhook.url"}]) from None
    return WebhookTarget(url=url, events=tuple(dict.fromkeys(webhook.events)))
