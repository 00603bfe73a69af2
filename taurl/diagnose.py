"""Read a run's ``metrics.jsonl`` and name what looks wrong, on each side of J(θ).

Every policy-gradient method optimises J(θ) = E_{τ∼p_θ}[R(τ)]; a run that does not
learn is failing on the trajectory side (how log p_θ(τ) enters the gradient:
ratios, clipping, sampler/learner mismatch, entropy) or on the reward side (what
R(τ) credits: zero-variance groups, saturated or absent success). Each rule below
reads named metrics over the last iterations and, when it fires, says which side,
what it saw (the numbers), and what to try.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from taurl.errors import TaurlError

Side = Literal["trajectory", "reward", "rollout"]
Row = dict[str, float]


@dataclass(frozen=True)
class Finding:
    """One symptom: which side of J(θ), the evidence, and the suggested fix."""

    side: Side
    name: str
    evidence: str
    advice: str


def read_metrics(run_dir: str | Path) -> list[Row]:
    """The numeric fields of each line of ``RUN_DIR/metrics.jsonl``, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise TaurlError(f"{path} does not exist; expected a run directory written by `taurl train`")
    rows: list[Row] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            data = json.loads(line)
            rows.append({k: float(v) for k, v in data.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows


def _series(rows: Sequence[Row], key: str) -> list[float]:
    return [r[key] for r in rows if key in r and math.isfinite(r[key])]


def _recent(rows: Sequence[Row], key: str, window: int) -> list[float]:
    return _series(rows, key)[-window:]


Rule = Callable[[Sequence[Row], int], Finding | None]


def _zero_variance(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "reward/zero_var_groups", window)
    if vals and statistics.fmean(vals) >= 0.7:
        succ = _recent(rows, "rollout/success", window)
        level = f", success {statistics.fmean(succ):.2f}" if succ else ""
        return Finding(
            "reward", "no learning signal",
            f"reward/zero_var_groups = {statistics.fmean(vals):.2f} over the last {len(vals)} "
            f"iterations{level}",
            "most groups score the same on every sample, so group-normalised advantages are 0: "
            "make tasks easier (if success ≈ 0) or harder (if ≈ 1), raise the group size, or add a "
            "teacher signal (preset grpo_opd)",
        )
    return None


def _success_saturated(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "rollout/success", window)
    if len(vals) >= 2 and statistics.fmean(vals) <= 0.02:
        return Finding(
            "reward", "reward never observed",
            f"rollout/success = {statistics.fmean(vals):.3f} over the last {len(vals)} iterations",
            "the policy almost never succeeds: start from easier tasks (curriculum), shape the "
            "reward (e.g. a format bonus), or distil from a teacher (grpo_opd)",
        )
    if len(vals) >= 2 and statistics.fmean(vals) >= 0.98:
        return Finding(
            "reward", "task solved",
            f"rollout/success = {statistics.fmean(vals):.3f} over the last {len(vals)} iterations",
            "nothing left to learn on this split: use harder tasks",
        )
    return None


def _mismatch(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "traj/sampler_mismatch_kl", window)
    if vals and statistics.fmean(vals) > 0.01:
        return Finding(
            "trajectory", "sampler–learner mismatch",
            f"traj/sampler_mismatch_kl = {statistics.fmean(vals):.4f} (> 0.01)",
            "the inference engine and the learner disagree on log-probs, so the gradient is "
            "off-policy: enable truncated importance sampling (learner.options.tis_cap) or "
            "compute in float32 on both sides",
        )
    return None


def _clip_saturated(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "traj/clip_frac", window)
    if vals and statistics.fmean(vals) > 0.2:
        return Finding(
            "trajectory", "clip fraction saturated",
            f"traj/clip_frac = {statistics.fmean(vals):.2f} (> 0.2)",
            "most tokens hit the PPO clip, so their gradient is zero: lower the learning rate or "
            "the number of epochs per batch (learner.lr, learner.options.epochs)",
        )
    return None


def _entropy_collapse(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _series(rows, "traj/entropy")
    if len(vals) >= 4 and vals[0] > 0:
        recent = statistics.fmean(vals[-window:])
        if recent < 0.2 * vals[0]:
            return Finding(
                "trajectory", "entropy collapse",
                f"traj/entropy fell from {vals[0]:.3f} to {recent:.3f}",
                "the policy stopped exploring: raise learner.options.eps_high (DAPO clip-higher), "
                "add an entropy bonus (learner.options.entropy_coef), or lower learner.lr",
            )
    return None


def _grad_spikes(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _series(rows, "traj/grad_norm")
    if len(vals) >= 4:
        med = statistics.median(vals)
        worst = max(vals[-window:])
        if med > 0 and worst > 10 * med:
            return Finding(
                "trajectory", "gradient spikes",
                f"traj/grad_norm peaked at {worst:.2f}, {worst / med:.0f}× its median {med:.2f}",
                "lower the learning rate or max_grad_norm; check for very long or truncated "
                "episodes dominating a batch",
            )
    return None


def _policy_drift(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "traj/approx_kl", window)
    if vals and statistics.fmean(vals) > 0.05:
        return Finding(
            "trajectory", "large policy steps",
            f"traj/approx_kl = {statistics.fmean(vals):.3f} per update (> 0.05)",
            "each update moves the policy far from the one that sampled the batch: lower the "
            "learning rate or epochs, or tighten clip_low/clip_high",
        )
    return None


def _truncation(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "rollout/stop/length", window)
    if vals and statistics.fmean(vals) > 0.3:
        return Finding(
            "rollout", "turns cut by max_tokens",
            f"rollout/stop/length = {statistics.fmean(vals):.2f} of turns",
            "raise sampling.max_tokens or penalise rambling; truncated turns carry noisy reward",
        )
    return None


def _errors(rows: Sequence[Row], window: int) -> Finding | None:
    vals = _recent(rows, "rollout/termination/error", window)
    if vals and statistics.fmean(vals) > 0.05:
        return Finding(
            "rollout", "episodes failing",
            f"rollout/termination/error = {statistics.fmean(vals):.2f} of episodes",
            "environments or tools are crashing: read the error details in the run's "
            "trajectories (info.error)",
        )
    return None


RULES: tuple[Rule, ...] = (
    _zero_variance, _success_saturated, _mismatch, _clip_saturated, _entropy_collapse,
    _grad_spikes, _policy_drift, _truncation, _errors,
)


def diagnose(rows: Sequence[Row], window: int = 5) -> list[Finding]:
    """Apply every rule to the metrics rows (one per iteration); the findings that fire."""
    return [f for rule in RULES if (f := rule(rows, window)) is not None]


def format_findings(findings: Sequence[Finding], num_rows: int) -> str:
    """A side-by-side report: trajectory side, reward side, rollout."""
    if not findings:
        return f"read {num_rows} iterations: no symptom found on either side of J(θ)."
    lines = [f"read {num_rows} iterations; symptoms by side of J(θ) = E_τ[R(τ)]:"]
    for side, title in (("trajectory", "trajectory side p_θ(τ)"), ("reward", "reward side R(τ)"),
                        ("rollout", "rollout")):
        mine = [f for f in findings if f.side == side]
        lines.append(f"\n[{title}]" + ("" if mine else "  nothing found"))
        for f in mine:
            lines.append(f"  - {f.name}: {f.evidence}\n    try: {f.advice}")
    return "\n".join(lines)
