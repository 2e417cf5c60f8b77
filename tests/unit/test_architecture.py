"""The shape of the code, checked from its source with `ast`: layered packages without import cycles, imports at
the top of files, and functions short enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A package imports only the packages before it in this list; "ground" is modules/*.py (config, files, ...).
LAYERS = ("ground", "networks", "data", "objectives", "evaluation", "artifacts", "training")
SCRIPTS = ("train_cfm.py", "train_ddpm.py", "train_vae.py", "sample.py", "caption.py", "encode_latents.py")
# In-function imports of our own modules that are allowed, as (file, imported module). None are.
LAZY_IMPORTS_ALLOWED: set[tuple[str, str]] = set()
MAX_FUNCTION_LINES = 80
MAX_TRAIN_LINES = 60


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 else 0


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("modules/**/*.py"), *(ROOT / s for s in SCRIPTS), *ROOT.glob("bench/*.py")]
    return {module_name(p): p for p in files}


def own_imports(tree: ast.AST, module: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import of `modules`."""
    inside = {
        id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "modules" or name.startswith("modules."):
                found.append((name, id(node) in inside, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> imports of our own modules (only those that are files or packages of ours)."""
    known = sources()
    out = {}
    for module, path in known.items():
        imports = own_imports(ast.parse(path.read_text()), module)
        out[module] = [(name, lazy, line) for name, lazy, line in imports if name in known]
    return out


def test_no_package_imports_a_later_layer(graph):
    wrong = [
        f"{module} (line {line}) imports {name}"
        for module, imports in graph.items()
        if module.startswith("modules.")
        for name, _, line in imports
        if layer(name) > layer(module)
    ]
    assert not wrong, f"imports against the layers {LAYERS}: " + "; ".join(wrong)


def test_no_import_cycles(graph):
    edges = {m: {name for name, _, _ in imports if name != m} for m, imports in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_our_modules_are_imported_at_the_top_of_files(graph):
    lazy = [
        f"{module} (line {line}) imports {name} inside a function"
        for module, imports in graph.items()
        for name, inside, line in imports
        if inside and (module, name) not in LAZY_IMPORTS_ALLOWED
    ]
    assert not lazy, "; ".join(lazy)


def function_lengths():
    for module, path in sources().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield module, node.name, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_80_lines():
    long = [f"{m}.{name}: {n} lines" for m, name, n in function_lengths() if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long)


def test_train_is_at_most_60_lines():
    (n,) = [n for m, name, n in function_lengths() if m == "modules.training.loop" and name == "train"]
    assert n <= MAX_TRAIN_LINES, f"modules/training/loop.py: train() is {n} lines"


def test_the_checks_can_fail():
    """The graph and length checks see what they must: an in-function import and a layer inversion."""
    tree = ast.parse("from modules.training.loop import train\ndef f():\n    from modules.config import UserError\n")
    found = own_imports(tree, "modules.networks.unet")
    assert ("modules.training.loop", False, 1) in found and ("modules.config", True, 3) in found
    assert layer("modules.training.loop") > layer("modules.networks.unet") > layer("modules.config")


def test_no_test_file_imports_another():
    """Tests share code through tests/helpers.py (and fixtures through conftest.py), never through each other."""
    tests = ROOT / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")} | {"conftest"}
    wrong = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            imported = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported = [node.module]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            wrong += [f"{path.relative_to(ROOT)} imports {m}" for m in imported if m.split(".")[0] in names]
    assert not wrong, "; ".join(wrong)
