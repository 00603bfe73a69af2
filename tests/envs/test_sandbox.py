"""The code sandbox: results, limits, and the attacks it must contain (run for real)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from taurl.envs.sandbox import Sandbox, SandboxConfig, SandboxLimits

# Tight limits keep the attacks cheap; each must still end within them.
LIMITS = SandboxLimits(timeout_s=3.0, cpu_s=2, memory_mb=128, max_processes=8, max_file_mb=1)


def _namespaces_available() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        probe = ["unshare", "-n", "-m", "true"]
        return subprocess.run(probe, check=False, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module", params=["strongest", "guard"])
def box(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig(limits=LIMITS, isolation=request.param)) as sandbox:
        yield sandbox


def test_protections_say_what_enforces_each_item(box: Sandbox) -> None:
    report = box.protections()
    assert len(report) >= 10 and all(
        v.split(":")[0] in ("kernel", "guard", "none") for v in report.values()), report
    if box.isolation == "guard":
        assert report["network"].startswith("guard:")
        assert report["total memory of a run and its forks"].startswith("kernel: RLIMIT_AS")
    elif _namespaces_available():
        weak = {k: v for k, v in report.items() if not v.startswith("kernel:")}
        assert not weak, weak  # root: the kernel enforces every item


def _alive(box: Sandbox) -> None:
    result = box.run("print('alive')")
    assert result.ok and result.stdout == "alive\n", result


def test_isolation_reports_what_is_active(box: Sandbox) -> None:
    if box.config.isolation == "guard":
        assert box.isolation == "guard"
    elif _namespaces_available():
        layers = box.isolation.split("+")
        assert {"netns", "ipcns", "mountns", "pidns", "uid"} <= set(layers), layers
        assert "guard" not in layers  # memcg too where a cgroup can be made
    else:
        assert "guard" in box.isolation


def test_runs_code_with_stdin_and_reports_exit_status(box: Sandbox) -> None:
    result = box.run("import sys\nprint(sys.stdin.read().upper(), end='')", stdin="hello")
    assert result.ok and result.stdout == "HELLO" and result.exit_code == 0 and not result.timed_out
    failed = box.run("def f():\n    raise ValueError('boom')\nf()")
    assert not failed.ok and failed.exit_code == 1 and failed.killed_reason is None
    assert "ValueError: boom" in failed.stderr and 'File "<sandbox>", line 3' in failed.stderr
    assert "_sandbox_worker" not in failed.stderr  # the traceback starts at the user's code
    assert box.run("import sys; sys.exit(3)").exit_code == 3


def test_each_run_gets_a_fresh_temp_dir_and_a_scrubbed_environment(box: Sandbox) -> None:
    first = box.run("import os\nopen('note.txt', 'w').write('x')\nprint(os.getcwd())")
    assert first.ok, first
    second = box.run("import os\nprint(os.path.exists('note.txt'), os.getcwd())")
    assert second.ok and second.stdout.split()[0] == "False"
    assert second.stdout.split()[1] != first.stdout.strip()
    os.environ["TAURL_SECRET_FOR_TEST"] = "leak"
    try:
        env = box.run("import os\nprint(sorted(os.environ))")
    finally:
        del os.environ["TAURL_SECRET_FOR_TEST"]
    assert env.ok and "TAURL_SECRET_FOR_TEST" not in env.stdout
    assert env.stdout.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


def test_output_is_cut_and_file_size_is_limited(box: Sandbox) -> None:
    small = SandboxLimits(max_output_bytes=100)
    result = box.run("print('x' * 10000)", limits=small)
    assert result.ok and len(result.stdout) == 100 and result.output_truncated
    big_file = box.run("open('big', 'wb').write(b'0' * (2 * 1024 * 1024))")
    assert not big_file.ok and "File too large" in big_file.stderr


def test_infinite_loop_is_killed_at_the_wall_clock_timeout(box: Sandbox) -> None:
    start = time.monotonic()
    result = box.run("import time\nwhile True:\n    time.sleep(0.01)")  # sleeps: no CPU limit hit
    elapsed = time.monotonic() - start
    assert not result.ok and result.timed_out and result.killed_reason == "timeout"
    assert result.exit_code is None
    assert LIMITS.timeout_s <= elapsed < LIMITS.timeout_s + 2
    _alive(box)


def test_busy_loop_hits_the_cpu_limit(box: Sandbox) -> None:
    result = box.run("while True:\n    pass", limits=SandboxLimits(timeout_s=10, cpu_s=1))
    assert not result.ok and not result.timed_out and result.killed_reason == "cpu_limit"
    assert result.duration_s < 5
    _alive(box)


def test_memory_bomb_fails_within_the_memory_limit(box: Sandbox) -> None:
    result = box.run("chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 * 1024))")
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr
    _alive(box)


def test_fork_bomb_is_contained(box: Sandbox) -> None:
    bomb = "import os\nwhile True:\n    os.fork()"
    start = time.monotonic()
    result = box.run(bomb)
    assert not result.ok
    assert time.monotonic() - start < LIMITS.timeout_s + 5
    if "uid" in box.isolation:
        # RLIMIT_NPROC stopped it: fork() failed with EAGAIN, well before the timeout.
        assert (
            "BlockingIOError" in result.stderr
            or "Resource temporarily unavailable" in result.stderr
        )
        assert _processes_of_uid(box.config.uid_base) == []
    else:
        assert "PermissionError: sandbox: os.fork is disabled" in result.stderr
    _alive(box)


def test_leftover_processes_are_killed(box: Sandbox) -> None:
    if "uid" not in box.isolation:
        pytest.skip("process creation is refused outright by the guard")
    # A child that leaves the process group and outlives its parent.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    result = box.run(code)
    assert result.ok and result.stdout == "parent done\n"
    assert _processes_of_uid(box.config.uid_base) == []


def test_writing_outside_the_temp_dir_fails(box: Sandbox) -> None:
    target = Path(f"/tmp/taurl-escape-{uuid.uuid4().hex}")
    repo_target = Path(__file__).with_name(f"escape-{uuid.uuid4().hex}")
    for path in (target, repo_target):
        result = box.run(f"open({str(path)!r}, 'w').write('escaped')")
        assert not result.ok, result
        assert "Error" in result.stderr  # PermissionError or OSError (read-only file system)
        assert not path.exists()
    _alive(box)


def test_opening_a_socket_fails(box: Sandbox) -> None:
    code = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
        "s.settimeout(2)\n"
        "s.connect(('1.1.1.1', 80))\n"
    )
    result = box.run(code)
    assert not result.ok and not result.timed_out
    assert (
        "Network is unreachable" in result.stderr or "network access is disabled" in result.stderr
    )
    _alive(box)


def test_concurrent_runs_from_threads(box: Sandbox) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: box.run(f"print({i} * {i})"), range(20)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(20)]


def test_a_dead_worker_is_replaced_and_reported_as_a_crash() -> None:
    with Sandbox(SandboxConfig(workers=1, limits=LIMITS)) as sandbox:
        sandbox._all[0].proc.kill()  # what an OOM kill of the worker would look like
        broken = sandbox.run("print(1)")
        assert not broken.ok and broken.killed_reason == "sandbox_error"
        assert not broken.timed_out and "crashed" in broken.stderr, broken  # not a timeout
        _alive(sandbox)


def test_deeply_nested_directories_are_cleaned_up(box: Sandbox) -> None:
    """shutil.rmtree recurses: 1,200 nested directories (past Python's recursion limit)
    crashed the worker on cleanup."""
    code = "import os\nfor _ in range(1200):\n    os.mkdir('d')\n    os.chdir('d')\nprint('deep')"
    result = box.run(code)
    assert result.ok and result.stdout == "deep\n", result
    locked = box.run("import os\nos.mkdir('x')\nopen('x/f', 'w').write('1')\nos.chmod('x', 0)")
    assert locked.ok, locked
    _alive(box)
    for worker in box._all:
        assert worker.proc.poll() is None  # no worker died on the way
        if worker.root:  # guard mode: its run directories are on the host's /tmp
            assert os.listdir(worker.root) == [n for n in os.listdir(worker.root) if n.startswith("io-")]


def test_remove_tree_handles_depth_and_locked_directories(tmp_path) -> None:
    from taurl.envs._sandbox_worker import remove_tree

    top = tmp_path / "top"
    cur = top
    cur.mkdir()
    fd = os.open(cur, os.O_RDONLY)
    for _ in range(2500):  # deeper than recursion or PATH_MAX allow
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    (top / "locked").mkdir()
    (top / "locked" / "f").write_text("x")
    os.chmod(top / "locked", 0)
    cwd = os.getcwd()
    remove_tree(str(top))
    assert not top.exists() and os.getcwd() == cwd


def test_a_sandbox_started_in_a_thread_outlives_the_thread() -> None:
    """Workers die with the *thread* that forked them (PR_SET_PDEATHSIG): start them from
    a short-lived thread, as the env's tool layer does, and every later run must work."""
    with Sandbox(SandboxConfig(workers=1, limits=LIMITS)) as sandbox:
        sandbox.close()  # started again, lazily, by the thread below
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(sandbox.run, "print(1)").result().stdout == "1\n"
        for i in range(3):  # the starting thread is gone now
            result = sandbox.run(f"print({i})")
            assert result.ok and result.stdout == f"{i}\n", result


@pytest.mark.skipif(not _namespaces_available(), reason="the uid layer needs root")
def test_concurrent_sandboxes_run_as_distinct_uids_and_do_not_kill_each_other() -> None:
    """Each worker kills its uid's processes after a run: a uid shared by two sandboxes
    would kill the other's run. Eight one-worker sandboxes sleep at once; all finish."""
    boxes = [Sandbox(SandboxConfig(workers=1, limits=LIMITS)) for _ in range(8)]
    try:
        code = "import os, time\ntime.sleep(0.5)\nprint(os.getuid())"
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda b: b.run(code), boxes))
        assert all(r.ok for r in results), [r.killed_reason for r in results]
        uids = {int(r.stdout) for r in results}
        assert len(uids) == 8 and min(uids) >= SandboxConfig().uid_base
    finally:
        for b in boxes:
            b.close()
    # closed sandboxes hand their uids back: a new one takes the lowest again
    with Sandbox(SandboxConfig(workers=1, limits=LIMITS)) as again:
        assert int(again.run("import os\nprint(os.getuid())").stdout) == min(uids)


