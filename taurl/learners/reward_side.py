"""The reward side of one update, composed: reward terms, the estimator, advantage terms.

R(τ) reaches the tokens in three stages, each a table of pure pieces chosen by the
algorithm's options (never special-cased by the caller):

1. **reward terms** change the rewards before credit is assigned — KL to the reference
   subtracted from the reward (``kl_in: reward``);
2. the **estimator** (``options.advantage``, :data:`taurl.learners.advantages.ESTIMATORS`)
   turns rewards into per-token advantages (and value targets for a critic);
3. **advantage terms** add to those advantages — GiGPO's step groups
   (``step_group_weight``) and on-policy distillation from a teacher (``teacher``).

Every term has the same shape: ``(state, context, options) -> (state, metrics)``, and a
predicate saying when the options turn it on. :func:`compute` runs the three stages;
:func:`reward_metrics` reports the batch's rewards before any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from taurl.learners import advantages as A
from taurl.learners import losses as L
from taurl.learners import turns as TU
from taurl.learners.batch import Batch, group_ids
from taurl.learners.options import AlgorithmOptions
from taurl.learners.scoring import Scores
from taurl.types import Trajectory


@dataclass(frozen=True)
class Rewards:
    """Rewards as the estimator reads them: per token (at each turn's end) and per turn."""

    token_B_T: torch.Tensor  # float [B, T]
    turn_B_H: torch.Tensor  # float [B, H]


@dataclass(frozen=True)
class UpdateTargets:
    """What the trajectory side's loss is computed against, for every row of the batch."""

    advantages_B_T: torch.Tensor  # float32 [B, T]
    returns_B_T: torch.Tensor | None  # float32 [B, T], the critic's targets (None: no critic)
    value_mask_B_T: torch.Tensor | None  # 0/1 [B, T], where the value loss applies
    scores: Scores  # old, reference and teacher log-probs, values


Metrics = dict[str, float]
RewardTerm = Callable[[Rewards, Batch, Scores, AlgorithmOptions], tuple[Rewards, Metrics]]
AdvantageTerm = Callable[[torch.Tensor, Batch, Scores, Rewards, AlgorithmOptions],
                         tuple[torch.Tensor, Metrics]]


def kl_in_reward(rewards: Rewards, batch: Batch, scores: Scores,
                 o: AlgorithmOptions) -> tuple[Rewards, Metrics]:
    """``r_t -= β KL_t`` per sampled token (and per turn, summed), as in InstructGPT."""
    mask, turns = batch.mask_B_T, batch.turn_ids_B_T
    kl = L.kl_penalty(scores.old_logp, scores.ref_logp, mask, o.kl_estimator)
    H = rewards.turn_B_H.shape[1]
    shaped = Rewards(rewards.token_B_T - o.kl_coef * kl,
                     rewards.turn_B_H - o.kl_coef * TU.turn_sums(kl, turns, mask, H))
    return shaped, {"reward/kl_ref": L.masked_mean(kl, mask).item()}


def step_groups(adv_B_T: torch.Tensor, batch: Batch, scores: Scores, rewards: Rewards,
                o: AlgorithmOptions) -> tuple[torch.Tensor, Metrics]:
    """GiGPO: ``+ ω ×`` each turn's return normalised within its step group (same state)."""
    step_returns = A.turn_returns(rewards.turn_B_H, batch.turn_valid_B_H, o.gamma_turn)
    step_adv = A.step_group_advantages(step_returns, batch.anchor_ids_B_H, o.group_scale)
    turns, mask = batch.turn_ids_B_T, batch.mask_B_T
    return adv_B_T + o.step_group_weight * TU.broadcast_turns(step_adv, turns, mask), {}


def teacher(adv_B_T: torch.Tensor, batch: Batch, scores: Scores, rewards: Rewards,
            o: AlgorithmOptions) -> tuple[torch.Tensor, Metrics]:
    """GRPO-OPD: ``α A + λ (log π_teacher − log π)`` per sampled token."""
    mask = batch.mask_B_T
    opd_adv = A.opd(scores.old_logp, scores.teacher_logp, mask, o.teacher_coef, o.teacher_clip)
    gap = L.masked_mean(scores.teacher_logp - scores.old_logp, mask).item()
    return A.grpo_opd(adv_B_T, opd_adv, o.advantage_coef), {"reward/teacher_gap": gap}


#: Stage 1: (name, on when, term).
REWARD_TERMS: tuple[tuple[str, Callable[[AlgorithmOptions], bool], RewardTerm], ...] = (
    ("kl_in_reward", lambda o: o.kl_coef > 0 and o.kl_in == "reward", kl_in_reward),
)
#: Stage 3, in this order: (name, on when, term). Step groups read the shaped turn rewards.
ADVANTAGE_TERMS: tuple[tuple[str, Callable[[AlgorithmOptions], bool], AdvantageTerm], ...] = (
    ("step_groups", lambda o: o.step_group_weight > 0, step_groups),
    ("teacher", lambda o: o.teacher != "none", teacher),
)


def active_terms(o: AlgorithmOptions) -> list[str]:
    """The names of the terms ``o`` turns on, in the order they run."""
    return [name for name, on, _ in (*REWARD_TERMS, *ADVANTAGE_TERMS) if on(o)]


def compute(batch: Batch, scores: Scores, o: AlgorithmOptions, estimator: A.Estimator,
            params: A.AdvantageParams) -> tuple[UpdateTargets, Metrics]:
    """Rewards → shaped rewards → advantages (+ terms) for every token of ``batch``."""
    mask, turns = batch.mask_B_T, batch.turn_ids_B_T
    at_turn_end = TU.turn_end_mask(turns, mask)
    rewards = Rewards(TU.broadcast_turns(batch.turn_rewards_B_H, turns, at_turn_end),
                      batch.turn_rewards_B_H)
    metrics: Metrics = {}
    for _, on, term in REWARD_TERMS:
        if on(o):
            rewards, m = term(rewards, batch, scores, o)
            metrics.update(m)
    inputs = A.AdvantageInputs(
        mask_B_T=mask, turn_ids_B_T=turns, token_rewards_B_T=rewards.token_B_T,
        turn_rewards_B_H=rewards.turn_B_H, turn_valid_B_H=batch.turn_valid_B_H,
        group_ids_B=batch.group_ids_B, values_B_T=scores.values,
    )
    out, m = estimator(inputs, params)
    metrics.update(m)
    adv = out.advantages_B_T
    for _, on, adv_term in ADVANTAGE_TERMS:
        if on(o):
            adv, m = adv_term(adv, batch, scores, rewards, o)
            metrics.update(m)
    metrics.update(A.advantage_metrics(adv, mask, turns))
    return UpdateTargets(adv, out.returns_B_T, out.value_mask_B_T, scores), metrics


def reward_metrics(trajs: list[Trajectory]) -> tuple[Metrics, torch.Tensor]:
    """``reward/...`` metrics of a whole batch, and which rows sit in zero-variance groups."""
    if not trajs:
        zero = {"reward/mean": 0.0, "reward/std": 0.0, "reward/zero_var_groups": 0.0}
        return zero, torch.zeros(0, dtype=torch.bool)
    returns = torch.tensor([t.episode_return for t in trajs], dtype=torch.float64)
    groups = torch.tensor(group_ids(trajs))
    zero_var = A.zero_variance_groups(returns, groups)
    multi = (torch.bincount(groups) > 1).sum().item()
    zero_var_groups = len(set(groups[zero_var].tolist()))
    return {
        "reward/mean": returns.mean().item(),
        "reward/std": returns.std().item() if len(trajs) > 1 else 0.0,
        "reward/zero_var_groups": zero_var_groups / multi if multi else 0.0,
    }, zero_var
