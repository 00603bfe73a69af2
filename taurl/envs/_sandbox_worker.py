"""The sandbox's worker process (a "zygote"): started once, forks one child per execution.

This file runs as a standalone script under ``python -I -S`` (isolated mode, no
site-packages), so it imports only the standard library and nothing of taurl. It is
started by :class:`taurl.envs.sandbox.Sandbox`, never imported by it. It stays one
self-contained file, whatever its length, because inside the sandbox the taurl package
is hidden and the script is run by path, so it has no sibling modules to import.

Why a zygote: starting a fresh interpreter costs ~47 ms on the project's machines, which
caps a 2-core host near 40 executions/s. Forking an interpreter that is already running
costs ~1 ms, so each execution pays only for ``fork`` + the user's code.

Isolation, strongest first (each layer is applied when the kernel allows it, and the
layers obtained are reported to the host in the handshake line):

* ``netns``   — the worker enters a new, empty network namespace (no interfaces but a
  down loopback): any ``connect`` fails with "Network is unreachable".
* ``ipcns``   — a new IPC namespace: SysV shared memory, semaphores and message queues
  are private to the worker and vanish with it.
* ``mountns`` — a private mount namespace where every mount is remounted read-only and
  ``nosuid``, a fresh size-limited tmpfs covers ``/tmp`` (each execution gets its own
  directory in it), and empty unreadable tmpfs cover ``/run`` (host unix sockets) and the
  ``hidden_paths`` (the taurl package, which holds Code-v0's hidden tests).
* ``uid``     — each child drops to an unprivileged uid/gid owned by this worker alone;
  ``RLIMIT_NPROC`` then bounds its processes (the kernel does not enforce it for root),
  and after each execution a helper running as that uid does ``kill(-1, SIGKILL)``,
  which reaches every process the code left behind, even ones that left the group.
* ``pidns``   — each run gets a PID namespace and its own ``/proc``: the code sees and can
  signal only its own processes, and all of them die when the run ends.
* ``userns``  — not root: the namespaces above are built inside a user namespace (uid 0
  inside = the user outside); the code runs with every capability dropped.
* ``memcg``   — a memory cgroup per worker (v1 ``memory`` or v2), its limit set to each
  run's ``memory_mb``: the total of the run and every process it forks is bounded, not
  only each process's address space.
* ``guard``   — where a layer is missing, a ``sys.addaudithook`` guard in the child
  refuses sockets, writes outside the temp dir, and process creation. It is an
  in-process guard: native code (e.g. ctypes, which it also refuses) could bypass it.

Protocol: one JSON object per line on stdin (a request), one JSON object per line on
stdout (the reply). The first line the worker writes is the handshake
``{"isolation": [...layers...]}``.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import select
import signal
import sys
import tempfile
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
#: Mount options that must be repeated on a read-only remount (the kernel refuses to
#: drop a "locked" flag inherited from a more privileged namespace).
MOUNT_FLAG_OPTIONS = {
    "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _blocked_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that other users cannot traverse, if any."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for depth in range(1, len(parts) + 1):
        ancestor = os.sep + os.sep.join(parts[:depth])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _expose_stdlib() -> None:
    """Make the interpreter's stdlib readable for the sandbox uid, hiding its neighbours.

    An interpreter installed under e.g. ``/root/.pyenv`` sits behind a ``0700`` home: the
    unprivileged child could not import ``json``. The stdlib is bind-mounted back into an
    empty tmpfs laid over that home, so the rest of the home stays invisible.
    """
    prefix = os.path.realpath(sys.base_prefix)
    blocked = _blocked_ancestor(prefix)
    if blocked is None:
        return
    staging = tempfile.mkdtemp(prefix="stdlib-", dir="/tmp")
    _mount(prefix, staging, None, MS_BIND | MS_REC, None)
    _mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(prefix, mode=0o755, exist_ok=True)
    _mount(staging, prefix, None, MS_BIND | MS_REC, None)
    _libc.umount2(staging.encode(), MNT_DETACH)
    os.rmdir(staging)


def _enter_namespaces(tmpfs_mb: int, hidden: list[str]) -> list[str]:
    """Enter new network + mount namespaces; make everything read-only but a fresh /tmp,
    and cover each folder in ``hidden`` with an empty tmpfs only root may open."""
    layers = ["netns", "ipcns", "mountns"]
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC) != 0:
        layers.remove("ipcns")
        if _libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
            return []
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmpfs_mb}m,mode=0755")
    _expose_stdlib()
    # /run holds the host's unix sockets (a database, dbus): a socket file is reachable
    # by path from any network namespace, so the folder is covered like the hidden ones.
    for path in [*hidden, "/run", "/var/run"]:
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=000")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        target = fields[4].replace("\\040", " ")
        if target in ("/proc", "/tmp") or target.startswith("/proc/"):
            continue  # /tmp holds the runs' directories; procfs cannot hold files
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID  # no setuid program gains root
        for opt in fields[5].split(","):
            flags |= MOUNT_FLAG_OPTIONS.get(opt, 0)
        try:
            _mount(None, target, None, flags, None)
        except OSError:
            # Fine if it is read-only already or went away under us; a mount the code
            # could still write to means this layer does not hold: say so, do not claim it.
            try:
                writable = not os.statvfs(target).f_flag & os.ST_RDONLY
            except OSError:
                continue
            if writable:
                raise
    return layers


def _enter_user_namespace() -> bool:
    """As an unprivileged user: become root of a new user namespace (uid 0 inside = this
    user outside), which may then create the network, IPC, mount and PID namespaces."""
    uid, gid = os.geteuid(), os.getegid()
    if _libc.unshare(CLONE_NEWUSER) != 0:
        return False  # user namespaces are disabled here: the guard stays the only layer
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return True


def _drop_capabilities() -> None:
    """Give up every capability for good (bounding, ambient, effective, permitted sets).

    Root of a user namespace may remount the read-only tree writable; its code runs
    without any capability, so it cannot.
    """
    for cap in range(64):
        _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: ignored
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _probe_pid_namespace() -> bool:
    """Whether a run can get a PID namespace of its own (with its own /proc): launch a
    trivial run the way :func:`_execute` does and check it ran as the namespace's pid 2."""
    status_r, status_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(status_r)
        _launch_in_pid_namespace(status_w, lambda: os._exit(0 if os.getpid() == 2 else 1))
    os.close(status_w)
    launched = os.waitpid(pid, 0)[1] == 0
    reported = os.read(status_r, 64)
    os.close(status_r)
    return launched and bool(reported) and os.waitstatus_to_exitcode(int(reported)) == 0


