"""What the Ray path costs: rollout throughput through Ray engine actors vs in-process vLLM.

    python benchmarks/scale.py                                  # 1 engine each side, smollm2-135m
    python benchmarks/scale.py --engines 2 --json scale.json    # 2 engines each side
    python benchmarks/scale.py --tasks 2 --samples 2 --repeats 1 --broadcast-engines 0   # smoke

Both paths run the same ``run_rollout`` (a multi-turn environment, ``tasks × samples``
episodes, ``turns`` turns of at most ``max-tokens`` tokens, ``in-flight`` episodes at
once) with the same seeds, so they sample the same requests, on the same machine:

(a) **in-process**: ``--engines`` vLLM engines (:class:`VLLMBackend`) in this process,
    behind the same least-outstanding, session-sticky routing as the Ray path;
(b) **ray**: a local Ray cluster and a :class:`RayBackend` with ``--engines`` engine
    actors (1 logical CPU each), each the same vLLM engine in its actor's process.

Both are up together and measured alternately (a, b, a, b, … ``--repeats`` times each),
each run from an empty prefix cache, after a warm-up on other tasks: a drift of the
machine's load shows as a spread between repeats instead of as a difference between
paths. Reported: sampled tokens/s of each (mean over repeats), **(b)/(a)** (target
>= 0.9: Ray must cost little when it is not needed), start-up times, and the peak
memory (PSS) of the in-process engines, of the Ray processes (daemons, actors and
their engines, the object store) and of this process.

Then (``--broadcast-engines``, default 2) the time to broadcast the model's weights
to that many engine actors: ``update_weights`` with the checkpoint's state dict in the
engines' dtype, ``--sync-repeats`` times; split into the object-store ``put`` and the
engines' concurrent load, next to the in-process engine's own ``update_weights``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Mapping
from typing import Self

import psutil
from transformers import AutoTokenizer

from taurl.agents.backend import InferenceBackend
from taurl.agents.config import RayConfig
from taurl.agents.loop import Agent, AgentConfig
from taurl.agents.ray_backend import RayBackend
from taurl.agents.vllm_backend import VLLMBackend
from taurl.models import resolve_model
from taurl.rollout.runner import RolloutConfig, RolloutResult, run_rollout
from taurl.types import Generation, SamplingParams

RAY_NAMES = (
    "raylet",
    "gcs_server",
    "ray::",
    "dashboard",
    "runtime_env",
    "log_monitor",
    "monitor.py",
)


class PeakPSS:
    """Samples memory in a thread: in-process engines, Ray's processes, this process.

    PSS (resident memory with each shared page split among the processes that map it),
    not RSS: Ray's object store is shared memory mapped by the raylet and every reader,
    and a sum of RSS would count it once per process.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.peak: dict[str, int] = collections.defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    @staticmethod
    def _pss(p: psutil.Process) -> int:
        try:
            return int(p.memory_full_info().pss)
        except psutil.Error:
            return 0

    def _tree_pss(self, p: psutil.Process) -> int:
        try:
            return sum(self._pss(q) for q in [p, *p.children(recursive=True)])
        except psutil.Error:
            return 0

    def _run(self, interval_s: float) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            now = {"driver": self._pss(me), "in_process": 0, "ray": 0}
            for child in me.children():
                try:
                    cmd = " ".join(child.cmdline()) + child.name()
                except psutil.Error:
                    continue
                side = "ray" if any(n in cmd for n in RAY_NAMES) else "in_process"
                now[side] += self._tree_pss(child)
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class InProcessEngines(InferenceBackend):
    """``n`` in-process vLLM engines with the Ray path's routing: least outstanding, sticky."""

    def __init__(self, n: int, model: str, options: Mapping[str, object]) -> None:
        self.engines = [VLLMBackend(model, **options) for _ in range(n)]  # type: ignore[arg-type]
        self.max_model_len = self.engines[0].max_model_len
        self.weight_dtype = self.engines[0].weight_dtype
        self._in_flight = [0] * n
        self._sessions: dict[str, int] = {}

    async def generate(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        session_id: str | None = None,
    ) -> Generation:
        i = self._sessions.get(session_id) if session_id is not None else None
        if i is None:
            i = min(range(len(self.engines)), key=self._in_flight.__getitem__)
            if session_id is not None:
                self._sessions[session_id] = i
        self._in_flight[i] += 1
        try:
            return await self.engines[i].generate(prompt_token_ids, sampling)
        finally:
            self._in_flight[i] -= 1

    async def update_weights(self, state_dict: Mapping[str, object], version: int) -> None:
        await asyncio.gather(*(e.update_weights(state_dict, version) for e in self.engines))  # type: ignore[arg-type]
        self.policy_version = version

    async def reset_prefix_cache(self) -> None:
        await asyncio.gather(*(e.reset_prefix_cache() for e in self.engines))

    async def close(self) -> None:
        for e in self.engines:
            await e.close()


def rollout_config(args: argparse.Namespace, seed: int) -> RolloutConfig:
    return RolloutConfig(
        env_id=args.env, split="train", env_kwargs={"max_turns": args.turns}, num_tasks=args.tasks,
        samples_per_task=args.samples, max_in_flight=args.in_flight, seed=seed, progress=False,
        agent=AgentConfig(
            max_turns=args.turns, drift_check=False,
            sampling=SamplingParams(max_tokens=args.max_tokens, temperature=1.0),
        ),
    )  # fmt: skip


def measured_run(backend: InferenceBackend, tokenizer: object, cfg: RolloutConfig) -> RolloutResult:
    """One rollout from an empty prefix cache."""

    async def run() -> RolloutResult:
        await backend.reset_prefix_cache()  # type: ignore[attr-defined]
        return await run_rollout(Agent(backend, tokenizer, cfg.agent), cfg)  # type: ignore[arg-type]

    return asyncio.run(run())


