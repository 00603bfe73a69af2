"""The reward side of J(θ) = E_{τ∼p_θ}[R(τ)]: what R(τ) credits to which token.

Every function here is pure: tensors and explicit scalars in, tensors out, no model
and no config object. Shapes use these letters:

- ``B`` trajectories, ``T`` tokens per trajectory (padded), ``H`` turns (padded);
- ``N`` a flat list of scores (one per trajectory, or one per (trajectory, turn)).

Masks are float or bool tensors of 0/1. ``mask_B_T`` is the loss mask: 1 only on the
tokens the policy sampled; prompt, observation/tool and padding tokens are 0 and get
advantage 0, so they never receive gradient.

The estimators behind the algorithm presets all have one signature,
``estimator(inputs: AdvantageInputs, params: AdvantageParams) -> (AdvantageOutput, metrics)``,
and are selected by name from :data:`ESTIMATORS`. Moving values between turns and
tokens is :mod:`taurl.learners.turns`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from taurl.errors import ConfigError
from taurl.learners.turns import broadcast_turns, gather_turn_starts, turn_start_mask

Scale = Literal["std", "none"]
Credit = Literal["episode", "turn"]


# -- token-level GAE ------------------------------------------------------------------


def gae(
    rewards_B_T: torch.Tensor,
    values_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438) over masked steps.

    Args:
        rewards_B_T: float [B, T], reward received after step t (0 where there is none;
            a reward on a masked position is ignored).
        values_B_T: float [B, T], V(s_t) of the state in which step t was taken.
        mask_B_T: 0/1 [B, T], 1 on the steps that count (sampled tokens, or turns).
        gamma: discount per counted step.
        lam: GAE λ.

    Positions with mask 0 are skipped: the next value and the running GAE carry
    through them unchanged, so the result equals GAE computed on the sequence of
    counted steps alone. After the last counted step the value is 0 (episode end).

    Returns:
        ``(advantages_B_T, returns_B_T)``, both float [B, T] and 0 where mask is 0;
        ``returns = advantages + values`` (the value targets).
    """
    mask = mask_B_T.to(values_B_T.dtype)
    B, T = values_B_T.shape
    advantages = torch.zeros_like(values_B_T)
    next_value = values_B_T.new_zeros(B)
    running = values_B_T.new_zeros(B)
    for t in range(T - 1, -1, -1):
        m = mask[:, t]
        delta = rewards_B_T[:, t] + gamma * next_value - values_B_T[:, t]
        step = delta + gamma * lam * running
        advantages[:, t] = step * m
        running = torch.where(m > 0, step, running)
        next_value = torch.where(m > 0, values_B_T[:, t], next_value)
    returns = (advantages + values_B_T) * mask
    return advantages, returns


# -- baselines over flat scores ---------------------------------------------------------


