"""Where one training iteration's time goes: rollout, update, weight sync, eval, checkpoint.

Runs the default config (GRPO, calculator, SmolLM2-135M through vLLM) for a few
iterations in a temporary run directory and reports, per iteration, each phase's
seconds and share, the weight sync's share (target <= 5%) and the idle share: time
spent neither generating (rollout) nor computing gradients (update).

    python benchmarks/train_step.py                 # default model, 3 iterations
    python benchmarks/train_step.py model=tiny-random iterations=2
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from taurl.config import load_config
from taurl.trainer import TrainConfig, train

PHASES = ("rollout_s", "update_s", "sync_s", "eval_s", "checkpoint_s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"run_dir={tmp}/run", "iterations=3", "eval_every=3", "tensorboard=false",
                     "time_budget_min=0", "rollout.progress=false", *sys.argv[1:]]
        cfg = load_config(TrainConfig, None, overrides)
        run = train(cfg)
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    print(f"model {cfg.model}, {cfg.rollout.num_tasks}x{cfg.rollout.samples_per_task} episodes "
          f"per iteration, algorithm {cfg.learner.algorithm}")
    print("iter  " + "  ".join(f"{p[:-2]:>10}" for p in PHASES) + "   total  sync%  idle%")
    sync_shares, idle_shares = [], []
    for r in rows:
        t = {p: r.get(f"timing/{p}", 0.0) for p in PHASES}
        total = sum(t.values())
        sync_shares.append(t["sync_s"] / total)
        idle_shares.append(1 - (t["rollout_s"] + t["update_s"] + t["eval_s"]) / total)
        print(f"{r['iteration']:>4}  " + "  ".join(f"{t[p]:>9.2f}s" for p in PHASES)
              + f"  {total:6.1f}s  {100 * sync_shares[-1]:4.1f}  {100 * idle_shares[-1]:4.1f}")
    print(f"mean weight-sync share {100 * sum(sync_shares) / len(rows):.1f}% (target <= 5%), "
          f"mean idle share {100 * sum(idle_shares) / len(rows):.1f}%")


if __name__ == "__main__":
    main()
