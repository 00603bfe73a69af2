"""The Gymnasium spaces of text environments: chat messages in, assistant text out.

Gymnasium's own ``Text`` space limits the charset and has no notion of a chat
message, so taurl's envs (and :class:`~taurl.envs.adapter.TextEnvAdapter`) declare
these instead; :func:`taurl.envs.check_env` checks observations against the same
:data:`ROLES`.
"""

from __future__ import annotations

import gymnasium

from taurl.types import Message

#: Roles an observation message may carry.
ROLES: frozenset[str] = frozenset({"system", "user", "assistant", "tool"})


class TextSpace(gymnasium.Space[str]):
    """Any Python string up to ``max_length`` characters (gymnasium's ``Text`` limits the charset)."""

    def __init__(self, max_length: int = 100_000, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)
        self.max_length = max_length

    def sample(self, mask: None = None, probability: None = None) -> str:
        length = int(self.np_random.integers(0, 64))
        codes = self.np_random.integers(32, 127, size=length)
        return "".join(chr(int(c)) for c in codes)

    def contains(self, x: object) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"TextSpace(max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextSpace) and other.max_length == self.max_length


class MessagesSpace(gymnasium.Space[list]):
    """A list of chat messages: dicts with a ``role`` in :data:`ROLES` and a string ``content``."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(shape=None, dtype=None, seed=seed)

    def sample(self, mask: None = None, probability: None = None) -> list[Message]:
        return [{"role": "user", "content": TextSpace(seed=int(self.np_random.integers(2**31))).sample()}]

    def contains(self, x: object) -> bool:
        return isinstance(x, list) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
            for m in x
        )

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "MessagesSpace()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MessagesSpace)
