"""The Learner on the tiny model: every preset, invariances, direction, checkpoints, teachers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import toy_trajectories
from transformers import AutoModelForCausalLM, AutoTokenizer

from taurl.config import load_config
from taurl.errors import ConfigError, TrajectoryError
from taurl.learners import PRESETS, AlgorithmOptions, Learner, LearnerConfig, LoraConfig, scoring
from taurl.learners.batch import build_batch, pack_micro_batches
from taurl.learners.model import policy_forward
from taurl.learners.teacher import TokenizerMismatchError, privileged_prefix

CONTEXT = "The reference solution is 42."
# Every group has reward variance, so DAPO's filter keeps them all.
REWARDS = [[0.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]


@pytest.fixture(scope="module")
def trajs(tiny_model: Path):
    out = toy_trajectories(tiny_model, groups=2, per_group=2, rewards=REWARDS)
    for t in out:
        t.info["privileged_context"] = CONTEXT
    return out


def snapshot(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.state_dict_for_sync().items()}


@pytest.mark.parametrize("algorithm", list(PRESETS))
def test_every_preset_updates_the_policy(tiny_model: Path, trajs, algorithm: str) -> None:
    # PPO's 4 epochs x 4 minibatches repeat one code path 16 times; one epoch keeps the
    # test fast and still takes 4 optimizer steps with shuffled minibatches.
    opts = AlgorithmOptions(epochs=1) if algorithm.startswith("ppo") else AlgorithmOptions()
    cfg = LearnerConfig(algorithm=algorithm, options=opts, lr=1e-3, device="cpu")
    learner = Learner(cfg, tiny_model)
    before = snapshot(learner)
    metrics = learner.update(trajs)
    after = learner.state_dict_for_sync()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, f"{algorithm}: no parameter changed"
    assert learner.policy_version == metrics["perf/optimizer_steps"] >= 1
    for key in ("traj/sampler_mismatch_kl", "traj/entropy", "traj/grad_norm", "reward/mean",
                "reward/zero_var_groups", "adv/mean"):
        assert key in metrics, f"{algorithm}: metric {key} missing"
    # the sampler log-probs are the model's own (float32): no mismatch before the update
    assert metrics["traj/sampler_mismatch_kl"] < 1e-6


def gradients(learner: Learner, trajectories) -> dict[str, torch.Tensor]:
    """The gradient of one minibatch made of every trajectory, without the optimizer step."""
    learner.backward(trajectories)
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_is_invariant_to_micro_batch_size(tiny_model: Path, agg: str) -> None:
    trajs8 = toy_trajectories(tiny_model, groups=2, per_group=4, turns=1, action_len=5, seed=3)
    T = len(trajs8[0].token_ids)
    assert all(len(t.token_ids) == T for t in trajs8)
    opts = AlgorithmOptions(loss_agg=agg, kl_coef=0.0)
    grads = {}
    for budget, expect_micro in ((8 * T, 1), (2 * T, 4)):
        assert len(pack_micro_batches(list(range(8)), [T] * 8, budget)) == expect_micro
        cfg = LearnerConfig(algorithm="grpo", options=opts, micro_batch_tokens=budget,
                            dtype="float32", device="cpu")
        grads[expect_micro] = gradients(Learner(cfg, tiny_model), trajs8)
    assert grads[1].keys() == grads[4].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[4][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_grpo_step_moves_logprobs_with_the_advantage_sign(tiny_model: Path) -> None:
    trajs = toy_trajectories(tiny_model, groups=2, per_group=4, turns=1, seed=5,
                             rewards=[[1.0], [0.0], [0.0], [1.0], [0.0], [1.0], [1.0], [1.0]])
    cfg = LearnerConfig(algorithm="grpo", options=AlgorithmOptions(kl_coef=0.0), lr=1e-4,
                        device="cpu", dtype="float32")
    learner = Learner(cfg, tiny_model)
    batch = build_batch(trajs, learner.device)

    def seq_logp() -> torch.Tensor:
        with torch.no_grad():
            out = policy_forward(learner.model, batch.input_ids_B_T, batch.mask_B_T, 1024)
        return out.logp_B_T.sum(1)

    before = seq_logp()
    learner.update(trajs)
    delta = seq_logp() - before
    returns = torch.tensor([t.episode_return for t in trajs]).view(2, 4)
    adv_sign = torch.sign(returns - returns.mean(1, keepdim=True)).flatten()
    assert (adv_sign != 0).all()
    assert (delta[adv_sign > 0] > 0).all(), delta
    assert (delta[adv_sign < 0] < 0).all(), delta


def test_save_load_round_trip_continues_identically(tiny_model: Path, trajs, tmp_path) -> None:
    cfg = LearnerConfig(algorithm="grpo", options=AlgorithmOptions(minibatches=2), lr=1e-3,
                        device="cpu")
    a = Learner(cfg, tiny_model)
    a.update(trajs)
    a.save(tmp_path / "ckpt")
    b = Learner(cfg, tiny_model)
    b.load(tmp_path / "ckpt")
    assert b.policy_version == a.policy_version == 2
    for k, v in a.state_dict_for_sync().items():
        torch.testing.assert_close(b.state_dict_for_sync()[k], v, atol=0, rtol=0)
    a.update(trajs)
    b.update(trajs)
    for k, v in a.state_dict_for_sync().items():
        torch.testing.assert_close(b.state_dict_for_sync()[k], v, atol=1e-7, rtol=0, msg=k)


def test_lora_update_changes_merged_weights(tiny_model: Path, trajs) -> None:
    # peft is an optional extra (taurl[lora]); the learner without it is tested above.
    pytest.importorskip("peft")
    cfg = LearnerConfig(algorithm="grpo", lr=1e-2, device="cpu", lora=LoraConfig(rank=4))
    learner = Learner(cfg, tiny_model)
    before = snapshot(learner)
    metrics = learner.update(trajs)  # grpo's KL uses the adapter-off model as reference
    after = learner.state_dict_for_sync()
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before if "q_proj" in k)
    assert torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # frozen
    assert metrics["traj/kl_ref"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["plain", "lora", "value_head"])
def test_run_checkpoint_keeps_the_weights_once_only_where_the_policy_is_all_of_them(
        tiny_model: Path, trajs, tmp_path, kind: str) -> None:
    """A run's checkpoint writes the learner's weights only where the float32 policy is not
    all of them (LoRA adapters, a value head); either way the learner restores exactly."""
    from taurl.learners.checkpoint import policy_is_all_weights, saved_weights
    from taurl.run_dir import RunDir, snapshot_checkpoint

    if kind == "lora":
        pytest.importorskip("peft")
    cfg = LearnerConfig(algorithm="ppo" if kind == "value_head" else "grpo", lr=1e-2,
                        device="cpu", options=AlgorithmOptions(epochs=1, minibatches=1),
                        lora=LoraConfig(rank=4 if kind == "lora" else 0))
    learner = Learner(cfg, tiny_model)
    learner.update(trajs)
    assert policy_is_all_weights(learner) == (kind == "plain")
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    ckpt = run.write_checkpoint(snapshot_checkpoint(0, learner, tiny_model), keep=1)
    assert (ckpt / "learner" / "model.safetensors").exists() == (kind != "plain")
    assert saved_weights(ckpt / "learner").keys() <= learner.trained_modules.state_dict().keys()
    restored = Learner(cfg, tiny_model)
    restored.load(ckpt / "learner")
    for k, v in learner.trained_modules.state_dict().items():
        torch.testing.assert_close(restored.trained_modules.state_dict()[k], v, atol=0, rtol=0,
                                   msg=k)


def test_privileged_teacher_scores_the_students_exact_tokens(tiny_model: Path, trajs) -> None:
    learner = Learner(LearnerConfig(algorithm="grpo_opd", device="cpu", dtype="float32"),
                      tiny_model)
    batch = build_batch(trajs, learner.device)
    got = scoring.privileged_logprobs(learner, batch, trajs)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prefix = privileged_prefix(tok, CONTEXT)
    assert CONTEXT in tok.decode(prefix) and "system" in tok.decode(prefix)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for b, traj in enumerate(trajs):
        full = torch.tensor([prefix + traj.token_ids])
        with torch.no_grad():
            logp = base(input_ids=full).logits.log_softmax(-1)[0]
        off = len(prefix)
        for t, m in enumerate(traj.loss_mask):
            if m:  # the teacher's log-prob of the student's token t, given context + tokens < t
                expect = logp[off + t - 1, traj.token_ids[t]].item()
                assert got[b, t].item() == pytest.approx(expect, abs=1e-4)
            else:
                assert got[b, t].item() == 0.0
    # the context matters: without it the same model scores the tokens differently
    assert not torch.allclose(got, batch.sampler_logp_B_T, atol=1e-4)


def test_privileged_teacher_needs_the_context(tiny_model: Path, trajs) -> None:
    learner = Learner(LearnerConfig(algorithm="grpo_opd", device="cpu"), tiny_model)
    bare = [toy_trajectories(tiny_model, groups=1, per_group=2, rewards=REWARDS[:2])[0]]
    with pytest.raises(TrajectoryError, match="privileged_context"):
        learner.update(bare)


def test_precomputed_teacher_reads_info(tiny_model: Path, trajs) -> None:
    opts = AlgorithmOptions(teacher="precomputed", advantage_coef=0.0)
    learner = Learner(LearnerConfig(algorithm="grpo_opd", options=opts, device="cpu"), tiny_model)
    with pytest.raises(TrajectoryError, match="teacher_logprobs"):
        learner.update(trajs)
    for t in trajs:
        # a teacher that likes every sampled token 1 nat more than the sampler
        t.info["teacher_logprobs"] = [lp + 1.0 if m else 0.0
                                      for lp, m in zip(t.logprobs, t.loss_mask, strict=True)]
    try:
        metrics = learner.update(trajs)
    finally:
        for t in trajs:
            del t.info["teacher_logprobs"]
    assert metrics["reward/teacher_gap"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["adv/mean"] == pytest.approx(1.0, abs=1e-3)  # α = 0: pure OPD


def test_teacher_coef_zero_scores_the_teacher_but_trains_as_grpo(
    tiny_model: Path, trajs
) -> None:
    """λ = 0 is GRPO's control arm: reward/teacher_gap is measured, the advantages are GRPO's."""
    grpo = Learner(LearnerConfig(algorithm="grpo", lr=1e-3, device="cpu",
                                 options=AlgorithmOptions(kl_coef=0.0)), tiny_model)
    opts = AlgorithmOptions(teacher="model", teacher_path=str(tiny_model), teacher_coef=0.0,
                            loss_agg="seq-mean-token-mean")
    control = Learner(LearnerConfig(algorithm="grpo_opd", lr=1e-3, device="cpu", options=opts),
                      tiny_model)
    want, got = grpo.update(trajs), control.update(trajs)
    assert "reward/teacher_gap" not in want
    # the teacher is the policy's own model here, so it agrees with the sampler
    assert got["reward/teacher_gap"] == pytest.approx(0.0, abs=1e-3)
    for key in ("adv/mean", "adv/std", "adv/abs_max", "traj/policy_loss"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_loading_a_folder_that_is_no_checkpoint_says_so(tiny_model: Path, tmp_path) -> None:
    from taurl.errors import CheckpointError, TaurlError

    learner = Learner(LearnerConfig(algorithm="grpo", device="cpu"), tiny_model)
    with pytest.raises(CheckpointError, match="Learner.save"):
        learner.load(tmp_path)
    assert issubclass(CheckpointError, TaurlError) and issubclass(CheckpointError, FileNotFoundError)


def test_trainer_resolves_builtin_teacher_names(tiny_model: Path) -> None:
    from taurl.trainer import _resolve_model_options

    cfg = LearnerConfig(algorithm="grpo_opd",
                        options=AlgorithmOptions(teacher="model", teacher_path="tiny-random"))
    assert _resolve_model_options(cfg).options.teacher_path == str(tiny_model)
    assert cfg.options.teacher_path == "tiny-random"  # the user's config is left as written
    plain = LearnerConfig(algorithm="grpo")
    assert _resolve_model_options(plain) is plain


def test_teacher_with_another_tokenizer_is_refused(tiny_model: Path, tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<taurl-extra-token>"])
    tok.save_pretrained(other)
    opts = AlgorithmOptions(teacher="model", teacher_path=str(other))
    with pytest.raises(TokenizerMismatchError, match="do not share a tokenizer"):
        Learner(LearnerConfig(algorithm="grpo_opd", options=opts, device="cpu"), tiny_model)


def test_dapo_filters_zero_variance_groups(tiny_model: Path) -> None:
    trajs = toy_trajectories(tiny_model, groups=2, per_group=2, turns=1,
                             rewards=[[1.0], [1.0], [0.0], [1.0]])
    learner = Learner(LearnerConfig(algorithm="dapo", lr=1e-3, device="cpu"), tiny_model)
    metrics = learner.update(trajs)
    assert metrics["reward/zero_var_groups"] == 0.5
    assert metrics["reward/filtered_frac"] == 0.5
    assert learner.policy_version == 1
    all_equal = toy_trajectories(tiny_model, groups=1, per_group=2, turns=1,
                                 rewards=[[1.0], [1.0]])
    metrics = learner.update(all_equal)
    assert metrics["perf/optimizer_steps"] == 0 and learner.policy_version == 1


@pytest.mark.parametrize("rewards", [[[1.0], [1.0], [0.0], [1.0]], [[1.0], [1.0], [0.0], [0.0]]],
                         ids=["one-group-zero", "all-zero"])
def test_rows_without_gradient_are_skipped_with_the_same_update(tiny_model: Path,
                                                                rewards) -> None:
    # group 0 scored alike (advantage 0 everywhere): its rows add nothing to the gradient
    trajs = toy_trajectories(tiny_model, groups=2, per_group=2, turns=1, rewards=rewards)
    after, metrics, grads = {}, {}, {}
    for skip in (False, True):
        # weight decay: an all-zero gradient still moves the weights (AdamW steps with it)
        cfg = LearnerConfig(algorithm="grpo", options=AlgorithmOptions(kl_coef=0.0), lr=1e-3,
                            weight_decay=0.1, dtype="float32", device="cpu",
                            skip_zero_grad_rows=skip)
        learner = Learner(cfg, tiny_model)
        grads[skip] = gradients(learner, trajs)  # AdamW would hide a wrong scale
        before = snapshot(learner)
        metrics[skip] = learner.update(trajs) | learner.update(trajs)  # moments carried
        after[skip] = snapshot(learner)
        assert learner.policy_version == 2
    assert "traj/zero_grad_frac" not in metrics[False]
    varied = toy_trajectories(tiny_model, groups=1, per_group=2, turns=1, rewards=[[1.0], [0.0]])
    assert learner.update(varied)["traj/zero_grad_frac"] == 0.0  # reported when nothing skipped
    alike = [rewards[2 * g] == rewards[2 * g + 1] for g in range(2)]  # per group of 2
    zero_tokens = sum(sum(t.loss_mask) for i, t in enumerate(trajs) if alike[i // 2])
    expected = zero_tokens / sum(sum(t.loss_mask) for t in trajs)
    assert metrics[True]["traj/zero_grad_frac"] == pytest.approx(expected)
    assert any(not torch.equal(before[k], after[True][k]) for k in before)
    assert grads[True].keys() == grads[False].keys()
    for k, g in grads[False].items():
        torch.testing.assert_close(grads[True][k], g, atol=1e-7, rtol=1e-5, msg=k)
    for k, v in after[False].items():
        torch.testing.assert_close(after[True][k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_rows_are_not_skipped_when_the_loss_has_a_term_without_the_advantage(
        tiny_model: Path) -> None:
    trajs = toy_trajectories(tiny_model, groups=1, per_group=2, turns=1, rewards=[[1.0], [1.0]])
    for opts in (AlgorithmOptions(kl_coef=0.0, entropy_coef=0.01),
                 AlgorithmOptions(kl_coef=0.1, kl_in="loss")):
        learner = Learner(LearnerConfig(algorithm="grpo", options=opts, device="cpu"), tiny_model)
        metrics = learner.update(trajs)
        assert "traj/zero_grad_frac" not in metrics and "traj/entropy" in metrics, opts


def test_config_errors_say_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="valid: reinforce, ppo"):
        LearnerConfig(algorithm="gpro")
    with pytest.raises(ConfigError, match="needs a critic"):
        LearnerConfig(algorithm="grpo", options=AlgorithmOptions(advantage="gae"))
    with pytest.raises(ConfigError, match="dual_clip must be > 1"):
        AlgorithmOptions(dual_clip=0.5)
    with pytest.raises(ConfigError, match="teacher_path"):
        LearnerConfig(algorithm="grpo_opd", options=AlgorithmOptions(teacher="model"))


def test_config_loads_from_overrides() -> None:
    cfg = load_config(LearnerConfig, None, ["algorithm=dapo", "options.eps_high=0.3",
                                            "lr=2e-6"])
    opts = cfg.resolved_options()
    assert (opts.eps_high, opts.eps_low, opts.filter_zero_var_groups) == (0.3, 0.2, True)
    assert cfg.lr == 2e-6
