"""The ``backend:`` and ``ray:`` sections of the train, rollout and eval configs.

A leaf module: it imports neither Ray, torch nor vLLM, so a config can be loaded,
checked and printed on a machine that has none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from taurl.errors import ConfigError
from taurl.types import JSONValue

#: Backend kind → "module:class", imported only when that kind is made (``make_backend``).
BACKENDS: dict[str, str] = {
    "vllm": "taurl.agents.vllm_backend:VLLMBackend",
    "vllm-server": "taurl.agents.server_backend:VLLMServerBackend",
    "hf": "taurl.agents.hf_backend:HFBackend",
}

_ADDRESS = re.compile(r"^(local|auto|ray://\S+|[\w.-]+:\d+)$")


@dataclass
class BackendConfig:
    """Which inference backend samples, and its constructor options."""

    # backend: vllm | vllm-server | hf (in-process vLLM, `vllm serve` replicas, transformers)
    kind: str = "vllm"
    # constructor arguments of that backend, e.g. {dtype: bfloat16, max_model_len: 2048}
    options: dict[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ConfigError(f"BackendConfig.kind must be one of {sorted(BACKENDS)}, got {self.kind!r}")


@dataclass
class RayConfig:
    """Where the rollout runs on Ray: inference engines and environment workers as actors."""

    # "" = no Ray (one process, nothing imports Ray); "local" = start a cluster on this machine; "auto" = join the running one; or "ray://host:port"
    address: str = ""
    # inference engine actors, each one backend.kind engine (one per GPU, or one per node on CPU)
    num_engines: int = 1
    # logical CPUs each engine actor reserves
    cpus_per_engine: float = 1.0
    # GPUs each engine actor reserves; None = 1 when the cluster has GPUs, else 0
    gpus_per_engine: float | None = None
    # environment worker actors (0 = environments run in the driver's threads, as without Ray)
    env_workers: int = 0
    # logical CPUs each environment worker reserves
    cpus_per_env_worker: float = 1.0
    # environments one worker steps at the same time (its threads)
    env_threads_per_worker: int = 16
    # replacements of a dead actor (per engine, per env worker) before the run gives up on it
    max_restarts: int = 3
    # seconds an actor may take to start (an engine loads its model) before that is an error
    start_timeout_s: float = 900.0
    # logical CPUs of a "local" cluster; None = the machine's count, raised to what the actors reserve
    num_cpus: int | None = None
    # environment variables set in every actor, e.g. {VLLM_CPU_KVCACHE_SPACE: "1"}
    env_vars: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.address and not _ADDRESS.match(self.address):
            raise ConfigError(
                f"ray.address must be '' (off), 'local', 'auto', 'ray://host:port' or "
                f"'host:port', got {self.address!r}"
            )
        for name in ("num_engines", "env_threads_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ray.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_engine", "cpus_per_env_worker", "env_workers", "max_restarts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ray.{name} must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_engine is not None and self.gpus_per_engine < 0:
            raise ConfigError(
                f"ray.gpus_per_engine must be >= 0 or None (1 when the cluster has GPUs), "
                f"got {self.gpus_per_engine}"
            )
        if self.start_timeout_s <= 0:
            raise ConfigError(f"ray.start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.num_cpus is not None:
            if self.num_cpus < 1:
                raise ConfigError(f"ray.num_cpus must be >= 1 or None, got {self.num_cpus}")
            if self.address != "local":
                raise ConfigError(
                    f"ray.num_cpus sizes a cluster this process starts (address 'local'); with "
                    f"address {self.address!r} the cluster has its own size: drop ray.num_cpus"
                )

    @property
    def enabled(self) -> bool:
        """True when the rollout runs on Ray."""
        return bool(self.address)

    def cpus_reserved(self) -> float:
        """Logical CPUs the engine and environment actors reserve together."""
        return self.num_engines * self.cpus_per_engine + self.env_workers * self.cpus_per_env_worker
