"""Eval metrics against values computed by hand in the comments."""

from __future__ import annotations

import json
import math

import pytest

from taurl.rollout.eval import EnvResult, EvalReport, compare
from taurl.rollout.metrics import (
    batch_means,
    mean_ci,
    paired_diff_ci,
    pass_at_k,
    student_t_quantile,
    summarize,
    summarize_rollout,
)
from taurl.types import Trajectory


def traj(group: str, ret: float, success: bool | None, turns: int = 1, *, calls: int = 0,
         errors: int = 0, termination: str = "terminated", sampled: int = 3) -> Trajectory:
    # one prompt token, then `turns` turns of `sampled` tokens each
    per_turn = [sampled] * turns
    token_ids = [1] + [5] * sum(per_turn)
    turn_ids = [-1] + [h for h, n in enumerate(per_turn) for _ in range(n)]
    rewards = [0.0] * (turns - 1) + [ret] if turns else []
    return Trajectory(
        token_ids=token_ids, loss_mask=[0] + [1] * sum(per_turn),
        logprobs=[0.0] + [-0.5] * sum(per_turn), turn_ids=turn_ids, rewards=rewards,
        episode_return=ret if turns else 0.0, termination=termination, env_id="E", group_id=group,
        success=success, info={"tool_calls": calls, "tool_errors": errors},
    )


def test_pass_at_k_hand_values():
    # n=5, c=2: pass@1 = c/n = 0.4; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@3 = 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9; pass@4: n-c=3 < 4 -> 1
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    # large n without overflow: n=200, c=1, k=100 -> 1 - C(199,100)/C(200,100) = 1 - 100/200
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def test_student_t_quantiles_match_tables():
    # two-sided 95% critical values from a t table
    for df, expected in [(1, 12.7062), (4, 2.7764), (9, 2.2622), (49, 2.0096)]:
        assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_mean_ci_hand_values():
    # [1,2,3,4]: mean 2.5, s^2 = (2.25+0.25+0.25+2.25)/3 = 5/3, se = sqrt(5/12) = 0.645497
    # half-width = t(0.975, 3) * se = 3.182446 * 0.645497 = 2.054260
    mean, half = mean_ci([1, 2, 3, 4])
    assert mean == 2.5 and half == pytest.approx(2.054260, abs=1e-5)
    assert math.isnan(mean_ci([3.0])[1])
    # paired: diffs [1, 1, 1, 1] -> mean 1, zero variance
    assert paired_diff_ci([0, 1, 2, 3], [1, 2, 3, 4]) == (1.0, 0.0)


def test_summarize_hand_values():
    trajs = [
        # task A: 2 samples, 1 success; task B: 2 samples, 0 successes; task C: 2 successes
        traj("A", 1.0, True, turns=2, calls=2, errors=1), traj("A", 0.0, False),
        traj("B", 0.0, False, calls=1), traj("B", -0.5, None, termination="max_turns"),
        traj("C", 1.0, True, calls=1), traj("C", 1.0, True, termination="context_overflow"),
    ]
    m = summarize(trajs, wall_s=2.0)
    assert m.episodes == 6 and m.tasks == 3
    # returns: 1, 0, 0, -0.5, 1, 1 -> mean 2.5/6
    assert m.mean_return == pytest.approx(2.5 / 6)
    assert m.success_rate == pytest.approx(3 / 6)
    # pass@1 = mean(1/2, 0, 1) = 0.5; pass@2 = mean(1, 0, 1) = 2/3
    assert m.pass_at_k == {"1": pytest.approx(0.5), "2": pytest.approx(2 / 3)}
    assert m.mean_turns == pytest.approx(7 / 6)
    # 4 tool calls, 1 error -> validity 3/4
    assert m.tool_calls == 4 and m.tool_call_validity == pytest.approx(0.75)
    assert m.terminations == {"terminated": 4, "max_turns": 1, "context_overflow": 1}
    assert m.errors == 0
    # sampled tokens: 7 turns * 3 = 21 over 2 s
    assert m.sampled_tokens == 21 and m.tokens_per_s == pytest.approx(10.5)


def test_rollout_summary_and_batch_means_count_as_the_eval_table_does():
    trajs = [traj("A", 1.0, True, turns=2, calls=2, errors=1), traj("A", 0.0, False),
             traj("B", -0.5, None, termination="max_turns", calls=1),
             traj("B", 0.0, False, termination="error")]
    trajs[0].info["finish_reasons"] = ["stop", "length"]
    trajs[1].info["finish_reasons"] = ["length"]
    s = summarize_rollout(trajs, wall_s=4.0)
    # returns 1, 0, -0.5, 0 -> mean 0.125; 5 turns * 3 = 15 sampled tokens over 4 s
    assert s.episodes == 4 and s.errors == 1 and s.mean_return == pytest.approx(0.125)
    assert s.terminations == {"terminated": 2, "max_turns": 1, "error": 1}
    assert s.sampled_tokens == 15 and s.tokens_per_s == pytest.approx(3.75)
    m = batch_means(trajs)
    assert m["rollout/return"] == pytest.approx(0.125) and m["rollout/success"] == 0.25
    assert m["rollout/tool_calls"] == pytest.approx(3 / 4)
    assert m["rollout/tool_errors"] == pytest.approx(1 / 4)
    assert m["rollout/turns"] == pytest.approx(5 / 4)
    # episode tokens: 1 prompt + 6, then 1 + 3 three times -> 19 / 4
    assert m["rollout/episode_tokens"] == pytest.approx(19 / 4)
    assert m["rollout/termination/error"] == 0.25 and m["rollout/termination/truncated"] == 0.0
    # 3 generations, 2 cut at the token limit
    assert m["rollout/stop/length"] == pytest.approx(2 / 3)
    assert summarize(trajs, 4.0).terminations == s.terminations


def test_compare_and_report():
    a = [traj("A", 0.0, False), traj("B", 1.0, True), traj("C", 0.0, False)]
    b = [traj("A", 1.0, True), traj("B", 1.0, True), traj("C", 1.0, True)]
    ra, rb = EnvResult(summarize(a, 1.0, "E"), a), EnvResult(summarize(b, 1.0, "E"), b)
    comp = compare(ra, rb)
    # diffs [1, 0, 1]: mean 2/3, s^2 = 1/3, se = 1/3, half = t(0.975, 2) * 1/3 = 4.302653/3
    assert comp.pairs == 3 and comp.return_diff == pytest.approx(2 / 3)
    assert comp.return_diff_ci95 == pytest.approx(4.302653 / 3, abs=1e-5)
    assert comp.success_diff == pytest.approx(2 / 3)
    report = EvalReport(config={}, models=["base", "trained"],
                        results={"base": {"E": ra.metrics}, "trained": {"E": rb.metrics}},
                        comparisons=[comp])
    md = report.to_markdown()
    lines = md.strip().splitlines()
    assert len(lines) == 5  # header, rule, base, trained, delta
    assert lines[2].startswith("| E | base | 3 | 0.333 ± ")
    assert "Δ (trained − base)" in lines[4] and "+0.667 ± 1.434" in lines[4]
    assert json.loads(json.dumps(report.to_dict()))["comparisons"][0]["pairs"] == 3
    with pytest.raises(ValueError, match="different tasks"):
        compare(ra, EnvResult(summarize(b[:2], 1.0, "E"), b[:2]))
