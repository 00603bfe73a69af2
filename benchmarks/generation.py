"""Raw generation throughput: vLLM in-process vs transformers on the same prompts.

    python benchmarks/generation.py                          # smollm2-135m bf16, batch 64
    python benchmarks/generation.py --dtype float32 --batch 64 --max-tokens 64
    python benchmarks/generation.py --backends vllm --cpu-threads 2 --json out.json
    python benchmarks/generation.py --backends vllm --batch 16 --compile   # torch.compile'd engine

For each backend: the start time, the first request's latency (cold), a single
request's tokens/s once warm, and tokens/s with ``--batch`` requests in flight
(temperature 1, one seed per request, at most ``--max-tokens`` new tokens each;
a request may end earlier on EOS, and only sampled tokens are counted). The
prompts are chat-rendered questions, identical for both backends. Backends run one
after the other, each alone on the machine's cores. The load average at the start
is printed with the results: on a shared machine it explains most of the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.models import resolve_model
from taurl.types import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a binary search does.",
    "List three prime numbers greater than 10.",
    "How many legs does a spider have?",
    "Give a synonym for 'happy'.",
    "What is 12 times 7?",
    "Describe the colour blue to someone who cannot see.",
]


def chat_prompts(model_dir: str, n: int) -> list[list[int]]:
    """``n`` chat-template-rendered prompts (token ids), cycling through QUESTIONS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}]
        enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)
        out.append([int(t) for t in enc["input_ids"]])
    return out


async def _batch(
    backend: InferenceBackend, prompts: list[list[int]], max_tokens: int
) -> tuple[int, float]:
    t0 = time.perf_counter()
    gens = await asyncio.gather(
        *(
            backend.generate(p, SamplingParams(max_tokens=max_tokens, seed=i), session_id=str(i))
            for i, p in enumerate(prompts)
        )
    )
    return sum(len(g.token_ids) for g in gens), time.perf_counter() - t0


def bench(kind: str, model: str, dtype: str, prompts: list[list[int]], max_tokens: int,
          options: dict[str, object]) -> dict[str, object]:  # fmt: skip
    """Start backend ``kind``, measure cold, warm-single and batched throughput, close it."""
    t0 = time.perf_counter()
    backend = make_backend(kind, model, dtype=dtype, max_model_len=1024, **options)
    start_s = time.perf_counter() - t0
    threads = getattr(backend, "num_threads", None)
    try:
        n_cold, cold_s = asyncio.run(_batch(backend, prompts[:1], max_tokens))
        n_one, one_s = asyncio.run(_batch(backend, prompts[1:2], max_tokens))
        n_batch, batch_s = asyncio.run(_batch(backend, prompts, max_tokens))
    finally:
        asyncio.run(backend.close())
    return {
        "backend": kind,
        "dtype": dtype,
        "threads": threads,
        "start_s": round(start_s, 1),
        "first_request_s": round(cold_s, 2),
        "first_request_tokens": n_cold,
        "single_tok_s": round(n_one / one_s, 1),
        "batch": len(prompts),
        "batch_tokens": n_batch,
        "batch_s": round(batch_s, 2),
        "batch_tok_s": round(n_batch / batch_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name or folder")
    parser.add_argument("--dtype", default="bfloat16", help="float32 | bfloat16")
    parser.add_argument("--batch", type=int, default=64, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--backends", default="vllm,hf", help="comma list of vllm, hf")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="vLLM worker cores (the first N this process may use); default: "
                        "all of them (VLLM_CPU_OMP_THREADS_BIND=auto in the environment: "
                        "vLLM's own binding)")  # fmt: skip
    parser.add_argument(
        "--no-warmup", action="store_true", help="vLLM: skip the warm-up requests at start"
    )
    parser.add_argument(
        "--hf-threads",
        type=int,
        default=None,
        help="torch threads for the HF backend (default: torch's)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="vLLM: torch.compile the model (enforce_eager=False; on CPU the default is eager)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    model = str(resolve_model(args.model))
    prompts = chat_prompts(model, args.batch)
    load = os.getloadavg()[0]
    rows = []
    for kind in args.backends.split(","):
        options: dict[str, object] = {}
        if kind == "vllm":
            options["cpu_threads"] = args.cpu_threads
            options["warmup"] = not args.no_warmup
            if args.compile:
                options["enforce_eager"] = False
        if kind == "hf":
            options["max_batch_size"] = args.batch
            options["num_threads"] = args.hf_threads
        rows.append(bench(kind, model, args.dtype, prompts, args.max_tokens, options))
        print(json.dumps(rows[-1]), flush=True)
    header = (
        f"{args.model} {args.dtype}, batch {args.batch}, <= {args.max_tokens} new tokens, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"load average at start {load:.1f}"
    )
    print(f"\n{header}\n")
    print("| backend | start s | first request s | single tok/s | batch tok/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['start_s']} | {r['first_request_s']} | "
              f"{r['single_tok_s']} | {r['batch_tok_s']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"setup": header, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
