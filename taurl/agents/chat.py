"""Chat-template rendering as token deltas, and the drift check.

The agent never re-tokenizes what the policy sampled. The token stream of an
episode is built from three kinds of pieces:

1. the **prompt**: the first observation rendered through the chat template with
   the generation prompt (``<|im_start|>assistant\\n`` for SmolLM2);
2. each turn's **sampled tokens**, appended exactly as the backend returned them;
3. a **bridge** after each turn: the text the template puts between the end of the
   assistant's content and the next generation prompt, i.e. the rest of the
   assistant turn's closing (``\\n`` after a sampled ``<|im_end|>``, or
   ``<|im_end|>\\n`` when the turn was cut by ``max_tokens``), then the new
   observation messages, then the generation prompt.

How a bridge is rendered ("diff" method): render the conversation twice as text —
``R(before, gen=True)`` (what the model was prompted with) and
``R(before + [assistant(content)] + new, gen=True)`` — and take the second minus the
first and minus the content. This is exact whenever the template is
*prefix-preserving* (rendering more messages only appends text), which it checks
each time; SmolLM2's template is (its injected default system message depends only
on the first message, which never changes). When the check fails, the bridge is
rendered after a fixed dummy conversation instead ("dummy" method): the new
messages come out in the template's usual form, and the drift check then shows where
the episode's stream differs from a full re-render.

The drift check (:func:`check_drift`) compares the stream with
``tokenize(R(messages, gen=False))`` and classifies a difference as
``"tokenization"`` (same text, other token ids: the sampler picked a non-canonical
split, harmless for training) or ``"template"`` (the text itself differs: the
template is not prefix-preserving).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from taurl.envs.tools import format_tool_prompt
from taurl.types import JSONValue, Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DriftKind = Literal["none", "tokenization", "template"]
BridgeMethod = Literal["diff", "dummy"]

# The conversation the "dummy" bridge method renders new messages after. It starts with
# a system message so that templates which inject a default one (SmolLM2) do not.
_DUMMY_BEFORE: tuple[Message, ...] = (
    {"role": "system", "content": "S"},
    {"role": "user", "content": "U"},
)
_DUMMY_CONTENT = "A"


def template_supports_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer's chat template reads a ``tools`` variable."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and "tools" in template


def with_tool_prompt(messages: list[Message], tool_schemas: list[dict[str, JSONValue]]) -> list[Message]:
    """``messages`` with the tools described in the system message (for templates without tools).

    The text is :func:`taurl.envs.tools.format_tool_prompt`; it is appended to an
    existing first system message, or becomes a new system message in front. Without
    tools the messages come back unchanged (as a new list).
    """
    if not tool_schemas:
        return list(messages)
    prompt = format_tool_prompt(tool_schemas)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content', '')}\n\n{prompt}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


@dataclass(frozen=True)
class Bridge:
    """The non-sampled tokens between one assistant turn's sampled tokens and the next prompt."""

    token_ids: list[int]  # [B] closing of the turn + new observation + generation prompt
    text: str  # their text
    method: BridgeMethod  # "diff" (exact, template prefix-preserving) or "dummy" (fallback)


@dataclass(frozen=True)
class DriftReport:
    """How an episode's token stream compares with a full re-render of its messages."""

    kind: DriftKind  # "none", "tokenization" (same text, other ids) or "template" (text differs)
    stream_tokens: int  # length of the episode's token stream (+ the final closing)
    render_tokens: int  # length of the re-render's tokens
    first_token_diff: int | None  # first index where the token ids differ, None if equal
    first_char_diff: int | None  # first index where the texts differ, None if equal
    stream_excerpt: str  # stream text around first_char_diff ("" when equal)
    render_excerpt: str  # re-render text around first_char_diff ("" when equal)

    @property
    def ok(self) -> bool:
        """True when the stream equals the re-render token for token."""
        return self.kind == "none"

    def to_dict(self) -> dict[str, JSONValue]:
        """A JSON-ready dict (stored in ``Trajectory.info["drift"]``)."""
        return {
            "kind": self.kind,
            "ok": self.ok,
            "stream_tokens": self.stream_tokens,
            "render_tokens": self.render_tokens,
            "first_token_diff": self.first_token_diff,
            "first_char_diff": self.first_char_diff,
            "stream_excerpt": self.stream_excerpt,
            "render_excerpt": self.render_excerpt,
        }


