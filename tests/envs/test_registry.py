"""Every built-in id is registered; the three core envs make on both splits and pass check_env."""

from __future__ import annotations

import subprocess
import sys

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs import check_env

IDS = ["taurl/Calculator-v0", "taurl/SQL-v0", "taurl/GuessNumber-v0", "taurl/CalculatorAgent-v0",
       "taurl/Code-v0", "taurl/Web-v0"]


def test_all_ids_registered() -> None:
    for env_id in IDS:
        assert env_id in gymnasium.registry, env_id
    assert gymnasium.registry["taurl/Code-v0"].entry_point == "taurl.envs.code:CodeEnv"
    assert gymnasium.registry["taurl/Web-v0"].entry_point == "taurl.envs.web:WebEnv"


@pytest.mark.parametrize("env_id", IDS[:4])
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_make_both_splits(env_id: str, split: str) -> None:
    env = gymnasium.make(env_id, split=split)
    assert env.unwrapped.split == split
    check_env(env)
    env.close()


def test_importing_envs_stays_light() -> None:
    code = ("import sys, taurl.envs; heavy = {'torch', 'transformers', 'vllm'} & set(sys.modules); "
            "lazy = {'taurl.envs.calculator', 'taurl.envs.sql', 'taurl.envs.game'} & set(sys.modules); "
            "print(sorted(heavy), sorted(lazy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_agent_calculator_asks_products_the_tool_pays_for() -> None:
    """Train: two 3-digit operands; held-out: one of them 4-digit. Answers need the tool."""
    for split, low, high in (("train", 100, 999), ("heldout", 100, 1998)):
        env = gymnasium.make("taurl/CalculatorAgent-v0", split=split)
        for seed in range(20):
            env.reset(seed=seed)
            task = env.unwrapped.task
            a, b = (int(x) for x in task.privileged_context.split(" = ")[0].split(" * "))
            assert low <= min(a, b) and max(a, b) <= high and task.answer == a * b, task
            if split == "heldout":
                assert max(a, b) >= 1000, task
        env.close()
