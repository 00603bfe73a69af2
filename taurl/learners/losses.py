"""The trajectory side of J(θ) = E_{τ∼p_θ}[R(τ)]: how log p_θ(τ) enters the gradient.

Pure functions over per-token tensors: ``[B, T]`` with ``mask_B_T`` the loss mask (1
only on sampled tokens; observation/tool/prompt/padding tokens are 0 and contribute
neither loss nor gradient). Each loss returns a per-token loss ``[B, T]`` (0 where the
mask is 0) and a dict of 0-dim metric tensors (masked means over this call's tokens);
:func:`aggregate` turns the per-token loss into the scalar to back-propagate.

Policy losses share one signature,
``loss(logp, old_logp, advantages, mask, params) -> (loss_B_T, metrics)``,
and are selected by name from :data:`POLICY_LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from taurl.errors import ConfigError

KLEstimator = Literal["k1", "k2", "k3"]
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp() of a log-ratio beyond this overflows float32 long before it means anything.
_MAX_LOG_RATIO = 20.0


def masked_mean(x_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """0-dim mean of ``x`` over positions where mask is 1 (0 when the mask is empty)."""
    m = mask_B_T.to(x_B_T.dtype)
    return (x_B_T * m).sum() / m.sum().clamp(min=1)


@dataclass(frozen=True)
class PolicyLossParams:
    """The trajectory side's scalars, passed explicitly to every policy loss."""

    eps_low: float = 0.2  # ratio clipped below at 1 - eps_low
    eps_high: float = 0.2  # ratio clipped above at 1 + eps_high (DAPO clip-higher: > eps_low)
    dual_clip: float = 0.0  # dual-clip constant c > 1 for negative advantages; 0 = off