def _first_diff(a: list[int] | str, b: list[int] | str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class ChatRenderer:
    """Renders messages through one tokenizer's chat template, whole or as token deltas.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template and an EOS token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.chat_template:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no chat template; the agent renders "
                "conversations through it (use an instruct model's tokenizer)"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} has no EOS token; the agent needs it to "
                "tell a finished assistant turn from a cut one"
            )
        self.tokenizer = tokenizer
        self.eos_token_id: int = int(tokenizer.eos_token_id)
        self.eos_text: str = self.decode([self.eos_token_id])
        self.supports_tools = template_supports_tools(tokenizer)

    # -- text and tokens ---------------------------------------------------------------

    def render(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool,
        tools: list[dict[str, JSONValue]] | None = None,
    ) -> str:
        """The chat template's text for ``messages`` (``tools`` only if the template reads them)."""
        kwargs = {"tools": tools} if (tools and self.supports_tools) else {}
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_end|>``) map to their ids."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: list[int]) -> str:
        """The exact text of ``token_ids``, special tokens included."""
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def assistant_content(self, sampled_ids: list[int]) -> str:
        """The assistant message text of one turn: its sampled tokens without a final EOS."""
        if sampled_ids and sampled_ids[-1] == self.eos_token_id:
            sampled_ids = sampled_ids[:-1]
        return self.decode(sampled_ids)

    # -- episode pieces ----------------------------------------------------------------

    def prepare(
        self, messages: list[Message], tools: list[dict[str, JSONValue]]
    ) -> tuple[list[Message], list[dict[str, JSONValue]] | None]:
        """The first messages and the ``tools`` argument to render an episode with.

        With a tools-aware template the schemas go to the template; otherwise they are
        described in the system message (:func:`with_tool_prompt`).
        """
        if self.supports_tools:
            return list(messages), (tools or None)
        return with_tool_prompt(messages, tools), None

    def prompt_ids(self, messages: list[Message], tools: list[dict[str, JSONValue]] | None = None) -> list[int]:
        """Token ids of the first prompt: ``messages`` + the generation prompt."""
        return self.encode(self.render(messages, add_generation_prompt=True, tools=tools))

    def bridge(
        self,
        before: list[Message],
        content: str,
        ended_with_eos: bool,
        new_messages: list[Message],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, JSONValue]] | None = None,
    ) -> Bridge:
        """The tokens to append after a turn's sampled tokens (see the module docstring).

        Args:
            before: The conversation the turn was prompted with.
            content: The turn's assistant text (:meth:`assistant_content`).
            ended_with_eos: Whether the sampled tokens end with EOS (then the bridge
                leaves it out; otherwise the bridge closes the turn with it).
            new_messages: The observation to append ([] for just the turn's closing).
            add_generation_prompt: End with the next assistant turn's header.
            tools: The episode's ``tools`` render argument.
        """
        assistant: Message = {"role": "assistant", "content": content}
        head = self.render(before, add_generation_prompt=True, tools=tools) + content
        full = self.render(
            [*before, assistant, *new_messages], add_generation_prompt=add_generation_prompt, tools=tools
        )
        method: BridgeMethod = "diff"
        if not full.startswith(head):
            method = "dummy"
            dummy = list(_DUMMY_BEFORE)
            head = self.render(dummy, add_generation_prompt=True, tools=tools) + _DUMMY_CONTENT
            full = self.render(
                [*dummy, {"role": "assistant", "content": _DUMMY_CONTENT}, *new_messages],
                add_generation_prompt=add_generation_prompt,
                tools=tools,
            )
            if not full.startswith(head):
                raise ValueError(
                    "the chat template renders an assistant message so that its content is not "
                    "followed by the rest of the conversation; the agent cannot append observations "
                    f"as token deltas with it (template of {self.tokenizer.name_or_path!r})"
                )
        text = full[len(head):]
        if ended_with_eos and text.startswith(self.eos_text):
            text = text[len(self.eos_text):]
        return Bridge(token_ids=self.encode(text) if text else [], text=text, method=method)

    def check_drift(
        self,
        token_ids: list[int],
        messages: list[Message],
        final_closing_ids: list[int],
        tools: list[dict[str, JSONValue]] | None = None,
        excerpt_chars: int = 60,
    ) -> DriftReport:
        """Compare an episode's stream with a full re-render of its messages.

        Args:
            token_ids: The episode's token stream.
            messages: The conversation it represents (ending with an assistant message,
                or with the observation the last prompt ended with).
            final_closing_ids: Tokens that close the last turn as the template would
                (a bridge with no new messages), not part of the stream. Empty when the
                stream ends with a generation prompt (no turn was sampled after it).
            tools: The episode's ``tools`` render argument.
            excerpt_chars: Characters of context shown around the first difference.
        """
        ends_with_turn = bool(messages) and messages[-1].get("role") == "assistant"
        rendered = self.render(messages, add_generation_prompt=not ends_with_turn, tools=tools)
        render_ids = self.encode(rendered)
        stream_ids = [*token_ids, *final_closing_ids]
        tok_diff = _first_diff(stream_ids, render_ids)
        stream_text = self.decode(stream_ids)
        char_diff = _first_diff(stream_text, rendered)
        if tok_diff is None:
            kind: DriftKind = "none"
        elif char_diff is None:
            kind = "tokenization"
        else:
            kind = "template"
        lo = max(0, (char_diff or 0) - excerpt_chars)
        hi = (char_diff or 0) + excerpt_chars
        return DriftReport(
            kind=kind,
            stream_tokens=len(stream_ids),
            render_tokens=len(render_ids),
            first_token_diff=tok_diff,
            first_char_diff=char_diff,
            stream_excerpt=stream_text[lo:hi] if char_diff is not None else "",
            render_excerpt=rendered[lo:hi] if char_diff is not None else "",
        )
