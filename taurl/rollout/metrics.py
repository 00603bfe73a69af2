"""Evaluation metrics over trajectories: pure functions, checked against hand computations.

- :func:`pass_at_k`: the unbiased estimator of Chen et al. (2021), "Evaluating Large
  Language Models Trained on Code", eq. 1: with ``n`` samples of a task of which
  ``c`` succeed, ``pass@k = 1 - C(n-c, k) / C(n, k)``, averaged over tasks.
- :func:`mean_ci`: the mean and the half-width of its Student-t confidence interval.
- :func:`paired_diff_ci`: the mean difference of paired values (same task, same seed,
  two models) and its interval.
- :func:`summarize`: every number the eval table shows, from a list of Trajectories.

Every summary of a list of Trajectories (the eval table's :func:`summarize`, a
rollout's :func:`summarize_rollout`, the trainer's per-iteration :func:`batch_means`)
reads one set of sums, :func:`episode_totals`, so a count means the same everywhere.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from taurl.rollout.grouping import group_trajectories
from taurl.types import TERMINATIONS, JSONValue, Trajectory


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task: ``1 - C(n-c, k) / C(n, k)``.

    Args:
        n: Samples drawn for the task (``n >= k``).
        c: How many of them succeeded (``0 <= c <= n``).
        k: The k of pass@k (``1 <= k``).
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Numerical Recipes 6.4, Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _student_t_cdf(t: float, df: int) -> float:
    x = df / (df + t * t)
    ln_front = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - math.lgamma(0.5)
    ln_front += (df / 2) * math.log(x) + 0.5 * math.log1p(-x) if x < 1 else -math.inf
    a, b = df / 2, 0.5
    if x < (a + 1) / (a + b + 2):
        tail = math.exp(ln_front) * _betacf(a, b, x) / a  # = I_x(df/2, 1/2)
    else:
        tail = 1.0 - math.exp(ln_front) * _betacf(b, a, 1 - x) / b
    return 1.0 - 0.5 * tail if t >= 0 else 0.5 * tail


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"student_t_quantile takes p in [0.5, 1), got {p}")
    if df < 1:
        raise ValueError(f"student_t_quantile needs df >= 1, got {df}")
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if _student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its two-sided Student-t interval.

    The half-width is ``t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the
    sample standard deviation (``ddof=1``); it is ``nan`` for fewer than 2 values.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value, got none")
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, student_t_quantile((1 + confidence) / 2, n - 1) * math.sqrt(var / n)


def paired_diff_ci(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float]:
    """Mean of ``b[i] - a[i]`` and its interval's half-width (:func:`mean_ci` of the differences).

    Pairing (the same task and seed under two models) removes the task-to-task
    variance that an unpaired comparison would carry.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff_ci needs equal lengths, got {len(a)} and {len(b)}")
    return mean_ci([y - x for x, y in zip(a, b, strict=True)], confidence)


@dataclass
class EpisodeTotals:
    """Sums and counts over a list of Trajectories, the one source of every summary."""

    episodes: int  # trajectories
    returns: float  # Σ episode_return
    successes: int  # episodes with success == True (no verdict counts as failure)
    turns: int  # Σ assistant turns
    tool_calls: int  # tool calls attempted (malformed ones included)
    tool_errors: int  # tool calls that failed
    sampled_tokens: int  # tokens the policy generated
    episode_tokens: int  # tokens of whole episodes (prompt, observations, samples)
    terminations: Counter[str]  # termination reason -> episodes
    finish_reasons: Counter[str]  # each generation's stop reason -> generations
    drift: Counter[str]  # drift kind -> episodes checked
    env_s: float  # seconds in env calls, summed over episodes
    generate_s: float  # seconds awaiting the backend, summed over episodes
    policy_versions: list[int]  # distinct policy versions that sampled, ascending

    def named_terminations(self) -> dict[str, int]:
        """The non-zero termination counts, in :data:`TERMINATIONS` order."""
        return {name: self.terminations[name] for name in TERMINATIONS if self.terminations[name]}


def _info_int(t: Trajectory, key: str) -> int:
    return int(t.info.get(key, 0) or 0)  # type: ignore[arg-type]


def episode_totals(trajectories: Sequence[Trajectory]) -> EpisodeTotals:
    """The :class:`EpisodeTotals` of ``trajectories`` (all zero for none)."""
    return EpisodeTotals(
        episodes=len(trajectories),
        returns=sum(t.episode_return for t in trajectories),
        successes=sum(t.success is True for t in trajectories),
        turns=sum(t.num_turns for t in trajectories),
        tool_calls=sum(_info_int(t, "tool_calls") for t in trajectories),
        tool_errors=sum(_info_int(t, "tool_errors") for t in trajectories),
        sampled_tokens=sum(t.num_sampled_tokens for t in trajectories),
        episode_tokens=sum(len(t.token_ids) for t in trajectories),
        terminations=Counter(t.termination for t in trajectories),
        finish_reasons=Counter(
            str(s) for t in trajectories
            for s in t.info.get("finish_reasons", []) or []  # type: ignore[union-attr]
        ),
        drift=Counter(
            str(t.info["drift"]["kind"])  # type: ignore[index, call-overload]
            for t in trajectories if isinstance(t.info.get("drift"), dict)
        ),
        env_s=sum(t.timing.get("env_s", 0.0) for t in trajectories),
        generate_s=sum(t.timing.get("generate_s", 0.0) for t in trajectories),
        policy_versions=sorted({t.policy_version for t in trajectories}),
    )


