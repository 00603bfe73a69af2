"""Environment workers on Ray, and the Ray session a rollout or training run opens.

Heavy environments (code sandboxes, web tasks) can run on other machines than the
trainer: :class:`RayEnvPool` keeps ``ray.env_workers`` worker actors, and its
:meth:`~RayEnvPool.make` is a drop-in for ``gymnasium.make`` that the runner takes
(``run_rollout(..., make_env=pool.make)``). The environment is built inside a
worker from the driver's registration (its ``EnvSpec`` travels with the call, so
environments registered only in the driver work too); the driver holds a
:class:`RayEnv` proxy whose ``reset``/``step``/``close`` are calls to that worker.

When a worker dies the environments it held are gone with their state: the proxy
raises :class:`~taurl.errors.EnvWorkerLost`, the pool starts a replacement worker,
and the runner plays the episode again from ``reset`` with the same seeds (the
partial trajectory is dropped, so no episode is lost or counted twice).

:class:`RayRollout` bundles what a command opens when ``ray.address`` is set: the
connection, engine actors on demand, and the env worker pool.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gymnasium

from taurl.agents.config import RayConfig
from taurl.agents.ray_backend import RayBackend
from taurl.agents.ray_engine import actor_lost_errors, connect_ray, kill_actor
from taurl.errors import EnvError, EnvWorkerLost
from taurl.types import JSONValue, Message

if TYPE_CHECKING:
    from gymnasium.envs.registration import EnvSpec
    from ray.actor import ActorHandle

    from taurl.rollout.runner import EnvFactory


class EnvWorker:
    """A Ray actor holding many environments, each stepped by one of its threads."""

    def __init__(self) -> None:
        import taurl.envs  # noqa: F401 - the built-in environments' registrations

        self._envs: dict[int, gymnasium.Env] = {}
        self._next = 0
        self._lock = threading.Lock()

    def pid(self) -> int:
        """This worker's process id (answers once the worker is up)."""
        return os.getpid()

    def make(self, spec: EnvSpec, kwargs: dict[str, JSONValue]) -> int:
        """Build an environment like ``gymnasium.make(spec, **kwargs)``; returns its key."""
        env = gymnasium.make(spec, **kwargs)
        with self._lock:
            self._next += 1
            self._envs[self._next] = env
            return self._next

    def reset(
        self, key: int, seed: int | None, options: dict[str, JSONValue] | None
    ) -> tuple[list[Message], dict[str, JSONValue]]:
        """``reset`` of environment ``key``."""
        return self._envs[key].reset(seed=seed, options=options)  # type: ignore[no-any-return]

    def step(
        self, key: int, action: str
    ) -> tuple[list[Message], float, bool, bool, dict[str, JSONValue]]:
        """``step`` of environment ``key``."""
        return self._envs[key].step(action)  # type: ignore[no-any-return]

    def close(self, key: int) -> None:
        """Close and forget environment ``key``."""
        with self._lock:
            env = self._envs.pop(key, None)
        if env is not None:
            env.close()


@dataclass
class _Worker:
    handle: ActorHandle | None  # None once its max_restarts are spent
    envs: int = 0  # live environments it holds
    restarts: int = 0


