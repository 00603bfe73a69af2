"""The `taurl` command line skeleton."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from taurl import __version__
from taurl.cli import build_parser, eval_command, main
from taurl.errors import TaurlError
from taurl.rollout.eval import EvalConfig
from taurl.types import SamplingParams


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "taurl.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"taurl {__version__}"


def test_models_list_and_prepare(capsys) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "tiny-random" in out
    assert main(["models", "prepare", "tiny-random"]) == 0
    assert capsys.readouterr().out.strip().endswith("tiny-random")


def test_unknown_model_is_a_clean_error(capsys) -> None:
    assert main(["models", "prepare", "smolm2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taurl: error: unknown model 'smolm2'")


@pytest.mark.parametrize("flags", [["--max-turns", "3"], ["--max-tokens", "17"], ["eval.agent.max_turns=3"]])
def test_eval_agent_flags_keep_greedy_sampling(flags: list[str]) -> None:
    """`taurl eval --max-turns N` changes max_turns only: eval stays greedy (temperature 0)."""
    cmd = eval_command(build_parser().parse_args(["eval", *flags]))
    default = EvalConfig().agent
    assert cmd.eval.agent.sampling.temperature == 0.0
    if "--max-tokens" in flags:
        assert cmd.eval.agent == replace(default, sampling=replace(default.sampling, max_tokens=17))
    else:
        assert cmd.eval.agent == replace(default, max_turns=3)


def test_eval_flags_keep_the_config_files_agent_settings(tmp_path: Path) -> None:
    p = tmp_path / "eval.yaml"
    p.write_text("eval:\n  agent:\n    max_context_tokens: 512\n    sampling: {top_p: 0.5}\n")
    args = ["eval", "--config", str(p), "--max-turns", "3", "--max-tokens", "17"]
    agent = eval_command(build_parser().parse_args(args)).eval.agent
    assert (agent.max_turns, agent.max_context_tokens) == (3, 512)
    assert agent.sampling == SamplingParams(max_tokens=17, temperature=0.0, top_p=0.5)
    sampled = eval_command(build_parser().parse_args(["eval", "--temperature", "0.7", "--samples", "4"]))
    assert sampled.eval.agent.sampling.temperature == 0.7 and sampled.eval.samples == 4


def test_train_overrides_change_the_default_run_key_by_key(tmp_path: Path) -> None:
    from taurl.cli import train_config
    from taurl.train_config import TrainConfig

    # no file: the default run with these keys changed, not sections rebuilt from their
    # classes' defaults (which gave 8 x 4 episodes, 8 turns and a KL penalty)
    cfg = train_config(build_parser().parse_args(
        ["train", "rollout.progress=false", "learner.lr=1e-5"]))
    default = TrainConfig()
    assert not cfg.rollout.progress and cfg.learner.lr == 1e-5
    assert replace(cfg.rollout, progress=True) == default.rollout
    assert replace(cfg.learner, lr=default.learner.lr) == default.learner
    # a file is the config: a learner section it names is its preset's (here PPO's KL)
    p = tmp_path / "c.yaml"
    p.write_text("learner:\n  algorithm: ppo\n")
    cfg = train_config(build_parser().parse_args(["train", str(p), "learner.lr=1e-5"]))
    assert cfg.learner.options.kl_coef is None and cfg.learner.resolved_options().kl_coef > 0
    assert cfg.learner.lr == 1e-5


def test_a_run_or_its_latest_pointer_names_the_newest_checkpoints_policy(tmp_path: Path) -> None:
    from taurl.cli import rollout_command, train_config

    ckpts = tmp_path / "run" / "checkpoints"
    for it in (2, 5):
        (ckpts / f"iter-00000{it}" / "policy").mkdir(parents=True)
        (ckpts / f"iter-00000{it}" / "trainer.json").write_text("{}")
    (ckpts / "latest").write_text("iter-000005")  # a file naming it, as the trainer writes
    newest = str(ckpts / "iter-000005" / "policy")
    cmd = eval_command(build_parser().parse_args(
        ["eval", "--model", str(tmp_path / "run"), "--compare", str(ckpts / "latest/policy")]))
    assert cmd.model == cmd.compare == newest
    assert rollout_command(build_parser().parse_args(
        ["rollout", "--model", str(ckpts / "latest")])).model == newest
    assert train_config(build_parser().parse_args(["train", f"model={tmp_path}/run"])).model == newest
    other = str(ckpts / "iter-000002" / "policy")  # any other path stays as it is
    assert eval_command(build_parser().parse_args(["eval", "--model", other])).model == other
    (ckpts / "latest").write_text("iter-000009")  # names no complete checkpoint
    with pytest.raises(TaurlError, match="has no complete checkpoint"):
        eval_command(build_parser().parse_args(["eval", "--model", str(tmp_path / "run")]))


def test_eval_labels_name_checkpoints_by_run_and_iteration() -> None:
    from taurl.rollout.commands import _label

    assert _label("smollm2-135m") == "smollm2-135m"
    assert _label("runs/grpo-sql/checkpoints/iter-000004/policy") == "grpo-sql@iter-000004"
    assert _label("/abs/runs/x/checkpoints/iter-000010/policy") == "x@iter-000010"
    assert _label("models/my-model") == "my-model"


def test_every_rollout_and_eval_flag_lands_on_its_config_field() -> None:
    from taurl.cli import rollout_command

    r = rollout_command(build_parser().parse_args([
        "rollout", "--model", "tiny-random", "--out", "t.jsonl", "--backend", "hf",
        "--env", "taurl/SQL-v0", "--split", "heldout", "--tasks", "3", "--samples", "2",
        "--in-flight", "5", "--seed", "9", "--max-turns", "2", "--max-tokens", "33",
        "--temperature", "0.5", "--no-progress", "rollout.task_offset=4",
    ]))
    assert (r.model, r.output, r.backend.kind) == ("tiny-random", "t.jsonl", "hf")
    ro = r.rollout
    assert (ro.env_id, ro.split, ro.num_tasks, ro.samples_per_task, ro.max_in_flight, ro.seed,
            ro.task_offset) == ("taurl/SQL-v0", "heldout", 3, 2, 5, 9, 4)
    assert (ro.agent.max_turns, ro.agent.sampling.max_tokens, ro.agent.sampling.temperature,
            ro.progress) == (2, 33, 0.5, False)
    e = eval_command(build_parser().parse_args([
        "eval", "--model", "m1", "--compare", "m2", "--out", "o", "--env", "a", "b",
        "--split", "train", "--episodes", "7", "--samples", "3", "--in-flight", "6",
        "--seed", "2", "--max-turns", "4", "--temperature", "1.0",
    ]))
    assert (e.model, e.compare, e.out_dir, e.eval.envs, e.eval.split) == (
        "m1", "m2", "o", ["a", "b"], "train")
    assert (e.eval.episodes, e.eval.samples, e.eval.max_in_flight, e.eval.seed,
            e.eval.agent.max_turns) == (7, 3, 6, 2, 4)
