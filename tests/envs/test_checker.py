"""check_env catches each broken rule with a message naming it."""

from __future__ import annotations

import numpy as np
import pytest

from taurl.envs import Task, TextEnv, ToolEnv, Turn, check_env, user
from taurl.envs.tools import Tool
from taurl.errors import EnvError

TASKS = {"train": [Task(f"t{i}", f"Say {i}.", answer=i) for i in range(5)], "heldout": [Task("h", "Say 9.", 9)]}


class Echo(TextEnv):
    """A correct little env: answer the number; one retry."""

    tasks = TASKS

    def turn(self, action: str) -> Turn:
        ok = action.strip() == str(self.task.answer)
        return Turn([] if ok else [user("Try again.")], float(ok), ok, {"success": ok})


def lookup(key: str) -> str:
    """Look a key up."""
    return key


class Lookup(ToolEnv):
    tasks = TASKS

    def __init__(self, split: str = "train") -> None:
        super().__init__([lookup], split)

    def score(self, task: Task, answer: str) -> bool:
        return answer == str(task.answer)


def test_correct_envs_pass() -> None:
    check_env(Echo())
    check_env(Lookup())


class RaisesOnGarbage(Echo):
    def turn(self, action: str) -> Turn:
        if not action.isdigit():
            raise ValueError("cannot parse")
        return super().turn(action)


class IgnoresSeed(Echo):
    """Draws tasks from its own counter instead of the seeded rng."""

    draws = 0

    def make_task(self, rng: np.random.Generator) -> Task:
        self.draws += 1
        return TASKS["train"][self.draws % 5]


class SameTask(Echo):
    def make_task(self, rng: np.random.Generator) -> Task:
        return TASKS["train"][0]


class IntReward(Echo):
    def step(self, action: str):  # type: ignore[no-untyped-def]
        obs, r, te, tr, info = super().step(action)
        return obs, int(r), te, tr, info


class NumpyBool(Echo):
    def step(self, action: str):  # type: ignore[no-untyped-def]
        obs, r, te, tr, info = super().step(action)
        return obs, r, np.bool_(te), tr, info


class NeverEnds(Echo):
    def __init__(self) -> None:
        super().__init__(max_turns=10_000)


class BadMessages(Echo):
    def first_messages(self, task: Task) -> list:
        return [task.prompt]


class NoObservation(Echo):
    def turn(self, action: str) -> Turn:
        return Turn([], 0.0, False)


class SilentToolErrors(Lookup):
    def turn(self, action: str) -> Turn:
        return Turn([user("ok")], 0.0, False)


class BadToolSchema(Lookup):
    def __init__(self) -> None:
        broken = Tool("lookup", "Look up.", {"type": "object", "properties": {"key": {}}}, lookup)
        ToolEnv.__init__(self, [broken])


class NoOrderCheck(Echo):
    def step(self, action: str):  # type: ignore[no-untyped-def]
        self.done = False
        return super().step(action)


@pytest.mark.parametrize(
    ("env_cls", "message"),
    [
        (RaisesOnGarbage, "raised ValueError: cannot parse; model text of any kind must become an observation"),
        (IgnoresSeed, "twice gave different tasks"),
        (SameTask, "different seeds must give different tasks"),
        (IntReward, "reward must be a finite Python float, got int"),
        (NumpyBool, "terminated must be a Python bool"),
        (NeverEnds, "did not end within 200 steps"),
        (BadMessages, "must be a dict with 'role'"),
        (NoObservation, "no observation although the episode goes on"),
        (SilentToolErrors, "must count as a tool error"),
        (BadToolSchema, "parameter 'key' needs a 'type'"),
        (NoOrderCheck, "step() after the episode ended did not raise"),
    ],
)
def test_broken_envs_are_caught(env_cls: type, message: str) -> None:
    with pytest.raises(EnvError, match="check_env: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        check_env(env_cls())
