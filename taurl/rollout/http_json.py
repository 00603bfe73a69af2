"""A minimal HTTP/1.1 server loop for JSON APIs, on stdlib asyncio streams.

The OpenAI-compatible endpoint (:mod:`taurl.rollout.openai_endpoint`) needs only
request/response JSON over keep-alive connections from a local client, so
:class:`JSONServer` runs ``asyncio.start_server`` with this loop instead of a web
framework: no extra dependency, and the server lives on whichever event loop starts it
(the endpoint's own background loop).

What it does per request: read the head up to the blank line, require a
``Content-Length`` body (chunked bodies are refused with 411, bodies over
:data:`MAX_BODY_BYTES` with 413), hand ``(method, path, headers, body)`` to the
handler, and write its JSON answer with ``Content-Length`` and ``Connection``. A
handler raises :class:`RequestError` to answer with an OpenAI-style error body; the
connection stays open unless the client asked to close it or the error leaves the
stream unreadable (status 411 or above).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from taurl.types import JSONValue

#: Largest request body read; a bigger one is answered 413 and the connection closed.
MAX_BODY_BYTES = 64 * 2**20

#: ``handle(method, path, headers, body) -> (status, JSON payload)``; headers are lower-cased.
Handler = Callable[[str, str, dict[str, str], bytes], Awaitable[tuple[int, dict[str, JSONValue]]]]


class RequestError(Exception):
    """A request answered with an OpenAI-style error body ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, JSONValue]:
        """The error body: ``message``, ``type``, ``param`` and ``code``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class JSONServer:
    """``handle`` served over HTTP/1.1 on ``host:port``, from the event loop that starts it."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        """Start listening; returns the port (a free one when ``port`` is 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=2**20)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await _serve_connection(reader, writer, self._handle)
        finally:
            self._writers.discard(writer)


def read_json_object(body: bytes) -> dict[str, JSONValue]:
    """``body`` parsed as a JSON object; anything else is a 400 :class:`RequestError`."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}") from e
    if not isinstance(request, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(request).__name__}")
    return request


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            handle: Handler) -> None:
    """Answer the requests of one connection with ``handle`` until it closes; closes ``writer``."""
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            keep_alive = headers.get("connection", "").lower() != "close"
            try:
                if len(parts) != 3:
                    raise RequestError(400, f"malformed HTTP request line {lines[0]!r}")
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    raise RequestError(411, "send the body with a Content-Length, not chunked")
                size = int(headers.get("content-length", "0") or 0)
                if not 0 <= size <= MAX_BODY_BYTES:
                    raise RequestError(413, f"the body has {size} bytes; at most {MAX_BODY_BYTES} are read")
                body = await reader.readexactly(size)
                status, payload = await handle(parts[0], parts[1].split("?")[0], headers, body)
            except RequestError as e:
                status, payload = e.status, e.body()
                keep_alive = keep_alive and e.status < 411
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            data = json.dumps(payload, ensure_ascii=False).encode()
            reason = HTTPStatus(status).phrase
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}"
                "\r\n\r\n".encode() + data
            )
            await writer.drain()
            if not keep_alive:
                return
    except ConnectionError:
        return
    finally:
        writer.close()
