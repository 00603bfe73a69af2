"""Tools from a Model Context Protocol server: :class:`MCPToolset`.

An MCP server publishes tools (a name, a description and a JSON schema of the
arguments each) and runs them on request. :class:`MCPToolset` starts a stdio server
as a child process, opens a client session on it and turns each tool the server
lists (``list_tools``) into a taurl :class:`~taurl.envs.tools.Tool` whose schema is
the server's and whose call goes through ``call_tool``. Put the toolset among a
:class:`~taurl.envs.base.ToolEnv`'s tools: the env offers its tools (they reach the
tool prompt like any other) and closes it, stopping the server, in ``close()``::

    class WeatherEnv(ToolEnv):
        def __init__(self, split: str = "train", **kwargs):
            server = MCPToolset([sys.executable, "weather_server.py"], timeout_s=5)
            super().__init__([server], split, **kwargs)

Calls are checked and reported like every tool's (:mod:`taurl.envs.tool_execution`):
arguments are validated against the server's schema first; a tool whose result says
``isError`` (the server caught an exception) or whose request fails comes back as
``Error: tool 'x' raised MCPToolError: ...``, and one still running after
``timeout_s`` as ``Error: tool 'x' did not finish within N s`` (its request is then
cancelled, so the session does not fill with stuck calls).

The session lives on an event loop in a background thread, because the SDK is async
and environments are stepped synchronously (in the rollout's worker threads); calls
from several threads are safe. Each env instance starts its own server, and the
rollout runner makes one env per episode: keep servers quick to start.

``mcp`` (``pip install 'taurl[mcp]'``) is imported only when a toolset is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self, TextIO

from taurl.envs.tools import Tool
from taurl.errors import ConfigError, EnvError, TaurlError
from taurl.types import JSONValue

if TYPE_CHECKING:
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters
    from mcp.types import ContentBlock
    from mcp.types import Tool as MCPTool

#: Seconds a call may run past ``timeout_s`` before its request is cancelled: the tool
#: executor reports the timeout at ``timeout_s``, the cancel follows a moment later.
CANCEL_GRACE_S = 1.0
#: Seconds :meth:`MCPToolset.close` waits for the session and the server to stop (the
#: SDK closes the server's stdin, waits, then kills its process tree).
CLOSE_TIMEOUT_S = 15.0


class MCPToolError(TaurlError):
    """An MCP tool call failed: the server reported an error, or the request did."""


class MCPToolset:
    """The tools of one MCP server that runs as a child process over stdio.

    Args:
        command: The server's command line, e.g. ``[sys.executable, "server.py"]``.
        env: Environment variables for the server, over the SDK's safe defaults.
        cwd: The server's working directory (default: this process's).
        timeout_s: Time limit of one call, in seconds.
        startup_timeout_s: Time limit for starting the server and listing its tools.
        stderr: Where the server's stderr goes (default: this process's stderr).

    Raises:
        ConfigError: ``mcp`` is not installed, or an argument is out of range.
        EnvError: The server did not start or did not list its tools in time.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout_s: float = 10.0,
        startup_timeout_s: float = 30.0,
        stderr: TextIO | None = None,
    ) -> None:
        if isinstance(command, str) or not command:
            raise ConfigError(
                f"MCPToolset: command must be a non-empty list of strings, got {command!r}; "
                "e.g. [sys.executable, 'server.py']"
            )
        for name, value in (("timeout_s", timeout_s), ("startup_timeout_s", startup_timeout_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"MCPToolset: {name} must be a number of seconds > 0, got {value!r}")
        try:
            from mcp.client.stdio import StdioServerParameters
        except ImportError as e:
            raise ConfigError(
                "MCPToolset needs the mcp package; install it with `pip install 'taurl[mcp]'`"
            ) from e
        self.command = list(command)
        self.timeout_s = float(timeout_s)
        self._closed = False
        self._session: ClientSession | None = None
        self._stop = asyncio.Event()  # binds to the background loop on first use
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="taurl-mcp", daemon=True)
        self._thread.start()
        params = StdioServerParameters(
            command=self.command[0], args=self.command[1:], env=dict(env) if env else None, cwd=cwd
        )
        ready: concurrent.futures.Future[list[MCPTool]] = concurrent.futures.Future()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(params, ready, stderr), self._loop)
        try:
            listed = ready.result(timeout=startup_timeout_s)
        except concurrent.futures.TimeoutError:
            self.close()
            raise EnvError(
                f"the MCP server {' '.join(self.command)!r} did not start and list its tools within "
                f"{startup_timeout_s:g} s; check that it runs on its own, or raise startup_timeout_s"
            ) from None
        except Exception as e:
            self.close()
            cause = _innermost(e)
            raise EnvError(
                f"could not start the MCP server {' '.join(self.command)!r}: "
                f"{type(cause).__name__}: {cause}; its stderr may say why"
            ) from e
        self.tools: list[Tool] = [self._tool(t) for t in listed]

    async def _serve(
        self,
        params: StdioServerParameters,
        ready: concurrent.futures.Future[list[MCPTool]],
        stderr: TextIO | None,
    ) -> None:
        """Start the server, open the session, list the tools, then hold it all until close()."""
        import sys

        from mcp import ClientSession
        from mcp.client.stdio import stdio_client
        from mcp.types import PaginatedRequestParams

        try:
            async with (
                stdio_client(params, errlog=stderr or sys.stderr) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                listed: list[MCPTool] = []
                cursor: str | None = None
                while True:
                    page = await session.list_tools(
                        params=PaginatedRequestParams(cursor=cursor) if cursor else None
                    )
                    listed.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self._session = session
                ready.set_result(listed)
                await self._stop.wait()
        except BaseException as e:
            if ready.done():
                raise
            ready.set_exception(e)

    def _tool(self, listed: MCPTool) -> Tool:
        name = listed.name

        def fn(**arguments: JSONValue) -> str:
            return self.call(name, arguments)

        return Tool(
            name=name, description=listed.description or "", parameters=dict(listed.input_schema),
            fn=fn, timeout_s=self.timeout_s,
        )

    def call(self, name: str, arguments: Mapping[str, JSONValue]) -> str:
        """Run tool ``name`` on the server and return its text output.

        Raises:
            MCPToolError: The tool reported an error, or the request failed.
            TimeoutError: No answer within ``timeout_s`` (plus a grace second); the
                request has been cancelled.
            EnvError: The toolset is closed.
        """
        if self._closed or self._session is None:
            raise EnvError(f"MCPToolset {' '.join(self.command)!r} is closed; make a new one")
        future = asyncio.run_coroutine_threadsafe(
            self._session.call_tool(name, dict(arguments)), self._loop
        )
        try:
            result = future.result(timeout=self.timeout_s + CANCEL_GRACE_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"tool {name!r} did not finish within {self.timeout_s:g} s") from None
        except Exception as e:  # the SDK's protocol and connection errors
            cause = _innermost(e)
            raise MCPToolError(f"{type(cause).__name__}: {cause}") from e
        text = _content_text(result.content)
        if not text and result.structured_content is not None:
            text = _json(result.structured_content)
        if result.is_error:
            raise MCPToolError(text or "the server reported an error without a message")
        return text

    def close(self) -> None:
        """Stop the session and the server (closed stdin, then killed after a grace period).

        Safe to call more than once, and from any thread.
        """
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._stop.set)
        try:
            self._serving.result(timeout=CLOSE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            self._serving.cancel()  # the SDK still stops the server under cancellation
        except BaseException:  # noqa: BLE001, S110 - a server that died first is stopped already
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _innermost(e: BaseException) -> BaseException:
    """The first leaf of an exception group (anyio's task groups wrap what went wrong)."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _json(value: object) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, default=str)


def _content_text(blocks: Sequence[ContentBlock]) -> str:
    """A call result's content as text: text blocks as they are, others named by their type."""
    parts: list[str] = []
    for block in blocks:
        text = getattr(block, "text", None)
        if isinstance(text, str):
            parts.append(text)
        else:
            mime = getattr(block, "mime_type", None)
            parts.append(f"[{block.type} content{f' ({mime})' if mime else ''} not shown]")
    return "\n".join(parts)
