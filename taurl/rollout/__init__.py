"""Rollout: the concurrent episode runner, grouping, evaluation metrics and reports."""

from taurl.rollout.eval import Comparison, EnvResult, EvalConfig, EvalReport, compare, evaluate
from taurl.rollout.grouping import group_trajectories
from taurl.rollout.metrics import (
    EvalMetrics,
    RolloutSummary,
    mean_ci,
    paired_diff_ci,
    pass_at_k,
    summarize,
)
from taurl.rollout.runner import (
    RolloutConfig,
    RolloutResult,
    run_rollout,
    task_seed,
)

__all__ = [
    "Comparison",
    "EnvResult",
    "EvalConfig",
    "EvalMetrics",
    "EvalReport",
    "RolloutConfig",
    "RolloutResult",
    "RolloutSummary",
    "compare",
    "evaluate",
    "group_trajectories",
    "mean_ci",
    "paired_diff_ci",
    "pass_at_k",
    "run_rollout",
    "summarize",
    "task_seed",
]
