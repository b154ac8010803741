"""What keeps browsers from misusing the API: response headers, and requests refused by Host
and Origin.

* ``X-Content-Type-Options: nosniff``: a clip, poster or JSON body is never run as a script or
  rendered as HTML because a browser guessed its type.
* A Content-Security-Policy fitting the UI, which loads only its own script and stylesheet and
  has no inline script: anything injected into the page would not run, and no other site may
  frame it (clickjacking). The interactive API docs (Swagger UI, ReDoc) load their assets from a
  CDN with inline script, so those two pages get only the framing rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, send_error

UI_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",  # posters, and previews of the file being uploaded
        "media-src 'self' blob:",  # result videos
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
DOCS_POLICY = "frame-ancestors 'none'"
DOCS_PATHS = ("/docs", "/redoc")


class SecurityHeaders:
    """Pure ASGI middleware: adds the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope["path"].startswith(DOCS_PATHS) else UI_POLICY

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Content-Security-Policy"] = policy
                headers["X-Frame-Options"] = "DENY"  # frame-ancestors for older browsers
                headers["Referrer-Policy"] = "same-origin"
            await send(message)

        await self.app(scope, receive, send_with_headers)


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(host: str) -> str:
    """``example.org`` of ``example.org:8000``; ``[::1]`` of ``[::1]:8000``."""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class RequestOrigin:
    """Refuses requests a browser was tricked into sending.

    * Host: only the names in ``allowed_hosts`` (``*``: any). With a rebound DNS name, a page
      of another site reaches a server on localhost under *its* name; refusing foreign Host
      headers ends that (DNS rebinding).
    * Origin (else Referer) of a state-changing request (POST, PUT, PATCH, DELETE): the server's
      own, or one of ``allowed_origins``. A page of another origin can send a form POST without
      reading the answer (no CORS needed); in open mode that would change the bank. Requests
      with neither header (curl, SDKs, the CLI) are not browsers' and pass.
    """

    def __init__(
        self, app: ASGIApp, allowed_hosts: Sequence[str], allowed_origins: Sequence[str]
    ) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {_host_name(host.lower()) for host in allowed_hosts}
        self.origins = {origin.rstrip("/").lower() for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        problem = None
        if not self.any_host and _host_name(host) not in self.hosts:
            problem = ApiError(400, "invalid_host", f"host {host!r} is not served here")
        elif scope["method"] in STATE_CHANGING:
            origin = headers.get("origin") or _origin_of(headers.get("referer"))
            own = f"{scope.get('scheme', 'http')}://{host}"
            if origin is not None and origin.lower() not in (own, *self.origins):
                message = f"requests from {origin} may not change anything"
                problem = ApiError(403, "cross_origin", message)
        if problem is None:
            await self.app(scope, receive, send)
            return
        await send_error(send, problem)


def _origin_of(referer: str | None) -> str | None:
    if not referer:
        return None
    parts = urlsplit(referer)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