def test_the_taurl_package_is_hidden_from_the_code(box: Sandbox) -> None:
    """taurl/envs/code_problems.py holds Code-v0's hidden tests: the code cannot read it."""
    import taurl.envs.code_problems as problems

    source = Path(problems.__file__).resolve()
    result = box.run(f"print(open({str(source)!r}).read()[:100])")
    assert not result.ok and "Error" in result.stderr and "PROBLEMS" not in result.stdout, result
    listing = box.run(f"import os\nprint(os.listdir({str(source.parent)!r}))")
    assert "code_problems.py" not in listing.stdout, listing
    _alive(box)


def test_no_new_privileges_and_private_ipc_and_no_host_sockets(box: Sandbox) -> None:
    status = box.run("print(open('/proc/self/status').read())")
    assert "NoNewPrivs:\t1" in status.stdout, status  # setuid programs run unprivileged
    if "ipcns" not in box.isolation:
        return
    ns = box.run("import os\nprint(os.readlink('/proc/self/ns/ipc'))")
    assert ns.ok and ns.stdout.strip() != os.readlink("/proc/self/ns/ipc")  # SysV IPC is private
    run = box.run("import os\nprint(os.listdir('/run'))")
    assert not run.ok and "PermissionError" in run.stderr, run  # host unix sockets unreachable