@dataclass
class RolloutSummary:
    """Counts and rates of one rollout."""

    episodes: int  # trajectories produced
    errors: int  # episodes that ended in "error"
    terminations: dict[str, int]  # termination reason -> count
    mean_return: float  # mean episode return
    sampled_tokens: int  # tokens the policy generated
    wall_s: float  # wall-clock seconds
    episodes_per_s: float  # episodes / wall_s
    tokens_per_s: float  # sampled_tokens / wall_s
    env_s: float  # seconds spent in env calls, summed over episodes
    generate_s: float  # seconds spent awaiting the backend, summed over episodes
    policy_versions: list[int]  # distinct policy versions that sampled

    def to_dict(self) -> dict[str, JSONValue]:
        """JSON-ready."""
        return asdict(self)



def summarize_rollout(trajectories: Sequence[Trajectory], wall_s: float) -> RolloutSummary:
    """The :class:`RolloutSummary` of finished trajectories."""
    tot = episode_totals(trajectories)
    n = tot.episodes
    return RolloutSummary(
        episodes=n,
        errors=tot.terminations["error"],
        terminations=tot.named_terminations(),
        mean_return=tot.returns / n if n else 0.0,
        sampled_tokens=tot.sampled_tokens,
        wall_s=wall_s,
        episodes_per_s=n / wall_s if wall_s > 0 else 0.0,
        tokens_per_s=tot.sampled_tokens / wall_s if wall_s > 0 else 0.0,
        env_s=tot.env_s,
        generate_s=tot.generate_s,
        policy_versions=tot.policy_versions,
    )


def batch_means(trajectories: Sequence[Trajectory], prefix: str = "rollout") -> dict[str, float]:
    """Means over a batch of episodes, as the trainer logs them under ``prefix/``: return,
    success, turns, tool calls and errors, lengths, each termination's share, and the share
    of generations cut at the token limit."""
    tot = episode_totals(trajectories)
    n = max(tot.episodes, 1)
    out = {
        f"{prefix}/tool_calls": tot.tool_calls / n,
        f"{prefix}/tool_errors": tot.tool_errors / n,
        f"{prefix}/return": tot.returns / n,
        f"{prefix}/success": tot.successes / n,
        f"{prefix}/turns": tot.turns / n,
        f"{prefix}/sampled_tokens": tot.sampled_tokens / n,
        f"{prefix}/episode_tokens": tot.episode_tokens / n,
    }
    for reason in TERMINATIONS:
        out[f"{prefix}/termination/{reason}"] = tot.terminations[reason] / n
    stops = sum(tot.finish_reasons.values())
    if stops:
        out[f"{prefix}/stop/length"] = tot.finish_reasons["length"] / stops
    return out


@dataclass
class EvalMetrics:
    """What one model scored on one environment."""

    env_id: str  # the environment
    episodes: int  # trajectories counted (tasks × samples)
    tasks: int  # distinct groups (tasks)
    mean_return: float  # mean episode return
    return_ci95: float  # half-width of the return's 95% interval (nan for < 2 episodes)
    success_rate: float  # fraction of episodes with success == True
    success_ci95: float  # half-width of the success rate's 95% interval
    pass_at_k: dict[str, float]  # "k" -> unbiased pass@k averaged over tasks, k = 1..samples
    mean_turns: float  # mean assistant turns per episode
    tool_calls: int  # tool calls attempted (malformed ones included)
    tool_call_validity: float | None  # fraction of tool calls without error; None without calls
    terminations: dict[str, int]  # termination reason -> count
    errors: int  # episodes that ended in "error"
    sampled_tokens: int  # tokens the policy generated
    wall_s: float  # wall-clock seconds of the run
    tokens_per_s: float  # sampled_tokens / wall_s
    drift: dict[str, int] = field(default_factory=dict)  # drift kind -> count (episodes checked)

    def to_dict(self) -> dict[str, JSONValue]:
        """JSON-ready (nan becomes None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
        return out


def group_success_counts(trajectories: Sequence[Trajectory]) -> list[tuple[int, int]]:
    """``(n, c)`` per group: samples and successes of each task, in first-seen order."""
    return [(len(g), sum(t.success is True for t in g)) for g in group_trajectories(trajectories)]


def summarize(trajectories: Sequence[Trajectory], wall_s: float, env_id: str = "") -> EvalMetrics:
    """Every eval number for one model on one environment.

    Success is ``Trajectory.success is True`` (an episode the env gave no verdict on
    counts as a failure). pass@k is reported for every k up to the smallest group
    size, averaged over groups (tasks).
    """
    if not trajectories:
        raise ValueError("summarize needs at least one trajectory, got none")
    tot = episode_totals(trajectories)
    mean_return, return_ci = mean_ci([t.episode_return for t in trajectories])
    success_rate, success_ci = mean_ci([float(t.success is True) for t in trajectories])
    counts = group_success_counts(trajectories)
    k_max = min(n for n, _ in counts)
    pass_k = {
        str(k): sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in range(1, k_max + 1)
    }
    calls = tot.tool_calls
    return EvalMetrics(
        env_id=env_id or trajectories[0].env_id,
        episodes=tot.episodes,
        tasks=len(counts),
        mean_return=mean_return,
        return_ci95=return_ci,
        success_rate=success_rate,
        success_ci95=success_ci,
        pass_at_k=pass_k,
        mean_turns=tot.turns / tot.episodes,
        tool_calls=calls,
        tool_call_validity=(calls - tot.tool_errors) / calls if calls else None,
        terminations=tot.named_terminations(),
        errors=tot.terminations["error"],
        sampled_tokens=tot.sampled_tokens,
        wall_s=wall_s,
        tokens_per_s=tot.sampled_tokens / wall_s if wall_s > 0 else math.nan,
        drift=dict(sorted(tot.drift.items())),
    )
