"""The vLLM server backend against real ``vllm serve`` processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from taurl.agents.server_backend import VLLMServerBackend
from taurl.agents.vllm_backend import VLLMBackend
from taurl.types import Generation, SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServerBackend]:
    backend = VLLMServerBackend(
        tiny_model_path,
        dtype="float32",
        max_model_len=512,
        retry_timeout=900,
        log_dir=tmp_path_factory.mktemp("serve-logs"),
    )
    try:
        yield backend
    finally:
        backend.close_sync()
    assert all(r.process is not None and r.process.poll() is not None for r in backend.replicas)


def prompt(i: int) -> list[int]:
    return [1, 9690, 198, 2683, 314 + i, 30, 2, 198]


def test_server_matches_the_in_process_engine(
    server: VLLMServerBackend, vllm_tiny: VLLMBackend
) -> None:
    async def run(backend: VLLMServerBackend | VLLMBackend) -> list[Generation]:
        return await asyncio.gather(
            *(
                backend.generate(
                    prompt(i), SamplingParams(max_tokens=12, seed=i), session_id=f"s{i}"
                )
                for i in range(6)
            )
        )

    over_http = asyncio.run(run(server))
    in_process = asyncio.run(run(vllm_tiny))
    # same weights, same seeds, same float32 engine: the same tokens
    assert [g.token_ids for g in over_http] == [g.token_ids for g in in_process]
    for a, b in zip(over_http, in_process, strict=True):
        assert a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    # every session stays on its replica
    assert all(f"s{i}" in server._router for i in range(6))


def test_started_cpu_server_uses_the_small_kv_block(server: VLLMServerBackend) -> None:
    """Started CPU replicas get VLLMBackend's block size, so a group shares a short prompt."""
    from taurl.agents.vllm_backend import CPU_BLOCK_SIZE

    assert server._log_dir is not None
    log = (server._log_dir / "replica-0.log").read_text()
    assert f"'block_size': {CPU_BLOCK_SIZE}" in log  # vLLM logs its non-default arguments


def test_server_weight_update_goes_through_the_rpc_endpoint(
    server: VLLMServerBackend, tiny_model_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    def sample() -> list[list[int]]:
        async def run() -> list[Generation]:
            return await asyncio.gather(*(server.generate(prompt(i), greedy) for i in range(3)))

        return [g.token_ids for g in asyncio.run(run())]

    before = sample()
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        for p in flipped.parameters():
            p.mul_(-1.0)
    asyncio.run(server.update_weights(flipped.state_dict(), version=1))
    assert server.policy_version == 1
    assert sample() != before
    asyncio.run(server.update_weights(model.state_dict(), version=2))
    assert sample() == before


def test_server_workers_stop_polling_soon_after_a_rollout(server: VLLMServerBackend) -> None:
    """As the in-process engine's: a replica's idle worker leaves the cores to the learner
    within 0.1 s (vLLM's own busy polling lasts 1 s after each message)."""
    import time

    import psutil

    assert all(r.idle_readers >= 1 for r in server.replicas)  # the replicas run on the CPU
    workers = [w for r in server.replicas if r.process is not None
               for w in psutil.Process(r.process.pid).children(recursive=True)
               if w.name() == "VLLM::Worker"]
    assert len(workers) == len(server.replicas)

    def cpu_seconds() -> float:
        return sum(sum(w.cpu_times()[:2]) for w in workers)

    async def rollout() -> None:
        greedy = SamplingParams(max_tokens=16, temperature=0.0)
        await asyncio.gather(*(server.generate(prompt(i), greedy, session_id=f"p{i}")
                               for i in range(8)))

    asyncio.run(rollout())
    time.sleep(0.3)
    before = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - before < 0.3 * len(workers)  # vLLM's 1 s: ~0.7 s each


def test_rollout_survives_a_killed_server_without_lost_or_duplicated_results(
    server: VLLMServerBackend, vllm_tiny: VLLMBackend
) -> None:
    episodes, turns = 12, 4
    results: list[tuple[int, int]] = []
    records: dict[tuple[int, int], tuple[list[int], Generation]] = {}
    first_turn_done = asyncio.Event()

    async def episode(e: int) -> None:
        context = prompt(e)
        for t in range(turns):
            sp = SamplingParams(max_tokens=6, seed=100 * e + t)
            gen = await server.generate(context, sp, session_id=f"episode-{e}")
            results.append((e, t))
            records[(e, t)] = (list(context), gen)
            if len(results) >= episodes // 2:
                first_turn_done.set()
            context = context + gen.token_ids + [198]

    async def killer() -> None:
        await first_turn_done.wait()
        server.kill_replica(0)  # SIGKILL to the server's whole process group

    async def rollout() -> None:
        await asyncio.gather(killer(), *(episode(e) for e in range(episodes)))

    retries_before = server.stats["retries"]
    asyncio.run(rollout())
    assert server.replicas[0].restarts == 1
    assert server.stats["retries"] > retries_before  # the kill really hit requests in flight
    assert sorted(results) == [(e, t) for e in range(episodes) for t in range(turns)]
    # results after the restart are the ones the model gives: not lost, not mixed up
    for key in [(0, turns - 1), (episodes - 1, turns - 1), (3, 2)]:
        context, gen = records[key]
        e, t = key
        ref = asyncio.run(
            vllm_tiny.generate(context, SamplingParams(max_tokens=6, seed=100 * e + t))
        )
        assert gen.token_ids == ref.token_ids
