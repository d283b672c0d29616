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


ROOT = FIRMWARE.parent
PACKAGES = ("firmware", "hal", "fuzz", "vm", "board", "fixtures")
NAMED = r'"((?:' + "|".join(PACKAGES) + r')(?:\.\w+)+)"'       # a module named in a string (importlib)


def import_graph(root, packages=PACKAGES):
    """module -> the project's modules it imports, statically or by a name in a string."""
    import re
    files = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for module, path in files.items():
        source = path.read_text()
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set(re.findall(NAMED, source))
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = {m for m in found if m in files and m != module}
    return graph


def import_loops(graph):
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_no_module_imports_itself_back_through_others_even_by_name():
    assert import_loops(import_graph(ROOT)) == []


def test_the_loop_check_sees_a_loop_made_by_a_name(tmp_path):
    (tmp_path / "hal").mkdir()
    (tmp_path / "hal" / "a.py").write_text("import importlib\nimportlib.import_module(\"hal.b\")\n")
    (tmp_path / "hal" / "b.py").write_text("from hal.a import x\n")
    (tmp_path / "hal" / "c.py").write_text("from . import a\n")
    assert import_loops(import_graph(tmp_path, ("hal",))) == [["hal.a", "hal.b"]]


MODULE_LINES_MAX = 600          # a module this long holds more than one part: split it


def long_modules(root, limit=MODULE_LINES_MAX):
    return sorted((str(p.relative_to(root)), n) for package in PACKAGES
                  for p in (root / package).rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > limit)


def test_no_product_module_is_over_600_lines():
    assert long_modules(ROOT) == []


def test_the_length_check_sees_a_long_module(tmp_path):
    (tmp_path / "hal").mkdir()
    (tmp_path / "hal" / "big.py").write_text("x = 1\n" * (MODULE_LINES_MAX + 1))
    (tmp_path / "hal" / "small.py").write_text("x = 1\n" * MODULE_LINES_MAX)
    assert long_modules(tmp_path) == [("hal/big.py", MODULE_LINES_MAX + 1)]


# -- ownership: a part of its own (firmware/owners.py), one per mode --------------------------

def _unanswered(cls):
    from firmware.owners import Ownership
    return sorted(name for name, value in vars(Ownership).items()
                  if callable(value) and name != "__init__" and getattr(cls, name) is value)


def test_every_ownership_part_answers_every_question():
    from firmware.ha.controller import HaOwnership
    from firmware.replica.controller import ReplicaOwnership
    from hal.sim.static import StaticOwnership
    for cls in (HaOwnership, ReplicaOwnership, StaticOwnership):
        assert _unanswered(cls) == [], cls.__name__


def test_every_controller_has_its_ownership_part():
    from fixtures.mempair import MemPair
    from fixtures.mem_replica import MemReplicaPair
    from firmware.ha.controller import HaOwnership
    from firmware.replica.controller import ReplicaOwnership
    from hal.sim.static import StaticOwnership
    assert isinstance(MemPair(fencing=True).ctrl[0].ownership, HaOwnership)
    assert isinstance(MemPair().ctrl[1].ownership, StaticOwnership)
    assert isinstance(MemReplicaPair().ctrl[0].ownership, ReplicaOwnership)


def test_the_ownership_check_sees_a_question_left_unanswered():
    from firmware.owners import FixedOwnership

    class Half(FixedOwnership):
        pass                                # FixedOwnership leaves owns() to the mode
    assert _unanswered(Half) == ["owns"]


def test_the_shared_parts_never_look_at_how_ownership_is_decided():
    """The write path, the mirror partner side, destage and allocation ask through
    firmware/owners.py; none of them names the ha package or a LUN's fencing state."""
    shared = ["controller.py", "peer.py", "destage.py", "allocation.py", "diskhealth.py", "mirror.py",
              "recovery.py", "forwarding.py", "zeroes.py", "cache.py"]
    for name in shared:
        text = (ROOT / "firmware" / name).read_text()
        assert "from .ha" not in text and ".fence" not in text and "lun % 2" not in text, name


SHARED_FILES = ("controller.py", "peer.py", "destage.py", "allocation.py", "diskhealth.py")


def _shared_names(controller=None, files=SHARED_FILES):
    """Names of a controller (the shared one unless named): its methods, and the attributes its
    files set on self."""
    if controller is None:
        from firmware.controller import Controller as controller
    shared = {n for k in controller.__mro__ if k is not object for n in vars(k)}
    classes = {k.__name__ for k in controller.__mro__}
    for name in files:
        tree = ast.parse((ROOT / "firmware" / name).read_text())
        for node in (n for c in tree.body if isinstance(c, ast.ClassDef) and c.name in classes
                     for n in ast.walk(c)):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and \
                    isinstance(node.value, ast.Name) and node.value.id == "self":
                shared.add(node.attr)
    return shared


