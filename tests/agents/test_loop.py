"""The token-exact agent loop on real environments and the shared vLLM engine (tiny model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import gymnasium
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import taurl.envs  # noqa: F401 - registers the built-in environments
from taurl.agents.loop import Agent, AgentConfig
from taurl.envs.tool_parsing import TagToolCallParser, ToolCall
from taurl.types import SamplingParams, Trajectory

pytestmark = pytest.mark.vllm


class WholeMessageJSONParser:
    """A real tool-call format some models use: the whole message is one JSON call.

    The tiny random model's text is never valid JSON, so every turn is a malformed
    tool call from the model, which the env answers with an error observation.
    """

    def parse(self, text: str) -> tuple[list[ToolCall], list[str]]:
        call, error = TagToolCallParser._parse_one(text.strip())
        return ([call], []) if call is not None else ([], [error])


class CrashOnSecondStep(gymnasium.Env):
    """A test-only env whose own code fails on the second step."""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turns = 0
        return [{"role": "user", "content": "Say something."}], {"task_id": "crash", "tools": []}

    def step(self, action):
        self.turns += 1
        if self.turns == 2:
            raise RuntimeError("database connection lost")
        return [{"role": "user", "content": "Again."}], 0.5, False, False, {}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def run(agent: Agent, env: gymnasium.Env, seed: int = 3, sample_seed: int | None = 11) -> Trajectory:
    try:
        return asyncio.run(agent.run_episode(env, seed=seed, sample_seed=sample_seed, env_id="t", group_id="g"))
    finally:
        env.close()


def segments(traj: Trajectory) -> list[tuple[int, int, int]]:
    """Maximal runs of equal (turn_id, loss_mask) as (start, end, mask)."""
    out, start = [], 0
    for i in range(1, len(traj.token_ids) + 1):
        if i == len(traj.token_ids) or (traj.turn_ids[i], traj.loss_mask[i]) != (traj.turn_ids[start], traj.loss_mask[start]):
            out.append((start, i, traj.loss_mask[start]))
            start = i
    return out


def calculator_json(**kw) -> gymnasium.Env:
    return gymnasium.make(
        "taurl/Calculator-v0", parser=WholeMessageJSONParser(), disable_env_checker=True, **kw
    )


def test_multi_turn_mask_logprobs_and_malformed_tool_calls(vllm_tiny, tokenizer):
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(sampling=SamplingParams(max_tokens=12, temperature=1.0)))
    traj = run(agent, calculator_json(max_turns=3))
    assert traj.termination == "truncated" and traj.num_turns == 3
    # every turn was a malformed call: the env's format penalty, an error observation
    assert traj.rewards == [-0.1, -0.1, -0.1]
    assert traj.info["tool_calls"] == 3 and traj.info["tool_errors"] == 3
    renderer = agent.renderer
    segs = segments(traj)
    # prompt (-1, mask 0), then per turn: sampled (mask 1) and, but for the last, a bridge (mask 0)
    assert [(traj.turn_ids[s], m) for s, _, m in segs] == [(-1, 0), (0, 1), (0, 0), (1, 1), (1, 0), (2, 1)]
    assert segs[0][1] == len(renderer.prompt_ids(traj.messages[:2]))
    assistants = [m["content"] for m in traj.messages if m["role"] == "assistant"]
    for h, (s, e, _) in enumerate([seg for seg in segs if seg[2] == 1]):
        sampled = traj.token_ids[s:e]
        assert 1 <= len(sampled) <= 12
        assert renderer.assistant_content(sampled) == assistants[h]
        assert all(lp < 0 for lp in traj.logprobs[s:e])
    assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m == 0)
    for s, e, m in segs[2:5:2]:  # the two bridges
        text = renderer.decode(traj.token_ids[s:e])
        closes_with_eos = traj.token_ids[s - 1] == renderer.eos_token_id
        assert text.startswith("\n<|im_start|>user\n" if closes_with_eos else "<|im_end|>\n<|im_start|>user\n")
        assert "malformed tool call" in text and text.endswith("<|im_start|>assistant\n")
    # the stream re-renders to the same text (token ids may differ: random sampled splits)
    assert traj.info["drift"]["kind"] in ("none", "tokenization")
    assert traj.info["drift"]["first_char_diff"] is None
    assert Trajectory.from_json(traj.to_json()) == traj


def test_logprobs_agree_with_transformers_on_a_whole_trajectory(vllm_tiny, tokenizer, tiny_model_path):
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(sampling=SamplingParams(max_tokens=10, temperature=1.0)))
    traj = run(agent, gymnasium.make("taurl/GuessNumber-v0", max_turns=3, disable_env_checker=True))
    assert traj.num_turns == 3 and traj.num_sampled_tokens > 3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    ids = torch.tensor([traj.token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    # the log-prob of token t is read from the position before it
    recomputed = logp[:-1].gather(1, ids[0, 1:, None])[:, 0]
    mask = torch.tensor(traj.loss_mask[1:], dtype=torch.bool)
    sampler = torch.tensor(traj.logprobs[1:])
    assert mask.sum() == traj.num_sampled_tokens
    assert torch.allclose(sampler[mask], recomputed[mask], atol=1e-3), (sampler[mask] - recomputed[mask]).abs().max()


def test_context_overflow_ends_the_episode_and_clips_the_last_turn(vllm_tiny, tokenizer):
    probe = Agent(vllm_tiny, tokenizer, AgentConfig(max_context_tokens=4096))
    env = calculator_json()
    obs, info = env.reset(seed=3)
    msgs, tools = probe.renderer.prepare(obs, info["tools"])
    prompt_len = len(probe.renderer.prompt_ids(msgs, tools))
    # room for 5 new tokens although max_tokens is 16: the turn is clipped, the next prompt cannot fit
    sampling = SamplingParams(max_tokens=16, temperature=1.0)
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(max_context_tokens=prompt_len + 5, sampling=sampling))
    traj = run(agent, env)
    assert traj.termination == "context_overflow" and traj.num_turns == 1
    assert len(traj.token_ids) <= prompt_len + 5 and 1 <= traj.num_sampled_tokens <= 5
    assert traj.info["final_observation"] and "malformed" in traj.info["final_observation"][0]["content"]
    # a first prompt that does not fit at all: no turn, still a Trajectory
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(max_context_tokens=prompt_len - 1))
    traj = run(agent, calculator_json())
    assert traj.termination == "context_overflow" and traj.num_turns == 0 and traj.num_sampled_tokens == 0
    assert traj.info["drift"]["kind"] == "none"


def test_max_turns_and_stop_strings(vllm_tiny, tokenizer):
    # a stop string the random model hits quickly: finish "stop" without EOS, closed by the bridge
    sampling = SamplingParams(max_tokens=24, temperature=1.0, stop=(" ",))
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(max_turns=2, sampling=sampling))
    traj = run(agent, gymnasium.make("taurl/GuessNumber-v0", max_turns=10, disable_env_checker=True))
    assert traj.termination == "max_turns" and traj.num_turns == 2
    assert traj.info["final_observation"], "the observation after the last turn is kept for readers"
    assert "stop" in traj.info["finish_reasons"]
    assert traj.info["drift"]["first_char_diff"] is None


def test_env_crash_marks_the_episode_error(vllm_tiny, tokenizer):
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(sampling=SamplingParams(max_tokens=4)))
    traj = run(agent, CrashOnSecondStep())
    assert traj.termination == "error" and traj.num_turns == 2
    assert traj.rewards == [0.5, 0.0]
    assert "RuntimeError: database connection lost" in traj.info["error"]
    assert "drift" not in traj.info


def test_greedy_episode_is_reproducible(vllm_tiny, tokenizer):
    agent = Agent(vllm_tiny, tokenizer, AgentConfig(sampling=SamplingParams(max_tokens=8, temperature=0.0)))
    make = lambda: gymnasium.make("taurl/GuessNumber-v0", max_turns=2, disable_env_checker=True)
    a, b = run(agent, make()), run(agent, make())
    assert a.token_ids == b.token_ids and a.rewards == b.rewards and a.task_id == b.task_id