def _group_stats(
    scores_N: torch.Tensor, group_ids_N: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-entry ``(group size, group mean, unbiased group std)``, each float [N]."""
    if not scores_N.is_floating_point():
        scores_N = scores_N.float()
    _, inverse = torch.unique(group_ids_N, return_inverse=True)
    G = int(inverse.max().item()) + 1 if inverse.numel() else 0
    x = scores_N.double()
    count = torch.zeros(G, dtype=torch.float64, device=x.device).index_add_(
        0, inverse, torch.ones_like(x)
    )
    total = torch.zeros_like(count).index_add_(0, inverse, x)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (x - mean[inverse]) ** 2)
    var = sq / (count - 1).clamp(min=1)
    dtype = scores_N.dtype
    return count[inverse].to(dtype), mean[inverse].to(dtype), var.sqrt()[inverse].to(dtype)


def group_normalize(
    scores_N: torch.Tensor,
    group_ids_N: torch.Tensor,
    scale: Scale = "std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantage: score minus its group's mean, optionally over the std.

    ``scale="std"`` is GRPO (Shao et al. 2024, arXiv 2402.03300), with the unbiased
    (n-1) std; ``scale="none"`` is Dr.GRPO (Liu et al. 2025, arXiv 2503.20783), which
    drops the std because it up-weights near-deterministic groups.

    Args:
        scores_N: float [N], one score per entry (an episode return, or a turn return).
        group_ids_N: int [N], entries with equal ids are compared with each other.
        scale: "std" or "none".
        eps: added to the std.

    Returns:
        float [N]. A group of one, and a group whose scores are all equal, gets 0.
    """
    count, mean, std = _group_stats(scores_N, group_ids_N)
    adv = scores_N - mean
    if scale == "std":
        adv = adv / (std + eps)
    elif scale != "none":
        raise ConfigError(f"group_normalize: scale must be 'std' or 'none', got {scale!r}")
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def rloo(scores_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740).

    ``A_i = s_i - mean_{j in group, j != i} s_j = n/(n-1) * (s_i - mean_group)``.

    Args:
        scores_N: float [N].
        group_ids_N: int [N].

    Returns:
        float [N]; a group of one gets 0 (there is no other sample to compare with).
    """
    count, mean, _ = _group_stats(scores_N, group_ids_N)
    adv = (scores_N - mean) * count / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


def batch_normalize(scores_N: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Whiten scores over the whole batch: REINFORCE++ (Hu 2025, arXiv 2501.03262) / ReBN.

    Args:
        scores_N: float [N].
        eps: added to the (unbiased) std.

    Returns:
        float [N], ``(s - mean) / (std + eps)``; all zeros when N < 2.
    """
    if scores_N.numel() < 2:
        return torch.zeros_like(scores_N)
    return (scores_N - scores_N.mean()) / (scores_N.std() + eps)


def zero_variance_groups(scores_N: torch.Tensor, group_ids_N: torch.Tensor) -> torch.Tensor:
    """bool [N]: True where the entry's group has size > 1 and all its scores are equal.

    DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476) drops these groups:
    their group-relative advantage is 0, so they only dilute the loss denominator.
    """
    count, _, std = _group_stats(scores_N, group_ids_N)
    return (count > 1) & (std == 0)


# -- turn-level credit --------------------------------------------------------------------


def turn_returns(
    turn_rewards_B_H: torch.Tensor, turn_valid_B_H: torch.Tensor, gamma_turn: float
) -> torch.Tensor:
    """Discounted return from each turn on: ``G_h = sum_{k>=h} gamma_turn^(k-h) r_k``.

    Args:
        turn_rewards_B_H: float [B, H], reward of turn h (0 on padding turns).
        turn_valid_B_H: 0/1 [B, H], 1 on the trajectory's real turns.
        gamma_turn: discount per turn.

    Returns:
        float [B, H], 0 on padding turns.
    """
    valid = turn_valid_B_H.to(turn_rewards_B_H.dtype)
    out = torch.zeros_like(turn_rewards_B_H)
    running = turn_rewards_B_H.new_zeros(turn_rewards_B_H.shape[0])
    for h in range(turn_rewards_B_H.shape[1] - 1, -1, -1):
        running = (turn_rewards_B_H[:, h] + gamma_turn * running) * valid[:, h]
        out[:, h] = running
    return out


def step_group_advantages(
    step_returns_B_H: torch.Tensor,
    anchor_ids_B_H: torch.Tensor,
    scale: Scale = "std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """GiGPO step-level advantage (Feng et al. 2025, arXiv 2505.10978).

    Turns that share an anchor id (same group, same observation so far) form a step
    group; each turn's return is normalised within its step group.

    Args:
        step_returns_B_H: float [B, H], e.g. :func:`turn_returns`.
        anchor_ids_B_H: int [B, H], the step group of each turn; -1 on padding turns.
        scale: "std" or "none", as in :func:`group_normalize`.
        eps: added to the std.

    Returns:
        float [B, H]; 0 on padding turns and for turns alone in their step group.
    """
    valid = anchor_ids_B_H >= 0
    out = torch.zeros_like(step_returns_B_H)
    if valid.any():
        out[valid] = group_normalize(step_returns_B_H[valid], anchor_ids_B_H[valid], scale, eps)
    return out


# -- teacher signal -------------------------------------------------------------------------


def opd(
    student_logprobs_B_T: torch.Tensor,
    teacher_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    coef: float,
    clip: float = 0.0,
) -> torch.Tensor:
    """On-policy distillation advantage: ``coef * clip(teacher - student)`` per sampled token.

    The per-token negative reverse KL of Agarwal et al. 2024 (GKD, arXiv 2306.13649) and
    Lu & Thinking Machines 2025 ("On-policy distillation"): the student is pushed up
    where the teacher finds its token likelier than it does itself.

    Args:
        student_logprobs_B_T: float [B, T], log-prob of each sampled token under the student.
        teacher_logprobs_B_T: float [B, T], log-prob of the same tokens under the teacher.
        mask_B_T: 0/1 [B, T], sampled tokens.
        coef: λ.
        clip: clamp ``teacher - student`` to ``[-clip, clip]``; 0 leaves it unclipped.

    Returns:
        float [B, T], detached (a reward, not a path for gradient), 0 where mask is 0.
    """
    gap = (teacher_logprobs_B_T - student_logprobs_B_T).detach()
    if clip:
        gap = gap.clamp(-clip, clip)
    return coef * gap * mask_B_T.to(gap.dtype)


def grpo_opd(
    grpo_advantages_B_T: torch.Tensor, opd_advantages_B_T: torch.Tensor, alpha: float
) -> torch.Tensor:
    """GRPO-OPD: ``A = alpha * A_GRPO + opd`` (``opd`` already carries λ); alpha = 0 is pure OPD.

    Args:
        grpo_advantages_B_T: float [B, T].
        opd_advantages_B_T: float [B, T], from :func:`opd`.
        alpha: weight of the outcome advantage.
    """
    return alpha * grpo_advantages_B_T + opd_advantages_B_T


# -- the uniform estimator interface ---------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything a reward-side estimator may read, for one batch (tensors on one device)."""

    mask_B_T: torch.Tensor  # 0/1 float [B, T], sampled tokens
    turn_ids_B_T: torch.Tensor  # int [B, T], -1 for the prompt, h for turn h
    token_rewards_B_T: torch.Tensor  # float [B, T], turn h's reward on its last sampled token
    turn_rewards_B_H: torch.Tensor  # float [B, H], reward of each turn, 0 on padding turns
    turn_valid_B_H: torch.Tensor  # 0/1 float [B, H], 1 on real turns
    group_ids_B: torch.Tensor  # int [B], trajectories answering the same task share an id
    values_B_T: torch.Tensor | None = None  # float [B, T], critic's V at each token, if any


@dataclass(frozen=True)
class AdvantageParams:
    """The reward side's scalars, passed explicitly to every estimator."""

    gamma: float = 1.0  # token-level discount (gae)
    lam: float = 1.0  # GAE λ (gae, turn_gae)
    gamma_turn: float = 1.0  # discount per turn (turn credit, turn_gae)
    credit: Credit = "episode"  # score each trajectory by its return, or each turn by G_h
    scale: Scale = "std"  # group_norm: divide by the group std, or not
    eps: float = 1e-6  # added to standard deviations


@dataclass(frozen=True)
class AdvantageOutput:
    """What an estimator returns."""

    advantages_B_T: torch.Tensor  # float [B, T], 0 off the sampled tokens
    returns_B_T: torch.Tensor | None  # float [B, T] value targets (critic estimators only)
    value_mask_B_T: torch.Tensor | None  # 0/1 [B, T] where the value loss applies


def _scores(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``(scores_N, group_ids_N)`` for the chosen credit."""
    if params.credit == "episode":
        return inputs.turn_rewards_B_H.sum(1), inputs.group_ids_B
    G = turn_returns(inputs.turn_rewards_B_H, inputs.turn_valid_B_H, params.gamma_turn)
    valid = inputs.turn_valid_B_H > 0
    groups = inputs.group_ids_B[:, None].expand_as(G)
    return G[valid], groups[valid]


def _spread(
    scores_adv_N: torch.Tensor, inputs: AdvantageInputs, params: AdvantageParams
) -> torch.Tensor:
    """Put flat advantages back on the tokens they credit."""
    if params.credit == "episode":
        return scores_adv_N[:, None] * inputs.mask_B_T
    per_turn = torch.zeros_like(inputs.turn_rewards_B_H)
    per_turn[inputs.turn_valid_B_H > 0] = scores_adv_N
    return broadcast_turns(per_turn, inputs.turn_ids_B_T, inputs.mask_B_T)


Metrics = dict[str, float]


def _group_norm(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[AdvantageOutput, Metrics]:
    scores, groups = _scores(inputs, params)
    adv = group_normalize(scores, groups, params.scale, params.eps)
    return AdvantageOutput(_spread(adv, inputs, params), None, None), {}


def _rloo(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[AdvantageOutput, Metrics]:
    scores, groups = _scores(inputs, params)
    return AdvantageOutput(_spread(rloo(scores, groups), inputs, params), None, None), {}


def _batch_norm(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[AdvantageOutput, Metrics]:
    scores, _ = _scores(inputs, params)
    adv = batch_normalize(scores, params.eps)
    return AdvantageOutput(_spread(adv, inputs, params), None, None), {}


def _need_values(inputs: AdvantageInputs, name: str) -> torch.Tensor:
    if inputs.values_B_T is None:
        raise ConfigError(f"advantage estimator {name!r} needs a critic; set critic: head or model")
    return inputs.values_B_T


def explained_variance(
    values_B_T: torch.Tensor, returns_B_T: torch.Tensor, mask_B_T: torch.Tensor
) -> float:
    """``1 − Var(G − V) / Var(G)`` over the masked positions: how much of the returns'
    variance the critic predicts (1 perfect, 0 no better than a constant, < 0 worse).
    nan when the returns do not vary."""
    m = mask_B_T > 0
    g, v = returns_B_T[m].double(), values_B_T[m].double()
    if g.numel() < 2 or g.var() == 0:
        return float("nan")
    return (1.0 - (g - v).var() / g.var()).item()


def _gae(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[AdvantageOutput, Metrics]:
    values = _need_values(inputs, "gae")
    adv, ret = gae(inputs.token_rewards_B_T, values, inputs.mask_B_T, params.gamma, params.lam)
    ev = explained_variance(values, ret, inputs.mask_B_T)
    return AdvantageOutput(adv, ret, inputs.mask_B_T), {"adv/explained_variance": ev}


def _turn_gae(inputs: AdvantageInputs, params: AdvantageParams) -> tuple[AdvantageOutput, Metrics]:
    values = _need_values(inputs, "turn_gae")
    H = inputs.turn_rewards_B_H.shape[1]
    turn_values = gather_turn_starts(values, inputs.turn_ids_B_T, inputs.mask_B_T, H)
    adv_H, ret_H = gae(
        inputs.turn_rewards_B_H, turn_values, inputs.turn_valid_B_H, params.gamma_turn, params.lam
    )
    starts = turn_start_mask(inputs.turn_ids_B_T, inputs.mask_B_T)
    returns = broadcast_turns(ret_H, inputs.turn_ids_B_T, starts)
    out = AdvantageOutput(broadcast_turns(adv_H, inputs.turn_ids_B_T, inputs.mask_B_T), returns,
                          starts)
    ev = explained_variance(turn_values, ret_H, inputs.turn_valid_B_H)
    return out, {"adv/explained_variance": ev}


Estimator = Callable[[AdvantageInputs, AdvantageParams], tuple[AdvantageOutput, Metrics]]

#: Reward-side estimators by name; every one takes ``(AdvantageInputs, AdvantageParams)``.
ESTIMATORS: dict[str, Estimator] = {
    "group_norm": _group_norm,  # GRPO / Dr.GRPO (params.scale), episode or turn credit
    "rloo": _rloo,  # leave-one-out baseline, episode or turn credit
    "batch_norm": _batch_norm,  # REINFORCE++ whitening, episode or turn credit
    "gae": _gae,  # token-level GAE with a critic (PPO)
    "turn_gae": _turn_gae,  # turn-level GAE, critic evaluated once per turn
}

#: Estimators that need a critic's values.
CRITIC_ESTIMATORS = frozenset({"gae", "turn_gae"})


def get_estimator(name: str) -> Estimator:
    """The estimator called ``name``; an unknown name lists the valid ones."""
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown advantage estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def advantage_metrics(
    advantages_B_T: torch.Tensor, mask_B_T: torch.Tensor, turn_ids_B_T: torch.Tensor
) -> dict[str, float]:
    """Advantage statistics over sampled tokens, and the per-turn credit spread.

    ``reward/turn_credit_spread`` is the mean, over trajectories with two or more
    turns, of the std of their per-turn mean advantages: 0 when every turn of an
    episode gets the same credit (episode-level estimators).
    """
    m = mask_B_T > 0
    if not m.any():
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/abs_max": 0.0}
    a = advantages_B_T[m].double()
    out = {
        "adv/mean": a.mean().item(),
        "adv/std": a.std().item() if a.numel() > 1 else 0.0,
        "adv/abs_max": a.abs().max().item(),
    }
    spreads = []
    for b in range(advantages_B_T.shape[0]):
        turns = turn_ids_B_T[b][m[b]]
        if turns.numel() and int(turns.max()) > int(turns.min()):
            means = torch.stack([a_t.mean() for a_t in _split_by(advantages_B_T[b][m[b]], turns)])
            spreads.append(means.double().std().item())
    out["reward/turn_credit_spread"] = sum(spreads) / len(spreads) if spreads else 0.0
    return out


def _split_by(x_N: torch.Tensor, keys_N: torch.Tensor) -> list[torch.Tensor]:
    return [x_N[keys_N == k] for k in torch.unique(keys_N)]
