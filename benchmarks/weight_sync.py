"""Weight sync into the in-process vLLM engine: shared memory vs a safetensors file.

    python benchmarks/weight_sync.py                       # smollm2-135m, 5 rounds
    python benchmarks/weight_sync.py --model qwen2.5-coder-0.5b --rounds 3

Two engines of the same model run side by side in this process, one per route
(``VLLMBackend(weight_sync="memory")`` and ``weight_sync="file"``); each round sends
both the same new state dict (the model's weights plus a little noise, in the
engine's dtype), alternating which goes first, and times ``update_weights`` — the
whole sync as the trainer sees it: writing the weights, the workers loading them and
rebuilding their kernels, the prefix-cache reset. After the last round both engines
answer the same greedy prompt, which must agree (same weights either way).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import time

import torch

from taurl.agents.vllm_backend import VLLMBackend
from taurl.models import resolve_model
from taurl.types import SamplingParams


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), platform.processor())
    return f"{name}, avx512_bf16={'avx512_bf16' in out}"


async def main(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    path = resolve_model(args.model)
    engines = {
        route: VLLMBackend(path, dtype=args.dtype, weight_sync=route, max_model_len=512)
        for route in ("memory", "file")
    }
    dtype = engines["memory"].weight_dtype
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    seen: set[int] = set()
    names = []
    for k, v in base.items():  # tied weights once, as Learner.state_dict_for_sync gives them
        if v.untyped_storage().data_ptr() not in seen:
            seen.add(v.untyped_storage().data_ptr())
            names.append(k)
    nbytes = sum(base[k].numel() for k in names) * dtype.itemsize
    print(f"{args.model}: {len(names)} tensors, {nbytes / 2**20:.0f} MiB in {dtype}; "
          f"CPU {cpu_name()}, torch threads {torch.get_num_threads()}")
    times: dict[str, list[float]] = {route: [] for route in engines}
    gen = torch.Generator().manual_seed(0)
    for r in range(args.rounds):
        state = {k: (base[k] + 1e-4 * torch.randn(base[k].shape, generator=gen)).to(dtype)
                 for k in names}
        order = ["memory", "file"] if r % 2 == 0 else ["file", "memory"]
        for route in order:
            t0 = time.perf_counter()
            await engines[route].update_weights(state, r + 1)
            times[route].append(time.perf_counter() - t0)
        print(f"round {r}: " + "  ".join(f"{k} {times[k][-1]:.2f}s" for k in engines))
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    outs = {k: (await e.generate(prompt, greedy)).token_ids for k, e in engines.items()}
    for e in engines.values():
        await e.close()
    for k, ts in times.items():
        print(f"{k:>6}: median {statistics.median(ts):.2f} s (min {min(ts):.2f}, max {max(ts):.2f})")
    ratio = statistics.median(times["file"]) / statistics.median(times["memory"])
    print(f"file / memory: {ratio:.1f}x; greedy outputs agree: {outs['memory'] == outs['file']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(p.parse_args()))
