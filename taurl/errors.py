"""The exceptions taurl raises. A leaf module: it imports nothing of taurl.

Every message says what was expected, what came, and what to do about it.
"""

from __future__ import annotations


class TaurlError(Exception):
    """Base class of every error taurl raises on purpose."""


class ConfigError(TaurlError, ValueError):
    """A configuration key, value or file is wrong."""


class SchemaError(TaurlError, ValueError):
    """A record (e.g. a Trajectory line in JSONL) does not match the schema this taurl reads."""


class TrajectoryError(TaurlError, ValueError):
    """A Trajectory breaks one of its invariants (lengths, mask, logprobs, turns)."""


class ModelError(TaurlError):
    """A model name cannot be resolved, or its local folder is missing or corrupt."""


class CheckpointError(TaurlError, FileNotFoundError):
    """A folder given as a checkpoint does not hold one (or not a complete one)."""


class EnvError(TaurlError):
    """An environment was used against its contract (e.g. step before reset)."""


class BackendError(TaurlError):
    """An inference backend failed in a way retries could not fix."""


class EnvWorkerLost(TaurlError):
    """The process holding an environment died mid-episode, and the environment's state with it.

    Not the environment's fault: the rollout runner re-runs the episode from ``reset``
    (same seeds) on a restarted worker instead of recording an ``"error"`` episode.
    """
