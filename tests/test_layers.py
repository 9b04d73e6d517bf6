"""The layers of docs/architecture.md, held by reading every module's imports (no MPI)."""

import ast
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "granger_mpi"
KERNELS = ROOT / "kernels"

# Lowest first; a module may import from its own layer or lower ones.
LAYERS = {
    1: {"errors", "kernels"},
    2: {"mpi", "storage"},
    3: {"collectives", "data", "model", "observe", "config", "rundir", "faults", "reporters", "secrets",
        "factories"},
    4: {"checkpoint"},
    5: {"training"},
    6: {"api"},
    7: {"cli", "__main__", "launch", "tools"},
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}
LAUNCH_AND_TOOLS = {"launch", "tools"}
# Imports inside functions that are not there to dodge a cycle: the command line sets thread
# counts before numpy loads, the package resolves its API on first use for the same reason,
# and doctor reports a numba that fails to load as a failed check.
LAZY_ALLOWED = {"granger_mpi/cli.py", "granger_mpi/__init__.py", "granger_mpi/tools/doctor.py"}


def module_name(path):
    """``granger_mpi.training.trainer`` for granger_mpi/training/trainer.py (kernels/ is
    installed as granger_mpi.kernels)."""
    if path.is_relative_to(KERNELS):
        parts = ("granger_mpi", "kernels", *path.relative_to(KERNELS).with_suffix("").parts)
    else:
        parts = ("granger_mpi", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def shown(path):
    """``path`` for a message: relative to the repository when it is in it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else f"{path.parent.name}/{path.name}"


def sources():
    return sorted([*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")])


def imports(path):
    """``(granger_mpi module imported, at module level?)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(tree.body)
    found = []
    modules = known_modules()
    here = module_name(path).split(".")
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from granger_mpi import checkpoint`` imports the module granger_mpi.checkpoint
            names = ([f"{module}.{alias.name}" for alias in node.names]
                     if (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
                     or module == "granger_mpi" else [module])
        else:
            continue
        for name in names:
            if name == "granger_mpi" or name.startswith("granger_mpi."):
                found.append((resolve(name, modules), node in top or _in_try_at_top(node, tree)))
    return found


def _in_try_at_top(node, tree):
    return any(isinstance(stmt, ast.Try) and node in ast.walk(stmt) for stmt in tree.body)


def top_name(module):
    """The layer table's name of a module: its first part below granger_mpi."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def known_modules():
    return frozenset(module_name(p) for p in sources())


def resolve(name, modules):
    """``granger_mpi.x.y`` names a module, or an object in module ``granger_mpi.x``."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def graph():
    edges = {}
    for path in sources():
        edges[module_name(path)] = {name for name, at_top in imports(path) if at_top}
    return edges


def test_every_module_has_a_layer():
    missing = sorted({top_name(m) for m in known_modules() if top_name(m)} - set(LAYER_OF))
    assert not missing, f"modules with no layer in docs/architecture.md: {missing}"


def test_no_module_imports_from_a_higher_layer():
    wrong = []
    for path in sources():
        me = top_name(module_name(path))
        if me is None:
            continue
        for name, _ in imports(path):
            other = top_name(name)
            if other and other != me and LAYER_OF[other] > LAYER_OF[me]:
                wrong.append(f"{shown(path)} (layer {LAYER_OF[me]}) imports {name} "
                             f"(layer {LAYER_OF[other]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node or nxt not in edges:
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node)
    # a package's __init__ importing its own modules is not a cycle through them
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, "\n".join(cycles)


def test_no_import_inside_a_function_to_dodge_a_cycle():
    lazy = [f"{shown(path)}: {name}" for path in sources()
            for name, at_top in imports(path)
            if not at_top and shown(path) not in LAZY_ALLOWED]
    assert not lazy, "\n".join(lazy)


@pytest.mark.parametrize("rule", ["kernels", "collectives", "cli", "launch-and-tools"])
def test_the_named_rules(rule):
    broken = []
    for path in sources():
        me = top_name(module_name(path))
        for name, _ in imports(path):
            other = top_name(name)
            if rule == "kernels" and me == "kernels" and other not in (None, "kernels"):
                broken.append(f"{shown(path)} imports {name}")
            if rule == "collectives" and me == "collectives" and other and LAYER_OF[other] > 2 \
                    and other != "collectives":
                broken.append(f"{shown(path)} imports {name}")
            if rule == "cli" and other == "cli" and me not in ("cli", "__main__"):
                broken.append(f"{shown(path)} imports {name}")
            if rule == "launch-and-tools" and me in LAUNCH_AND_TOOLS and other in ("training", "api"):
                broken.append(f"{shown(path)} imports {name}")
    assert not broken, "\n".join(broken)


def test_a_planted_violation_is_caught(tmp_path, monkeypatch):
    """The checks can fail: a kernel that imports MPI code is reported."""
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "bad.py").write_text("from granger_mpi import collectives\n")
    monkeypatch.setattr(sys.modules[__name__], "KERNELS", fake)
    with pytest.raises(AssertionError, match="kernels/bad.py imports granger_mpi.collectives"):
        test_the_named_rules("kernels")
