"""The OpenAI-compatible endpoint: the official ``openai`` client against the tiny model.

The HF backend serves (fast to start); a thin wrapper records every (prompt, Generation)
the real backend returned, so the tests can check the Trajectory against what was
actually sampled, token for token.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from taurl.agents.backend import InferenceBackend
from taurl.agents.chat import ChatRenderer
from taurl.agents.hf_backend import HFBackend
from taurl.cli import main
from taurl.rollout.openai_endpoint import OpenAIEndpoint
from taurl.types import Generation, SamplingParams, read_jsonl

openai = pytest.importorskip("openai")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]},
    },
}]


class Recording(InferenceBackend):
    """The real backend, plus a record of each request's prompt and the Generation it got."""

    def __init__(self, inner: InferenceBackend) -> None:
        self.inner = inner
        self.max_model_len = inner.max_model_len
        self.calls: list[tuple[str, list[int], Generation]] = []

    async def generate(self, prompt_token_ids, sampling, *, session_id=None):
        gen = await self.inner.generate(prompt_token_ids, sampling, session_id=session_id)
        self.calls.append((session_id or "", list(prompt_token_ids), gen))
        return gen

    async def update_weights(self, state_dict, version):
        await self.inner.update_weights(state_dict, version)

    async def close(self):
        """The module's backend outlives each test."""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: Path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_path: Path) -> Iterator[HFBackend]:
    backend = HFBackend(tiny_model_path, dtype="float32", max_batch_size=8, max_model_len=1024)
    try:
        yield backend
    finally:
        backend.close_sync()


@pytest.fixture
def endpoint(hf_tiny, tokenizer) -> Iterator[OpenAIEndpoint]:
    with OpenAIEndpoint(Recording(hf_tiny), tokenizer, sampling=SamplingParams(max_tokens=10)) as ep:
        yield ep


def agent_loop(base_url: str, key: str, turns: int = 3, seed: int = 0) -> list[dict]:
    """A small tool-using agent written against the official client, as users write them."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    messages: list = [{"role": "system", "content": "You add numbers."},
                      {"role": "user", "content": "What is 2 + 3?"}]
    for turn in range(turns):
        reply = client.chat.completions.create(
            model="policy", messages=messages, tools=TOOLS, temperature=1.0, seed=seed + turn,
        )
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
        messages.append(message)  # the client's own message object, sent back as is
        if message.tool_calls:
            for call in message.tool_calls:
                messages.append({"role": "tool", "tool_call_id": call.id, "content": "5"})
        else:
            messages.append({"role": "user", "content": "Use the add tool, please."})
    return messages


def test_agent_loop_is_recorded_token_exactly(endpoint, tokenizer):
    agent_loop(endpoint.base_url, "episode-1")
    [traj] = endpoint.finish_sync("episode-1", reward=0.75)
    calls = endpoint.backend.calls
    assert len(calls) == 3 and traj.num_turns == 3
    # each request's prompt is the stream so far, each reply's ids follow unchanged, mask 1
    for h, (session_id, prompt, gen) in enumerate(calls):
        assert session_id == "episode-1/0"
        n = len(prompt)
        assert traj.token_ids[:n] == prompt
        assert traj.token_ids[n:n + len(gen.token_ids)] == gen.token_ids
        assert traj.loss_mask[n:n + len(gen.token_ids)] == [1] * len(gen.token_ids)
        assert traj.logprobs[n:n + len(gen.token_ids)] == gen.logprobs
        assert set(traj.turn_ids[n:n + len(gen.token_ids)]) == {h}
    assert traj.num_sampled_tokens == sum(len(g.token_ids) for _, _, g in calls)
    assert all(lp < 0 for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m)
    # the first prompt is the template's rendering of the first request
    renderer = ChatRenderer(tokenizer)
    first, tools = renderer.prepare([{"role": "system", "content": "You add numbers."},
                                     {"role": "user", "content": "What is 2 + 3?"}], TOOLS)
    assert calls[0][1] == renderer.prompt_ids(first, tools)
    # the rewards come from finish(); the drift check agrees with a full re-render: the text is
    # the template's (a random model's ids may be a non-canonical split of it: "tokenization")
    assert traj.rewards == [0.0, 0.0, 0.75] and traj.episode_return == 0.75
    assert traj.termination == "terminated" and traj.info["segments"] == 1
    assert traj.info["drift"]["kind"] in ("none", "tokenization")
    assert traj.info["drift"]["first_char_diff"] is None
    before, content, ended_with_eos = _last(traj, renderer)
    closing = renderer.bridge(before, content, ended_with_eos, [], add_generation_prompt=False).token_ids
    rendered = renderer.render(traj.messages, add_generation_prompt=False)
    assert renderer.decode(traj.token_ids + closing) == rendered
    if traj.info["drift"]["kind"] == "none":
        assert traj.token_ids + closing == renderer.encode(rendered)


def _last(traj, renderer):
    """(before, content, ended_with_eos) of a trajectory's last turn."""
    last_sampled = max(i for i, m in enumerate(traj.loss_mask) if m)
    return traj.messages[:-1], traj.messages[-1]["content"], traj.token_ids[last_sampled] == renderer.eos_token_id


