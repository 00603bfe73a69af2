"""Errors are loud: broken environments through the real `taurl eval` / `taurl rollout` entry point.

Each env below is broken the way real ones were found broken: a factory without
``split``, a ``reset`` without ``options``, a dict observation, and one that fails on
some tasks only. The HF backend on the tiny model serves the few turns that run.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import pytest

from taurl.agents.loop import TRACEBACK_CHARS, traceback_summary
from taurl.cli import main
from taurl.rollout.failures import env_failures
from taurl.rollout.runner import task_seed
from taurl.types import Trajectory, read_jsonl


class NoSplitEnv(gymnasium.Env):
    """Its factory takes no ``split``: ``gymnasium.make(..., split=...)`` fails."""

    def __init__(self) -> None:
        pass


class NoOptionsEnv(gymnasium.Env):
    """A shim whose ``reset`` takes no ``options``, as the agent loop passes it."""

    def __init__(self, split: str = "train") -> None:
        pass

    def reset(self, *, seed: int | None = None):  # type: ignore[override]
        return [{"role": "user", "content": "hi"}], {}


class DictObsEnv(gymnasium.Env):
    """Returns one message dict instead of a list of messages."""

    def __init__(self, split: str = "train") -> None:
        pass

    def reset(self, *, seed=None, options=None):
        return {"role": "user", "content": "hi"}, {}


class FlakyEnv(gymnasium.Env):
    """Fails in ``reset`` on odd seeds; otherwise one turn worth 1."""

    def __init__(self, split: str = "train") -> None:
        pass

    def reset(self, *, seed=None, options=None):
        if seed % 2:
            raise ValueError(f"task file for seed {seed} is corrupt")
        return [{"role": "user", "content": f"Task {seed}"}], {"task_id": str(seed)}

    def step(self, action):
        return [], 1.0, True, False, {"success": True}


for _id, _cls in [("NoSplit", NoSplitEnv), ("NoOptions", NoOptionsEnv),
                  ("DictObs", DictObsEnv), ("Flaky", FlakyEnv)]:
    if f"taurl-test/{_id}-v0" not in gymnasium.registry:
        gymnasium.register(f"taurl-test/{_id}-v0", entry_point=_cls)

FLAGS = ["--model", "tiny-random", "--backend", "hf", "--no-progress", "--max-tokens", "4",
         "--max-turns", "1"]


def test_traceback_summary_keeps_the_innermost_frames_within_its_bound() -> None:
    def deep(n: int) -> None:
        if n == 0:
            raise KeyError("x" * 5000)
        deep(n - 1)

    with pytest.raises(KeyError) as info:
        deep(30)
    text = traceback_summary(info.value)
    assert len(text) <= TRACEBACK_CHARS
    assert text.startswith("Traceback") and "in deep" in text
    assert "\nKeyError: 'xxx" in text and text.endswith("...")
    with pytest.raises(ValueError) as info:
        deep_ok = 1 / 1
        raise ValueError(f"short {deep_ok}")
    short = traceback_summary(info.value)
    assert short.startswith("Traceback (most recent call last):")
    assert "test_failures.py" in short and short.endswith("ValueError: short 1.0")


def test_env_failures_count_per_env_and_keep_the_first() -> None:
    def traj(env: str, error: str | None) -> Trajectory:
        info = {} if error is None else {"error": error, "traceback": f"tb of {error}"}
        return Trajectory(token_ids=[], loss_mask=[], logprobs=[], turn_ids=[], rewards=[],
                          episode_return=0.0, termination="error" if error else "terminated",
                          env_id=env, info=info)

    fails = env_failures([traj("a", None), traj("a", "first"), traj("b", "only"),
                          traj("a", "second"), traj("c", None)])
    assert [(f.env_id, f.errors, f.episodes, f.first_error, f.traceback) for f in fails] == [
        ("a", 2, 3, "first", "tb of first"), ("b", 1, 1, "only", "tb of only")]
    assert [f.all_failed for f in fails] == [False, True]
    assert fails[0].format("m1").splitlines() == [
        "taurl: a (m1): 2/3 episodes ended in error; the first: first", "    tb of first"]


@pytest.mark.parametrize(("env", "needle"), [
    ("NoSplit", "unexpected keyword argument 'split'"),
    ("NoOptions", "unexpected keyword argument 'options'"),
    ("DictObs", "expected a list of chat messages"),
])
def test_eval_of_a_broken_env_fails_and_says_why_on_stderr(
    env: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_id = f"taurl-test/{env}-v0"
    code = main(["eval", *FLAGS, "--env", env_id, "--episodes", "2", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert f"taurl: {env_id}: 2/2 episodes ended in error; the first:" in err
    assert needle in err and "Traceback (most recent call last):" in err
    assert f"taurl: error: every episode of {env_id} ended in error" in err
    assert "error:2" in out  # the table is still printed and written
    saved = json.loads((tmp_path / "eval.json").read_text())["failures"]
    assert saved["tiny-random"][0]["errors"] == 2 and needle in saved["tiny-random"][0]["first_error"]


def test_rollout_of_a_partly_broken_env_succeeds_but_prints_the_first_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_id = "taurl-test/Flaky-v0"
    seeds = [task_seed(0, env_id, "train", i) for i in range(4)]
    bad = [s for s in seeds if s % 2]
    assert 0 < len(bad) < len(seeds), "seed 0's first 4 tasks should mix odd and even seeds"
    out_file = tmp_path / "t.jsonl"
    code = main(["rollout", *FLAGS, "--env", env_id, "--tasks", "4", "--samples", "1",
                 "--out", str(out_file)])
    _, err = capsys.readouterr()
    assert code == 0, err
    first = f"task file for seed {bad[0]} is corrupt"
    assert f"taurl: {env_id}: {len(bad)}/4 episodes ended in error; the first: " in err
    assert first in err and "in reset" in err  # the traceback names the failing function
    assert "every episode" not in err
    errored = [t for t in read_jsonl(out_file) if t.termination == "error"]
    assert len(errored) == len(bad) and "Traceback" in str(errored[0].info["traceback"])


def test_rollout_of_an_env_that_always_fails_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["rollout", *FLAGS, "--env", "taurl-test/NoOptions-v0", "--tasks", "2",
                 "--samples", "1", "--out", str(tmp_path / "t.jsonl")])
    assert code == 1
    assert "every episode of taurl-test/NoOptions-v0 ended in error" in capsys.readouterr().err
