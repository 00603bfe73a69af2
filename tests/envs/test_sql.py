"""SQL-v0: read-only per-instance database, query limits, scoring, scripted solve and fail."""

from __future__ import annotations

import json

import gymnasium
import pytest

import taurl.envs  # noqa: F401  (registers the ids)
from taurl.envs import check_env, run_episode
from taurl.envs.sql import SQLEnv, failing_policy, oracle_policy
from taurl.errors import ConfigError


def call(query: str) -> str:
    return "<tool_call>" + json.dumps({"name": "sql", "arguments": {"query": query}}) + "</tool_call>"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_scripted_agents_solve_and_fail(split: str) -> None:
    env = gymnasium.make("taurl/SQL-v0", split=split)
    check_env(env)
    families = set()
    for seed in range(40):
        solved = run_episode(env, oracle_policy, seed=seed)
        assert solved.error is None and solved.success is True and solved.rewards == [0.0, 1.0], solved
        families.add(env.unwrapped.task.metadata["family"])
        failed = run_episode(env, failing_policy, seed=seed)
        assert failed.success is False and failed.terminated and failed.rewards == [0.0, 0.0]
    expected = {"salary", "department", "price", "stock"} if split == "train" else {"headcount", "ordered", "top_earner"}
    assert families == expected  # the splits ask different kinds of question


def test_query_results_and_row_limit() -> None:
    env = SQLEnv(max_rows=3)
    env.reset(seed=0)
    obs, reward, *_ = env.step(call("SELECT name, floor FROM departments ORDER BY floor, name"))
    assert reward == 0.0
    assert obs[0]["content"] == (
        "<tool_response>\nname | floor\nSupport | 1\nMarketing | 2\nSales | 2\n"
        "(only the first 3 rows are shown; narrow the query)\n</tool_response>"
    )
    obs, *_ = env.step(call("SELECT COUNT(*) AS n FROM employees"))
    assert obs[0]["content"] == "<tool_response>\nn\n60\n(1 row)\n</tool_response>"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM employees", "not authorized"),
        ("UPDATE products SET price = 0", "not authorized"),
        ("DROP TABLE orders", "not authorized"),
        ("ATTACH DATABASE 'x.db' AS x", "not authorized"),
        ("PRAGMA query_only = OFF", "not authorized"),
        ("SELECT * FROM nope", "no such table: nope"),
        ("SELECT 1; SELECT 2", "one statement at a time"),
        ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c",
         "ran longer than 0.2 s"),
    ],
)
def test_bad_queries_are_error_observations(query: str, message: str) -> None:
    env = SQLEnv(query_timeout_s=0.2)
    env.reset(seed=0)
    obs, reward, terminated, _, info = env.step(call(query))
    assert not terminated and reward == -0.1 and info["tool_errors"] == 1
    assert message in obs[0]["content"] and obs[0]["content"].startswith("<tool_response>\nError: ")
    obs, *_ = env.step(call("SELECT COUNT(*) FROM employees"))
    assert "\n60\n" in obs[0]["content"]  # nothing was changed, and the connection still works


def test_instances_do_not_share_a_database() -> None:
    a, b = SQLEnv(), SQLEnv()
    assert a.conn is not b.conn
    a.close()
    b.reset(seed=0)
    obs, *_ = b.step(call("SELECT COUNT(*) FROM orders"))
    assert "\n300\n" in obs[0]["content"]


def test_name_answers_reject_lists_of_candidates() -> None:
    env = SQLEnv()
    for seed in range(100):
        env.reset(seed=seed)
        if env.task.metadata["family"] == "department":
            break
    answer = env.task.answer
    assert env.score(env.task, f"They work in {answer}.")
    assert env.score(env.task, answer.upper())
    assert not env.score(env.task, "Sales, Support, Research, Finance, Marketing, Engineering")
    assert not env.score(env.task, "somewhere")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_rows must be an int >= 1"):
        SQLEnv(max_rows=0)
    with pytest.raises(ConfigError, match="query_timeout_s must be a number > 0"):
        SQLEnv(query_timeout_s=0)
