"""Run untrusted Python code in a confined process: :class:`Sandbox`.

A :class:`Sandbox` keeps a small pool of worker processes ("zygotes", see
``taurl/envs/_sandbox_worker.py``); each execution forks a fresh child from one of them,
so it costs ~1 ms of process creation instead of a ~47 ms interpreter start. Every child
gets:

* a wall-clock timeout, after which its whole process group is killed;
* ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` and
  ``RLIMIT_NOFILE`` limits (:class:`SandboxLimits`), and no core dumps;
* a fresh temporary directory as its working directory, ``HOME`` and ``TMPDIR``, removed
  afterwards;
* a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only) and only the
  standard library (``python -I -S``);
* no network.

How strongly this holds depends on what the machine allows; :attr:`Sandbox.isolation`
names the layers that are active (detected at start, never assumed):

``netns+ipcns+mountns+pidns+uid`` (running as root, or with CAP_SYS_ADMIN + CAP_SETUID)
    The kernel enforces everything: an empty network namespace, a private IPC namespace,
    a PID namespace per run (its own ``/proc``; leftovers die with it),
    a mount namespace where the whole file tree is read-only and ``nosuid`` except a
    private tmpfs (``/run`` and the taurl package covered by unreadable empty ones), and a
    per-worker unprivileged uid no other worker on the machine holds, which makes
    ``RLIMIT_NPROC`` effective (it is not enforced for root) and lets the worker kill
    every process the code left behind. ``+memcg`` is appended where the worker could
    create a memory cgroup: ``memory_mb`` then bounds a run and all it forks together
    (``killed_reason == "memory_limit"`` when the kernel's OOM killer ended it).
    ``no_new_privs`` is set in every mode.
``userns+netns+ipcns+mountns+pidns`` (any other user, where unprivileged user
namespaces are enabled)
    The same namespaces built inside a user namespace. One uid only, so no uid layer:
    the code runs as the user with every capability dropped (it cannot remount the tree
    writable), and its PID namespace keeps it from the user's other processes.
``guard`` (where neither is possible)
    Resource limits and timeouts as above, plus an in-process audit-hook guard
    (:func:`sys.addaudithook`) that refuses sockets, writes outside the temp dir,
    process creation and ``ctypes``. It stops ordinary Python code; it is not a security
    boundary against code that reaches native calls by other means.

Mixed forms such as ``uid+guard`` appear where only some layers are available.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Self

from taurl.envs._sandbox_worker import remove_tree
from taurl.errors import ConfigError, TaurlError

_WORKER_SCRIPT = Path(__file__).with_name("_sandbox_worker.py")
#: Seconds the host waits for a worker's reply beyond the execution's own timeout,
#: before it declares the worker hung and replaces it.
_REPLY_GRACE_S = 5.0


class SandboxError(TaurlError):
    """The sandbox itself failed (a worker could not start or stopped answering)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed execution."""

    timeout_s: float = 5.0  # wall-clock seconds before the process group is killed
    cpu_s: int = 5  # CPU seconds (RLIMIT_CPU); the kernel sends SIGXCPU past it
    memory_mb: int = 256  # address-space limit in MiB (RLIMIT_AS)
    max_processes: int = 16  # processes the code may have at once (RLIMIT_NPROC, own uid)
    max_file_mb: int = 8  # largest file the code may write, in MiB (RLIMIT_FSIZE)
    max_open_files: int = 64  # open file descriptors (RLIMIT_NOFILE)
    max_output_bytes: int = 65536  # stdout and stderr are each cut to this many bytes

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"SandboxLimits.timeout_s must be > 0 seconds, got {self.timeout_s}")
        for name in ("cpu_s", "max_processes", "max_file_mb", "max_open_files"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SandboxLimits.{name} must be >= 1, got {getattr(self, name)}")
        if self.memory_mb < 64:
            raise ConfigError(
                f"SandboxLimits.memory_mb must be >= 64 (a Python interpreter needs ~30 MiB "
                f"of address space to start), got {self.memory_mb}"
            )
        if self.max_open_files < 8:
            raise ConfigError(
                f"SandboxLimits.max_open_files must be >= 8 (stdio + imports), "
                f"got {self.max_open_files}"
            )
        if self.max_output_bytes < 1:
            raise ConfigError(
                f"SandboxLimits.max_output_bytes must be >= 1, got {self.max_output_bytes}"
            )


@dataclass(frozen=True)
class SandboxResult:
    """What one execution produced."""

    ok: bool  # exited with status 0 within every limit
    stdout: str  # decoded as UTF-8 (invalid bytes replaced), cut to max_output_bytes
    stderr: str  # likewise; holds the traceback when the code raised
    exit_code: int | None  # the exit status; negative = killed by that signal; None = timeout
    timed_out: bool  # the wall-clock timeout fired
    killed_reason: str | None  # "timeout", "cpu_limit", "signal SIGKILL", ... or None
    duration_s: float  # wall-clock seconds from fork to exit
    output_truncated: bool = False  # stdout or stderr was longer than max_output_bytes


@dataclass(frozen=True)
class SandboxConfig:
    """How a :class:`Sandbox` runs its workers."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)  # per-execution default limits
    workers: int = 2  # worker processes = executions that can run at once
    isolation: Literal["strongest", "guard"] = "strongest"  # "guard" forces the fallback
    uid_base: int = 61000  # workers run code as the first free uids from here (root only)
    tmpfs_mb: int = 64  # size of the private /tmp of each worker (mount namespace only)
    # Folders the code must not read: the taurl package holds the hidden tests of
    # taurl/Code-v0 (in the mount namespace an empty, unreadable tmpfs covers each one;
    # in guard mode the audit hook refuses opening files under them).
    hidden_paths: tuple[str, ...] = (str(Path(__file__).resolve().parents[1]),)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"SandboxConfig.workers must be >= 1, got {self.workers}")
        if self.isolation not in ("strongest", "guard"):
            raise ConfigError(
                f"SandboxConfig.isolation must be 'strongest' or 'guard', got {self.isolation!r}"
            )
        if not 1000 <= self.uid_base <= 2**31 - 1024:
            raise ConfigError(
                f"SandboxConfig.uid_base must be an unused uid >= 1000, got {self.uid_base}"
            )
        if self.tmpfs_mb < 1:
            raise ConfigError(f"SandboxConfig.tmpfs_mb must be >= 1, got {self.tmpfs_mb}")


