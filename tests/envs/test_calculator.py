"""Calculator-v0: the safe calculator tool, task splits, scoring, scripted solve and fail."""

from __future__ import annotations

import re

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs import check_env, run_episode
from taurl.envs.calculator import CalculatorEnv, calculator, failing_policy, oracle_policy
from taurl.errors import ConfigError


@pytest.mark.parametrize(
    ("expression", "result"),
    [("12 * (3 + 4)", "84"), ("7 / 2", "3.5"), ("1 / 3", "0.3333333333"), ("2 ^ 10", "1024"),
     ("-(4 - 10) =", "6"), ("6 × 7 ÷ 3", "14"), ("17 // 5 + 17 % 5", "5"), ("2.5 * 4", "10")],
)
def test_calculator_evaluates(expression: str, result: str) -> None:
    assert calculator(expression) == result


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('true')", "unsupported syntax"),
        ("open('/etc/passwd')", "unsupported syntax"),
        ("x + 1", "unsupported syntax 'x'"),
        ("'a' * 3", "unsupported syntax"),
        ("(1).__class__", "unsupported syntax"),
        ("2 ** 1000", "exponent 1000 is too large"),
        ("10 ** 99 * 10 ** 99", "out of range"),
        ("1 / 0", "division by zero"),
        ("1 +", "cannot parse"),
        ("1" * 400, "longer than 300"),
    ],
)
def test_calculator_rejects(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        calculator(expression)


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"style": "word", "num_operations": 3, "operations": "+-*"}, {"style": "mixed", "num_operations": 2}],
)
def test_scripted_agents_solve_and_fail(split: str, kwargs: dict) -> None:
    env = gymnasium.make("taurl/Calculator-v0", split=split, **kwargs)
    check_env(env)
    for seed in range(30):
        solved = run_episode(env, oracle_policy, seed=seed)
        assert solved.error is None and solved.success is True, solved
        assert solved.rewards == [0.0, 1.0] and solved.terminated
        failed = run_episode(env, failing_policy, seed=seed)
        assert failed.success is False and failed.rewards == [0.0] and failed.terminated


def test_heldout_differs_in_kind() -> None:
    def prompts(split: str, style: str) -> list[str]:
        env = CalculatorEnv(split, style=style, max_value=20, num_operations=2)
        return [env.reset(seed=s)[0][0]["content"] for s in range(60)]

    for style in ("expression", "word"):
        train, heldout = prompts("train", style), prompts("heldout", style)
        train_openings = {p.split(" ")[0] for p in train}
        heldout_openings = {p.split(" ")[0] for p in heldout}
        assert not train_openings & heldout_openings, (train_openings, heldout_openings)
    # every held-out task has an operand above the train range, none of the train tasks has
    env = CalculatorEnv("heldout", max_value=20, num_operations=2)
    for s in range(60):
        env.reset(seed=s)
        assert max(int(x) for x in re.findall(r"\d+", env.task.privileged_context.split("=")[0])) > 20
    env = CalculatorEnv("train", max_value=20, num_operations=2)
    for s in range(60):
        env.reset(seed=s)
        assert max(int(x) for x in re.findall(r"\d+", env.task.privileged_context.split("=")[0])) <= 20


def test_answer_format_is_forgiving() -> None:
    env = CalculatorEnv()
    env.reset(seed=0)
    answer = env.task.answer
    for text, ok in [
        (f"<answer>{answer}</answer>", True),
        (f"So the result is {answer}.", True),
        (f"first 3, then <answer> {answer} </answer> and 99 later", True),
        (f"{answer} is wrong, it is {answer + 1}", False),
        ("I do not know", False),
    ]:
        env.reset(seed=0)
        _, reward, terminated, _, info = env.step(text)
        assert terminated and info["success"] is ok and reward == float(ok), text


def test_word_problems_apply_steps_in_order() -> None:
    env = CalculatorEnv(style="word", num_operations=3, operations="+*")
    for s in range(40):
        env.reset(seed=s)
        expression, answer = env.task.privileged_context.split(" = ")
        assert calculator(expression) == answer == str(env.task.answer)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "poem"}, "style must be 'expression', 'word' or 'mixed'"),
        ({"min_value": 5, "max_value": 5}, "need 0 <= min_value < max_value"),
        ({"num_operations": 4}, "num_operations must be 1, 2 or 3"),
        ({"operations": "+/"}, "operations must be a non-empty string of"),
        ({"max_value": 2.5}, "max_value must be an int"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        CalculatorEnv(**kwargs)


def test_final_answer_tool_ends_the_episode_with_its_argument() -> None:
    env = gymnasium.make("taurl/CalculatorAgent-v0")
    obs, info = env.reset(seed=3)
    names = [t["function"]["name"] for t in info["tools"]]
    assert names == ["calculator", "final_answer"]
    task = env.unwrapped.task
    expression = task.privileged_context.split(" = ")[0]
    # The 0.5B's habit: the call and the answer as two JSON objects, one per line.
    obs, reward, terminated, truncated, info = env.step(
        f'{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}'
    )
    assert not terminated and f"{task.answer}" in obs[0]["content"]
    obs, reward, terminated, truncated, info = env.step(
        f'{{"name": "calculator", "arguments": {{"expression": "{task.answer}"}}}}\n'
        f'{{"name": "final_answer", "arguments": {{"answer": {task.answer}}}}}'
    )
    assert terminated and not truncated and reward == 1.0 and info["success"] is True
    assert obs == [] and info["tool_calls"] == 2 and info["tool_errors"] == 0

    env.reset(seed=3)
    obs, reward, terminated, _, info = env.step('{"name": "final_answer", "arguments": {"answer": "7"}}')
    assert terminated and reward == 0.0 and info["success"] is False

    env.reset(seed=3)  # a bad final_answer call is an error the model reads, not an answer
    obs, reward, terminated, _, info = env.step('{"name": "final_answer", "arguments": {"value": 7}}')
    assert not terminated and reward == -0.1 and "bad arguments for 'final_answer'" in obs[0]["content"]

    plain = gymnasium.make("taurl/Calculator-v0")  # without answer_tool the name is unknown
    _, info = plain.reset(seed=0)
    assert [t["function"]["name"] for t in info["tools"]] == ["calculator"]
    obs, _, terminated, _, _ = plain.step('<tool_call>{"name": "final_answer", "arguments": {"answer": "3"}}</tool_call>')
    assert not terminated and "unknown tool 'final_answer'" in obs[0]["content"]
