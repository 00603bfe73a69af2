"""What ``taurl rollout`` and ``taurl eval`` run: their configs and their bodies.

Both commands are a config dataclass (loaded by :func:`taurl.config.load_config` from
an optional YAML file plus ``key=value`` overrides) and a function that opens the
backend, runs, and writes its outputs. The CLI (:mod:`taurl.cli`) only maps its flags
to overrides; tests call these functions with an already-open backend.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.agents.config import BackendConfig, RayConfig
from taurl.agents.loop import Agent
from taurl.config import config_to_dict
from taurl.models import resolve_model
from taurl.rollout.agent_programs import AgentCmdConfig, run_agent_cmd
from taurl.rollout.eval import EvalConfig, EvalReport, compare, evaluate
from taurl.rollout.failures import env_failures
from taurl.rollout.runner import EnvFactory, RolloutConfig, RolloutResult, run_rollout
from taurl.types import write_jsonl

if TYPE_CHECKING:
    from taurl.rollout.ray_envs import RayRollout

OpenBackend = Callable[[str], AbstractContextManager[InferenceBackend]]


@dataclass
class RolloutCommand:
    """``taurl rollout``: sample trajectories and write them to JSONL."""

    # model name (smollm2-135m, tiny-random), local folder or cached hub id
    model: str = "smollm2-135m"
    # JSONL file the trajectories are written to, as they finish
    output: str = "trajectories.jsonl"
    # the inference backend
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Ray scale-out (ray.address=local|auto|ray://...): engines and env workers as actors; off by default
    ray: RayConfig = field(default_factory=RayConfig)
    # env, split, tasks × samples, concurrency, agent
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # an OpenAI-client agent program to run per episode instead of the env (agent_cmd.command)
    agent_cmd: AgentCmdConfig = field(default_factory=AgentCmdConfig)


@dataclass
class EvalCommand:
    """``taurl eval``: evaluate one model, or compare two, on one or more environments."""

    # model name (smollm2-135m, tiny-random), local folder or cached hub id
    model: str = "smollm2-135m"
    # a second model to put side by side with the first (e.g. a trained checkpoint), or None
    compare: str | None = None
    # folder for eval.json, eval.md and one trajectories JSONL per model and env
    out_dir: str = "runs/eval"
    # the inference backend (the same settings serve both models)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Ray scale-out (ray.address=local|auto|ray://...): engines and env workers as actors; off by default
    ray: RayConfig = field(default_factory=RayConfig)
    # envs, split, episodes, samples, seed, agent (greedy by default)
    eval: EvalConfig = field(default_factory=EvalConfig)


def backend_opener(config: BackendConfig, ray_rollout: RayRollout | None = None) -> OpenBackend:
    """A function that opens (and on exit closes) a ``config`` backend for a model.

    With ``ray_rollout`` the backend is that many engine actors of ``config.kind``.
    """

    @contextmanager
    def open_backend(model: str) -> Iterator[InferenceBackend]:
        if ray_rollout is not None:
            backend: InferenceBackend = ray_rollout.make_backend(config.kind, model, config.options)
        else:
            backend = make_backend(config.kind, model, **config.options)
        try:
            yield backend
        finally:
            asyncio.run(backend.close())

    return open_backend


@contextmanager
def open_ray(config: RayConfig) -> Iterator[RayRollout | None]:
    """The Ray session ``config`` asks for, closed on exit; None (and no Ray import) when off."""
    if not config.enabled:
        yield None
        return
    from taurl.rollout.ray_envs import RayRollout

    session = RayRollout(config)
    try:
        yield session
    finally:
        session.close()


def _make_env(ray_rollout: RayRollout | None) -> EnvFactory | None:
    return ray_rollout.make_env if ray_rollout is not None else None


def _agent(backend: InferenceBackend, model: str, agent_config: object) -> Agent:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    return Agent(backend, tokenizer, agent_config)  # type: ignore[arg-type]


def run_rollout_command(cmd: RolloutCommand, open_backend: OpenBackend | None = None) -> RolloutResult:
    """Run ``taurl rollout``: trajectories go to ``cmd.output`` as they finish."""
    Path(cmd.output).parent.mkdir(parents=True, exist_ok=True)
    with open_ray(cmd.ray) as ray_rollout:
        opener = open_backend or backend_opener(cmd.backend, ray_rollout)
        with opener(cmd.model) as backend:
            agent = _agent(backend, cmd.model, cmd.rollout.agent)
            if cmd.agent_cmd.command:
                return run_agent_cmd(agent, cmd.agent_cmd, cmd.rollout, output=cmd.output)
            return asyncio.run(
                run_rollout(agent, cmd.rollout, output=cmd.output, make_env=_make_env(ray_rollout))
            )


def _label(model: str) -> str:
    """A model's name in tables and file names: a built-in name as is, a folder by its name,
    a run's checkpoint (``RUN/checkpoints/iter-N/policy``) as ``RUN@iter-N``."""
    if not ("/" in model or Path(model).exists()):
        return model
    path = Path(model)
    parts = path.parts
    if len(parts) >= 4 and parts[-1] == "policy" and parts[-3] == "checkpoints":
        return f"{parts[-4]}@{parts[-2]}"
    return path.name


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def run_eval_command(cmd: EvalCommand, open_backend: OpenBackend | None = None) -> EvalReport:
    """Run ``taurl eval``: evaluate, write ``eval.json``/``eval.md`` and trajectories into ``out_dir``."""
    models = [cmd.model] if cmd.compare is None else [cmd.model, cmd.compare]
    labels = [_label(m) for m in models]
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    out_dir = Path(cmd.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {}
    with open_ray(cmd.ray) as ray_rollout:
        opener = open_backend or backend_opener(cmd.backend, ray_rollout)
        for model, label in zip(models, labels, strict=True):
            with opener(model) as backend:
                agent = _agent(backend, model, cmd.eval.agent)
                runs[label] = asyncio.run(evaluate(agent, cmd.eval, make_env=_make_env(ray_rollout)))
            for env_id, result in runs[label].items():
                write_jsonl(result.trajectories, out_dir / f"trajectories-{_file_part(label)}-{_file_part(env_id)}.jsonl")
    comparisons = []
    if cmd.compare is not None:
        a, b = runs[labels[0]], runs[labels[1]]
        comparisons = [compare(a[env_id], b[env_id]) for env_id in cmd.eval.envs]
    report = EvalReport(
        config=json.loads(json.dumps(config_to_dict(cmd), default=str)),
        models=labels,
        results={label: {e: r.metrics for e, r in run.items()} for label, run in runs.items()},
        comparisons=comparisons,
        failures={
            label: failures
            for label, run in runs.items()
            if (failures := env_failures([t for r in run.values() for t in r.trajectories]))
        },
    )
    report.write(out_dir)
    return report
