"""MCP tools: a real MCP server (written below, run as a stdio child process) behind a ToolEnv."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mcp")

from taurl.envs.base import Task, ToolEnv
from taurl.envs.checker import check_env
from taurl.envs.mcp import MCPToolset
from taurl.envs.tools import format_tool_prompt
from taurl.errors import ConfigError, EnvError

SERVER = '''
import os, sys, time
from mcp.server.mcpserver import MCPServer

with open(sys.argv[1], "w") as f:  # the test checks that close() ends this process
    f.write(str(os.getpid()))

server = MCPServer("taurl-test")

@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b

@server.tool()
def fail(reason: str) -> str:
    """Always raises."""
    raise ValueError(f"cannot {reason}")

@server.tool()
def sleepy(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return "woke up"

server.run()
'''

TIMEOUT_S = 6.0  # the calls that should finish take ~2 s at most on a busy 2-core machine


class MCPEnv(ToolEnv):
    tasks = {  # noqa: RUF012
        "train": [Task(id="t0", prompt="Add 2 and 3.", answer="5"),
                  Task(id="t1", prompt="Add 4 and 4.", answer="8")],
        "heldout": [Task(id="h0", prompt="Add 20 and 22.", answer="42")],
    }

    def __init__(self, server: list[str], split: str = "train", **kwargs: object) -> None:
        log = open(Path(server[-1]).with_suffix(".log"), "w")  # noqa: SIM115 - the server's stderr
        super().__init__([MCPToolset(server, timeout_s=TIMEOUT_S, stderr=log)], split, **kwargs)  # type: ignore[arg-type]

    def score(self, task: Task, answer: str) -> bool:
        return answer == task.answer


@pytest.fixture
def server(tmp_path: Path) -> list[str]:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return [sys.executable, str(script), str(tmp_path / "server.pid")]


def _pid(server: list[str]) -> int:
    return int(Path(server[-1]).read_text())


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _call(name: str, **arguments: object) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_mcp_tools_are_listed_called_bounded_and_their_server_closed(server: list[str]) -> None:
    env = MCPEnv(server, parser="tags", max_turns=8)
    try:
        obs, info = env.reset(seed=0)
        by_name = {s["function"]["name"]: s["function"] for s in info["tools"]}
        assert sorted(by_name) == ["add", "fail", "sleepy"]
        assert by_name["add"]["description"] == "Add two integers."
        assert by_name["add"]["parameters"]["properties"]["a"]["type"] == "integer"
        assert by_name["add"]["parameters"]["required"] == ["a", "b"]
        prompt = format_tool_prompt(info["tools"])
        assert "Add two integers." in prompt and '"name": "add"' in prompt

        obs, reward, terminated, _, info = env.step(_call("add", a=2, b=3))
        assert obs[0]["content"] == "<tool_response>\n5\n</tool_response>"
        assert (reward, terminated, info["tool_errors"]) == (0.0, False, 0)

        obs, reward, _, _, info = env.step(_call("add", a=2))  # checked against the server's schema
        assert "missing required argument 'b'" in obs[0]["content"] and info["tool_errors"] == 1

        obs, reward, _, _, info = env.step(_call("fail", reason="divide"))
        assert obs[0]["content"].startswith("<tool_response>\nError: tool 'fail' raised MCPToolError: ")
        assert "fail" in info["error"] and info["tool_errors"] == 1 and reward == -0.1

        t0 = time.monotonic()
        obs, _, _, _, info = env.step(_call("sleepy", seconds=120))
        assert time.monotonic() - t0 < TIMEOUT_S + 3
        assert f"Error: tool 'sleepy' did not finish within {TIMEOUT_S:g} s" in obs[0]["content"]
        assert info["tool_errors"] == 1
    finally:
        env.close()  # the server is busy sleeping: close must still end it
    assert _gone(_pid(server)), "the MCP server outlived env.close()"
    env.close()  # twice is fine


def test_an_mcp_env_keeps_the_env_contract(server: list[str]) -> None:
    env = MCPEnv(server)
    try:
        # the concurrent-reset check resets fresh copies, each with its own server (one env per
        # episode, as the runner makes them): two keep the test quick
        check_env(env, make=lambda: MCPEnv(server), threads=2, rounds=1)
    finally:
        env.close()
    assert _gone(_pid(server))


def test_an_env_that_refuses_its_config_stops_the_server(server: list[str]) -> None:
    with pytest.raises(ConfigError, match="max_tool_calls_per_turn"):
        MCPEnv(server, max_tool_calls_per_turn=0)
    assert _gone(_pid(server))


def test_a_server_that_does_not_start_is_an_env_error(tmp_path: Path) -> None:
    with pytest.raises(EnvError, match="could not start the MCP server"):
        MCPToolset([sys.executable, "-c", "import sys; sys.exit(3)"], startup_timeout_s=30,
                   stderr=open(tmp_path / "err.log", "w"))  # noqa: SIM115
    with pytest.raises(ConfigError, match="non-empty list"):
        MCPToolset("python server.py")  # type: ignore[arg-type]
