"""`taurl diagnose` on synthetic metrics with known symptoms, and `taurl plot`."""

from __future__ import annotations

import json

from taurl.diagnose import diagnose, format_findings, read_metrics
from taurl.plot import plot_run


def _write(tmp_path, rows):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"iteration": i, **r}) + "\n" for i, r in enumerate(rows))
    return tmp_path


def test_healthy_run_has_no_findings(tmp_path) -> None:
    rows = [
        {"reward/zero_var_groups": 0.3, "rollout/success": 0.2 + 0.05 * i, "traj/clip_frac": 0.02,
         "traj/sampler_mismatch_kl": 0.001, "traj/entropy": 1.0 - 0.02 * i,
         "traj/grad_norm": 1.0 + 0.1 * (i % 2), "traj/approx_kl": 0.002}
        for i in range(8)
    ]
    run = _write(tmp_path, rows)
    assert diagnose(read_metrics(run)) == []
    assert "no symptom" in format_findings([], 8)


def test_each_known_symptom_is_named_with_its_numbers(tmp_path) -> None:
    rows = [
        {"reward/zero_var_groups": 0.9, "rollout/success": 0.0,
         "traj/sampler_mismatch_kl": 0.05, "traj/clip_frac": 0.4,
         "traj/entropy": 2.0 if i == 0 else 0.1, "traj/grad_norm": 1.0 if i < 7 else 50.0,
         "traj/approx_kl": 0.2, "rollout/stop/length": 0.6, "rollout/termination/error": 0.25}
        for i in range(8)
    ]
    findings = {f.name: f for f in diagnose(read_metrics(_write(tmp_path, rows)))}
    assert set(findings) == {
        "no learning signal", "reward never observed", "sampler–learner mismatch",
        "clip fraction saturated", "entropy collapse", "gradient spikes", "large policy steps",
        "turns cut by max_tokens", "episodes failing",
    }
    assert findings["no learning signal"].side == "reward"
    assert "0.90" in findings["no learning signal"].evidence
    assert findings["sampler–learner mismatch"].side == "trajectory"
    assert "importance sampling" in findings["sampler–learner mismatch"].advice
    assert "50.00" in findings["gradient spikes"].evidence
    report = format_findings(list(findings.values()), len(rows))
    assert report.index("[trajectory side") < report.index("[reward side")


def test_solved_task_is_reported(tmp_path) -> None:
    rows = [{"rollout/success": 1.0} for _ in range(5)]
    names = [f.name for f in diagnose(read_metrics(_write(tmp_path, rows)))]
    assert names == ["task solved"]


def test_plot_writes_a_png(tmp_path) -> None:
    rows = [{"rollout/return": 0.1 * i, "rollout/success": 0.1 * i, "traj/clip_frac": 0.01}
            for i in range(5)]
    path = plot_run(_write(tmp_path, rows))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_key_the_advice_names_is_a_real_config_key() -> None:
    """Following the advice must not end in "unknown config key" (learner.tis_cap did)."""
    import re
    from pathlib import Path

    import taurl.diagnose
    from taurl.config import load_config
    from taurl.trainer import TrainConfig

    source = Path(taurl.diagnose.__file__).read_text()
    keys = set(re.findall(r"\b(?:learner|rollout|backend)\.[a-z_]+(?:\.[a-z_]+)*", source))
    assert {"learner.options.tis_cap", "learner.options.eps_high", "learner.lr"} <= keys
    values = {"lr": "1e-6", "epochs": "2"}
    for key in sorted(keys):
        load_config(TrainConfig, None, [f"{key}={values.get(key.rsplit('.', 1)[1], '0.3')}"])