#: Every worker process is started from this one thread. The worker asks the kernel to
#: kill it when its parent dies (``PR_SET_PDEATHSIG``), and "parent" there means the
#: *thread* that forked it: a worker started from a short-lived thread (a tool call run
#: in a thread by the env's tool layer) was killed as soon as that call returned. This
#: thread lives as long as the process, so workers die with the process, not before.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="taurl-sandbox-spawn"
)

#: How many uids past ``uid_base`` are tried before giving up.
_UID_RANGE = 4096
_UID_LOCK_DIR = Path("/run/taurl-sandbox-uids" if os.path.isdir("/run") else "/tmp/taurl-sandbox-uids")


class _UidLease:
    """One sandbox uid held by this worker alone, on this machine, until :meth:`release`.

    The worker kills every process of its uid after each run (``kill(-1)`` as that uid),
    so two workers sharing a uid kill each other's runs; and code running as a uid can
    signal and inspect every process of that uid. Each worker therefore takes a uid no
    other worker, of any :class:`Sandbox` in any process, holds: an exclusive ``flock`` on
    ``<lock dir>/<uid>`` (released by the kernel if the process dies).
    """

    def __init__(self, base: int) -> None:
        _UID_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        for uid in range(base, base + _UID_RANGE):
            fd = os.open(_UID_LOCK_DIR / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise SandboxError(
            f"no free sandbox uid in {base}..{base + _UID_RANGE - 1}: {_UID_RANGE} sandbox "
            "workers are running on this machine; close some Sandboxes (or envs owning one)"
        )

    def release(self) -> None:
        if self._fd >= 0:
            # Unlock explicitly: a process forked from this one shares the descriptor.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class _Worker:
    """One zygote process and the pipes to it. Used by one thread at a time."""

    def __init__(self, config: SandboxConfig) -> None:
        # A uid is only used when the worker can switch to it (root); leasing one anyway is
        # cheap and keeps the two modes alike.
        self.lease = _UidLease(config.uid_base) if os.geteuid() == 0 else None
        uid = self.lease.uid if self.lease else config.uid_base
        cfg = {"mode": config.isolation, "uid": uid, "gid": uid, "tmpfs_mb": config.tmpfs_mb,
               "hidden_paths": list(config.hidden_paths)}
        try:
            self.proc = _SPAWNER.submit(
                subprocess.Popen,
                [sys.executable, "-I", "-S", str(_WORKER_SCRIPT), json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            ).result()
        except BaseException:
            self._release()
            raise
        self._buffer = b""
        self.closed = False
        hello = self._read_line(deadline=time.monotonic() + 30)
        if hello is None:
            self.kill()
            raise SandboxError(
                f"sandbox worker {_WORKER_SCRIPT} did not start within 30 s "
                f"(exit status {self.proc.poll()}); run it by hand to see why"
            )
        info = json.loads(hello)
        self.layers: list[str] = info["isolation"]
        self.memory_cgroup: str | None = info.get("memory_cgroup")
        self.root: str | None = info.get("root")  # its run directories, when on the host's /tmp

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.closed = True  # end of file: the worker exited
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def execute(self, request: dict, timeout_s: float) -> dict | None:
        """Send one request; its reply, or None when the worker died or hung."""
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except (BrokenPipeError, OSError):
            return None
        line = self._read_line(deadline=time.monotonic() + timeout_s + _REPLY_GRACE_S)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        # The worker's children die with it (PR_SET_PDEATHSIG) and its private tmpfs is
        # released with its mount namespace.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        if getattr(self, "root", None):
            remove_tree(self.root)  # a killed worker leaves its directory behind otherwise
        self._remove_cgroup()
        self._release()  # the worker and its children are gone: the uid is free again

    def _remove_cgroup(self) -> None:
        """A killed worker cannot remove its memory cgroup: do it once its runs are gone."""
        path = getattr(self, "memory_cgroup", None)
        for _ in range(50):
            if path is None or not os.path.isdir(path):
                return
            try:
                os.rmdir(path)
                return
            except OSError:
                time.sleep(0.01)  # the last killed processes are still exiting

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=5)
            self._release()
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _close_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()


class Sandbox:
    """A pool of confined worker processes that run Python code; thread-safe.

    Workers start on the first :meth:`run` (or :meth:`start`) and stop on :meth:`close`
    (also at interpreter exit). Use it as a context manager to close it promptly::

        with Sandbox() as box:
            result = box.run("print(sum(range(10)))")
            assert result.ok and result.stdout == "45\\n"
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._started = False
        self._finalizer = weakref.finalize(self, _close_workers, self._all)

    def start(self) -> None:
        """Start the worker processes now (otherwise the first :meth:`run` does)."""
        with self._lock:
            if self._started:
                return
            for _ in range(self.config.workers):
                worker = _Worker(self.config)
                self._all.append(worker)
                self._idle.put(worker)
            self._started = True

    @property
    def isolation(self) -> str:
        """The isolation layers active, e.g. ``"netns+ipcns+mountns+pidns+uid+memcg"``."""
        self.start()
        return "+".join(self._all[0].layers)

    def protections(self) -> dict[str, str]:
        """What keeps the code from each thing, given the layers this machine allowed.

        Keys are the threats; a value starting with ``kernel:`` is enforced by the kernel,
        ``guard:`` by the in-process audit hook (stops ordinary Python, not a boundary),
        ``none:`` means nothing does.
        """
        layers = set(self.isolation.split("+"))
        confined_fs = "mountns" in layers and bool(layers & {"uid", "userns"})
        return {
            "network": "kernel: empty network namespace" if "netns" in layers
            else "guard: socket calls refused",
            "writing files outside the run's directory": "kernel: read-only, nosuid mount "
            "namespace" if confined_fs else "guard: opening for writing refused",
            "reading the taurl package (Code-v0's hidden tests)": "kernel: covered by an "
            "unreadable tmpfs" if confined_fs else "guard: opening refused",
            "host unix sockets (/run)": "kernel: /run covered by an unreadable tmpfs"
            if confined_fs else "guard: socket calls refused",
            "seeing or signalling other processes": "kernel: a PID namespace per run"
            if "pidns" in layers else "kernel: a uid of its own" if "uid" in layers
            else "guard: process creation and kill refused",
            "SysV shared memory and semaphores": "kernel: IPC namespace" if "ipcns" in layers
            else "none: shared with the host",
            "processes left running after the run": "kernel: the PID namespace ends with "
            "the run" if "pidns" in layers else "kernel: every process of its uid killed"
            if "uid" in layers else "guard: process creation refused",
            "number of processes": "kernel: RLIMIT_NPROC of its own uid" if "uid" in layers
            else "kernel: RLIMIT_NPROC in its user namespace" if "userns" in layers
            else "guard: process creation refused",
            "total memory of a run and its forks": "kernel: memory cgroup" if "memcg" in layers
            else "kernel: RLIMIT_AS per process only (forks each get the limit)",
            "gaining privileges (setuid programs)": "kernel: no_new_privs"
            + (", capabilities dropped" if "userns" in layers else ""),
            "CPU time, wall-clock time, file size, open files": "kernel: rlimits and a "
            "wall-clock kill",
        }

    def run(self, code: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
        """Run ``code`` as a Python program in a fresh confined child process.

        Args:
            code: Python source, run as ``__main__``.
            stdin: text the program reads on standard input.
            limits: this execution's limits; defaults to the sandbox's ``config.limits``.

        Returns:
            The :class:`SandboxResult`; a program that fails, times out or hits a limit
            is a result with ``ok=False``, never an exception.

        Raises:
            SandboxError: only when the sandbox itself is broken (a worker cannot start).
        """
        lim = limits or self.config.limits
        self.start()
        request = {"code": code, "stdin": stdin, "timeout_s": lim.timeout_s, "limits": asdict(lim)}
        worker = self._idle.get()
        try:
            reply = worker.execute(request, lim.timeout_s)
            if reply is None or "error" in reply:
                if reply is not None:
                    detail, hung = reply["error"], False
                elif worker.closed or worker.proc.poll() is not None:
                    try:
                        status = worker.proc.wait(timeout=2)
                    except subprocess.TimeoutExpired:
                        status = "unknown"
                    detail, hung = f"the worker crashed, exit status {status}", False
                else:
                    detail, hung = "worker stopped answering", True
                worker = self._replace(worker)
                return SandboxResult(
                    ok=False,
                    stdout="",
                    stderr=f"sandbox: execution aborted ({detail}); the worker was restarted",
                    exit_code=None,
                    timed_out=hung,
                    killed_reason="sandbox_error",
                    duration_s=lim.timeout_s if hung else 0.0,
                )
        finally:
            self._idle.put(worker)
        return SandboxResult(ok=reply["exit_code"] == 0 and not reply["timed_out"], **reply)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        index = self._all.index(worker)
        fresh = _Worker(self.config)
        self._all[index] = fresh
        return fresh

    def close(self) -> None:
        """Stop every worker process. The sandbox can be started again afterwards."""
        with self._lock:
            _close_workers(self._all)
            self._all.clear()
            self._idle = queue.Queue()
            self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
