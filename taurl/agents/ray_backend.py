"""Ray backend: inference engines as Ray actors, one backend interface in the driver.

Each engine actor builds an ordinary backend (:func:`make_backend`, vLLM by default)
in its own process — one per GPU, or one per node on CPU — and the driver (the
trainer) talks to all of them through :class:`RayBackend`:

- **routing**: a new episode (``session_id``) goes to the engine with the fewest
  requests in flight, and every later turn of it to the same engine (its prefix
  cache holds the episode's history);
- **weights**: ``update_weights`` puts the state dict into Ray's object store once
  and every engine loads it from there at the same time;
- **failures**: when an engine actor dies (a node lost, ``ray.kill``, an OOM kill),
  a replacement actor is started at its place and loaded with the latest weights,
  and the requests that were in flight on the dead one are sent again — to a live
  engine at once, or to the replacement. Each caller's ``generate`` returns exactly
  one result; per-request seeds make the re-sent request sample what the lost one
  would have. ``stats["restarts"]`` counts replacements.

Nothing here imports Ray at module level: ``taurl`` without ``ray.address`` never
loads it. The ``ray:`` config section is :class:`taurl.agents.config.RayConfig`; the
engine actor and the Ray helpers live in :mod:`taurl.agents.ray_engine`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from taurl.agents.backend import BackgroundLoop, LoopBackend, SessionRouter
from taurl.agents.config import RayConfig
from taurl.agents.ray_engine import EngineActor, actor_lost_errors, kill_actor, pack_state_dict
from taurl.errors import BackendError
from taurl.models import resolve_model
from taurl.types import Generation, JSONValue, SamplingParams

if TYPE_CHECKING:
    import torch
    from ray.actor import ActorHandle


@dataclass
class _Engine:
    """The driver's record of one engine slot; ``handle`` changes when it is replaced."""

    handle: ActorHandle
    in_flight: int = 0  # requests sent and not yet answered
    healthy: bool = True  # False from a death until the replacement is loaded
    restarts: int = 0
    failed: str = ""  # set when max_restarts is spent: the slot is given up
    info: dict[str, JSONValue] = field(default_factory=dict)


