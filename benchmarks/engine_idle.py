"""An idle vLLM worker's busy polling against the learner's update that follows a rollout.

    python benchmarks/engine_idle.py                 # SmolLM2 float32, 6 rounds
    python benchmarks/engine_idle.py --rounds 10

A vLLM worker keeps polling its message queue in a busy loop for a while after each message
(vLLM: 1 s); taurl's in-process engine cuts that to ``CPU_POLL_IDLE_AFTER_S`` on a CPU, where
the learner's update starts on the same cores right after the rollout. With the engine and a
learner in this process, each round samples 16 answers and then times ``Learner.update``
right away, once with vLLM's polling time and once with taurl's (set through the workers'
``taurl_poll_idle_after``), alternating; it also records the worker processes' CPU seconds
during the update. Prints the medians of both.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's taurl first
sys.path.insert(1, str(Path(__file__).resolve().parent))

VLLM_POLL_S = 1.0  # vLLM's own SpinCondition.busy_loop_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()

    import psutil
    from packing import single_turn

    from taurl.agents.vllm_backend import VLLMBackend
    from taurl.agents.vllm_worker import CPU_POLL_IDLE_AFTER_S, IDLE_METHOD
    from taurl.learners import Learner
    from taurl.models import resolve_model
    from taurl.trainer import TrainConfig
    from taurl.types import SamplingParams

    model = resolve_model(args.model)
    backend = VLLMBackend(model, dtype="float32", max_model_len=1024, seed=0)
    learner = Learner(dataclasses.replace(TrainConfig().learner, dtype="float32"), model)
    trajs = single_turn(16, 108, 8, 44)  # the peer benchmark's shape
    workers = psutil.Process().children(recursive=True)

    async def rollout() -> None:
        await asyncio.gather(*(
            backend.generate([1, 9690, 198, 2683, 314, 253, 1234 + i],
                             SamplingParams(max_tokens=48, seed=i)) for i in range(16)))

    def set_poll(seconds: float) -> None:
        async def call() -> None:
            await backend._require_engine().collective_rpc(IDLE_METHOD, kwargs={"seconds": seconds})
        backend._loop.run_sync(call())

    settings = {f"vLLM's {VLLM_POLL_S:g} s": VLLM_POLL_S, f"taurl's {CPU_POLL_IDLE_AFTER_S:g} s": CPU_POLL_IDLE_AFTER_S}
    update_s: dict[str, list[float]] = {k: [] for k in settings}
    worker_cpu_s: dict[str, list[float]] = {k: [] for k in settings}
    try:
        learner.update(trajs)  # warm-up
        for rnd in range(args.rounds):
            order = list(settings) if rnd % 2 == 0 else list(settings)[::-1]
            for name in order:
                set_poll(settings[name])
                asyncio.run(rollout())
                cpu0 = sum(sum(w.cpu_times()[:2]) for w in workers)
                t0 = time.perf_counter()
                learner.update(trajs)
                update_s[name].append(time.perf_counter() - t0)
                worker_cpu_s[name].append(sum(sum(w.cpu_times()[:2]) for w in workers) - cpu0)
            print(f"round {rnd + 1}: " + ", ".join(
                f"{k} update {update_s[k][-1]:.2f} s (engine CPU {worker_cpu_s[k][-1]:.2f} s)"
                for k in settings), flush=True)
    finally:
        backend.close_sync()
    for name in settings:
        print(f"{name}: update median {statistics.median(update_s[name]):.3f} s, engine processes' "
              f"CPU during it {statistics.median(worker_cpu_s[name]):.2f} s")


if __name__ == "__main__":
    main()