class RayEnv(gymnasium.Env):  # type: ignore[type-arg]
    """A Gymnasium environment living in a Ray env worker; every call goes there.

    Raises :class:`~taurl.errors.EnvWorkerLost` when the worker died (the
    environment's state is gone); the environment's own exceptions come through as
    they are.
    """

    def __init__(
        self, pool: RayEnvPool, slot: int, handle: ActorHandle, key: int, env_id: str
    ) -> None:
        self._pool = pool
        self._slot = slot
        self._handle = handle
        self._key = key
        self.env_id = env_id
        self._closed = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, JSONValue] | None = None
    ) -> tuple[list[Message], dict[str, JSONValue]]:
        """``reset`` in the worker."""
        return self._call("reset", seed, options)  # type: ignore[no-any-return]

    def step(self, action: str) -> tuple[list[Message], float, bool, bool, dict[str, JSONValue]]:
        """``step`` in the worker."""
        return self._call("step", action)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the environment in the worker (nothing to do when the worker is gone)."""
        if self._closed:
            return
        self._closed = True
        from ray.exceptions import RayError

        try:
            self._call("close")
        except (EnvWorkerLost, RayError):
            pass
        finally:
            self._pool._released(self._slot, self._handle)

    def _call(self, method: str, *args: object) -> object:
        import ray
        from ray.exceptions import RayTaskError

        try:
            return ray.get(getattr(self._handle, method).remote(self._key, *args))
        except actor_lost_errors() as e:
            self._pool._lost(self._slot, self._handle)
            raise EnvWorkerLost(
                f"env worker {self._slot} holding {self.env_id} died during {method}: {e}"
            ) from e
        except RayTaskError as e:
            raise e.as_instanceof_cause() from None


class RayEnvPool:
    """``config.env_workers`` env worker actors; :meth:`make` builds an env on the least busy.

    A dead worker is replaced (at most ``config.max_restarts`` times per worker);
    ``stats["restarts"]`` counts replacements. Safe to use from many threads.
    """

    def __init__(self, config: RayConfig) -> None:
        import ray

        if config.env_workers < 1:
            raise EnvError(f"RayEnvPool needs ray.env_workers >= 1, got {config.env_workers}")
        self.config = config
        self.stats: dict[str, int] = {"restarts": 0, "lost": 0}
        options: dict[str, object] = {
            "num_cpus": config.cpus_per_env_worker,
            "max_concurrency": config.env_threads_per_worker,
            "max_restarts": 0,  # replaced by the pool, so that the runner knows state was lost
            "scheduling_strategy": "SPREAD",
        }
        if config.env_vars:
            options["runtime_env"] = {"env_vars": dict(config.env_vars)}
        self._actor_cls = ray.remote(EnvWorker).options(**options)  # type: ignore[arg-type]
        self._lock = threading.Lock()
        self._workers = [_Worker(self._actor_cls.remote()) for _ in range(config.env_workers)]
        try:
            ray.get([w.handle.pid.remote() for w in self._workers], timeout=config.start_timeout_s)  # type: ignore[union-attr]
        except Exception:
            self.close()
            raise

    @property
    def worker_handles(self) -> list[ActorHandle | None]:
        """The env worker actors, by slot (for fault drills: ``ray.kill(handles[0])``)."""
        return [w.handle for w in self._workers]

    def make(self, env_id: str, /, **kwargs: JSONValue) -> RayEnv:
        """``gymnasium.make(env_id, **kwargs)``, built in a worker; the proxy comes back.

        Raises :class:`~taurl.errors.EnvWorkerLost` if the chosen worker died meanwhile
        (the runner tries again) and :class:`~taurl.errors.EnvError` when every worker
        is gone for good.
        """
        import ray
        from ray.exceptions import RayTaskError

        spec = gymnasium.spec(env_id)  # an unknown id fails here, with gymnasium's suggestions
        with self._lock:
            live = [i for i, w in enumerate(self._workers) if w.handle is not None]
            if not live:
                raise EnvError(
                    f"every Ray env worker died and their ray.max_restarts={self.config.max_restarts} "
                    "replacements are spent"
                )
            slot = min(live, key=lambda i: self._workers[i].envs)
            worker = self._workers[slot]
            handle: ActorHandle = worker.handle  # type: ignore[assignment]
            worker.envs += 1
        try:
            key = ray.get(handle.make.remote(spec, dict(kwargs)))
        except actor_lost_errors() as e:
            self._released(slot, handle)
            self._lost(slot, handle)
            raise EnvWorkerLost(f"env worker {slot} died while making {env_id}: {e}") from e
        except RayTaskError as e:
            self._released(slot, handle)
            raise e.as_instanceof_cause() from None
        return RayEnv(self, slot, handle, key, env_id)

    def _released(self, slot: int, handle: ActorHandle) -> None:
        with self._lock:
            worker = self._workers[slot]
            if worker.handle is handle:
                worker.envs = max(0, worker.envs - 1)

    def _lost(self, slot: int, handle: ActorHandle) -> None:
        """Replace the worker in ``slot`` unless another caller already did."""
        with self._lock:
            worker = self._workers[slot]
            if worker.handle is not handle:
                return
            self.stats["lost"] += 1
            kill_actor(handle)
            if worker.restarts >= self.config.max_restarts:
                worker.handle = None
                return
            # Not waited for: calls to the new actor queue until it is up.
            worker.handle = self._actor_cls.remote()
            worker.envs = 0
            worker.restarts += 1
            self.stats["restarts"] += 1

    def close(self) -> None:
        """Remove every worker (and the environments they hold). Idempotent."""
        with self._lock:
            for w in self._workers:
                if w.handle is not None:
                    kill_actor(w.handle)
                    w.handle = None


class RayRollout:
    """What a command opens when ``ray.address`` is set: the connection, engines, env workers.

    Connects (unless this process already is), starts the env worker pool when
    ``ray.env_workers > 0``, and builds engine actors on demand
    (:meth:`make_backend`; the caller closes the backend). :meth:`close` removes the
    workers and disconnects if it connected.
    """

    def __init__(self, config: RayConfig) -> None:
        self.config = config
        self._connected = connect_ray(config)
        try:
            self.env_pool = RayEnvPool(config) if config.env_workers else None
        except BaseException:
            self.close()
            raise

    @property
    def make_env(self) -> EnvFactory | None:
        """The runner's ``make_env`` (None: environments stay in the driver)."""
        return self.env_pool.make if self.env_pool is not None else None

    def make_backend(
        self, kind: str, model: str | Path, options: Mapping[str, JSONValue] | None = None
    ) -> RayBackend:
        """``config.num_engines`` engine actors of backend ``kind`` serving ``model``."""
        return RayBackend(model, self.config, kind=kind, options=options)

    def close(self) -> None:
        """Remove the env workers; disconnect when this object connected. Idempotent."""
        pool = getattr(self, "env_pool", None)
        if pool is not None:
            pool.close()
            self.env_pool = None
        if self._connected:
            import ray

            ray.shutdown()
            self._connected = False
