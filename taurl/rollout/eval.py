"""Evaluation: run a model on environments' held-out tasks and report one table.

:func:`evaluate` runs ``episodes`` tasks × ``samples`` samples of each environment
through the rollout runner and summarises them (:func:`taurl.rollout.metrics.summarize`).
:func:`compare` pairs two models' trajectories task by task and sample by sample
(the runner's seeds make them the same tasks) and gives the difference of their mean
return and success rate with 95% intervals. :class:`EvalReport` renders everything as
Markdown and JSON.

Greedy sampling (``temperature=0``, the default) with a fixed seed gives the same
tasks and, up to the backend's numerics, the same answers on every run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from taurl.agents.loop import Agent, AgentConfig
from taurl.envs.base import SPLITS
from taurl.errors import ConfigError
from taurl.rollout.failures import EnvFailures
from taurl.rollout.grouping import group_trajectories
from taurl.rollout.metrics import EvalMetrics, paired_diff_ci, summarize
from taurl.rollout.runner import EnvFactory, RolloutConfig, run_rollout
from taurl.types import JSONValue, SamplingParams, Trajectory


def _greedy_agent() -> AgentConfig:
    return AgentConfig(sampling=SamplingParams(temperature=0.0))


@dataclass
class EvalConfig:
    """What an evaluation runs."""

    # Gymnasium ids of the environments, one table row (per model) each
    envs: list[str] = field(default_factory=lambda: ["taurl/Calculator-v0"])
    # task split: "heldout" (default) or "train"
    split: str = "heldout"
    # tasks per environment
    episodes: int = 50
    # samples per task; pass@k is reported for k = 1..samples (needs temperature > 0 if > 1)
    samples: int = 1
    # base seed of task and sampling seeds (the same seed gives the same tasks)
    seed: int = 0
    # episodes in flight at once
    max_in_flight: int = 32
    # threads that make, reset and step environments
    env_workers: int = 8
    # extra gymnasium.make arguments per environment id
    env_kwargs: dict[str, dict[str, JSONValue]] = field(default_factory=dict)
    # show a progress bar per environment
    progress: bool = True
    # the agent: turns, context, sampling (greedy by default)
    agent: AgentConfig = field(default_factory=_greedy_agent)

    def __post_init__(self) -> None:
        if not self.envs:
            raise ConfigError("EvalConfig.envs is empty; name at least one environment id")
        if self.split not in SPLITS:
            raise ConfigError(f"EvalConfig.split must be one of {SPLITS}, got {self.split!r}")
        if self.episodes < 1 or self.samples < 1:
            raise ConfigError(
                f"EvalConfig.episodes and samples must be >= 1, got {self.episodes} and {self.samples}"
            )
        if self.samples > 1 and self.agent.sampling.temperature == 0:
            raise ConfigError(
                f"EvalConfig.samples={self.samples} with greedy sampling (temperature 0) draws "
                f"{self.samples} identical answers, so pass@k says nothing; set "
                "agent.sampling.temperature > 0 (e.g. 1.0) or samples=1"
            )
        unknown = sorted(set(self.env_kwargs) - set(self.envs))
        if unknown:
            raise ConfigError(
                f"EvalConfig.env_kwargs has arguments for {unknown}, which are not in envs "
                f"{self.envs}; key env_kwargs by environment id"
            )


@dataclass
class EnvResult:
    """One model on one environment: its metrics and trajectories."""

    metrics: EvalMetrics
    trajectories: list[Trajectory]


@dataclass
class Comparison:
    """Model B minus model A on one environment, paired by task and sample."""

    env_id: str  # the environment
    pairs: int  # paired episodes
    return_diff: float  # mean of B's return − A's return
    return_diff_ci95: float  # half-width of its 95% interval
    success_diff: float  # B's success rate − A's
    success_diff_ci95: float  # half-width of its 95% interval


async def evaluate(
    agent: Agent, config: EvalConfig, *, make_env: EnvFactory | None = None
) -> dict[str, EnvResult]:
    """Run ``config`` with ``agent``; one :class:`EnvResult` per environment id, in order.

    ``agent`` gives the backend and tokenizer; ``config.agent`` the turns, context and
    sampling (greedy by default), whatever ``agent.config`` says. ``make_env`` builds the
    environments (default ``gymnasium.make``; see :func:`run_rollout`).
    """
    results: dict[str, EnvResult] = {}
    for env_id in config.envs:
        rollout = RolloutConfig(
            env_id=env_id,
            split=config.split,
            env_kwargs=dict(config.env_kwargs.get(env_id, {})),
            num_tasks=config.episodes,
            samples_per_task=config.samples,
            max_in_flight=config.max_in_flight,
            seed=config.seed,
            env_workers=config.env_workers,
            progress=config.progress,
            agent=config.agent,
        )
        out = await run_rollout(agent, rollout, make_env=make_env)
        results[env_id] = EnvResult(
            metrics=summarize(out.trajectories, out.summary.wall_s, env_id=env_id),
            trajectories=out.trajectories,
        )
    return results


def _pair_key(trajectories: list[Trajectory]) -> dict[tuple[str, int], Trajectory]:
    return {
        (traj.group_id, j): traj
        for group in group_trajectories(trajectories)
        for j, traj in enumerate(group)
    }


def compare(a: EnvResult, b: EnvResult) -> Comparison:
    """B − A on one environment; raises ValueError if the two runs hold different episodes."""
    ka, kb = _pair_key(a.trajectories), _pair_key(b.trajectories)
    if set(ka) != set(kb):
        raise ValueError(
            f"cannot pair the two runs on {a.metrics.env_id}: they hold different tasks or sample "
            "counts; run both with the same split, episodes, samples and seed"
        )
    keys = sorted(ka)
    ret_diff, ret_ci = paired_diff_ci(
        [ka[k].episode_return for k in keys], [kb[k].episode_return for k in keys]
    )
    succ_diff, succ_ci = paired_diff_ci(
        [float(ka[k].success is True) for k in keys], [float(kb[k].success is True) for k in keys]
    )
    return Comparison(
        env_id=a.metrics.env_id, pairs=len(keys), return_diff=ret_diff, return_diff_ci95=ret_ci,
        success_diff=succ_diff, success_diff_ci95=succ_ci,
    )


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pm(mean: float, half: float) -> str:
    return f"{mean:+.3f} ± {_fmt(half)}" if not math.isnan(half) else f"{mean:+.3f}"


@dataclass
class EvalReport:
    """Results of one or two models on one or more environments, as one table."""

    config: dict[str, JSONValue]  # the EvalConfig, as a dict
    models: list[str]  # model labels, in column order (A, then B when comparing)
    results: dict[str, dict[str, EvalMetrics]]  # model label -> env id -> metrics
    comparisons: list[Comparison] = field(default_factory=list)  # B − A per env when comparing
    # model label -> the environments where episodes errored (count and first error), if any
    failures: dict[str, list[EnvFailures]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, JSONValue]:
        """JSON-ready (nan becomes None)."""
        return {
            "config": self.config,
            "models": list(self.models),
            "results": {m: {e: r.to_dict() for e, r in envs.items()} for m, envs in self.results.items()},
            "comparisons": [
                {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(c).items()}
                for c in self.comparisons
            ],
            "failures": {m: [f.to_dict() for f in fs] for m, fs in self.failures.items()},
        }

    def to_markdown(self) -> str:
        """One Markdown table: a row per (environment, model), then a Δ row when comparing."""
        k_max = max(len(m.pass_at_k) for envs in self.results.values() for m in envs.values())
        pass_cols = [f"pass@{k}" for k in range(1, k_max + 1)]
        header = ["env", "model", "episodes", "return ± 95% CI", "success ± 95% CI", *pass_cols,
                  "turns", "tool calls/ep", "tool validity", "terminations", "tok/s"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        env_ids = list(dict.fromkeys(e for envs in self.results.values() for e in envs))
        by_env = {c.env_id: c for c in self.comparisons}
        for env_id in env_ids:
            for model in self.models:
                m = self.results[model].get(env_id)
                if m is None:
                    continue
                terms = " ".join(f"{k}:{v}" for k, v in m.terminations.items())
                row = [env_id, model, str(m.episodes), f"{m.mean_return:.3f} ± {_fmt(m.return_ci95)}",
                       f"{m.success_rate:.3f} ± {_fmt(m.success_ci95)}",
                       *[_fmt(m.pass_at_k.get(str(k))) for k in range(1, k_max + 1)],
                       f"{m.mean_turns:.2f}", f"{m.tool_calls / m.episodes:.2f}", _fmt(m.tool_call_validity),
                       terms, f"{m.tokens_per_s:.1f}"]
                lines.append("| " + " | ".join(row) + " |")
            comp = by_env.get(env_id)
            if comp is not None:
                row = [env_id, f"Δ ({self.models[1]} − {self.models[0]})", str(comp.pairs),
                       _pm(comp.return_diff, comp.return_diff_ci95),
                       _pm(comp.success_diff, comp.success_diff_ci95),
                       *[""] * k_max, "", "", "", "", ""]
                lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``eval.json`` and ``eval.md`` into ``out_dir``; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path, md_path = out / "eval.json", out / "eval.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        md_path.write_text(self.to_markdown(), encoding="utf-8")
        return json_path, md_path