def state_dict_of(model: str, dtype: object) -> dict[str, object]:
    from safetensors.torch import load_file

    path = resolve_model(model) / "model.safetensors"
    return {k: v.to(dtype) for k, v in load_file(str(path)).items()}  # type: ignore[arg-type]


def broadcast(args: argparse.Namespace, config: RayConfig, options: dict[str, object],
              inproc: InProcessEngines, ray_backend: RayBackend | None) -> dict[str, object]:  # fmt: skip
    """update_weights timings: Ray actors (``--broadcast-engines``) and one in-process engine."""
    own = ray_backend is None
    t0 = time.perf_counter()
    if ray_backend is None:
        config = dataclasses.replace(config, num_engines=args.broadcast_engines)
        ray_backend = RayBackend(args.model, config, kind="vllm", options=options)
    start_s = time.perf_counter() - t0
    state = state_dict_of(args.model, ray_backend.weight_dtype)
    ray_s, put_s, load_s, inproc_s = [], [], [], []
    try:
        for v in range(1, args.sync_repeats + 1):
            t0 = time.perf_counter()
            asyncio.run(ray_backend.update_weights(state, v))  # type: ignore[arg-type]
            ray_s.append(time.perf_counter() - t0)
            put_s.append(ray_backend.last_update_s["put_s"])
            load_s.append(ray_backend.last_update_s["load_s"])
            t0 = time.perf_counter()
            asyncio.run(inproc.engines[0].update_weights(state, v))  # type: ignore[arg-type]
            inproc_s.append(time.perf_counter() - t0)
    finally:
        if own:
            asyncio.run(ray_backend.close())
    mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20  # type: ignore[attr-defined]
    return {
        "engines": args.broadcast_engines, "state_dict_mib": round(mb, 1),
        "engine_start_s": round(start_s, 1) if own else None,
        "ray_s": round(statistics.median(ray_s), 3), "ray_put_s": round(statistics.median(put_s), 3),
        "ray_load_s": round(statistics.median(load_s), 3),
        "in_process_one_engine_s": round(statistics.median(inproc_s), 3),
        "all_ray_s": [round(x, 3) for x in ray_s],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--env", default="taurl/GuessNumber-v0", help="a multi-turn environment")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--engines", type=int, default=1, help="engines on each side")
    parser.add_argument("--repeats", type=int, default=2, help="measured runs of each side")
    parser.add_argument("--broadcast-engines", type=int, default=2, help="0: skip the broadcast")
    parser.add_argument("--sync-repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPUs without native bf16")
    parser.add_argument(
        "--engine-options", default='{"max_num_batched_tokens": 32768}',
        help="JSON of extra vllm.AsyncEngineArgs (as benchmarks/rollout.py: keeps prompts unchunked)",
    )  # fmt: skip
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import ray

    options: dict[str, object] = {
        "dtype": args.dtype, "max_model_len": 2048,
        "engine_options": json.loads(args.engine_options),
    }  # fmt: skip
    config = RayConfig(address="local", num_engines=args.engines, cpus_per_engine=1.0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    out: dict[str, object] = {
        "args": vars(args), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "load_avg_start": os.getloadavg(),
    }  # fmt: skip
    with PeakPSS() as mem:
        t0 = time.perf_counter()
        inproc = InProcessEngines(args.engines, args.model, options)
        out["in_process_start_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ray.init(
            address="local", num_cpus=max(os.cpu_count() or 1, args.engines + 1),
            include_dashboard=False, log_to_driver=False,
        )  # fmt: skip
        out["ray_init_s"] = round(time.perf_counter() - t0, 1)
        ray_backend = None
        try:
            t0 = time.perf_counter()
            ray_backend = RayBackend(args.model, config, kind="vllm", options=options)
            out["ray_engines_start_s"] = round(time.perf_counter() - t0, 1)
            sides: dict[str, InferenceBackend] = {"in_process": inproc, "ray": ray_backend}
            for backend in sides.values():  # warm-up on other tasks
                measured_run(backend, tokenizer, rollout_config(args, seed=12345))
            runs: dict[str, list[RolloutResult]] = {name: [] for name in sides}
            cfg = rollout_config(args, seed=0)
            for _ in range(args.repeats):
                for name, backend in sides.items():
                    runs[name].append(measured_run(backend, tokenizer, cfg))
            for name, results in runs.items():
                tps = [r.summary.tokens_per_s for r in results]
                out[name] = {
                    "tokens": results[0].summary.sampled_tokens, "episodes": results[0].summary.episodes,
                    "tokens_per_s": round(statistics.mean(tps), 1),
                    "all_tokens_per_s": [round(x, 1) for x in tps],
                }  # fmt: skip
            same = all(
                a.token_ids == b.token_ids
                for a, b in zip(runs["in_process"][0].trajectories, runs["ray"][0].trajectories, strict=True)
            )  # fmt: skip
            out["same_trajectories"] = same
            tps = {
                name: statistics.mean(r.summary.tokens_per_s for r in runs[name]) for name in runs
            }
            out["ray_over_in_process"] = round(tps["ray"] / tps["in_process"], 3)
            if args.broadcast_engines:
                if args.broadcast_engines != args.engines:  # free these engines' memory first
                    asyncio.run(ray_backend.close())
                    ray_backend = None
                out["broadcast"] = broadcast(args, config, options, inproc, ray_backend)
        finally:
            if ray_backend is not None:
                asyncio.run(ray_backend.close())
            asyncio.run(inproc.close())
            ray.shutdown()
    out["peak_pss_gib"] = {k: round(v / 2**30, 2) for k, v in mem.peak.items()}
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