def _reach(paths, classes=("Mixin", "Ownership"), shared=None):
    """What the classes in `paths` whose names end in one of `classes` (the ownership part's, by
    default) use of a controller (the shared one unless `shared` names another's names): (names
    used through self.ctrl, its names used through self that the part does not define itself,
    its names the part keeps as its own attributes)."""
    shared = _shared_names() if shared is None else shared
    through_ctrl, through_self, defined, stored = set(), set(), set(), set()
    for path in paths:
        tree = ast.parse(path.read_text())
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith(classes)]:
            # The start (__init__) reads the given names off its `ctrl` argument; elsewhere a
            # local `ctrl` is self.ctrl.
            start = {id(n) for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"
                     for n in ast.walk(f)}
            for node in ast.walk(cls):
                if isinstance(node, ast.FunctionDef):
                    defined.add(node.name)
                if not isinstance(node, ast.Attribute):
                    continue
                value = node.value
                if isinstance(value, ast.Attribute) and value.attr == "ctrl" and \
                        isinstance(value.value, ast.Name) and value.value.id == "self" or \
                        isinstance(value, ast.Name) and value.id == "ctrl" and id(node) not in start:
                    through_ctrl.add(node.attr)
                elif isinstance(value, ast.Name) and value.id == "self":
                    if isinstance(node.ctx, ast.Store):
                        stored.add(node.attr)
                    elif node.attr in shared:
                        through_self.add(node.attr)
    return through_ctrl, through_self - defined - stored, stored & shared


def test_ha_ownership_uses_only_what_the_interface_lists_of_the_shared_controller():
    from firmware.owners import ASKED_OF_THE_CONTROLLER, GIVEN_BY_THE_CONTROLLER
    through_ctrl, through_self, kept = _reach(sorted((ROOT / "firmware" / "ha").glob("*.py")))
    assert through_ctrl - ASKED_OF_THE_CONTROLLER == set()
    assert ASKED_OF_THE_CONTROLLER - through_ctrl == set(), "listed but no longer used: take it off the list"
    assert through_self == set(), "the part has no such name: reach the controller through self.ctrl"
    assert kept == GIVEN_BY_THE_CONTROLLER


def test_the_reach_check_sees_a_new_name_of_the_shared_controller(tmp_path):
    from firmware.owners import ASKED_OF_THE_CONTROLLER
    (tmp_path / "x.py").write_text("class XMixin:\n    def f(self):\n        self.stats = self.ctrl.stats\n"
                                   "        ctrl = self.ctrl\n"
                                   "        return self.ctrl.flush_queue, self.ctrl.out, self.pending, ctrl.waiting\n")
    through_ctrl, through_self, kept = _reach([tmp_path / "x.py"])
    assert through_ctrl - ASKED_OF_THE_CONTROLLER == {"flush_queue", "stats", "waiting"}
    assert through_self == {"pending"} and kept == {"stats"}


# A part of a controller, given some of its parts at its start, asks the controller for what its
# module lists (ASKED_OF_THE_CONTROLLER) and nothing else: (its module under firmware/, its class,
# the controller it is part of, the controller's names it keeps as given, state it took over).
PARTS = [
    ("replica/resync.py", "QuickResync", "firmware.replica.controller.ReplicaController",
     {"rec", "link", "cache", "write_path"}, {"peer_wants", "range_writes", "last_resync"}),
    ("allocation.py", "Allocation", "firmware.controller.Controller", {"cache", "link"}, set()),
    ("writepath.py", "WritePath", "firmware.controller.Controller",
     {"params", "buggify", "buggify_on", "on_serve", "block_size", "cache", "primary", "disk_health"},
     {"waiting", "next_seq", "zeroes"}),
]


@pytest.mark.parametrize("module, cls, controller, given, took", PARTS, ids=[p[1] for p in PARTS])
def test_a_part_uses_only_what_it_lists_of_its_controller(module, cls, controller, given, took):
    import importlib
    where, _, name = controller.rpartition(".")
    controller = getattr(importlib.import_module(where), name)
    asked = importlib.import_module("firmware." + module[:-3].replace("/", ".")).ASKED_OF_THE_CONTROLLER
    files = SHARED_FILES + (("replica/controller.py", "replica/destage.py") if "replica" in where else ())
    names = _shared_names(controller, files)
    through_ctrl, through_self, kept = _reach([ROOT / "firmware" / module], (cls,), names)
    assert through_ctrl - asked == set()
    assert asked - through_ctrl == set(), "listed but no longer used: take it off the list"
    assert through_self == set(), "the part has no such name: reach the controller through self.ctrl"
    assert kept == given
    assert not took & names, "the part's state is its own"


# -- no name used that is not defined (an import removed while a use remained) ---------------------

def _undefined_names(paths):
    from pyflakes import api, messages

    class Collect:
        def __init__(self):
            self.found = []

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                self.found.append(str(message))

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: {msg}")
    collect = Collect()
    for path in paths:
        api.check(path.read_text(), str(path), collect)
    return collect.found


def test_no_module_uses_a_name_it_does_not_define():
    """`inv bench` crashed on SERVER_CPU, whose import went with an unused-import cleanup; the
    tests never run the benchmark itself, so only a check of the names catches that."""
    root = ROOT
    paths = [p for d in ("firmware", "hal", "fixtures", "fuzz", "vm", "board", "tests") for p in
             sorted((root / d).rglob("*.py"))] + [root / "tasks.py"]
    assert _undefined_names(paths) == []


def test_the_name_check_sees_an_undefined_name(tmp_path):
    (tmp_path / "x.py").write_text("from os import path\n\n\ndef f():\n    return path, SERVER_CPU\n")
    assert [m.split(": ", 1)[1] for m in _undefined_names([tmp_path / "x.py"])] == ["undefined name 'SERVER_CPU'"]