class RayBackend(LoopBackend):
    """``num_engines`` engine actors behind the backend interface (see the module docstring).

    Building one starts the actors and blocks until every engine is ready. This
    process must be connected to Ray (:func:`~taurl.agents.ray_engine.connect_ray`).

    Args:
        model: a built-in model name, a folder, or a cached hub id; each actor
            resolves it on its own node (a folder must exist there too).
        config: engines, resources per engine, restarts, start timeout, actor env vars.
        kind: the inner backend of every engine (a key of ``BACKENDS``).
        options: the inner backend's constructor options.
    """

    def __init__(
        self,
        model: str | Path,
        config: RayConfig,
        *,
        kind: str = "vllm",
        options: Mapping[str, JSONValue] | None = None,
    ) -> None:
        import ray

        if not ray.is_initialized():
            raise BackendError(
                "RayBackend needs a Ray connection; call taurl.agents.ray_engine.connect_ray"
                "(config) (or ray.init) first"
            )
        self.model = str(model)
        self.model_path = resolve_model(model)
        self.config = config
        self.kind = kind
        self.options: dict[str, JSONValue] = dict(options or {})
        self.policy_version = 0
        #: seconds the last update_weights took: "put_s" (into the object store), "load_s" (engines)
        self.last_update_s: dict[str, float] = {}
        #: counters: "requests", "retries" (re-sent after a death), "rerouted", "restarts"
        self.stats: collections.Counter[str] = collections.Counter()
        gpus = config.gpus_per_engine
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self._actor_options: dict[str, object] = {
            "num_cpus": config.cpus_per_engine,
            "num_gpus": gpus,
            "max_restarts": 0,  # replaced by the driver, which reloads the latest weights
            "scheduling_strategy": "SPREAD",
        }
        if config.env_vars:
            self._actor_options["runtime_env"] = {"env_vars": dict(config.env_vars)}
        self._actor_cls = ray.remote(EngineActor).options(**self._actor_options)  # type: ignore[arg-type]
        # the latest weights, for replacements: (object-store ref of the state dict, version)
        self._weights: tuple[object | None, int] = (None, 0)
        self._router = SessionRouter()
        self._engines: list[_Engine] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._loop = BackgroundLoop(name="taurl-ray")
        try:
            self._loop.run_sync(self._start())
        except BaseException:
            self.close_sync()
            raise
        first = self._engines[0].info
        self.max_model_len = int(first["max_model_len"])  # type: ignore[arg-type]
        self._weight_dtype = first.get("weight_dtype")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The engines' weight dtype (what the trainer syncs in)."""
        import torch

        dtype = getattr(torch, str(self._weight_dtype), None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    @property
    def engine_handles(self) -> list[ActorHandle]:
        """The live engine actors, by slot (for fault drills: ``ray.kill(handles[0])``)."""
        return [e.handle for e in self._engines]

    def engine_status(self) -> list[dict[str, JSONValue]]:
        """Per engine slot: ``healthy``, ``in_flight``, ``restarts``, ``failed``, ``pid``."""
        return [
            {"healthy": e.healthy, "in_flight": e.in_flight, "restarts": e.restarts,
             "failed": e.failed, "pid": e.info.get("pid")}
            for e in self._engines
        ]  # fmt: skip

    def session_engine(self, session_id: str) -> int | None:
        """The engine slot an episode is kept on (None before its first request)."""
        return self._router.get(session_id)

    @property
    def restarts(self) -> int:
        """Engine actors replaced after a death, over this backend's life."""
        return self.stats["restarts"]

    # -- actors --------------------------------------------------------------------

    def _spawn(self) -> ActorHandle:
        return self._actor_cls.remote(self.kind, self.model, self.options)

    async def _start(self) -> None:
        self._changed = asyncio.Condition()
        self._engines = [_Engine(self._spawn()) for _ in range(self.config.num_engines)]
        infos = await self._wait_ready([e.handle for e in self._engines])
        for engine, info in zip(self._engines, infos, strict=True):
            engine.info = info

    async def _wait_ready(self, handles: list[ActorHandle]) -> list[dict[str, JSONValue]]:
        import ray
        from ray.exceptions import RayError

        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(h.info.remote() for h in handles), return_exceptions=True),
                self.config.start_timeout_s,
            )
        except TimeoutError as e:
            raise BackendError(
                f"{len(handles)} engine actor(s) did not start within {self.config.start_timeout_s:.0f} s; "
                f"each asks for {self._actor_options['num_cpus']} CPU and "
                f"{self._actor_options['num_gpus']} GPU and the cluster has "
                f"{ray.available_resources()} free: lower ray.num_engines or the per-engine "
                "resources, or raise ray.start_timeout_s"
            ) from e
        for info in infos:
            if isinstance(info, RayError):
                raise BackendError(
                    f"an engine actor ({self.kind}, {self.model}) failed to start: {info}"
                ) from info
            if isinstance(info, BaseException):
                raise info
        return infos  # type: ignore[return-value]

    def _on_death(self, i: int, handle: ActorHandle, exc: BaseException) -> None:
        """Start replacing slot ``i`` unless another request already saw this death."""
        engine = self._engines[i]
        if engine.handle is not handle or not engine.healthy or self._closed:
            return
        engine.healthy = False
        task = asyncio.get_running_loop().create_task(self._replace(i, handle, exc))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, i: int, dead: ActorHandle, exc: BaseException) -> None:
        from ray.exceptions import RayError

        kill_actor(dead)  # a merely unreachable actor must not live on beside its replacement
        engine = self._engines[i]
        reason = f"{type(exc).__name__}: {exc}"
        failures = 0
        while True:
            if engine.restarts >= self.config.max_restarts:
                engine.failed = (
                    f"engine {i} died ({reason[:300]}) and its ray.max_restarts="
                    f"{self.config.max_restarts} replacements are spent"
                )
                break
            if failures:  # the last replacement failed too (e.g. an OOM kill): let the node settle
                await asyncio.sleep(min(2.0**failures, 30.0))
            engine.restarts += 1
            self.stats["restarts"] += 1
            handle = self._spawn()
            try:
                (engine.info,) = await self._wait_ready([handle])
                loaded: tuple[object | None, int] = (None, 0)
                while loaded is not self._weights:  # weights may change while this one loads
                    loaded = self._weights
                    if loaded[0] is not None:
                        await handle.update_weights.remote(loaded[0], loaded[1])
            except (BackendError, RayError) as e:
                kill_actor(handle)
                reason = f"{type(e).__name__}: {e}"
                failures += 1
                continue
            engine.handle = handle
            engine.healthy = True
            break
        async with self._changed:
            self._changed.notify_all()

    # -- routing -------------------------------------------------------------------

    async def _pick(self, session_id: str | None) -> int:
        """Engine slot for a request: the session's own one while it is healthy, else the
        healthy engine with the fewest requests in flight (waiting while none is)."""
        i = self._router.sticky(session_id, lambda j: self._engines[j].healthy)
        self.stats["rerouted"] = self._router.rerouted
        if i is not None:
            return i
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    any(e.healthy for e in self._engines) or all(e.failed for e in self._engines)
                )
            )
        healthy = [i for i, e in enumerate(self._engines) if e.healthy]
        if not healthy:
            raise BackendError(
                "every Ray engine actor is gone: " + "; ".join(e.failed for e in self._engines)
            )
        return self._router.assign(session_id, healthy, lambda j: self._engines[j].in_flight)

    # -- generation ----------------------------------------------------------------

    async def _generate(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        from ray.exceptions import RayTaskError

        self.stats["requests"] += 1
        while True:
            i = await self._pick(session_id)
            engine = self._engines[i]
            handle = engine.handle
            engine.in_flight += 1
            try:
                return await handle.generate.remote(prompt, sampling)  # type: ignore[no-any-return]
            except actor_lost_errors() as e:
                self.stats["retries"] += 1
                self._on_death(i, handle, e)
            except RayTaskError as e:
                raise BackendError(f"Ray engine {i} failed a request: {e.cause!r}") from e
            finally:
                engine.in_flight -= 1

    # -- weights -------------------------------------------------------------------

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Put ``state_dict`` into the object store once; every engine loads it at once.

        See the interface docstring. The reference is kept, so that a replacement
        engine starts with these weights; a dead engine is waited for.
        """
        import ray

        t0 = time.perf_counter()
        ref = await asyncio.to_thread(lambda: ray.put(pack_state_dict(state_dict)))
        t1 = time.perf_counter()
        await self._loop.run(self._update_all(ref, version))
        self.policy_version = version
        self.last_update_s = {"put_s": t1 - t0, "load_s": time.perf_counter() - t1}

    async def _update_all(self, ref: object, version: int) -> None:
        self._weights = (ref, version)
        await asyncio.gather(
            *(self._update_one(i, ref, version) for i in range(len(self._engines)))
        )

    async def _update_one(self, i: int, ref: object, version: int) -> None:
        from ray.exceptions import RayTaskError

        engine = self._engines[i]
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: engine.healthy or bool(engine.failed))
            if engine.failed:
                return
            handle = engine.handle
            try:
                await handle.update_weights.remote(ref, version)
                return
            except actor_lost_errors() as e:
                self._on_death(i, handle, e)
            except RayTaskError as e:
                raise BackendError(f"Ray engine {i} failed to load weights: {e.cause!r}") from e

    async def reset_prefix_cache(self) -> None:
        """Drop every engine's cached prefixes (for measurements that must not reuse them)."""
        await self._loop.run(self._reset_all())

    async def _reset_all(self) -> None:
        handles = [e.handle for e in self._engines if e.healthy]
        await asyncio.gather(*(h.reset_prefix_cache.remote() for h in handles))

    # -- lifecycle -----------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop replacements under way and close every live engine."""
        for task in list(self._replacing):
            task.cancel()
        handles = [e.handle for e in self._engines if e.healthy]
        if handles:
            # a clean close stops each engine's child processes before the actor goes
            closing = asyncio.gather(*(h.close.remote() for h in handles), return_exceptions=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing, 60)

    def _after_stop(self) -> None:
        """Remove the engine actors and drop the weights' object-store reference."""
        for engine in self._engines:
            kill_actor(engine.handle)
        self._weights = (None, 0)


