"""ToolEnv/TextEnv behaviour: every malformed-tool-call case, limits, order checks, config errors."""

from __future__ import annotations

import time

import gymnasium
import numpy as np
import pytest

from taurl.envs import Task, TextEnv, ToolCall, ToolEnv, Turn, check_env, register_env
from taurl.errors import ConfigError, EnvError


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: First.
        b: Second.
    """
    return a + b


def fail(reason: str) -> str:
    """Raise an error."""
    raise ValueError(reason)


def hang(seconds: float) -> str:
    """Sleep for a while."""
    time.sleep(seconds)
    return "done"


class AddEnv(ToolEnv):
    tasks = {
        "train": [Task(f"t{i}", f"What is {i} + {i}?", answer=2 * i) for i in range(10)],
        "heldout": [Task("h", "What is 100 + 1?", answer=101)],
    }

    def __init__(self, split: str = "train", **kwargs: object) -> None:
        kwargs.setdefault("tool_timeout_s", 0.3)
        super().__init__([add, fail, hang], split, **kwargs)  # type: ignore[arg-type]

    def score(self, task: Task, answer: str) -> bool:
        return answer == str(task.answer)


def started(**kwargs: object) -> AddEnv:
    env = AddEnv(**kwargs)
    env.reset(seed=0)
    return env


CALL = '<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


@pytest.mark.parametrize(
    ("action", "message"),
    [
        ("<tool_call>{not json}</tool_call>", "not valid JSON"),
        ("<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": 1,", "not valid JSON"),  # cut off
        ('<tool_call>{"arguments": {"a": 1}}</tool_call>', 'missing "name"'),
        ('<tool_call>"add"</tool_call>', "expected a JSON object"),
        (CALL.format(name="mul", args='{"a": 1, "b": 2}'), "unknown tool 'mul'; available tools: add, fail, hang"),
        (CALL.format(name="add", args='{"a": 1}'), "missing required argument 'b'"),
        (CALL.format(name="add", args='{"a": 1, "b": 2, "c": 3}'), "unknown argument 'c'"),
        (CALL.format(name="add", args='{"a": "1", "b": 2}'), "argument 'a' must be integer, got str"),
        (CALL.format(name="fail", args='{"reason": "disk full"}'), "raised ValueError: disk full"),
        (CALL.format(name="hang", args='{"seconds": 5}'), "did not finish within 0.3 s"),
    ],
)
def test_every_malformed_call_is_an_error_observation(action: str, message: str) -> None:
    env = started(format_penalty=0.25)
    obs, reward, terminated, truncated, info = env.step(action)
    assert (terminated, truncated) == (False, False)
    assert reward == -0.25
    assert info["tool_errors"] == 1 and info["tool_calls"] == 1
    assert message in info["error"]
    assert len(obs) == 1 and obs[0]["role"] == "user"
    assert obs[0]["content"].startswith("<tool_response>\nError: ") and message in obs[0]["content"]


def test_good_call_then_answer() -> None:
    env = AddEnv(tool_call_bonus=0.2)
    obs, info = env.reset(seed=3)
    task = env.task
    assert obs == [{"role": "user", "content": task.prompt}]
    assert [t["function"]["name"] for t in info["tools"]] == ["add", "fail", "hang"]
    n = int(task.id[1:])
    obs, reward, terminated, _, info = env.step(CALL.format(name="add", args=f'{{"a": {n}, "b": {n}}}'))
    assert obs == [{"role": "user", "content": f"<tool_response>\n{2 * n}\n</tool_response>"}]
    assert (reward, terminated, info["tool_calls"], info["tool_errors"]) == (0.2, False, 1, 0)
    _, reward, *_ = env.step(CALL.format(name="add", args='{"a": 1, "b": 1}'))
    assert reward == 0.0  # the bonus is paid once per episode
    obs, reward, terminated, truncated, info = env.step(f"It is <answer>{2 * n}</answer>")
    assert (obs, reward, terminated, truncated, info["success"]) == ([], 1.0, True, False, True)


def test_wrong_answer_and_mixed_calls() -> None:
    env = started(format_penalty=0.1)
    both = CALL.format(name="add", args='{"a": 2, "b": 2}') + " and <tool_call>oops</tool_call>"
    obs, reward, _, _, info = env.step(both)
    assert info["tool_calls"] == 2 and info["tool_errors"] == 1 and reward == -0.1
    assert "Error: " in obs[0]["content"] and "\n4\n" in obs[0]["content"]
    _, reward, terminated, _, info = env.step("<answer>-1</answer>")
    assert (reward, terminated, info["success"]) == (0.0, True, False)


def test_tool_call_limit_per_turn() -> None:
    env = started(max_tool_calls_per_turn=2, format_penalty=0.5)
    action = CALL.format(name="add", args='{"a": 1, "b": 1}') * 3
    obs, reward, _, _, info = env.step(action)
    assert obs[0]["content"].count("\n2\n") == 2
    assert "only 2 tool calls run per turn; the last 1 were ignored" in info["error"]
    assert (info["tool_calls"], info["tool_errors"], reward) == (3, 1, -0.5)


def test_turn_limit_truncates() -> None:
    env = started(max_turns=2)
    _, _, terminated, truncated, _ = env.step(CALL.format(name="add", args='{"a": 1, "b": 1}'))
    assert not terminated and not truncated
    obs, _, terminated, truncated, info = env.step(CALL.format(name="add", args='{"a": 1, "b": 1}'))
    assert (obs, terminated, truncated) == ([], False, True)
    assert info["truncation"] == "max_turns" and info["success"] is False
    with pytest.raises(EnvError, match="after the episode ended"):
        env.step("more")


def test_order_and_action_type_are_enforced() -> None:
    env = AddEnv()
    with pytest.raises(EnvError, match="before reset"):
        env.step("hi")
    env.reset(seed=0)
    with pytest.raises(EnvError, match="expects the assistant's text"):
        env.step(b"bytes")  # type: ignore[arg-type]


def test_seeding() -> None:
    env = AddEnv()
    a = env.reset(seed=5)
    assert env.reset(seed=5) == a
    assert len({env.reset(seed=s)[1]["task_id"] for s in range(20)}) > 3
    assert AddEnv(split="heldout").reset(seed=1)[1]["task_id"] == "h"


def test_custom_parser_plugs_in() -> None:
    class SlashParser:
        def parse(self, text: str) -> tuple[list[ToolCall], list[str]]:
            if text.startswith("/add "):
                a, b = text.split()[1:]
                return [ToolCall("add", {"a": int(a), "b": int(b)})], []
            return [], []

    env = started(parser=SlashParser())
    obs, *_ = env.step("/add 20 22")
    assert obs[0]["content"] == "<tool_response>\n42\n</tool_response>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "test"}, "split must be one of ('train', 'heldout'), got 'test'"),
        ({"max_turns": 0}, "max_turns must be an int >= 1"),
        ({"max_tool_calls_per_turn": 0}, "max_tool_calls_per_turn must be an int >= 1"),
        ({"tool_timeout_s": -1}, "tool_timeout_s must be a number > 0 or None"),
        ({"format_penalty": -0.1}, "format_penalty must be a finite number >= 0"),
        ({"tool_call_bonus": float("nan")}, "tool_call_bonus must be a finite number >= 0"),
        ({"parser": "tag"}, "parser must be one of"),
        ({"parser": 3}, "parser must have a parse(text)"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AddEnv(**kwargs)


def test_duplicate_tool_names_rejected() -> None:
    class Dup(AddEnv):
        def __init__(self) -> None:
            ToolEnv.__init__(self, [add, add])

    with pytest.raises(ConfigError, match="two tools are named 'add'"):
        Dup()


def test_text_env_needs_tasks() -> None:
    class Empty(TextEnv):
        def turn(self, action: str) -> Turn:
            return Turn([], 0.0, True)

    with pytest.raises(NotImplementedError, match="has no tasks for split 'train'"):
        Empty().reset(seed=0)


def test_register_env_and_make() -> None:
    register_env("tests/Add-v0", AddEnv, max_turns=3)
    env = gymnasium.make("tests/Add-v0", split="heldout")
    assert env.unwrapped.max_turns == 3 and env.unwrapped.split == "heldout"
    with pytest.raises(EnvError, match="all gave task 'h'"):  # one held-out task: seeds cannot vary it
        check_env(env)
    env = gymnasium.make("tests/Add-v0")
    check_env(env)
    assert isinstance(env.unwrapped.np_random, np.random.Generator)