def test_memory_is_limited_in_total_not_only_per_process(box: Sandbox) -> None:
    """Four forks of 80 MiB each fit RLIMIT_AS (128 MiB per process) but not a 128 MiB total."""
    code = (
        "import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
        "    if pid == 0:\n        b = b'x' * (80 << 20)\n        time.sleep(1)\n        os._exit(0)\n"
        "    pids.append(pid)\nprint([os.waitpid(p, 0)[1] for p in pids])\n"
    )
    result = box.run(code)
    if "memcg" not in box.isolation:
        pytest.skip(f"no memory cgroup here ({box.isolation}): each process has RLIMIT_AS only")
    assert "[0, 0, 0, 0]" not in result.stdout, result
    fits = box.run("b = b'x' * (60 << 20)\nprint('fits')")
    assert fits.ok and fits.stdout == "fits\n", fits  # one process under the limit still runs
    # each run sets its own limit on the cgroup: 100 MiB under memory_mb=256 runs
    hog = box.run("b = bytearray(100 << 20)\nfor i in range(0, len(b), 4096):\n    b[i] = 1",
                  limits=SandboxLimits(timeout_s=3.0, memory_mb=256))
    assert hog.ok, hog


def test_the_code_sees_only_its_own_processes(box: Sandbox) -> None:
    if "pidns" not in box.isolation:
        pytest.skip(f"no PID namespace here ({box.isolation})")
    code = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
    pids = json.loads(box.run(code).stdout)
    assert os.getpid() not in pids and max(pids) < 10, pids  # the host's processes are not there
    killer = box.run(f"import os\nos.kill({os.getpid()}, 9)")
    assert not killer.ok and "ProcessLookupError" in killer.stderr, killer


