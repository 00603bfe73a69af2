"""Reward-side estimators against values computed by hand (written out in each test)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from taurl.errors import ConfigError
from taurl.learners import advantages as A
from taurl.learners import turns as TU


def close(a: torch.Tensor, b: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), torch.tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# -- GAE ------------------------------------------------------------------------------------


def test_gae_by_hand() -> None:
    # 3 steps, gamma=0.9, lam=0.8, rewards (0, 0, 1), values (0.5, 0.4, 0.3), V after end = 0.
    # d2 = 1 + 0 - 0.3 = 0.7                      A2 = 0.7
    # d1 = 0 + 0.9*0.3 - 0.4 = -0.13              A1 = -0.13 + 0.72*0.7 = 0.374
    # d0 = 0 + 0.9*0.4 - 0.5 = -0.14              A0 = -0.14 + 0.72*0.374 = 0.12928
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.3]])
    adv, ret = A.gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.7]])
    close(ret, [[0.62928, 0.774, 1.0]])


def test_gae_skips_masked_positions() -> None:
    # Sampled tokens at 1, 2, 5 (observation tokens at 3, 4; prompt at 0). The result
    # must equal GAE over the three sampled steps alone — the previous test's numbers —
    # whatever values/rewards sit on the masked positions.
    mask = torch.tensor([[0, 1, 1, 0, 0, 1]], dtype=torch.float32)
    r = torch.tensor([[9.0, 0.0, 0.0, 5.0, 5.0, 1.0]])
    v = torch.tensor([[7.0, 0.5, 0.4, -3.0, 8.0, 0.3]])
    adv, ret = A.gae(r, v, mask, gamma=0.9, lam=0.8)
    close(adv, [[0.0, 0.12928, 0.374, 0.0, 0.0, 0.7]])
    close(ret, [[0.0, 0.62928, 0.774, 0.0, 0.0, 1.0]])


def test_gae_masked_equals_compressed_random() -> None:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(3, 20, generator=g) > 0.4).float()
    r = torch.randn(3, 20, generator=g) * mask
    v = torch.randn(3, 20, generator=g)
    adv, _ = A.gae(r, v, mask, 0.97, 0.9)
    for b in range(3):
        keep = mask[b] > 0
        n = int(keep.sum())
        ref, _ = A.gae(r[b][keep][None], v[b][keep][None], torch.ones(1, n), 0.97, 0.9)
        close(adv[b][keep], ref[0].tolist())


# -- group baselines ------------------------------------------------------------------------


def test_group_normalize_std_and_none() -> None:
    # group 0: (1, 0, 1, 0) mean 0.5, unbiased std = sqrt((4 * 0.25) / 3) = 0.57735
    # group 1: (3,) singleton -> 0
    s = torch.tensor([1.0, 0.0, 1.0, 0.0, 3.0])
    g = torch.tensor([0, 0, 0, 0, 7])
    k = 0.5 / math.sqrt(1 / 3)
    close(A.group_normalize(s, g, "std", eps=0.0), [k, -k, k, -k, 0.0])
    close(A.group_normalize(s, g, "none"), [0.5, -0.5, 0.5, -0.5, 0.0])


def test_group_normalize_all_equal_is_zero() -> None:
    s = torch.tensor([2.0, 2.0, 2.0, 5.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1])
    # group 0: all equal -> 0 (0 / (0 + eps)); group 1: mean 3, std sqrt(8) -> +-2/2.8284
    close(A.group_normalize(s, g, "std", eps=1e-6), [0, 0, 0, 2 / math.sqrt(8), -2 / math.sqrt(8)])


def test_rloo_by_hand() -> None:
    # group (1, 0, 0): A_0 = 1 - 0 = 1, A_1 = 0 - 0.5 = -0.5, A_2 = -0.5; singleton -> 0
    s = torch.tensor([1.0, 0.0, 0.0, 4.0])
    g = torch.tensor([3, 3, 3, 1])
    close(A.rloo(s, g), [1.0, -0.5, -0.5, 0.0])


def test_batch_normalize_by_hand() -> None:
    # (1, 2, 3): mean 2, unbiased std 1
    close(A.batch_normalize(torch.tensor([1.0, 2.0, 3.0]), eps=0.0), [-1.0, 0.0, 1.0])
    close(A.batch_normalize(torch.tensor([5.0])), [0.0])


def test_zero_variance_groups() -> None:
    s = torch.tensor([1, 1, 0, 1, 3])  # ints, as episode returns may be
    g = torch.tensor([0, 0, 1, 1, 2])
    assert A.zero_variance_groups(s, g).tolist() == [True, True, False, False, False]


# -- turn-level credit ----------------------------------------------------------------------


def test_turn_returns_by_hand() -> None:
    # rewards (1, 0, 2), gamma 0.5: G2 = 2, G1 = 0 + 0.5*2 = 1, G0 = 1 + 0.5*1 = 1.5
    # second trajectory has 2 real turns (3rd is padding): G1 = 4, G0 = 1 + 0.5*4 = 3
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, 4.0, 0.0]])
    valid = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    close(A.turn_returns(r, valid, 0.5), [[1.5, 1.0, 2.0], [3.0, 4.0, 0.0]])


def test_turn_masks_and_broadcast() -> None:
    # prompt, turn 0 (2 tokens), observation of turn 0, turn 1 (1 token), padding
    turns = torch.tensor([[-1, 0, 0, 0, 1, -1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0]], dtype=torch.float32)
    assert TU.turn_start_mask(turns, mask).tolist() == [[0, 1, 0, 0, 1, 0]]
    assert TU.turn_end_mask(turns, mask).tolist() == [[0, 0, 1, 0, 1, 0]]
    close(TU.broadcast_turns(torch.tensor([[0.3, -2.0]]), turns, mask), [[0, 0.3, 0.3, 0, -2.0, 0]])
    x = torch.tensor([[9.0, 1.0, 2.0, 9.0, 4.0, 9.0]])
    close(TU.turn_sums(x, turns, mask, 2), [[3.0, 4.0]])
    close(TU.gather_turn_starts(x, turns, mask, 2), [[1.0, 4.0]])


def test_turn_gae_estimator_by_hand() -> None:
    # One trajectory, 2 turns; values read at each turn's first token: V0 = 0.5, V1 = 0.2.
    # rewards r0 = 0, r1 = 1, gamma_turn = 1, lam = 0.5:
    # d1 = 1 - 0.2 = 0.8 -> A1 = 0.8;  d0 = 0 + 0.2 - 0.5 = -0.3 -> A0 = -0.3 + 0.5*0.8 = 0.1
    turns = torch.tensor([[-1, 0, 0, 0, 1, 1]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]], dtype=torch.float32)
    values = torch.tensor([[0.0, 0.5, 0.9, 0.0, 0.2, 0.7]])
    inputs = A.AdvantageInputs(
        mask_B_T=mask, turn_ids_B_T=turns, token_rewards_B_T=torch.zeros(1, 6),
        turn_rewards_B_H=torch.tensor([[0.0, 1.0]]), turn_valid_B_H=torch.ones(1, 2),
        group_ids_B=torch.tensor([0]), values_B_T=values,
    )
    out, m = A.ESTIMATORS["turn_gae"](inputs, A.AdvantageParams(gamma_turn=1.0, lam=0.5))
    close(out.advantages_B_T, [[0, 0.1, 0.1, 0, 0.8, 0.8]])
    # value targets (A + V) only at the turn starts: 0.6 and 1.0
    close(out.returns_B_T * out.value_mask_B_T, [[0, 0.6, 0, 0, 1.0, 0]])
    # explained variance over the turns: G = (0.6, 1.0), V = (0.5, 0.2), G - V = (0.1, 0.8);
    # Var(G - V) = 0.245, Var(G) = 0.08 (n - 1) -> 1 - 0.245 / 0.08 = -2.0625
    assert m["adv/explained_variance"] == pytest.approx(-2.0625)


def test_group_norm_turn_credit_by_hand() -> None:
    # Two trajectories of one group, 2 turns each, gamma_turn 1:
    # traj 0 rewards (1, 0) -> G = (1, 0); traj 1 rewards (0, 0) -> G = (0, 0)
    # pooled group scores (1, 0, 0, 0): mean 0.25, "none" scale -> (0.75, -0.25, -0.25, -0.25)
    turns = torch.tensor([[-1, 0, 1], [-1, 0, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.float32)
    inputs = A.AdvantageInputs(
        mask_B_T=mask, turn_ids_B_T=turns, token_rewards_B_T=torch.zeros(2, 3),
        turn_rewards_B_H=torch.tensor([[1.0, 0.0], [0.0, 0.0]]), turn_valid_B_H=torch.ones(2, 2),
        group_ids_B=torch.tensor([0, 0]),
    )
    out, _ = A.ESTIMATORS["group_norm"](inputs, A.AdvantageParams(credit="turn", scale="none"))
    close(out.advantages_B_T, [[0, 0.75, -0.25], [0, -0.25, -0.25]])
    # episode credit: returns (1, 0) -> (0.5, -0.5) on every sampled token
    out, _ = A.ESTIMATORS["group_norm"](inputs, A.AdvantageParams(credit="episode", scale="none"))
    close(out.advantages_B_T, [[0, 0.5, 0.5], [0, -0.5, -0.5]])


def test_step_group_advantages_by_hand() -> None:
    # Turn 0 of three trajectories shares anchor 0 with step returns (1, 0, 0):
    # mean 1/3, "none" -> (2/3, -1/3, -1/3). Turn 1: traj 0 and 1 share anchor 5 with
    # (0, 1) -> (-0.5, 0.5); traj 2's turn 1 is alone (anchor 6) -> 0; padding (-1) -> 0.
    step_returns = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    anchors = torch.tensor([[0, 5], [0, 5], [0, 6]])
    out = A.step_group_advantages(step_returns, anchors, scale="none")
    close(out, [[2 / 3, -0.5], [-1 / 3, 0.5], [-1 / 3, 0.0]])
    anchors_pad = torch.tensor([[0, -1], [0, 5], [0, 6]])
    out = A.step_group_advantages(step_returns, anchors_pad, scale="none")
    close(out, [[2 / 3, 0.0], [-1 / 3, 0.0], [-1 / 3, 0.0]])


# -- teacher signal -------------------------------------------------------------------------


def test_opd_and_grpo_opd_by_hand() -> None:
    student = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    teacher = torch.tensor([[0.0, -0.5, -6.0, -9.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    # gaps on sampled tokens: 0.5 and -4.0; coef 2 -> 1.0, -8.0; clip 1 -> 0.5*2, -1*2
    close(A.opd(student, teacher, mask, coef=2.0), [[0, 1.0, -8.0, 0]])
    close(A.opd(student, teacher, mask, coef=2.0, clip=1.0), [[0, 1.0, -2.0, 0]])
    grpo = torch.tensor([[0.0, 0.3, 0.3, 0.0]])
    opd = A.opd(student, teacher, mask, coef=1.0)
    close(A.grpo_opd(grpo, opd, alpha=2.0), [[0, 0.6 + 0.5, 0.6 - 4.0, 0]])
    close(A.grpo_opd(grpo, opd, alpha=0.0), [[0, 0.5, -4.0, 0]])


def test_opd_is_detached() -> None:
    student = torch.tensor([[-1.0]], requires_grad=True)
    assert not A.opd(student, torch.tensor([[-0.5]]), torch.ones(1, 1), 1.0).requires_grad


def test_unknown_estimator_lists_valid() -> None:
    with pytest.raises(ConfigError, match="group_norm"):
        A.get_estimator("grpo_norm")


def test_advantage_metrics_turn_spread() -> None:
    # traj 0: turn means 1.0 and 0.0 -> std 0.7071; traj 1 single turn -> not counted
    adv = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    turns = torch.tensor([[-1, 0, 0, 1], [-1, 0, 0, 0]])
    mask = torch.tensor([[0.0, 1, 1, 1], [0, 1, 1, 1]])
    m = A.advantage_metrics(adv, mask, turns)
    assert m["reward/turn_credit_spread"] == pytest.approx(math.sqrt(0.5))
    assert m["adv/abs_max"] == 2.0


def test_reward_side_terms_follow_the_options() -> None:
    from taurl.learners import PRESETS
    from taurl.learners.reward_side import active_terms

    assert active_terms(PRESETS["grpo"].options) == []
    assert active_terms(PRESETS["ppo"].options) == ["kl_in_reward"]
    assert active_terms(PRESETS["grpo_opd"].options) == ["teacher"]
    gigpo = dataclasses.replace(PRESETS["grpo"].options, step_group_weight=1.0)
    assert active_terms(gigpo) == ["step_groups"]
