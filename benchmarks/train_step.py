"""Where one training iteration's time goes: rollout, update, weight sync, eval, checkpoint.

Runs the default config (GRPO, calculator, SmolLM2-135M through vLLM) for a few
iterations in a temporary run directory and reports, per iteration, each phase's
seconds, the iteration's wall-clock time, the weight sync's share of it and the
time the learner waited for episodes, and the share of sampled tokens whose rows the update
skipped (no gradient: ``learner.skip_zero_grad_rows``). With ``rollout.max_off_policy_steps=1`` the
rollout overlaps the update, so the phases add up to more than the wall-clock time.
The summary line gives iterations per hour over the iterations after the first
(which pays the engine's and the learner's first-step costs).

    python benchmarks/train_step.py                 # default model, 3 iterations
    python benchmarks/train_step.py model=tiny-random iterations=2
    python benchmarks/train_step.py iterations=5 rollout.max_off_policy_steps=1
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
        cfg = load_config(TrainConfig, None, overrides, base=TrainConfig())  # the default run, changed
        run = train(cfg)
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    print(f"model {cfg.model}, {cfg.rollout.num_tasks}x{cfg.rollout.samples_per_task} episodes "
          f"per iteration, algorithm {cfg.learner.algorithm}")
    print(f"rollout.max_off_policy_steps={cfg.rollout.max_off_policy_steps}")
    print("iter  " + "  ".join(f"{p[:-2]:>10}" for p in PHASES)
          + "    wall  sync%  waited  no-grad")
    sync_shares = []
    for r in rows:
        t = {p: r.get(f"timing/{p}", 0.0) for p in PHASES}
        wall = r["timing/iteration_s"]
        sync_shares.append(t["sync_s"] / wall)
        print(f"{r['iteration']:>4}  " + "  ".join(f"{t[p]:>9.2f}s" for p in PHASES)
              + f"  {wall:6.1f}s  {100 * sync_shares[-1]:4.1f}  "
              + f"{r.get('timing/rollout_wait_s', 0.0):5.1f}s  "
              + f"{100 * r.get('traj/zero_grad_frac', 0.0):6.0f}%")
    steady = rows[1:] or rows
    per_hour = 3600 * len(steady) / sum(r["timing/iteration_s"] for r in steady)
    print(f"mean weight-sync share {100 * sum(sync_shares) / len(rows):.1f}% (target <= 2%); "
          f"{per_hour:.0f} iterations/hour after the first; "
          f"max staleness {max(r.get('rollout/staleness_max', 0) for r in rows):.0f} steps")


if __name__ == "__main__":
    main()
