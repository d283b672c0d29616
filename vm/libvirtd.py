"""A private libvirtd for the VM pair, leaving the machine's own libvirt alone.

libvirtd (Debian 12 ships no virtqemud) runs as root in a private mount
namespace (`unshare -m --propagation private`) in which /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt are
bind mounts of directories under `<cache>/libvirtd/`. Only that namespace
sees them, so the host's configuration is never read or written. The
qemu.conf settings are the ones that made domain start work on this machine
kind (with the stock file, start hung for over a minute with no error).

The daemon is started and stopped by PID (kept in `<dir>/libvirtd.pid`).
Its own pid file lives in the private /run/libvirt too: libvirtd's default,
/run/libvirtd.pid, is outside the bind mounts, and the flock on it made a
second private libvirtd (say a fresh clone's, next to /work/main's) exit 1.
Any other URI (qemu:///system, qemu+ssh://host/system) can be used instead
of this one; `uri()` is only the default.
"""
from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import signal
import subprocess
import time

from vm.assets import DEFAULT_CACHE_DIR

# host path -> the directory of its own under state_dir() that replaces it in the namespace
BIND_DIRS = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
             "/var/log/libvirt": "log", "/var/cache/libvirt": "cache"}
QEMU_CONF = """# written by twincache vm/libvirtd.py for its private libvirtd
security_driver = "none"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
LIBVIRTD_CONF = """# written by twincache vm/libvirtd.py for its private libvirtd
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""
START_TIMEOUT_S = 30.0


class LibvirtdError(RuntimeError):
    """The private libvirtd cannot run here; the message says why."""


def state_dir(cache_dir=None) -> pathlib.Path:
    return pathlib.Path(cache_dir or DEFAULT_CACHE_DIR) / "libvirtd"


def uri(cache_dir=None) -> str:
    return f"qemu:///system?socket={state_dir(cache_dir)}/run/libvirt-sock"


def host_problem() -> str | None:
    """Why this host cannot run a private libvirtd, or None."""
    if os.geteuid() != 0:
        return "the private libvirtd needs root (or name an existing libvirt URI)"
    for tool in ("libvirtd", "unshare", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install libvirt-daemon-system qemu-system-x86)"
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True)
    if done.returncode:
        return f"unshare -m fails here: {done.stderr.strip()}"
    return None


def _prepare_config(root: pathlib.Path) -> None:
    """The directories that replace BIND_DIRS, and the two config files."""
    for local in BIND_DIRS.values():
        (root / local).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
    (root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)


def _prepare_mount_points() -> None:
    # A bind mount needs its mount point; an empty directory under /run or /var is harmless.
    for target in BIND_DIRS:
        pathlib.Path(target).mkdir(parents=True, exist_ok=True)


def _script(root: pathlib.Path) -> str:
    lines = ["set -e"]
    for target in BIND_DIRS:
        lines.append(f"mount --bind '{root / BIND_DIRS[target]}' '{target}'")
    lines.append("exec libvirtd --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid")
    return "\n".join(lines)


def read_pid(cache_dir=None) -> int | None:
    path = state_dir(cache_dir) / "libvirtd.pid"
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def start(cache_dir=None) -> str:
    """Start the private libvirtd unless it runs; returns its URI."""
    root = state_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # two starters must not race for the pid file
        return _start_locked(root, cache_dir)


def _start_locked(root: pathlib.Path, cache_dir) -> str:
    if read_pid(cache_dir):
        return uri(cache_dir)
    if problem := host_problem():
        raise LibvirtdError(problem)
    _prepare_config(root)
    _prepare_mount_points()
    log = open(root / "libvirtd.stderr", "ab")
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", _script(root)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    (root / "libvirtd.pid").write_text(f"{proc.pid}\n")
    sock = root / "run" / "libvirt-sock"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LibvirtdError(f"libvirtd exited with {proc.returncode}: {_log_errors(root)} "
                                f"(see {root}/libvirtd.stderr and {root}/log/libvirtd.log)")
        if sock.exists() and _connects(uri(cache_dir)):
            return uri(cache_dir)
        time.sleep(0.2)
    stop(cache_dir)
    raise LibvirtdError(f"libvirtd did not open {sock} within {START_TIMEOUT_S:.0f} s")


def _log_errors(root: pathlib.Path, count: int = 3) -> str:
    """The last error lines libvirtd logged (its stderr is empty when the log goes to a file)."""
    lines = []
    for path in (root / "libvirtd.stderr", root / "log" / "libvirtd.log"):
        try:
            lines += [line for line in path.read_text(errors="replace").splitlines() if " error : " in line]
        except FileNotFoundError:
            pass
    return " | ".join(lines[-count:]) or "no error logged"


def _connects(connect_uri: str) -> bool:
    import libvirt
    try:
        libvirt.open(connect_uri).close()
        return True
    except libvirt.libvirtError:
        return False


def stop(cache_dir=None, timeout_s: float = 15.0) -> bool:
    """Stop the private libvirtd by PID; True if one was running."""
    pid = read_pid(cache_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    (state_dir(cache_dir) / "libvirtd.pid").unlink(missing_ok=True)
    return True
