"""Agents: chat-template rendering, the token-exact agent loop, and inference backends.

The backends themselves (vLLM, HTTP server, transformers) are imported lazily by
:func:`make_backend`, so importing this package loads neither vLLM nor torch.
"""

from taurl.agents.backend import InferenceBackend, make_backend
from taurl.agents.chat import Bridge, ChatRenderer, DriftReport
from taurl.agents.config import BACKENDS
from taurl.agents.loop import Agent, AgentConfig, derive_seed

__all__ = [
    "BACKENDS",
    "Agent",
    "AgentConfig",
    "Bridge",
    "ChatRenderer",
    "DriftReport",
    "InferenceBackend",
    "derive_seed",
    "make_backend",
]
