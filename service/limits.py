"""Bounds on uploads enforced before their body is parsed or stored: size while it streams in,
and how many are received at once."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, send_error


class BodySizeLimit:
    """Rejects request bodies over ``limit`` bytes on the given paths with 413.

    A declared ``Content-Length`` over the limit is refused before any byte is read; a body
    that grows past it while streaming (chunked uploads) is cut off at that point.
    """

    def __init__(self, app: ASGIApp, limit: int, paths: tuple[str, ...]) -> None:
        self.app, self.limit, self.paths = app, limit, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        received = 0
        started = exceeded = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Answer now, and tell the app the client is gone: it stops parsing, and
                    # the server, done with a "Connection: close" response, stops reading the
                    # rest of the body. An exception here would be turned into a 400 by the
                    # form parser, with the upload still streaming in.
                    exceeded = True
                    if not started:
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's own answer to a body that was cut off
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise

    async def _reject(self, send: Send) -> None:
        message = f"upload exceeds the {self.limit / 2**20:.0f} MiB limit"
        error = ApiError(413, "upload_too_large", message, {"limit": self.limit})
        await send_error(send, error, close=True)


class ConcurrencyLimit:
    """At most ``limit`` requests at once on the given paths (POST); more get 429 with
    ``Retry-After`` before a byte of their body is read.

    Receiving an upload holds a spooled copy of it and then probes it; without this bound, a
    burst of large uploads could take the API's memory and disk all at once.
    """

    def __init__(
        self, app: ASGIApp, limit: int, paths: tuple[str, ...], retry_after_s: int = 5
    ) -> None:
        self.app, self.limit, self.paths, self.retry_after_s = app, limit, paths, retry_after_s
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            await self._refuse(send)
            return
        self.active += 1  # one event loop: no other request runs between the check and this
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def _refuse(self, send: Send) -> None:
        message = f"{self.limit} uploads are being received; try again in {self.retry_after_s} s"
        error = ApiError(
            429, "too_many_uploads", message, {"limit": self.limit},
            headers={"Retry-After": str(self.retry_after_s)},
        )  # fmt: skip
        await send_error(send, error, close=True)  # its body is never read
