"""Trajectory-side losses against values computed by hand (written out in each test)."""

from __future__ import annotations

import math

import pytest
import torch

from taurl.errors import ConfigError
from taurl.learners import losses as L


def close(a: torch.Tensor, b: list | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), torch.tensor(b, dtype=torch.float64), atol=tol, rtol=0)


def test_ppo_clip_by_hand() -> None:
    # ratios r = exp(logp - old) = (1.5, 0.5, 1.1, 0.7); eps_low 0.2, eps_high 0.3
    # A = (+1, +1, -1, -1)
    # tok0: max(-1.5, -clip(1.5)=-1.3) = -1.3   (clipped: clip active)
    # tok1: max(-0.5, -0.8) = -0.5               (unclipped)
    # tok2: max(1.1, 1.1) = 1.1                  (inside the range)
    # tok3: max(0.7, 0.8) = 0.8                  (clipped below: clip active)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7]])
    old = torch.zeros(1, 4)
    logp = ratio.log()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = L.ppo_clip_loss(logp, old, adv, torch.ones(1, 4), L.PolicyLossParams(0.2, 0.3))
    close(loss, [[-1.3, -0.5, 1.1, 0.8]])
    assert m["traj/clip_frac"].item() == pytest.approx(0.5)
    assert m["traj/ratio_max"].item() == pytest.approx(1.5)
    # approx_kl = mean((r - 1) - log r)
    expect = sum((r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)) / 4
    assert m["traj/approx_kl"].item() == pytest.approx(expect, rel=1e-5)


def test_ppo_dual_clip_by_hand() -> None:
    # A = -2, r = 5: plain PPO loss = max(10, 2*1.2=2.4) = 10; dual clip c=3 caps at -c*A = 6.
    # A = +2, r = 5: dual clip does not apply: max(-10, -2.4) = -2.4
    logp = torch.tensor([[math.log(5.0), math.log(5.0)]])
    adv = torch.tensor([[-2.0, 2.0]])
    p = L.PolicyLossParams(0.2, 0.2, dual_clip=3.0)
    loss, _ = L.ppo_clip_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), p)
    close(loss, [[6.0, -2.4]])
    loss, _ = L.ppo_clip_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), L.PolicyLossParams())
    close(loss, [[10.0, -2.4]])


def test_ppo_gradient_is_zero_where_clipped() -> None:
    logp = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0]])
    loss, _ = L.ppo_clip_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), L.PolicyLossParams())
    loss.sum().backward()
    # d/dlogp of -A r = -A r = -1.1 for the unclipped token; 0 for the clipped one
    close(logp.grad, [[0.0, -1.1]])


def test_reinforce_gradient_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = L.reinforce_loss(logp, logp.detach(), adv, mask, L.PolicyLossParams())
    close(loss, [[0.5, -2.0, 0.0]])  # -A * logp on sampled tokens
    loss.sum().backward()
    close(logp.grad, [[-0.5, 1.0, 0.0]])  # -A, and nothing for the masked token


def test_tis_weights_by_hand() -> None:
    # learner - sampler = (log 3, log 0.5, 0): ratios 3, 0.5, 1; cap 2 -> (2, 0.5, 1)
    learner = torch.tensor([[math.log(3.0), math.log(0.5), -1.0, 0.0]])
    sampler = torch.tensor([[0.0, 0.0, -1.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, m = L.tis_weights(learner, sampler, mask, cap=2.0)
    close(w, [[2.0, 0.5, 1.0, 0.0]])
    assert m["traj/tis_capped_frac"].item() == pytest.approx(1 / 3)
    # k3 mismatch: mean of (r - 1 - log r) over sampled tokens
    expect = ((3 - 1 - math.log(3)) + (0.5 - 1 - math.log(0.5)) + 0.0) / 3
    assert m["traj/sampler_mismatch_kl"].item() == pytest.approx(expect, rel=1e-5)
    assert m["traj/sampler_logp_absdiff_max"].item() == pytest.approx(math.log(3), rel=1e-5)
    w, _ = L.tis_weights(learner, sampler, mask, cap=0)
    close(w, [[1.0, 1.0, 1.0, 0.0]])


def test_kl_estimators_by_hand() -> None:
    # logp = -1, ref = -2: log r = ref - logp = -1
    # k1 = 1; k2 = 0.5; k3 = e^-1 - 1 + 1 = 0.367879
    logp, ref = torch.tensor([[-1.0, -5.0]]), torch.tensor([[-2.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    close(L.kl_penalty(logp, ref, mask, "k1"), [[1.0, 0.0]])
    close(L.kl_penalty(logp, ref, mask, "k2"), [[0.5, 0.0]])
    close(L.kl_penalty(logp, ref, mask, "k3"), [[math.exp(-1), 0.0]])
    with pytest.raises(ConfigError, match="k1, k2, k3"):
        L.kl_penalty(logp, ref, mask, "k4")  # type: ignore[arg-type]


def test_value_loss_clipped_by_hand() -> None:
    # old 1.0, new 2.0, target 3.0, clip 0.5 -> v_clip = 1.5
    # err = (2-3)^2 = 1, err_clip = (1.5-3)^2 = 2.25 -> 0.5 * 2.25 = 1.125 (clip active)
    # second: old 1.0, new 1.2, target 0 -> v_clip 1.2, both 1.44 -> 0.72
    v = torch.tensor([[2.0, 1.2]])
    old = torch.tensor([[1.0, 1.0]])
    ret = torch.tensor([[3.0, 0.0]])
    loss, m = L.value_loss(v, old, ret, torch.ones(1, 2), clip=0.5)
    close(loss, [[1.125, 0.72]])
    assert m["traj/value_clip_frac"].item() == pytest.approx(0.5)
    loss, _ = L.value_loss(v, old, ret, torch.ones(1, 2), clip=0)
    close(loss, [[0.5, 0.72]])


def test_aggregate_modes_by_hand() -> None:
    # seq 0: losses (1, 2, 3) on 3 tokens; seq 1: loss 6 on 1 token (others masked)
    loss = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # token-mean: (1+2+3+6) / 4 = 3
    assert L.aggregate(loss, mask, "token-mean", 4, 2, 3).item() == pytest.approx(3.0)
    # seq-mean-token-mean: (mean(1,2,3)=2 + 6) / 2 = 4
    assert L.aggregate(loss, mask, "seq-mean-token-mean", 4, 2, 3).item() == pytest.approx(4.0)
    # seq-mean-token-sum-norm with norm_len 4: (6 + 6) / (2 * 4) = 1.5
    assert L.aggregate(loss, mask, "seq-mean-token-sum-norm", 4, 2, 4).item() == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="token-mean"):
        L.aggregate(loss, mask, "mean", 4, 2, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_is_invariant_to_micro_batch_split(mode: str) -> None:
    # The whole batch's loss equals the sum of its micro-batches' losses when every
    # micro-batch uses the global denominators: 1 x 8 rows vs 4 x 2 rows.
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 10, generator=g)
    mask = (torch.rand(8, 10, generator=g) > 0.3).float()
    n_tok, n_seq = int(mask.sum()), int((mask.sum(1) > 0).sum())
    whole = L.aggregate(loss, mask, mode, n_tok, n_seq, 10)
    parts = sum(L.aggregate(loss[i : i + 2], mask[i : i + 2], mode, n_tok, n_seq, 10)
                for i in range(0, 8, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)


def test_unknown_policy_loss_lists_valid() -> None:
    with pytest.raises(ConfigError, match="ppo_clip, reinforce"):
        L.get_policy_loss("ppo")