def _nobody_worker(script_dir: Path) -> subprocess.Popen:
    """The worker script as an unprivileged user (nobody), under the system interpreter.

    The script is copied into ``script_dir`` (world-readable): the checkout may sit in a
    folder nobody cannot enter (a CI clone in a ``mktemp -d`` directory is 0700).
    """
    import taurl.envs.sandbox as sandbox_module

    script = script_dir / "_sandbox_worker.py"
    shutil.copyfile(sandbox_module._WORKER_SCRIPT, script)
    os.chmod(script, 0o644)
    cfg = {"mode": "strongest", "uid": 0, "gid": 0, "tmpfs_mb": 16,
           "hidden_paths": [str(Path(sandbox_module.__file__).resolve().parents[1])]}
    return subprocess.Popen(
        ["/usr/bin/python3", "-I", "-S", str(script), json.dumps(cfg)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        user=65534, group=65534, extra_groups=[], cwd="/", start_new_session=True,
    )


def _can_run_as_nobody() -> bool:
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        return False
    unshare_user = "import ctypes; exit(ctypes.CDLL(None).unshare(0x10000000))"  # CLONE_NEWUSER
    probe = subprocess.run(["/usr/bin/python3", "-c", unshare_user], user=65534, group=65534,
                           extra_groups=[], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_run_as_nobody(), reason="needs root (to become nobody), "
                    "/usr/bin/python3 and unprivileged user namespaces")
def test_an_unprivileged_user_gets_kernel_isolation_from_user_namespaces(tmp_path) -> None:
    """Not root (a CI runner): the worker builds the same namespaces inside a user namespace,
    so the code cannot write the user's files, reach the network, see or signal the user's
    other processes, or remount the tree writable, though it runs as that user."""
    victim_dir = Path(f"/var/tmp/taurl-nobody-{uuid.uuid4().hex}")
    victim_dir.mkdir(mode=0o755)
    victim = victim_dir / "notes.txt"
    victim.write_text("keep")
    os.chown(victim_dir, 65534, 65534)
    os.chown(victim, 65534, 65534)
    host = subprocess.Popen(["sleep", "60"], user=65534, group=65534, extra_groups=[])
    script_dir = Path(tempfile.mkdtemp(prefix="taurl-nobody-"))
    os.chmod(script_dir, 0o755)
    worker = _nobody_worker(script_dir)
    try:
        hello = json.loads(worker.stdout.readline())
        assert hello["isolation"] == ["userns", "netns", "ipcns", "mountns", "pidns"], hello

        def run(code: str) -> dict:
            req = {"code": code, "stdin": "", "timeout_s": 3.0, "limits": dataclasses.asdict(LIMITS)}
            worker.stdin.write(json.dumps(req).encode() + b"\n")
            worker.stdin.flush()
            return json.loads(worker.stdout.readline())

        assert run("print(6 * 7)")["stdout"] == "42\n"
        wrote = run(f"open({str(victim)!r}, 'w').write('gone')")
        assert "Read-only file system" in wrote["stderr"], wrote
        remount = run(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.mount(None, b'/var/tmp', None, 32 | 4096, None)\n"
            "print(r, os.strerror(ctypes.get_errno()))"
        )
        assert remount["stdout"].startswith("-1 "), remount  # no capability left to remount
        net = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
        assert net["exit_code"] != 0 and "unreachable" in net["stderr"], net
        killers = run(f"import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n"
                      f"    pass\nos.kill({host.pid}, signal.SIGKILL)")
        assert "ProcessLookupError" in killers["stderr"], killers
        forks = run("import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)\n"
                    "os.waitpid(pid, 0)\nprint('forked')")
        assert "forked" in forks["stdout"], forks
        package = str(Path(__file__).resolve().parents[2] / "taurl")
        hidden = run(f"import os\nprint(os.listdir({package!r}))")
        # unreadable (the covering tmpfs), or absent when the checkout is under /tmp, which
        # the worker replaces with its own private tmpfs
        refused = ("PermissionError", "FileNotFoundError")
        assert "envs" not in hidden["stdout"] and any(e in hidden["stderr"] for e in refused), hidden
        assert victim.read_text() == "keep" and host.poll() is None  # both untouched
    finally:
        worker.kill()
        host.kill()
        shutil.rmtree(victim_dir, ignore_errors=True)
        shutil.rmtree(script_dir, ignore_errors=True)


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be >= 64"):
        SandboxLimits(memory_mb=8)
    with pytest.raises(ValueError, match="isolation must be 'strongest' or 'guard'"):
        SandboxConfig(isolation="none")  # type: ignore[arg-type]


def _processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                continue
    return pids
