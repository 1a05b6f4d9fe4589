"""What every request passes before a handler runs: Host allow-list, inference token, body
size and body-read time. Raw ASGI, so a refused request costs no parsing.

Model-control routes are not covered by the inference token: they check their own admin
credential (``edgerun.control``), so holding the inference token never unlocks them.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import sys
from collections.abc import Awaitable, Iterable
from typing import TypeVar

import orjson

from edgerun.errors import PayloadTooLargeError, RequestTimeoutError
from edgerun.hosts import host_name, is_loopback

# Routes guarded by the admin credential instead of the inference token.
MODEL_CONTROL_PATH = re.compile(r"^/v2/repository/models/[^/]+/(load|unload)$")
T = TypeVar("T")


async def _within(awaitable: Awaitable[T], seconds: float) -> T:
    """``asyncio.wait_for`` without the task it wraps a coroutine in (one event-loop turn per body
    message) where ``asyncio.timeout`` exists (Python 3.11+)."""
    if sys.version_info < (3, 11):
        return await asyncio.wait_for(awaitable, seconds)
    async with asyncio.timeout(seconds):
        return await awaitable


def error_body(message: str) -> bytes:
    """The published ``ErrorResponse`` body."""
    return orjson.dumps({"error": message})


def bearer_matches(header: bytes | str | None, token: str) -> bool:
    """``Authorization: Bearer <token>``, scheme case-insensitive (RFC 7235), token compared in constant time."""
    if not header:
        return False
    value = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, credentials = value.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())


class GuardMiddleware:
    """Host allow-list and bearer token (everything but health), request body limit and read timeout."""

    def __init__(
        self,
        app,
        token: str | None,
        max_body: int,
        body_timeout_s: float = 60.0,
        allowed_hosts: Iterable[str] | None = None,
        loopback_hosts_only: bool = False,
    ):
        self.app = app
        self.token = token
        self.max_body = max_body
        self.body_timeout_s = body_timeout_s
        # Entries may be written with a port or brackets ('device.local:8000', '[::1]'): compare names only.
        self.allowed_hosts = frozenset(host_name(h) for h in allowed_hosts) if allowed_hosts else None
        # A server bound to loopback is reached by loopback names only; any other Host header is a
        # page whose DNS name was rebound to 127.0.0.1 trying to use the device's model.
        self.loopback_hosts_only = loopback_hosts_only and self.allowed_hosts is None

    @staticmethod
    async def _reject(send, status: int, message: str, headers=()) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), *headers],
            }
        )
        await send({"type": "http.response.body", "body": error_body(message)})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        health = path.startswith("/v2/health")
        if self.allowed_hosts is not None and not health:
            host = host_name(headers.get(b"host"))
            if host not in self.allowed_hosts:
                return await self._reject(
                    send, 400, f"Host '{host}' is not one this server answers to (--allowed-host); refusing the request"
                )
        if self.loopback_hosts_only and not health:
            host = host_name(headers.get(b"host"))
            if not is_loopback(host):
                return await self._reject(
                    send,
                    400,
                    f"Host '{host}' is not a loopback name and this server listens on loopback only; "
                    "name it with --allowed-host to answer it",
                )
        if self.token is not None and not health and not MODEL_CONTROL_PATH.match(path):
            if not bearer_matches(headers.get(b"authorization"), self.token):
                return await self._reject(
                    send,
                    401,
                    "missing or wrong bearer token; send 'Authorization: Bearer <token>' (see --token / EDGERUN_TOKEN)",
                    [(b"www-authenticate", b"Bearer")],
                )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await self._reject(
                    send, 400, f"Content-Length {length.decode(errors='replace')!r} is not a number"
                )
            if too_big:
                return await self._reject(
                    send,
                    413,
                    f"request body of {int(length)} bytes is over the {self.max_body} byte limit (--max-body-mb)",
                )
        return await self.app(scope, self._guarded_receive(receive), send)

    def _guarded_receive(self, receive):
        """``receive`` that counts body bytes and gives the whole body ``body_timeout_s`` to arrive."""
        received = 0
        deadline: float | None = None
        done = False
        limit, timeout = self.max_body, self.body_timeout_s

        async def guarded():
            nonlocal received, deadline, done
            if done:  # body complete: later receives only wait for a disconnect
                return await receive()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout
            try:
                message = await _within(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise RequestTimeoutError(
                    f"request body not received within {timeout:g} s; send it faster or in one piece"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(f"request body is over the {limit} byte limit (--max-body-mb)")
                done = not message.get("more_body", False)
            return message

        return guarded