def ppo_clip_loss(
    logp_B_T: torch.Tensor,
    old_logp_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    params: PolicyLossParams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), per token.

    ``loss = max(-A r, -A clip(r, 1-eps_low, 1+eps_high))`` with ``r = exp(logp - old_logp)``.
    Separate ``eps_low``/``eps_high`` is DAPO's clip-higher (arXiv 2503.14476). With
    ``dual_clip = c``, a negative-advantage token's loss is capped at ``-c A`` (Ye et al.
    2020, arXiv 1912.09729), so a huge ratio cannot blow up the update.

    Args:
        logp_B_T: float [B, T], log π_θ(token) with gradient.
        old_logp_B_T: float [B, T], log π_old(token) of the policy that the ratio is
            taken against (the learner's own recomputation, no gradient).
        advantages_B_T: float [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
        params: clip settings.

    Returns:
        ``(loss_B_T, metrics)`` with ``traj/clip_frac`` (fraction of tokens where the
        clip is active), ``traj/ratio_mean``, ``traj/ratio_max``, ``traj/approx_kl``
        (``E[(r-1) - log r]``, Schulman's k3 of KL(old || new)).
    """
    log_ratio = (logp_B_T - old_logp_B_T).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -advantages_B_T * ratio
    clipped = -advantages_B_T * ratio.clamp(1 - params.eps_low, 1 + params.eps_high)
    loss = torch.maximum(unclipped, clipped)
    if params.dual_clip:
        capped = torch.minimum(loss, -advantages_B_T * params.dual_clip)
        loss = torch.where(advantages_B_T < 0, capped, loss)
    m = mask_B_T.to(loss.dtype)
    with torch.no_grad():
        metrics = {
            "traj/clip_frac": masked_mean((clipped > unclipped).to(loss.dtype), m),
            "traj/ratio_mean": masked_mean(ratio, m),
            "traj/ratio_max": (ratio * m).max(),
            "traj/approx_kl": masked_mean((ratio - 1) - log_ratio, m),
        }
    return loss * m, metrics


def reinforce_loss(
    logp_B_T: torch.Tensor,
    old_logp_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    params: PolicyLossParams,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain policy gradient (Williams 1992): ``loss = -A log π_θ(token)``, per token.

    ``old_logp_B_T`` and ``params`` are unused (one signature for every policy loss);
    correct off-policy samples by multiplying the loss with :func:`tis_weights`.

    Args:
        logp_B_T: float [B, T], with gradient.
        old_logp_B_T: float [B, T], unused.
        advantages_B_T: float [B, T].
        mask_B_T: 0/1 [B, T], sampled tokens.
        params: unused.

    Returns:
        ``(loss_B_T, metrics)`` with ``traj/approx_kl`` against ``old_logp`` for monitoring.
    """
    m = mask_B_T.to(logp_B_T.dtype)
    with torch.no_grad():
        log_ratio = (logp_B_T - old_logp_B_T).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        metrics = {"traj/approx_kl": masked_mean(log_ratio.exp() - 1 - log_ratio, m)}
    return -advantages_B_T.detach() * logp_B_T * m, metrics


PolicyLoss = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossParams],
    tuple[torch.Tensor, dict[str, torch.Tensor]],
]

#: Policy losses by name; every one has the signature of :func:`ppo_clip_loss`.
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_clip": ppo_clip_loss,
    "reinforce": reinforce_loss,
}
#: Policy losses that are A times a function of the log-probs, so a token with advantage 0
#: adds exactly 0 to the loss and to its gradient (the learner may skip such rows:
#: ``learner.skip_zero_grad_rows``). A loss registered in :data:`POLICY_LOSSES` is not
#: assumed to be one.
ZERO_AT_ZERO_ADVANTAGE: frozenset[str] = frozenset({"ppo_clip", "reinforce"})


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss called ``name``; an unknown name lists the valid ones."""
    if name not in POLICY_LOSSES:
        raise ConfigError(f"unknown policy loss {name!r}; valid: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def tis_weights(
    learner_logp_B_T: torch.Tensor,
    sampler_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weights for the sampler–learner mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training").

    vLLM's log-probs and the learner's never agree exactly (kernels, bf16), so the
    tokens were drawn from a slightly different policy than the one being updated.
    ``w = min(π_learner / π_sampler, cap)`` reweights them; the cap bounds the variance.

    Args:
        learner_logp_B_T: float [B, T], the learner's log-probs (detached inside).
        sampler_logp_B_T: float [B, T], the sampler's log-probs (Trajectory.logprobs).
        mask_B_T: 0/1 [B, T], sampled tokens.
        cap: truncation C > 0, or 0 for no correction (weights all 1).

    Returns:
        ``(weights_B_T, metrics)``: weights 0 off the mask; ``traj/sampler_mismatch_kl``
        is the k3 estimate of KL(sampler || learner) on the sampled tokens,
        ``traj/sampler_logp_absdiff_max`` the largest per-token gap, and
        ``traj/tis_capped_frac`` the fraction of tokens whose weight hit the cap.
    """
    m = mask_B_T.to(learner_logp_B_T.dtype)
    with torch.no_grad():
        log_ratio = (learner_logp_B_T.detach() - sampler_logp_B_T).clamp(
            -_MAX_LOG_RATIO, _MAX_LOG_RATIO
        )
        ratio = log_ratio.exp()
        metrics = {
            "traj/sampler_mismatch_kl": masked_mean(ratio - 1 - log_ratio, m),
            "traj/sampler_logp_absdiff_max": (log_ratio.abs() * m).max(),
        }
        if not cap:
            return m, metrics
        metrics["traj/tis_capped_frac"] = masked_mean((ratio > cap).to(m.dtype), m)
        return ratio.clamp(max=cap) * m, metrics