def test_tool_calls_round_trip_and_history_rewrite_starts_a_segment(endpoint, hf_tiny):
    # The random model never writes a tool call, so the test writes one into the history as an
    # agent with its own few-shot example would; the endpoint renders it in the model's format.
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="episode-2", max_retries=0)
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    first = client.chat.completions.create(model="p", messages=messages, tools=TOOLS)
    messages.append(first.choices[0].message)
    messages.append({"role": "user", "content": "Again."})
    client.chat.completions.create(model="p", messages=messages, tools=TOOLS)
    # the agent rewrites history: a hand-written tool call instead of the model's reply
    rewritten = [messages[0],
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "5"}]
    client.chat.completions.create(model="p", messages=rewritten, tools=TOOLS)
    trajs = endpoint.finish_sync("episode-2", reward=1.0, group_id="g")
    assert [t.num_turns for t in trajs] == [2, 1]
    assert [t.rewards[-1] for t in trajs] == [1.0, 1.0] and {t.group_id for t in trajs} == {"g"}
    assert trajs[0].info["segment_break"] is None
    assert "history rewritten" in trajs[1].info["segment_break"]
    # the hand-written call is rendered as the <tool_call> block the tool prompt asks for,
    # and the tool result as ToolEnv's <tool_response> user message
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in trajs[1].messages[2]["content"]
    assert trajs[1].messages[3] == {"role": "user", "content": "<tool_response>\n5\n</tool_response>"}
    for t in trajs:
        assert t.info["drift"]["kind"] in ("none", "tokenization")


