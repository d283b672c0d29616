"""invoke tasks for the VM pair (`inv vm.setup`, `inv vm.up`, ...).

Each task is a thin call into vm/cli.py, so `inv vm.X` and `twincache vm X`
behave the same. tasks.py adds this module as the `vm` collection.
"""

from invoke import task

def _run(argv: list) -> None:
    from hal.cli import main as cli
    code = cli.main(["vm", *argv])
    if code:
        raise SystemExit(code)

@task
def setup(c):
    """Fetch the kernel, build the initramfs, start the private libvirtd."""
    _run(["setup"])

@task(help={"command": "shell text each guest runs instead of the controller",
            "fresh": "zero the NVRAM and disk files first", "timeout": "seconds to wait for NBD"})
def up(c, command=None, fresh=False, timeout=None):
    """Start controller VMs A and B; return once both controllers serve NBD."""
    _run(["up"] + (["--command", command] if command is not None else []) + (["--fresh"] if fresh else [])
         + (["--timeout", str(timeout)] if timeout else []))

@task(help={"json": "the shape of `twincache status --json` (controllers, exports as NBD URIs)"})
def status(c, json=False):
    """Domain states, NBD addresses and console logs."""
    _run(["status"] + (["--json"] if json else []))

@task(help={"name": "a or b", "follow": "keep printing (tail -F)"})
def console(c, name, follow=False):
    """Print a guest's console log."""
    _run(["console", name] + (["-f"] if follow else []))

@task(name="power-cut", help={"name": "a or b"})
def power_cut(c, name):
    """Pull the plug on one guest (libvirt destroy)."""
    _run(["power-cut", name])

@task(help={"name": "a or b", "command": "shell text instead of the saved command"})
def start(c, name, command=None):
    """Start one guest again (after a power cut) with its saved command."""
    _run(["start", name] + (["--command", command] if command is not None else []))

@task
def down(c):
    """Destroy both guests."""
    _run(["down"])

@task
def teardown(c):
    """Undefine both domains and stop the private libvirtd."""
    _run(["teardown"])

@task(help={"dir": "output directory (default <cache>/image)", "size": "image size"})
def image(c, dir=None, size="2G"):
    """Build a self-contained debootstrap guest image with the twincache wheel."""
    _run(["image", "--size", size] + (["--dir", dir] if dir else []))
