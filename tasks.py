"""invoke tasks for people and lab automation: `inv --list` shows them all.

Sub-collections live next to the code they drive (hal/tools/tasks_pair.py,
fuzz/tasks.py, vm/tasks.py, board/tasks.py) and are added here when present.
"""
import importlib
import os
import sys

from invoke import Collection, task

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
APT_PACKAGES = ["qemu-utils", "libnbd-bin", "python3-libnbd", "nbdkit", "fio", "qemu-system-x86",
                "qemu-block-extra", "libvirt-daemon-system", "libvirt-dev", "pkg-config",
                "busybox-static", "ndctl", "socat"]


@task
def setup(c):
    """Install the apt packages the tests need (as root); print the command otherwise."""
    missing = [p for p in APT_PACKAGES
               if c.run(f"dpkg-query -W -f='${{Status}}' {p} 2>/dev/null | grep -q 'ok installed'",
                        warn=True, hide=True).failed]
    if not missing:
        print("setup: every apt package is installed")
        return
    cmd = "apt-get install -y --no-install-recommends " + " ".join(missing)
    if os.geteuid() != 0:
        print(f"setup: not root; run: sudo apt-get update && sudo {cmd}")
        return
    c.run("apt-get update -qq", env={"DEBIAN_FRONTEND": "noninteractive"})
    c.run(cmd, env={"DEBIAN_FRONTEND": "noninteractive"})


@task(help={"k": "pytest -k expression", "x": "stop at the first failure", "args": "more pytest arguments"})
def test(c, k="", x=False, args=""):
    """Run the test suite (what CI runs)."""
    opts = ["-q", "-p", "no:cacheprovider"]
    if k:
        opts += ["-k", repr(k)]
    if x:
        opts.append("-x")
    c.run(f"{PY} -m pytest {' '.join(opts)} {args}", pty=False)


@task
def lint(c):
    """Byte-compile everything and check the firmware boundary."""
    c.run(f"{PY} -m compileall -q firmware hal fuzz vm board fixtures tests tasks.py")
    c.run(f"{PY} -m pytest -q -p no:cacheprovider tests/test_boundary.py")


ns = Collection(setup, test, lint)
for module_name, collection_name in [("hal.tools.tasks_pair", None), ("hal.tools.tasks_sim", None), ("fuzz.tasks", None), ("vm.tasks", "vm"),
                                     ("board.tasks", "board")]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            continue
        raise
    module.add_to(ns) if hasattr(module, "add_to") else ns.add_collection(
        Collection.from_module(module), name=collection_name)
