"""vLLM server backend: ``vllm serve`` replicas over HTTP, token ids in and out.

Requests go to each replica's ``/inference/v1/generate`` (token-in/token-out,
enabled by ``--enable-scale-out``) through one pooled ``httpx.AsyncClient``.
Routing sends a new episode to the replica with the fewest requests in flight and
keeps every later turn of that episode (same ``session_id``) on it, so the
replica's prefix cache holds the episode's history. Connection errors and 5xx
answers are retried with exponential backoff (tenacity); when the episode's
replica is down, the episode moves to a healthy one. Each attempt gets its own
request id, and a caller's ``generate`` returns exactly one result.

The backend starts the replicas itself (``urls=None``): ``vllm serve`` on
127.0.0.1, each in its own process group, restarted by a supervisor task when one
dies. It can instead attach to running servers (``urls=[...]``); those must run
with ``--enable-scale-out`` and ``VLLM_SERVER_DEV_MODE=1`` (for ``/pause``,
``/collective_rpc`` and ``/resume``, which carry weight updates).

Weights travel as a one-file checkpoint in a temporary folder that every replica
reads (``reload_weights``): replicas on other machines need ``weights_dir`` on a
shared filesystem.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import httpx
import tenacity

from taurl.agents.backend import (
    BackgroundLoop,
    LoopBackend,
    SessionRouter,
    weights_checkpoint,
)
from taurl.agents.vllm_backend import CPU_BLOCK_SIZE
from taurl.agents.vllm_worker import (
    CPU_POLL_IDLE_AFTER_S,
    IDLE_METHOD,
    RELOAD_METHOD,
    WORKER_EXTENSION,
)
from taurl.errors import BackendError
from taurl.models import resolve_model
from taurl.types import Generation, SamplingParams

if TYPE_CHECKING:
    import torch

#: Transport failures worth a retry: the replica is down, restarting, or dropped us.
RETRYABLE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
    httpx.PoolTimeout,
)


class ServerError(BackendError):
    """A replica answered with an error status (5xx are retried, 4xx are not)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Replica:
    """One ``vllm serve`` endpoint, and its process when this backend started it."""

    url: str
    port: int | None = None  # set when this backend manages the process
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    in_flight: int = 0  # requests sent and not yet answered
    healthy: bool = True  # False after a transport error, True after a good answer
    restarts: int = 0
    idle_readers: int = 0  # its worker queue readers told to stop polling sooner (CPU)
    _log: IO[bytes] | None = field(default=None, repr=False)


