"""The firmware does no I/O: it imports nothing that could touch the world."""
import ast
import pathlib

import pytest

FORBIDDEN = {"socket", "asyncio", "time", "random", "os", "threading", "libvirt",
             "selectors", "subprocess", "signal", "mmap", "multiprocessing", "serial",
             "usb", "hal", "vm", "board", "fixtures", "io", "shutil", "tempfile", "pathlib"}
FIRMWARE = pathlib.Path(__file__).resolve().parent.parent / "firmware"


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("__import__", "open", "exec", "eval"):
            yield f"<call {node.func.id}>", node.lineno


@pytest.mark.parametrize("path", sorted(FIRMWARE.rglob("*.py")), ids=lambda p: str(p.relative_to(FIRMWARE)))
def test_firmware_module_imports_no_io(path):
    bad = [(name, line) for name, line in imported_modules(path)
           if name in FORBIDDEN or name.startswith("<call")]
    assert not bad, f"{path}: forbidden imports {bad}"


def test_boundary_check_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import os\nfrom time import monotonic\n")
    assert [n for n, _ in imported_modules(sample)] == ["os", "time"]
