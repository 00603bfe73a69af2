"""``TrainConfig``: everything ``taurl train`` reads, as one dataclass (YAML or ``key=value``).

Its parts live with what they configure (the rollout, the learner, the backend, Ray);
this module only gathers them, with the defaults of the main example, and checks the
combination. ``taurl.trainer`` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from taurl.agents.config import BackendConfig, RayConfig
from taurl.agents.loop import AgentConfig
from taurl.errors import ConfigError
from taurl.learners.config import LearnerConfig
from taurl.learners.options import AlgorithmOptions
from taurl.rollout.runner import RolloutConfig
from taurl.types import SamplingParams


def _default_rollout() -> RolloutConfig:
    return RolloutConfig(
        env_id="taurl/Calculator-v0", num_tasks=4, samples_per_task=8, max_in_flight=64,
        agent=AgentConfig(max_turns=3, sampling=SamplingParams(max_tokens=96, temperature=1.0)),
    )


@dataclass
class TrainConfig:
    """A training run. Every field can be set in YAML or as ``key=value`` on the command line."""

    # policy model: built-in name (smollm2-135m, tiny-random), HF folder, or cached hub id
    model: str = "smollm2-135m"
    # where config, metrics, samples and checkpoints go
    run_dir: str = "runs/grpo-calculator"
    # training iterations (rollout + update + sync)
    iterations: int = 30
    # stop early after this many minutes of wall-clock time (0 = no limit)
    time_budget_min: float = 30.0
    # base seed of tasks, sampling and the learner
    seed: int = 0
    # training episodes: env, tasks per iteration (N), group size (G), agent limits and sampling
    rollout: RolloutConfig = field(default_factory=_default_rollout)
    # the algorithm (learner.algorithm: a preset, see LearnerConfig.algorithm) and its optimiser
    learner: LearnerConfig = field(
        default_factory=lambda: LearnerConfig(
            lr=5e-6, micro_batch_tokens=2048, options=AlgorithmOptions(kl_coef=0.0)
        )
    )
    # the inference engine: vllm (in-process, default), server, or hf
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Ray scale-out (ray.address=local|auto|ray://...): engines and env workers as actors; off by default
    ray: RayConfig = field(default_factory=RayConfig)
    # evaluate on the held-out split every this many iterations (0 = never; also at the end)
    eval_every: int = 4
    # held-out tasks per evaluation (greedy, one sample each)
    eval_episodes: int = 32
    # write a checkpoint every this many iterations; 0 = when checkpoints stay within
    # checkpoint_budget of the run time (the first and the last iteration are always saved)
    checkpoint_every: int = 0
    # auto checkpoints (checkpoint_every 0): the largest fraction of run time spent writing them
    checkpoint_budget: float = 0.05
    # checkpoints kept on disk (the newest ones)
    keep_checkpoints: int = 2
    # write checkpoints in a background thread from an in-memory copy (the iteration waits
    # only for the copy; trained weights and optimizer state once more in memory meanwhile).
    # Off by default: on 2 CPU cores the write competes with the next update and the
    # peer benchmark gained nothing; it is for a learner on a GPU (idle CPU cores)
    checkpoint_background: bool = False
    # trajectories per iteration appended to samples.md as text
    log_samples: int = 2
    # also write TensorBoard event files (needs the tensorboard package)
    tensorboard: bool = True
    # stop the run when more than this share of an iteration's episodes end in "error" (1.0 = never)
    max_error_rate: float = 0.5

    def __post_init__(self) -> None:
        for name in ("iterations", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.checkpoint_budget < 1:
            raise ConfigError(
                f"checkpoint_budget must be in (0, 1), got {self.checkpoint_budget}; "
                "0.05 = at most 5% of the run's time goes to checkpoints"
            )
        for name in ("eval_every", "eval_episodes", "log_samples", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.max_error_rate <= 1:
            raise ConfigError(
                f"max_error_rate must be in [0, 1], got {self.max_error_rate}; 0.5 stops a run "
                "when over half of an iteration's episodes error, 1.0 never stops it"
            )
        if self.time_budget_min < 0:
            raise ConfigError(f"time_budget_min must be >= 0 (0 = none), got {self.time_budget_min}")
        if self.rollout.split != "train":
            raise ConfigError(
                f"rollout.split is {self.rollout.split!r}; training samples the 'train' split "
                "(held-out tasks are for evaluation)"
            )
        if self.learner.seed == 0 and self.seed:
            self.learner.seed = self.seed
        o = self.learner.resolved_options()
        steps = o.epochs * o.minibatches
        if 0 < self.rollout.max_off_policy_steps < steps:
            raise ConfigError(
                f"rollout.max_off_policy_steps is {self.rollout.max_off_policy_steps}, but one "
                f"update takes epochs x minibatches = {steps} optimizer steps, so a batch sampled "
                f"during the previous update is {steps} steps old when trained on; set "
                f"rollout.max_off_policy_steps >= {steps} (or 0: synchronous)"
            )
