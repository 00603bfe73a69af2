"""Chat rendering as token deltas and the drift check, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from taurl.agents.chat import ChatRenderer, template_supports_tools, with_tool_prompt
from taurl.models import resolve_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"],
            },
        },
    }
]

# Like Qwen3's template: earlier assistant turns lose their <think> block, the last keeps it.
# Rendering more messages therefore changes text already rendered (not prefix-preserving).
THINK_STRIPPING_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("tiny-random"))


@pytest.fixture(scope="module")
def renderer(tokenizer):
    return ChatRenderer(tokenizer)


def play(renderer, first, turns, *, eos_on=None, split_chars=False):
    """Build a stream the way the agent does: prompt, sampled ids, bridges.

    ``turns`` is a list of (assistant content, observation messages); the assistant's
    "sampled" ids are the canonical tokens of the content (+ EOS unless eos_on says no).
    Returns (stream, messages, final closing ids).
    """
    messages = list(first)
    stream = renderer.prompt_ids(messages)
    closing = []
    for i, (content, obs) in enumerate(turns):
        eos = True if eos_on is None else eos_on[i]
        if split_chars:
            sampled = [t for ch in content for t in renderer.encode(ch)]
        else:
            sampled = renderer.encode(content)
        sampled = sampled + ([renderer.eos_token_id] if eos else [])
        assert renderer.assistant_content(sampled) == content
        before = messages
        stream = stream + sampled
        messages = [*before, {"role": "assistant", "content": content}]
        if obs is None:  # last turn
            closing = renderer.bridge(before, content, eos, [], add_generation_prompt=False).token_ids
            break
        bridge = renderer.bridge(before, content, eos, obs)
        stream = stream + bridge.token_ids
        messages = [*messages, *obs]
    return stream, messages, closing


def test_prompt_is_the_template_rendering_with_smollm_default_system(renderer, tokenizer):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    ids = renderer.prompt_ids(msgs)
    text = renderer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert ids == tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.mark.parametrize("with_system", [False, True])
def test_multi_turn_deltas_equal_full_rerender(renderer, with_system):
    first = [{"role": "user", "content": "Compute 17*23 with the tool."}]
    if with_system:
        first = [{"role": "system", "content": "You are terse."}, *first]
    turns = [
        ('<tool_call>{"name": "mul", "arguments": {"a": 17, "b": 23}}</tool_call>',
         [{"role": "user", "content": "<tool_response>391</tool_response>"}]),
        ("Let me check.", [{"role": "user", "content": "ok"}, {"role": "user", "content": "go on"}]),
        ("<answer>391</answer>", None),
    ]
    stream, messages, closing = play(renderer, first, turns)
    report = renderer.check_drift(stream, messages, closing)
    assert report.kind == "none", report
    assert report.first_token_diff is None and report.stream_tokens == report.render_tokens
    # the closing of an EOS-ended turn is only the template's newline
    assert renderer.decode(closing) == "\n"


def test_length_cut_turn_is_closed_with_eos_text(renderer):
    first = [{"role": "user", "content": "Say a lot."}]
    messages = list(first)
    sampled = renderer.encode("blah blah")  # cut by max_tokens: no EOS
    bridge = renderer.bridge(messages, "blah blah", False, [{"role": "user", "content": "more"}])
    assert bridge.method == "diff"
    assert bridge.text == "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    stream, messages, closing = play(
        renderer, first, [("blah blah", [{"role": "user", "content": "more"}]), ("fine", None)],
        eos_on=[False, False],
    )
    assert renderer.decode(closing) == "<|im_end|>\n"
    assert renderer.check_drift(stream, messages, closing).kind == "none"
    assert sampled == stream[len(renderer.prompt_ids(first)):][: len(sampled)]


def test_non_canonical_sampled_tokens_are_tokenization_drift(renderer):
    first = [{"role": "user", "content": "hi"}]
    stream, messages, closing = play(renderer, first, [("hello world", None)], split_chars=True)
    report = renderer.check_drift(stream, messages, closing)
    assert report.kind == "tokenization"
    assert report.first_char_diff is None
    # the first differing token is where the char-split content starts (after the prompt)
    assert report.first_token_diff == len(renderer.prompt_ids(first))


def test_non_prefix_preserving_template_falls_back_and_drift_shows_where(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = THINK_STRIPPING_TEMPLATE
    r = ChatRenderer(tok)
    first = [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+2?"}]
    turns = [
        ("<think>two plus two</think>Four?", [{"role": "user", "content": "Sure?"}]),
        ("<think>yes</think><answer>4</answer>", None),
    ]
    before = list(first)
    assert r.bridge(before, turns[0][0], True, turns[0][1]).method == "dummy"
    stream, messages, closing = play(r, first, turns)
    report = r.check_drift(stream, messages, closing)
    assert report.kind == "template"
    prompt_text = r.decode(r.prompt_ids(first))
    # the stream keeps the first turn's thinking as sampled; the re-render dropped it
    assert report.first_char_diff == len(prompt_text)
    assert report.stream_excerpt.endswith("<|im_start|>assistant\n<think>two plus two</think>Four?<|im_end|>\n<|im_start|>user\n")
    assert report.render_excerpt.endswith("<|im_start|>assistant\nFour?<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|")
    # the bridge itself is right: the observation is rendered in the template's form
    assert "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n" in r.decode(stream)


def test_tools_go_to_the_system_prompt_without_template_support(renderer, tokenizer):
    assert not template_supports_tools(tokenizer)
    msgs, tools = renderer.prepare([{"role": "user", "content": "q"}], TOOLS)
    assert tools is None
    assert msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"] and '"add"' in msgs[0]["content"]
    assert msgs[1] == {"role": "user", "content": "q"}
    merged = with_tool_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], TOOLS)
    assert len(merged) == 2 and merged[0]["content"].startswith("Be brief.\n\n") and "<tools>" in merged[0]["content"]
    assert with_tool_prompt([{"role": "user", "content": "q"}], []) == [{"role": "user", "content": "q"}]


def test_tools_go_to_a_tools_aware_template(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t['function']['name'] }};"
        "{% endfor %}<|im_end|>\n{% endif %}" + THINK_STRIPPING_TEMPLATE
    )
    r = ChatRenderer(tok)
    assert r.supports_tools
    msgs, tools = r.prepare([{"role": "user", "content": "q"}], TOOLS)
    assert tools == TOOLS and msgs == [{"role": "user", "content": "q"}]
    assert r.decode(r.prompt_ids(msgs, tools)).startswith("<|im_start|>system\nadd;<|im_end|>\n")
