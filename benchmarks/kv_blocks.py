"""Rollout time against the engine's KV-cache block size: which prompt prefixes vLLM shares.

    python benchmarks/kv_blocks.py                           # block sizes 128 (vLLM's CPU default) and 32
    python benchmarks/kv_blocks.py --blocks 128,32,64 --rounds 4 --json out.json
    python benchmarks/kv_blocks.py --config examples/grpo_agent_calculator.yaml   # a config's rollout

vLLM's prefix cache shares whole blocks only: a request reuses the KV of another's prompt
up to the last full block they have in common (blocks are cached when scheduled, so the
requests of one group, sent together, share them within the same step). On CPU vLLM's
default block is 128 tokens, so the peer benchmark's 44-token prompt shares nothing and its
8 samples each prefill it in full; a multi-turn episode re-prefills up to 127 tokens of its
own history every turn.

One engine per block size, all started in this process (float32, the in-process
``VLLMBackend``), and the same rollouts run on each in turn, round by round (idle engines
stop polling within 0.1 s, so they leave the cores to the one at work):

- **peer**: the peer benchmark's step (``benchmarks/peer_trl.py``): 2 prompts x 8 samples,
  one turn of at most 64 tokens;
- **default**: the default training config's rollout (``TrainConfig().rollout``: the
  calculator tool environment, 4 tasks x 8 samples; SmolLM2 calls no tool, so one turn
  each after a 287-token prompt);
- **multiturn**: ``benchmarks/rollout.py``'s work: GuessNumber, 16 tasks x 4 samples, 4
  turns of at most 32 tokens (each turn resends the episode's history);
- ``--config FILE``: instead, the rollout of a training config (its model, its engine's
  options, its agent), e.g. the tool agent's: Qwen2.5-Coder-0.5B, calculator calls over up
  to 4 turns.

Each round poses new tasks (as training iterations do) and every engine gets the same ones
with the same sampling seeds; each starts from an empty prefix cache, as after a weight
update. Prints each block size's median seconds per rollout, sampled and prompt tokens, and
the ratio against the first block size given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time

import peer_trl
import rollout
from transformers import AutoTokenizer

from taurl.agents.loop import Agent
from taurl.agents.vllm_backend import VLLMBackend
from taurl.config import load_config
from taurl.models import resolve_model
from taurl.rollout import RolloutConfig, run_rollout
from taurl.trainer import TrainConfig


def works() -> dict[str, RolloutConfig]:
    # benchmarks/rollout.py's multi-turn work, at its defaults
    multiturn = rollout.rollout_config(argparse.Namespace(
        env="taurl/GuessNumber-v0", turns=4, tasks=16, samples=4, in_flight=64, max_tokens=32), seed=0)
    return {"peer": peer_trl.rollout_config(),
            "default": dataclasses.replace(TrainConfig().rollout, progress=False),
            "multiturn": multiturn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--blocks", default="128,32", help="block sizes, comma-separated; the first is the baseline")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--works", default="peer,default,multiturn",
                        help="which rollouts: peer, default, multiturn")
    parser.add_argument("--config", help="a training config (YAML) whose rollout, model and engine to measure instead")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    chosen = {k: v for k, v in works().items() if k in args.works.split(",")}
    engine_args: dict[str, object] = {"dtype": "float32"}
    if args.config:
        cfg = load_config(TrainConfig, args.config)
        chosen = {"config": dataclasses.replace(cfg.rollout, progress=False)}
        args.model, engine_args = cfg.model, dict(cfg.backend.options)
    info = peer_trl.machine()
    print(f"{args.model}, engine options {engine_args}; machine: {info['cpu']}, {info['cpus']} CPUs, AVX512-BF16 "
          f"{'yes' if info['avx512_bf16'] else 'no'}; vllm {info['vllm']}, torch {info['torch']}; "
          f"load average {info['load_avg_start'][0]:.2f}", flush=True)
    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    engines = {}
    for b in blocks:
        t0 = time.perf_counter()
        options = {**engine_args, "engine_options": {**engine_args.get("engine_options", {}), "block_size": b}}
        engines[b] = VLLMBackend(model, **options)
        print(f"block {b}: engine up in {time.perf_counter() - t0:.0f} s", flush=True)
    rows: dict[str, dict[int, list[dict]]] = {w: {b: [] for b in blocks} for w in chosen}

    async def one(backend: VLLMBackend, cfg: RolloutConfig) -> dict:
        await backend.reset_prefix_cache()
        t0 = time.perf_counter()
        result = await run_rollout(Agent(backend, tokenizer, cfg.agent), cfg)
        seconds = time.perf_counter() - t0
        trajs = result.trajectories
        sampled = sum(sum(t.loss_mask) for t in trajs)
        return {"s": seconds, "sampled": sampled, "tokens": sum(len(t.token_ids) for t in trajs),
                "turns": sum(t.num_turns for t in trajs)}

    for r in range(args.rounds):
        for w, cfg in chosen.items():
            cfg_r = dataclasses.replace(cfg, seed=0, task_offset=r * cfg.num_tasks, split="train")
            order = blocks if r % 2 == 0 else blocks[::-1]
            for b in order:
                row = asyncio.run(one(engines[b], cfg_r))
                rows[w][b].append(row)
                print(f"round {r + 1} {w:>7} block {b:>3}: {row['s']:.2f} s, {row['sampled']} sampled "
                      f"of {row['tokens']} tokens, {row['turns']} turns", flush=True)
    for b in blocks:
        engines[b].close_sync()
    out: dict[str, dict] = {"machine": info, "model": args.model, "engine": engine_args, "config": args.config,
                            "blocks": blocks, "rounds": args.rounds, "works": {}}
    print("\n| rollout | block | s median (min–max) | vs block " f"{blocks[0]} | sampled / all tokens |\n|---|---|---|---|---|")
    for w in chosen:
        base = statistics.median(x["s"] for x in rows[w][blocks[0]])
        out["works"][w] = {}
        for b in blocks:
            xs = [x["s"] for x in rows[w][b]]
            med = statistics.median(xs)
            out["works"][w][b] = {"median_s": med, "rounds": rows[w][b]}
            print(f"| {w} | {b} | {med:.2f} ({min(xs):.2f}–{max(xs):.2f}) | {base / med:.2f}x | "
                  f"{sum(x['sampled'] for x in rows[w][b])} / {sum(x['tokens'] for x in rows[w][b])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