def test_parsed_tool_calls_come_back_as_openai_tool_calls(endpoint, tokenizer):
    # The random model never writes a call, so this backend returns canned ids: a stand-in
    # for a trained policy, to test the parsing and the mapping back of a reply with calls.
    request = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    raw = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    ids = ChatRenderer(tokenizer).encode(raw) + [tokenizer.eos_token_id]

    class Canned(InferenceBackend):
        max_model_len = 1024

        async def generate(self, prompt_token_ids, sampling, *, session_id=None):
            return Generation(token_ids=ids, logprobs=[-1.0] * len(ids), finish_reason="stop")

        async def update_weights(self, state_dict, version): ...

        async def close(self): ...

    with OpenAIEndpoint(Canned(), tokenizer) as ep:
        reply = openai.OpenAI(base_url=ep.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="p", messages=request["messages"], tools=TOOLS)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me add."
        [call] = choice.message.tool_calls
        assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
        # sent back with the tool's result, the reply is mapped to its exact sampled text: one segment
        follow = [*request["messages"], choice.message, {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        openai.OpenAI(base_url=ep.base_url, api_key="k", max_retries=0).chat.completions.create(
            model="p", messages=follow, tools=TOOLS)
        [traj] = ep.finish_sync("k", reward=1.0)
    assert traj.num_turns == 2 and traj.info["tool_calls"] == 2 and traj.info["drift"]["kind"] == "none"


def test_concurrent_sessions_are_isolated(endpoint):
    out: dict[str, list] = {}
    threads = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, agent_loop(endpoint.base_url, k, turns=2, seed=s)))
               for k, s in (("a", 7), ("b", 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rewards = {"a": 1.0, "b": -1.0}
    for key in ("a", "b"):
        [traj] = endpoint.finish_sync(key, reward=rewards[key])
        mine = [(p, g) for s, p, g in endpoint.backend.calls if s == f"{key}/0"]
        assert len(mine) == 2 and traj.num_turns == 2 and traj.rewards[-1] == rewards[key]
        p, g = mine[-1]
        assert traj.token_ids == p + g.token_ids
        assert traj.info["drift"]["kind"] in ("none", "tokenization")
    assert endpoint.sessions == {}


def test_reward_fn_reads_the_session(hf_tiny, tokenizer):
    def reward_fn(session) -> float:
        return float(len(session.messages))  # the last request's messages and the reply

    with OpenAIEndpoint(hf_tiny, tokenizer, sampling=SamplingParams(max_tokens=4), reward_fn=reward_fn) as ep:
        agent_loop(ep.base_url, "r", turns=2)
        [traj] = ep.finish_sync("r")
    assert traj.episode_return == 5.0  # system, user, assistant, user, assistant


def test_malformed_requests_get_openai_errors(endpoint):
    client = openai.OpenAI(base_url=endpoint.base_url, api_key="bad", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="p", messages=[{"content": "no role"}])
    assert e.value.status_code == 400 and "role" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}], n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="p", messages=[{"role": "user", "content": "x"}], temperature=-1)
    raw = httpx.post(f"{endpoint.base_url}/chat/completions", content=b"{not json",
                     headers={"Authorization": "Bearer bad"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    assert httpx.post(f"{endpoint.base_url}/chat/completions", json={}).status_code == 401
    assert [m.id for m in client.models.list().data] == ["taurl-policy"]
    # nothing was sampled: the session has no trajectory, its errors are kept
    assert endpoint.finish_sync("bad", reward=0.0) == []


AGENT_SCRIPT = textwrap.dedent("""
    import json, os, openai
    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY come from taurl
    messages = [{"role": "user", "content": "Seed " + os.environ["TAURL_TASK_SEED"]}]
    for _ in range(2):
        reply = client.chat.completions.create(model="policy", messages=messages)
        messages += [reply.choices[0].message, {"role": "user", "content": "more"}]
    if os.environ["TAURL_SAMPLE_INDEX"] == "1" and os.environ["TAURL_TASK_INDEX"] == "1":
        raise SystemExit("agent crashed")
    with open(os.environ["TAURL_REWARD_FILE"], "w") as f:
        json.dump({"reward": 1.0 + int(os.environ["TAURL_SAMPLE_INDEX"]), "success": True}, f)
""")


def test_rollout_agent_cmd(tmp_path, capsys):
    script = tmp_path / "my_agent.py"
    script.write_text(AGENT_SCRIPT)
    out = tmp_path / "trajs.jsonl"
    rc = main(["rollout", "--agent-cmd", f"{sys.executable} {script}", "--backend", "hf",
               "--model", "tiny-random", "--tasks", "2", "--samples", "2", "--max-tokens", "6",
               "--no-progress", "--out", str(out), "backend.options.max_model_len=512"])
    assert rc == 0, capsys.readouterr().err
    trajs = read_jsonl(out)
    assert len(trajs) == 4 and all(t.num_turns == 2 for t in trajs)
    by_key = {(t.task_id, t.info["session_id"]): t for t in trajs}
    assert len(by_key) == 4
    ok = [t for t in trajs if t.termination == "terminated"]
    [crashed] = [t for t in trajs if t.termination == "error"]
    assert "agent crashed" in crashed.info["error"] and crashed.episode_return == 0.0
    assert sorted(t.episode_return for t in ok) == [1.0, 1.0, 2.0] and all(t.success for t in ok)
    # the samples of a task share its seed and group
    for task in ("0", "1"):
        group = [t for t in trajs if t.task_id == task]
        assert len({t.group_id for t in group}) == 1 and len({t.seed for t in group}) == 1
    assert trajs[0].messages[0]["content"] == f"Seed {trajs[0].seed}"