def _launch_in_pid_namespace(status_fd: int, run_child) -> None:
    """In the forked child: give the run a PID namespace; never returns.

    This process makes the namespace; its child is the namespace's init, which mounts a
    /proc showing only the run's processes, starts the code in a grandchild (a normal
    process: init ignores signals it has no handler for, SIGXCPU included), reaps, and
    writes the code's wait status to ``status_fd``. When init exits the kernel kills
    everything left in the namespace; when this process is killed (timeout), init dies
    with it (PR_SET_PDEATHSIG) and the namespace with it.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if _libc.unshare(CLONE_NEWPID) != 0:
            os._exit(125)
        init = os.fork()
        if init == 0:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if _libc.unshare(CLONE_NEWNS) != 0:
                os._exit(125)
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            code = os.fork()
            if code == 0:
                run_child()
            while True:
                reaped, status = os.waitpid(-1, 0)
                if reaped == code:
                    break
            os.write(status_fd, str(status).encode())
            os._exit(0)
        os._exit(0 if os.waitpid(init, 0)[1] == 0 else 125)
    except BaseException:  # noqa: BLE001 - reported as a failed setup
        os._exit(125)


def _install_guard(
    workdir: str, block_net: bool, block_fs: bool, block_procs: bool, hidden: list[str]
) -> None:
    """In-process fallback: an audit hook that refuses what the kernel layers could not."""
    workdir = os.path.realpath(workdir)
    hidden = [os.path.realpath(h) for h in hidden]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    proc_events = {
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.exec",
        "os.spawn",
        "os.system",
        "subprocess.Popen",
        "os.kill",
        "os.killpg",
        "ctypes.dlopen",
        "ctypes.dlsym",
    }
    fs_events = {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.utime",
        "shutil.rmtree",
    }

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor: it was checked when opened
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        real = os.path.realpath(path)  # relative paths resolve against the current cwd
        return real == workdir or real.startswith(workdir + os.sep) or real == os.devnull

    def is_hidden(path: object) -> bool:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str):
            return False
        real = os.path.realpath(path)
        return any(real == h or real.startswith(h + os.sep) for h in hidden)

    def hook(event: str, args: tuple) -> None:
        if hidden and event in ("open", "os.listdir", "os.scandir") and args and is_hidden(args[0]):
            raise PermissionError(f"sandbox: {args[0]} is hidden from sandboxed code")
        if block_net and event.startswith("socket."):
            raise PermissionError(f"sandbox: network access is disabled ({event})")
        if block_procs and event in proc_events:
            raise PermissionError(f"sandbox: {event} is disabled")
        if block_fs and event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside {workdir} is disabled: {path}")
        if block_fs and event in fs_events:
            paths = [a for a in args if isinstance(a, (str, bytes))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside {workdir} is disabled")

    sys.addaudithook(hook)


class _MemoryCgroup:
    """A memory cgroup of this worker's own: the total memory of a run and all it forks.

    ``RLIMIT_AS`` bounds each process, so eight forks may hold eight times the limit; the
    cgroup bounds their sum. Created (cgroup v1 ``memory`` or v2 with the memory
    controller) before the worker enters its mount namespace, where ``/sys/fs/cgroup`` is
    read-only: the files are opened first and used through those descriptors.
    """

    def __init__(self, name: str) -> None:
        with open("/proc/self/cgroup") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
        v1 = [path for _, ctrls, path in entries if "memory" in ctrls.split(",")]
        v2 = [path for hid, ctrls, path in entries if hid == "0" and ctrls == ""]
        if v1:
            parent = "/sys/fs/cgroup/memory" + v1[0]
            limit, events = "memory.limit_in_bytes", "memory.oom_control"
        elif v2:
            parent, limit, events = "/sys/fs/cgroup" + v2[0], "memory.max", "memory.events"
        else:
            raise OSError("no memory cgroup")
        self.path = os.path.join(parent.rstrip("/"), name)
        os.mkdir(self.path, 0o700)
        try:
            self._limit = os.open(os.path.join(self.path, limit), os.O_WRONLY)
            self._procs = os.open(os.path.join(self.path, "cgroup.procs"), os.O_WRONLY)
            self._events = os.open(os.path.join(self.path, events), os.O_RDONLY)
            self._parent = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            os.rmdir(self.path)  # e.g. v2 without the memory controller delegated here
            raise
        self.name = name

    def set_limit(self, nbytes: int) -> None:
        os.write(self._limit, str(nbytes).encode())

    def join(self) -> None:
        """In the child, while still root: move this process into the cgroup."""
        os.write(self._procs, str(os.getpid()).encode())

    def oom_kills(self) -> int:
        text = os.pread(self._events, 4096, 0).decode()
        found = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        return int(found.group(1)) if found else 0

    def remove(self) -> None:
        for fd in (self._limit, self._procs, self._events):
            os.close(fd)
        try:
            os.rmdir(self.name, dir_fd=self._parent)  # the host's mount, not the read-only copy
        except OSError:
            pass  # a straggler still dying; the host removes the folder after the worker
        os.close(self._parent)


def _run_child(
    req: dict, cfg: dict, workdir: str, io_dir: str, layers: list[str], memcg: _MemoryCgroup | None
) -> None:
    """In the forked child: confine the process, then run the code. Never returns."""
    try:
        os.setsid()
        if memcg is not None:
            memcg.join()
        fds = [
            os.open(os.path.join(io_dir, "stdin"), os.O_RDONLY),
            os.open(os.path.join(io_dir, "stdout"), os.O_WRONLY | os.O_TRUNC),
            os.open(os.path.join(io_dir, "stderr"), os.O_WRONLY | os.O_TRUNC),
        ]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # Closes the worker's protocol pipes too: the code must not talk to the host.
        os.closerange(3, 65536)
        os.chdir(workdir)
        lim = req["limits"]
        mb = 1024 * 1024
        for res, value in (
            (resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1)),
            (resource.RLIMIT_AS, (lim["memory_mb"] * mb,) * 2),
            (resource.RLIMIT_NPROC, (lim["max_processes"],) * 2),
            (resource.RLIMIT_FSIZE, (lim["max_file_mb"] * mb,) * 2),
            (resource.RLIMIT_NOFILE, (lim["max_open_files"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(res, value)
        # Neither setuid binaries nor file capabilities raise this process's privileges.
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if "userns" in layers:
            _drop_capabilities()
        if "uid" in layers:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
            # Set after setuid, which clears it: the child dies with its worker.
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.environ.clear()
        os.environ.update(
            {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        )
        tempfile.tempdir = workdir
        sys.dont_write_bytecode = True  # imports must not try to write __pycache__
        sys.argv = ["<sandbox>"]
        if "guard" in layers:
            _install_guard(
                workdir,
                block_net="netns" not in layers,
                # A root child could remount the read-only tree: mountns needs uid.
                block_fs="mountns" not in layers or "uid" not in layers,
                block_procs="uid" not in layers,
                hidden=[] if {"mountns", "uid"} <= set(layers) else cfg["hidden_paths"],
            )
        code = compile(req["code"], "<sandbox>", "exec")
    except BaseException as exc:  # noqa: BLE001 - reported to the host as a failed run
        os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
        os._exit(125)
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 - the point
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - the user's exception is the run's result
        # Skip this frame: the traceback starts at the user's code, as with `python file`.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - e.g. the file-size limit hit while flushing
        status = status or 1
    os._exit(status & 0xFF)


def _kill_uid(uid: int) -> None:
    """Kill every process owned by ``uid`` (a fork bomb's leftovers), from a child as ``uid``."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setuid(uid)
            # kill(-1) as root would kill the whole machine: refuse unless the drop worked.
            if os.getuid() != uid or os.geteuid() != uid or uid == 0:
                os._exit(1)
            for _ in range(100):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
                except PermissionError:
                    break
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _wait(pid: int, deadline: float) -> int | None:
    """Wait for ``pid`` until ``deadline``; its wait status, or None on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if pidfd is not None:
                os.close(pidfd)
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            if pidfd is not None:
                os.close(pidfd)
            return None
        if pidfd is not None:
            select.select([pidfd], [], [], left)
        else:
            time.sleep(min(left, 0.002))


def _reap_all(deadline: float) -> None:
    """Reap the killed processes: the child's and those re-parented to this worker.

    The worker is a child subreaper, so every process the code started ends up as its
    child; after the kill they are all dying, and waiting for them (up to ``deadline``)
    means none lingers as a zombie into the next execution.
    """
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)


def remove_tree(top: str) -> None:
    """Delete ``top`` and everything in it, without recursion and without long paths.

    The code may nest directories thousands deep (``shutil.rmtree`` recurses and would
    raise RecursionError, crashing the worker) or lock itself out with ``chmod 000``.
    This walks down with ``chdir`` one level at a time, so no path grows long and no
    descriptor is held per level. Errors are ignored: it removes what it can.
    """
    try:
        home = os.open(".", os.O_RDONLY)
    except OSError:
        return
    names: list[str] = []
    try:
        os.chdir(top)
        while True:
            sub = None
            try:
                entries = list(os.scandir("."))
            except OSError:
                entries = []
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.name
                    break
                try:
                    os.unlink(entry.name)
                except OSError:
                    pass
            if sub is not None:
                try:
                    os.chmod(sub, 0o700)  # a directory the code made unreadable
                    os.chdir(sub)
                    names.append(sub)
                    continue
                except OSError:
                    try:
                        os.rmdir(sub)  # cannot enter it: at least try to drop it
                    except OSError:
                        break  # give up on this tree rather than loop
                    continue
            if not names:
                break
            os.chdir("..")
            try:
                os.rmdir(names.pop())
            except OSError:
                break
    except OSError:
        pass
    finally:
        os.fchdir(home)
        os.close(home)
    try:
        os.rmdir(top)
    except OSError:
        pass


def _read(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _execute(
    req: dict, cfg: dict, root: str, io_dir: str, layers: list[str], memcg: _MemoryCgroup | None
) -> dict:
    lim = req["limits"]
    if memcg is not None:
        memcg.set_limit(lim["memory_mb"] * 1024 * 1024)
        oom_before = memcg.oom_kills()
    workdir = tempfile.mkdtemp(prefix="run-", dir=root)
    if "uid" in layers:
        os.chown(workdir, cfg["uid"], cfg["gid"])
    os.chmod(workdir, 0o700)
    with open(os.path.join(io_dir, "stdin"), "w") as f:
        f.write(req["stdin"])
    start = time.monotonic()
    status_r, status_w = os.pipe() if "pidns" in layers else (-1, -1)
    pid = os.fork()
    if pid == 0:
        if "pidns" in layers:
            os.close(status_r)
            _launch_in_pid_namespace(
                status_w, lambda: _run_child(req, cfg, workdir, io_dir, layers, memcg)
            )
        _run_child(req, cfg, workdir, io_dir, layers, memcg)
    status = _wait(pid, start + req["timeout_s"])
    timed_out = status is None
    if timed_out:
        try:
            os.killpg(pid, signal.SIGKILL)  # without a PID namespace the child leads a group
        except ProcessLookupError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)  # with one, its init dies with this process
        except ProcessLookupError:
            pass
        status = os.waitpid(pid, 0)[1]
    duration = time.monotonic() - start
    if "pidns" in layers:
        os.close(status_w)
        reported = os.read(status_r, 64)  # the code's own wait status, written by init
        os.close(status_r)
        if reported and not timed_out:
            status = int(reported)
    if "uid" in layers:
        _kill_uid(cfg["uid"])
    else:
        try:
            os.killpg(pid, signal.SIGKILL)  # leftovers of the group, if any
        except (ProcessLookupError, PermissionError):
            pass
    _reap_all(deadline=time.monotonic() + 2.0)
    remove_tree(workdir)
    stdout, out_cut = _read(os.path.join(io_dir, "stdout"), lim["max_output_bytes"])
    stderr, err_cut = _read(os.path.join(io_dir, "stderr"), lim["max_output_bytes"])
    exit_code = os.waitstatus_to_exitcode(status)
    killed = None
    if timed_out:
        killed = "timeout"
    elif exit_code < 0:
        sig = -exit_code
        killed = "cpu_limit" if sig == signal.SIGXCPU else f"signal {signal.Signals(sig).name}"
        if sig == signal.SIGKILL and memcg is not None and memcg.oom_kills() > oom_before:
            killed = "memory_limit"  # the kernel's OOM killer, inside this run's cgroup
    elif exit_code == 125:
        killed = "setup_failed"
    return {
        "stdout": stdout,
        "stderr": stderr,
        "exit_code": None if timed_out else exit_code,
        "timed_out": timed_out,
        "killed_reason": killed,
        "duration_s": duration,
        "output_truncated": out_cut or err_cut,
    }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    layers: list[str] = []
    memcg: _MemoryCgroup | None = None
    if cfg["mode"] == "strongest" and os.geteuid() == 0:
        try:
            memcg = _MemoryCgroup(f"taurl-sandbox-{os.getpid()}")
        except OSError:
            memcg = None  # no cgroup to create here: each process keeps its RLIMIT_AS
        try:
            layers += _enter_namespaces(cfg["tmpfs_mb"], cfg["hidden_paths"])
        except OSError:
            layers = []  # half-entered namespaces still leave the host's mounts intact
        if layers and _probe_pid_namespace():
            layers.append("pidns")
        try:
            os.setgroups([])  # probe: CAP_SETGID/CAP_SETUID are needed for the uid layer
            layers.append("uid")
        except PermissionError:
            pass
    elif cfg["mode"] == "strongest" and _enter_user_namespace():
        # Not root: the same namespaces inside a user namespace, one uid only (no uid
        # layer); the PID namespace then keeps the code from signalling this user's
        # other processes, and the code runs without capabilities.
        try:
            layers += _enter_namespaces(cfg["tmpfs_mb"], cfg["hidden_paths"])
        except OSError:
            layers = []
        if layers and _probe_pid_namespace():
            layers = ["userns", *layers, "pidns"]
        else:
            layers = []  # without a PID namespace the code could signal the host's processes
    if memcg is not None and "uid" in layers:
        layers.append("memcg")
    elif memcg is not None:
        memcg.remove()  # a root child could leave the cgroup: not worth reporting
        memcg = None
    contained = {"netns", "mountns"} <= set(layers) and (
        "uid" in layers or {"userns", "pidns"} <= set(layers)
    )
    if not contained:
        layers.append("guard")
    _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    root = tempfile.mkdtemp(prefix="taurl-sandbox-")
    io_dir = tempfile.mkdtemp(prefix="io-", dir=root)
    for name in ("stdin", "stdout", "stderr"):
        open(os.path.join(io_dir, name), "w").close()
    # The code's directories live in `root`; the io files must not be writable by it.
    os.chmod(root, 0o711)
    os.chmod(io_dir, 0o700)
    inp = sys.stdin.buffer
    out = sys.stdout.buffer
    hello = {"isolation": layers, "memory_cgroup": memcg.path if memcg else None,
             "root": None if "mountns" in layers else root}  # the host's to clean after a crash
    out.write(json.dumps(hello).encode() + b"\n")
    out.flush()
    try:
        for line in inp:
            try:
                reply = _execute(json.loads(line), cfg, root, io_dir, layers, memcg)
            except OSError as exc:
                reply = {"error": f"{exc.__class__.__name__}: {exc}", "errno": exc.errno}
            out.write(json.dumps(reply).encode() + b"\n")
            out.flush()
    except BrokenPipeError:
        pass
    finally:
        remove_tree(root)
        if memcg is not None:
            memcg.remove()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