class VLLMServerBackend(LoopBackend):
    """Several ``vllm serve`` replicas behind the backend interface.

    Args:
        model: a built-in model name, a folder, or a cached hub id (``resolve_model``);
            when attaching (``urls``) it is only read for its config.json.
        urls: base URLs (``http://host:port``) of running servers; None starts
            ``replicas`` servers on 127.0.0.1.
        replicas: how many servers to start when ``urls`` is None.
        dtype, max_model_len, seed: the started servers' ``--dtype``,
            ``--max-model-len`` and ``--seed``. ``max_model_len`` also bounds prompts
            for attached servers.
        serve_args: further ``vllm serve`` command-line arguments (without a
            ``--block-size``, started CPU servers get ``--block-size 32``, as
            :class:`~taurl.agents.vllm_backend.VLLMBackend` does).
        enforce_eager: pass ``--enforce-eager`` (no torch.compile, which costs the
            server a minute at start on CPU); None = True without CUDA.
        cpu_kv_cache_gb: ``VLLM_CPU_KVCACHE_SPACE`` of started servers on a CPU machine.
        auto_restart: restart a started server when its process dies.
        start_timeout: seconds a started server may take to answer ``/health``.
        request_timeout: seconds one HTTP request may take (a whole generation).
        retry_timeout: seconds ``generate`` keeps retrying a failing request in all.
        log_dir: where started servers write ``replica-<i>.log`` (default: a temp dir).
        weights_dir: parent of the temporary weight folders (default: the system
            temp dir; must be shared with replicas on other machines).
        taurl_worker: the servers load taurl's vLLM worker extension
            (``--worker-extension-cls taurl.agents.vllm_worker.TaurlWorkerExtension``), whose
            reload also refreshes a tied LM head's CPU kernel and, on a CPU, whose idle workers
            stop busy-polling after 0.1 s instead of 1 s (:mod:`taurl.agents.vllm_worker`);
            None: True for started servers, False for attached ones (start those with the
            flag and pass True, or CPU servers of tied-embedding models keep a stale head).
    """

    def __init__(
        self,
        model: str | Path,
        *,
        urls: Sequence[str] | None = None,
        replicas: int = 1,
        dtype: str = "auto",
        max_model_len: int = 2048,
        seed: int = 0,
        serve_args: Sequence[str] = (),
        enforce_eager: bool | None = None,
        cpu_kv_cache_gb: int = 1,
        auto_restart: bool = True,
        start_timeout: float = 600.0,
        request_timeout: float = 600.0,
        retry_timeout: float = 600.0,
        log_dir: str | Path | None = None,
        weights_dir: str | Path | None = None,
        taurl_worker: bool | None = None,
    ) -> None:
        if urls is not None and not urls:
            raise BackendError(
                "VLLMServerBackend got urls=[]; pass server URLs or None to start servers"
            )
        if urls is None and replicas < 1:
            raise BackendError(f"VLLMServerBackend replicas must be >= 1, got {replicas}")
        if max_model_len < 2:
            raise BackendError(f"VLLMServerBackend max_model_len must be >= 2, got {max_model_len}")
        self.model_path = resolve_model(model)
        self.max_model_len = max_model_len
        self.policy_version = 0
        self.managed = urls is None
        self.auto_restart = auto_restart
        self.start_timeout = start_timeout
        self.retry_timeout = retry_timeout
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        #: counters for diagnostics: "requests", "retries", "rerouted", "restarts"
        self.stats: collections.Counter[str] = collections.Counter()
        self._serve_cmd = [
            # the API server's module, not the `vllm` CLI: vllm-cpu's CLI looks up the
            # version of a distribution named "vllm" and fails before parsing arguments
            sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
            "--model", str(self.model_path),
            "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--seed", str(seed), "--enable-scale-out", "--disable-log-stats",
            "--served-model-name", "taurl-policy", "--worker-extension-cls", WORKER_EXTENSION,
            *serve_args,
        ]  # fmt: skip
        use_extension = self.managed if taurl_worker is None else taurl_worker
        self._reload_method = RELOAD_METHOD if use_extension else "reload_weights"
        import torch

        on_cpu = not torch.cuda.is_available()
        if on_cpu if enforce_eager is None else enforce_eager:
            self._serve_cmd.append("--enforce-eager")
        if on_cpu:
            # seeded requests whose prompt is split kill vllm-cpu's engine: see vllm_backend
            self._serve_cmd.append("--no-enable-chunked-prefill")
            if not any(a.split("=")[0] == "--block-size" for a in serve_args):
                # short prompts share their KV prefix (vllm_backend's CPU_BLOCK_SIZE)
                self._serve_cmd += ["--block-size", str(CPU_BLOCK_SIZE)]
        # the learner may share these cores: idle workers must not spin on one (vllm_backend)
        self._poll_idle_after = CPU_POLL_IDLE_AFTER_S if on_cpu and use_extension else None
        self._env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
        self._env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
        if self.managed:
            self._log_dir: Path | None = Path(log_dir or tempfile.mkdtemp(prefix="taurl-serve-"))
            self._log_dir.mkdir(parents=True, exist_ok=True)
            self.replicas = [Replica(url="", port=None) for _ in range(replicas)]
        else:
            self._log_dir = None
            self.replicas = [Replica(url=u.rstrip("/")) for u in urls or ()]
        self._router = SessionRouter()
        self._loop = BackgroundLoop(name="taurl-vllm-server")
        try:
            self._loop.run_sync(self._start(request_timeout))
        except BaseException:
            self.close_sync()
            raise

    # -- processes -----------------------------------------------------------------

    async def _start(self, request_timeout: float) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(request_timeout, connect=10.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        if self.managed:
            for i in range(len(self.replicas)):
                self._spawn(i)
        await asyncio.gather(*(self._wait_ready(r) for r in self.replicas))
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    def _spawn(self, i: int) -> None:
        r = self.replicas[i]
        if r.port is None:
            r.port = _free_port()
            r.url = f"http://127.0.0.1:{r.port}"
        if self._log_dir is None:
            raise BackendError(f"replica {i} ({r.url}) is attached, not started by this backend")
        r.log_path = self._log_dir / f"replica-{i}.log"
        r._log = open(r.log_path, "ab")  # noqa: SIM115 - closed when the process ends
        # its own session (process group): a kill reaches the engine's child processes too
        r.process = subprocess.Popen(
            [*self._serve_cmd, "--port", str(r.port)],
            env=self._env, stdout=r._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        r.healthy = False

    async def _wait_ready(self, r: Replica) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if r.process is not None and r.process.poll() is not None:
                raise BackendError(
                    f"vllm serve for {r.url} exited with code {r.process.returncode} while "
                    f"starting; see its log {r.log_path}"
                )
            try:
                resp = await self._client.get(f"{r.url}/health", timeout=5.0)
                if resp.status_code == 200:
                    r.healthy = True
                    if self._poll_idle_after is not None:
                        await self._poll_idle_sooner(r, self._poll_idle_after)
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
        raise BackendError(
            f"vllm serve at {r.url} did not become healthy within {self.start_timeout:.0f} s"
            + (f"; see its log {r.log_path}" if r.log_path else "")
        )

    async def _poll_idle_sooner(self, r: Replica, seconds: float) -> None:
        """Tell a healthy replica's workers to stop busy-polling ``seconds`` after a message.

        Only a speed-up: a server that cannot take it (an attached one without
        ``VLLM_SERVER_DEV_MODE=1``, which weight updates need as well) keeps serving.
        """
        try:
            answer = await self._post_json(r, "/collective_rpc", {
                "method": IDLE_METHOD, "kwargs": {"seconds": seconds}})
        except (ServerError, *RETRYABLE_ERRORS):
            r.healthy = True  # it answered /health; a request that fails is retried as always
            return
        r.idle_readers = sum(int(n) for n in answer.get("results", []))  # type: ignore[union-attr]

    async def _supervise(self) -> None:
        """Restart started servers that died (when ``auto_restart``)."""
        while True:
            await asyncio.sleep(1.0)
            for i, r in enumerate(self.replicas):
                if r.process is None or r.process.poll() is None:
                    continue
                r.healthy = False
                if not self.auto_restart:
                    continue
                _stop_process(r)
                r.restarts += 1
                self.stats["restarts"] += 1
                self._spawn(i)
                try:
                    await self._wait_ready(r)
                except BackendError:
                    continue  # seen dead again on the next round and restarted

    def kill_replica(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a started replica's whole process group (for fault drills)."""
        r = self.replicas[index]
        if r.process is None:
            raise BackendError(f"replica {index} ({r.url}) was not started by this backend")
        r.healthy = False
        os.killpg(r.process.pid, sig)

    # -- routing -------------------------------------------------------------------

    def _pick(self, session_id: str | None) -> int:
        """Replica index for a request: the session's own one while it is healthy,
        else the healthy replica with the fewest requests in flight."""
        i = self._router.sticky(session_id, lambda j: self.replicas[j].healthy)
        self.stats["rerouted"] = self._router.rerouted
        if i is not None:
            return i
        candidates = [i for i, r in enumerate(self.replicas) if r.healthy] or list(
            range(len(self.replicas))
        )
        return self._router.assign(session_id, candidates, lambda j: self.replicas[j].in_flight)

    # -- generation ----------------------------------------------------------------

    async def _generate(
        self, prompt: list[int], sampling: SamplingParams, session_id: str | None
    ) -> Generation:
        self.stats["requests"] += 1
        body = {
            "token_ids": prompt,
            "sampling_params": {
                "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "stop": list(sampling.stop),
                "seed": sampling.seed,
                "logprobs": 0,
                "detokenize": bool(sampling.stop),
            },
            "output_mode": "tokens",
            "stream": False,
        }
        base_id = f"{session_id or 'req'}-{uuid.uuid4().hex}"
        attempt = 0
        async for retry in self._retrying():
            with retry:
                attempt += 1
                i = self._pick(session_id)
                data = await self._post_json(
                    self.replicas[i], "/inference/v1/generate",
                    {**body, "request_id": f"{base_id}-{attempt}"},
                )  # fmt: skip
        return _parse_generation(data)

    def _retrying(self) -> tenacity.AsyncRetrying:
        def count(state: tenacity.RetryCallState) -> None:
            self.stats["retries"] += 1

        return tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception(_retryable),
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
            stop=tenacity.stop_after_delay(self.retry_timeout),
            before_sleep=count,
            reraise=True,
        )

    async def _post_json(
        self, r: Replica, path: str, body: dict[str, object] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, object]:  # fmt: skip
        r.in_flight += 1
        try:
            resp = await self._client.post(f"{r.url}{path}", json=body, params=params)
        except RETRYABLE_ERRORS:
            r.healthy = False
            raise
        finally:
            r.in_flight -= 1
        if resp.status_code >= 400:
            if resp.status_code >= 500:
                r.healthy = False
            raise ServerError(
                resp.status_code,
                f"{r.url}{path} answered {resp.status_code}: {resp.text[:500]}",
            )
        r.healthy = True
        if not resp.content:
            return {}
        return resp.json()  # type: ignore[no-any-return]

    # -- weights -------------------------------------------------------------------

    async def update_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Load ``state_dict`` into every replica; see the interface docstring.

        Each replica is paused in ``"wait"`` mode (its in-flight requests finish with
        the old weights), reloads the checkpoint, drops its prefix cache, resumes.
        """
        with weights_checkpoint(state_dict, self.model_path, parent=self.weights_dir) as path:
            await self._loop.run(self._reload_all(path))
        self.policy_version = version

    async def _reload_all(self, path: Path) -> None:
        await asyncio.gather(*(self._reload(r, path) for r in self.replicas))

    async def _reload(self, r: Replica, path: Path) -> None:
        async for retry in self._retrying():
            with retry:
                await self._post_json(r, "/pause", params={"mode": "wait"})
                try:
                    await self._post_json(
                        r, "/collective_rpc",
                        {"method": self._reload_method, "kwargs": {"weights_path": str(path)}},
                    )  # fmt: skip
                    await self._post_json(r, "/reset_prefix_cache")
                finally:
                    await self._post_json(r, "/resume")

    # -- lifecycle -----------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop the supervisor and close the connections."""
        supervisor = getattr(self, "_supervisor", None)
        if supervisor is not None:
            supervisor.cancel()
        client = getattr(self, "_client", None)
        if client is not None:
            await client.aclose()

    def _after_stop(self) -> None:
        """Stop the servers this backend started."""
        for r in self.replicas:
            _stop_process(r)


def _retryable(e: BaseException) -> bool:
    if isinstance(e, RETRYABLE_ERRORS):
        return True
    return isinstance(e, ServerError) and e.status >= 500


def _parse_generation(data: Mapping[str, object]) -> Generation:
    """A ``/inference/v1/generate`` answer (one choice, ``logprobs=0``) → Generation."""
    try:
        choice = data["choices"][0]  # type: ignore[index]
        token_ids = [int(t) for t in choice["token_ids"]]
        content = choice["logprobs"]["content"]
        logprobs = [float(c["logprob"]) for c in content]
        reason = choice["finish_reason"]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BackendError(
            f"unexpected /inference/v1/generate answer ({type(e).__name__}: {e}): {str(data)[:300]}"
        ) from e
    finish = reason if reason in ("stop", "length") else "abort"
    return Generation(token_ids=token_ids, logprobs=logprobs, finish_reason=finish)


def _stop_process(r: Replica) -> None:
    """Kill a started replica's process group and reap it."""
    if r.process is not None:
        if r.process.poll() is None:
            try:
                os.killpg(r.process.pid, signal.SIGTERM)
                r.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(r.process.pid, signal.SIGKILL)  # children the server left behind
        except ProcessLookupError:
            pass
        r.process.wait()
    if r._log is not None:
        r._log.close()
        r._log = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
