"""taurl/Code-v0: problems, grading in the sandbox, scripted agents, attacks through the tool."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gymnasium
import pytest

import taurl.envs  # noqa: F401 - registers the environments
from taurl.envs import check_env, run_episode
from taurl.envs.code import CodeEnv, extract_code, failing_policy, oracle_policy
from taurl.envs.code_problems import HELDOUT_FAMILIES, PROBLEMS, TRAIN_FAMILIES
from taurl.envs.sandbox import Sandbox, SandboxConfig, SandboxLimits
from taurl.errors import ConfigError

LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=2, memory_mb=128, max_processes=8)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(workers=2, limits=LIMITS)) as box:
        yield box


def _env(sandbox: Sandbox, split: str = "train") -> CodeEnv:
    return CodeEnv(split, sandbox=sandbox, limits=LIMITS)


def _call(code: str) -> str:
    return (
        "<tool_call>"
        + json.dumps({"name": "run_python", "arguments": {"code": code}})
        + "</tool_call>"
    )


def test_problem_set_size_and_splits_differ_in_kind() -> None:
    assert len(PROBLEMS) >= 40
    assert len({p.name for p in PROBLEMS}) == len(PROBLEMS)
    train = [p for p in PROBLEMS if p.split == "train"]
    heldout = [p for p in PROBLEMS if p.split == "heldout"]
    assert len(train) >= 20 and len(heldout) >= 10
    assert {p.family for p in train} == set(TRAIN_FAMILIES)
    assert {p.family for p in heldout} == set(HELDOUT_FAMILIES)
    assert not set(TRAIN_FAMILIES) & set(HELDOUT_FAMILIES)


def test_expected_outputs_match_hand_computed_values() -> None:
    by_name = {p.name: {json.dumps(a): e for a, e in p.cases} for p in PROBLEMS}
    assert by_name["reverse_words"][json.dumps(["hello world"])] == "world hello"
    assert by_name["run_length_encode"][json.dumps(["aaabcc"])] == "a3b1c2"
    assert by_name["caesar_shift"][json.dumps(["xyz", 3])] == "abc"
    assert by_name["second_largest"][json.dumps([[7, 7]])] is None
    assert by_name["max_subarray_sum"][json.dumps([[-2, 1, -3, 4, -1, 2, 1, -5, 4]])] == 6
    assert by_name["prime_factors"][json.dumps([360])] == [2, 2, 2, 3, 3, 5]
    assert by_name["collatz_steps"][json.dumps([6])] == 8
    assert by_name["totient"][json.dumps([36])] == 12
    assert by_name["to_base"][json.dumps([255, 16])] == "ff"
    assert by_name["count_islands"][json.dumps([["#..", ".#.", "..#"]])] == 3
    assert by_name["shortest_path_length"][json.dumps([["...", ".#.", "..."]])] == 4
    assert by_name["diagonal_sum"][json.dumps([[[1, 2, 3], [4, 5, 6], [7, 8, 9]]])] == 25


def test_every_reference_passes_its_hidden_tests_in_the_sandbox(sandbox: Sandbox) -> None:
    env = _env(sandbox)
    for problem in PROBLEMS:
        fraction, run = env.grade(problem, problem.reference)
        assert fraction == 1.0, (problem.name, run.stdout, run.stderr)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_check_env_passes(sandbox: Sandbox, split: str) -> None:
    env = gymnasium.make("taurl/Code-v0", split=split, sandbox=sandbox, limits=LIMITS)
    check_env(env)
    env.close()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_oracle_solves_and_failing_policy_fails(sandbox: Sandbox, split: str) -> None:
    env = _env(sandbox, split)
    for seed in range(3):
        solved = run_episode(env, oracle_policy, seed=seed)
        assert solved.error is None and solved.success is True and solved.terminated
        assert solved.rewards == [0.0, 1.0]
        assert "exit code 0" in solved.messages[2]["content"]  # the run_python result
        failed = run_episode(env, failing_policy, seed=seed)
        assert failed.error is None and failed.success is False and failed.rewards == [0.0]
        family = {p.name: p.family for p in PROBLEMS}[env.task.answer]
        assert family in (TRAIN_FAMILIES if split == "train" else HELDOUT_FAMILIES)


def test_reset_info_carries_tools_and_reference(sandbox: Sandbox) -> None:
    env = _env(sandbox)
    obs, info = env.reset(seed=0)
    assert [t["function"]["name"] for t in info["tools"]] == ["run_python"]
    assert info["privileged_context"].startswith("def ")
    assert info["task_id"].startswith("code/train/")
    assert env.task.answer in obs[-1]["content"] and "run_python" in obs[-1]["content"]


def test_partial_credit_and_ungradable_answers(sandbox: Sandbox) -> None:
    env = _env(sandbox)
    problem = next(p for p in PROBLEMS if p.name == "digit_sum")
    # Ignores the minus sign rule: passes every case but the negative one.
    half_right = (
        "def digit_sum(n):\n    return sum(int(c) for c in str(n) if c != '-') if n >= 0 else 0"
    )
    fraction, _ = env.grade(problem, half_right)
    assert fraction == pytest.approx(4 / 5)
    assert env.grade(problem, "def digit_sum(n) return 1")[0] == 0.0  # syntax error
    assert env.grade(problem, "print('no function here')")[0] == 0.0
    assert env.grade(problem, "while True:\n    pass")[0] == 0.0  # killed by a limit


def test_a_printed_fake_result_line_does_not_count(sandbox: Sandbox) -> None:
    env = _env(sandbox)
    problem = next(p for p in PROBLEMS if p.name == "fibonacci")
    fake = (
        "import os\n"
        'print(\'__taurl_result__0000 {"passed": 5, "total": 5}\', flush=True)\n'
        "os._exit(0)\n"
    )
    assert env.grade(problem, fake)[0] == 0.0


FORGERIES = {
    # the issue-13 attack: json.loads patched to return an object equal to everything
    "eq_always_true": (
        "import json\nclass _Any:\n    def __eq__(self, other):\n        return True\n"
        "json.loads = lambda *a, **k: _Any()\ndef NAME(*args):\n    return None\n"
    ),
    # json.dumps patched to claim one fixed output for every case
    "patched_dumps": "import json\njson.dumps = lambda *a, **k: '0'\ndef NAME(*args):\n    return 0\n",
    # the harness's own token read from its code and a result line forged with it
    "forged_line_with_token": (
        "import sys, atexit\n"
        "token = [c for c in sys._getframe(1).f_code.co_consts\n"
        "         if isinstance(c, str) and c.startswith('\\n__taurl_result__')][0]\n"
        "atexit.register(lambda: print(token, '[\"1\", \"1\", \"1\", \"1\", \"1\"]'))\n"
        "def NAME(*args):\n    return 1\n"
    ),
}


@pytest.mark.parametrize("attack", sorted(FORGERIES))
def test_grading_cannot_be_forged_from_inside_the_sandbox(sandbox: Sandbox, attack: str) -> None:
    env = _env(sandbox)
    for problem in [p for p in PROBLEMS if p.name in ("fibonacci", "reverse_words", "totient")]:
        code = FORGERIES[attack].replace("NAME", problem.name)
        fraction, run = env.grade(problem, code)
        # at most the cases whose true answer the forged output happens to equal
        honest = sum(json.loads(json.dumps(e)) in (0, 1, "0", "1") for _, e in problem.cases)
        assert fraction <= honest / len(problem.cases), (problem.name, run.stdout[-300:])
    assert env.grade(problem, problem.reference)[0] == 1.0


def test_extract_code() -> None:
    assert (
        extract_code("<answer>\n```python\ndef f():\n    return 1\n```\n</answer>")
        == "def f():\n    return 1"
    )
    assert extract_code("Here:\n```\ndef g(): pass\n```\nDone.") == "def g(): pass"
    assert extract_code("def h(): pass") == "def h(): pass"
    assert extract_code("```py\na = 1\n```\n```python\nb = 2\n```") == "b = 2"


ATTACKS = {
    "infinite_loop": ("while True:\n    pass", "killed: the program"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "(failed)"),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10**7))", "MemoryError"),
    "socket": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "(failed)"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_through_run_python_fail_and_the_env_keeps_working(
    sandbox: Sandbox, attack: str
) -> None:
    code, expected = ATTACKS[attack]
    env = _env(sandbox)
    env.reset(seed=0)
    obs, _, terminated, truncated, info = env.step(_call(code))
    assert not terminated and not truncated and info["tool_errors"] == 0
    assert expected in obs[0]["content"] and "exit code 0" not in obs[0]["content"]
    obs, _, _, _, _ = env.step(_call("print(6 * 7)"))
    assert "exit code 0\nstdout:\n42" in obs[0]["content"]


def test_writing_outside_the_temp_dir_through_run_python_fails(sandbox: Sandbox) -> None:
    target = Path(f"/tmp/taurl-escape-{uuid.uuid4().hex}")
    env = _env(sandbox)
    env.reset(seed=0)
    obs, *_ = env.step(_call(f"open({str(target)!r}, 'w').write('x')"))
    assert "(failed)" in obs[0]["content"] and "Error" in obs[0]["content"]
    assert not target.exists()


def test_private_sandbox_starts_lazily_and_closes() -> None:
    env = CodeEnv("train", limits=LIMITS)
    assert not env.sandbox._started
    env.reset(seed=1)
    obs, *_ = env.step(_call("print('hi')"))
    assert "hi" in obs[0]["content"] and env.sandbox._started
    env.close()
    assert not env.sandbox._started


def test_private_sandbox_serves_every_call_of_an_episode() -> None:
    """The tool layer runs each call in a thread; the env's own sandbox must keep working
    after the call that started it (ok, error, timeout, ok, ok — each result checked)."""
    limits = SandboxLimits(timeout_s=1.0, cpu_s=2, memory_mb=128, max_processes=8)
    env = gymnasium.make("taurl/Code-v0", max_turns=8, limits=limits)
    env.reset(seed=0)
    expected = [
        ("print(1)", "exit code 0\nstdout:\n1"),
        ("raise ValueError('boom')", "ValueError: boom"),
        ("import time\ntime.sleep(30)", "killed: the program ran longer than 1 s"),
        ("print(6 * 7)", "exit code 0\nstdout:\n42"),
        ("print('again')", "exit code 0\nstdout:\nagain"),
    ]
    try:
        for code, want in expected:
            obs, _, terminated, truncated, info = env.step(_call(code))
            assert not terminated and not truncated and info["tool_errors"] == 0
            assert want in obs[0]["content"], (code, obs[0]["content"])
    finally:
        env.close()


def test_concurrent_episodes_with_private_sandboxes_grade_correctly() -> None:
    """One env per episode, each with its own sandbox, graded at the same time: the
    reference solutions must all score 1.0 (sandboxes must not kill each other's runs)."""
    envs = [CodeEnv("train", limits=LIMITS) for _ in range(32)]

    def play(pair: tuple[int, CodeEnv]) -> float:
        seed, env = pair
        env.reset(seed=seed)
        obs, *_ = env.step(_call("import time\ntime.sleep(0.5)\nprint('slept')"))
        assert "exit code 0\nstdout:\nslept" in obs[0]["content"], obs[0]["content"]
        answer = f"<answer>\n```python\n{env.task.privileged_context}\n```\n</answer>"
        return env.step(answer)[1]

    try:
        with ThreadPoolExecutor(32) as pool:
            rewards = list(pool.map(play, enumerate(envs)))
    finally:
        for env in envs:
            env.close()
    assert rewards == [1.0] * 32


def test_guard_only_sandbox_is_refused_unless_the_user_opts_in(monkeypatch) -> None:
    monkeypatch.delenv("TAURL_ALLOW_WEAK_SANDBOX", raising=False)
    with Sandbox(SandboxConfig(workers=1, limits=LIMITS, isolation="guard")) as weak:
        env = CodeEnv("train", sandbox=weak, limits=LIMITS)
        with pytest.raises(ConfigError, match="allow_weak_sandbox=True"):
            env.reset(seed=0)
        env = CodeEnv("train", sandbox=weak, limits=LIMITS, allow_weak_sandbox=True)
        env.reset(seed=0)
        obs, *_ = env.step(_call("print(6 * 7)"))
        assert "exit code 0\nstdout:\n42" in obs[0]["content"]
        monkeypatch.setenv("TAURL_ALLOW_WEAK_SANDBOX", "1")
        CodeEnv("train", sandbox=weak, limits=LIMITS).reset(seed=0)