def kl_penalty(
    logp_B_T: torch.Tensor,
    ref_logp_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    estimator: KLEstimator,
) -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) on tokens sampled from π_θ (Schulman 2020,
    "Approximating KL divergence").

    With ``log r = ref_logp - logp``: ``k1 = -log r``, ``k2 = (log r)^2 / 2``,
    ``k3 = r - 1 - log r``. k1 is unbiased but can be negative; k3 is unbiased and
    non-negative (GRPO's choice); k2 is biased, low variance, and its gradient is the
    true KL gradient.

    Args:
        logp_B_T: float [B, T], log π_θ (with or without gradient).
        ref_logp_B_T: float [B, T], log π_ref (no gradient).
        mask_B_T: 0/1 [B, T], sampled tokens.
        estimator: "k1", "k2" or "k3".

    Returns:
        float [B, T], 0 where mask is 0.
    """
    log_r = (ref_logp_B_T - logp_B_T).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    if estimator == "k1":
        kl = -log_r
    elif estimator == "k2":
        kl = 0.5 * log_r**2
    elif estimator == "k3":
        kl = log_r.exp() - 1 - log_r
    else:
        raise ConfigError(f"unknown KL estimator {estimator!r}; valid: k1, k2, k3")
    return kl * mask_B_T.to(kl.dtype)


def value_loss(
    values_B_T: torch.Tensor,
    old_values_B_T: torch.Tensor,
    returns_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss, per position: ``0.5 max((V - R)^2, (V_clip - R)^2)``.

    ``V_clip = old + clamp(V - old, -clip, clip)`` keeps the critic near the values the
    advantages were computed with (as in OpenAI baselines' PPO2).

    Args:
        values_B_T: float [B, T], the critic's current values, with gradient.
        old_values_B_T: float [B, T], the values used for the advantages (no gradient).
        returns_B_T: float [B, T], the value targets.
        mask_B_T: 0/1 [B, T], positions where the value is trained.
        clip: clip range, or 0 for the plain squared error.

    Returns:
        ``(loss_B_T, metrics)`` with ``traj/value_clip_frac`` and ``traj/value_error``
        (mean squared error before clipping).
    """
    m = mask_B_T.to(values_B_T.dtype)
    err = (values_B_T - returns_B_T) ** 2
    if not clip:
        loss = 0.5 * err
        clip_frac = torch.zeros((), device=values_B_T.device)
    else:
        v_clip = old_values_B_T + (values_B_T - old_values_B_T).clamp(-clip, clip)
        err_clip = (v_clip - returns_B_T) ** 2
        loss = 0.5 * torch.maximum(err, err_clip)
        clip_frac = masked_mean((err_clip > err).to(m.dtype).detach(), m)
    metrics = {"traj/value_clip_frac": clip_frac, "traj/value_error": masked_mean(err.detach(), m)}
    return loss * m, metrics


def aggregate(
    loss_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    mode: Aggregation,
    num_tokens: int,
    num_seqs: int,
    norm_len: int,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar, normalised by the *global* batch.

    The denominators (``num_tokens``, ``num_seqs``, ``norm_len``) are those of the whole
    minibatch behind one optimizer step, not of this micro-batch, so the summed
    gradients of the micro-batches equal the gradient of the whole minibatch whatever
    the micro-batch size.

    Modes:

    - ``token-mean``: ``sum(loss) / num_tokens`` — every token weighs the same (DAPO).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean
      (GRPO's original form: long answers' tokens weigh less).
    - ``seq-mean-token-sum-norm``: ``sum(loss) / (num_seqs * norm_len)`` with a constant
      length (Dr.GRPO, arXiv 2503.20783): no length bias in either direction.

    Args:
        loss_B_T: float [B, T], per-token loss (0 where mask is 0).
        mask_B_T: 0/1 [B, T], positions that count.
        mode: one of :data:`AGGREGATIONS`.
        num_tokens: masked tokens in the whole minibatch.
        num_seqs: sequences with at least one masked token in the whole minibatch.
        norm_len: the constant length of ``seq-mean-token-sum-norm``.

    Returns:
        0-dim tensor.
    """
    m = mask_B_T.to(loss_B_T.dtype)
    masked = loss_B_T * m
    if mode == "token-mean":
        return masked.sum() / max(num_tokens, 1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(1) / m.sum(1).clamp(min=1)
        return per_seq.sum() / max(num_seqs, 1)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / max(num_seqs * norm_len, 1)
    raise ConfigError(f"unknown loss aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")
