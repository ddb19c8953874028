"""The package's shape (docs/architecture.md): no import cycle, packages
that import only lower layers, documented public definitions, no citation of
a document outside the repository. (Size is judged in review, not by a
line cap: a long module that reads as one idea is fine.)

These tests read the source with `ast` only; they import nothing of the
package, so they run in well under a second.
"""

import ast
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "noisy_student"


def _modules(root=PACKAGE):
    """{dotted module name: path} of every .py file under `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _resolve(module, node, is_package):
    """Absolute names imported by an Import / ImportFrom node of `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    # `from a import b` imports a.b when b is a module, else a name of a.
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root=PACKAGE):
    """{module: set of package modules it imports}, function-level included.

    Importing a.b.c also runs a and a.b (their __init__), so those count as
    edges too.
    """
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _resolve(name, node,
                                       path.name == "__init__.py"):
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):
                        prefix = ".".join(parts[:i])
                        if prefix in modules and prefix != name:
                            targets.add(prefix)
        graph[name] = targets
    return graph


def find_cycle(graph):
    """One import cycle as a list [a, b, ..., a], or None."""
    state = {}  # 1: on the stack, 2: done.
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_finder_sees_a_function_level_cycle(tmp_path):
    # The shape of the circle issue 22 reports: a imports b at the top, b
    # imports a inside a function.
    pkg = tmp_path / "pkg"
    _write(pkg, {"__init__.py": "", "a.py": "from pkg import b\n",
                 "b.py": "def f():\n    from pkg import a\n",
                 "c.py": "from . import a\n"})
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and {"pkg.a", "pkg.b"} <= set(cycle), cycle
    _write(pkg, {"b.py": "def f():\n    return 1\n"})
    assert find_cycle(import_graph(pkg)) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "noisy_student.evaluation.evaluator" in graph
    assert graph["noisy_student.evaluation.evaluator"], "the walker found no imports"
    cycle = find_cycle(graph)
    assert cycle is None, (
        "Expected no import cycle in noisy_student/. Received: "
        + " -> ".join(cycle))


# The layering rule (docs/architecture.md): a package imports only packages
# of a lower layer (and itself). Lowest first.
LAYERS = (
    ("utils",),
    ("model", "data"),
    ("kernels",),
    ("training", "pseudo_labels", "evaluation", "serving"),
    ("pipeline",),
    ("api",),
    ("cli",),
)


def layer_of(module, top="noisy_student"):
    """(layer index, package) of a module of the package, or None for the
    package's own __init__."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != top:
        return None
    for index, packages in enumerate(LAYERS):
        if parts[1] in packages:
            return index, parts[1]
    raise AssertionError(f"{module}: its package is in no layer of LAYERS")


def layering_violations(graph, top="noisy_student"):
    """Imports from a package to one of the same or a higher layer."""
    problems = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module, top)
        for target in sorted(targets):
            there = layer_of(target, top)
            if here is None or there is None or here[1] == there[1]:
                continue
            if there[0] >= here[0]:
                problems.append(f"{module} imports {target}")
    return problems


def test_the_layering_check_sees_an_upward_and_a_sideways_import(tmp_path):
    pkg = tmp_path / "noisy_student"
    _write(pkg, {"__init__.py": "", "utils/__init__.py": "",
                 "model/__init__.py": "", "data/__init__.py": "",
                 "utils/storage.py": "",
                 "model/layers.py": "from noisy_student.utils import storage\n",
                 "data/sources.py": "def f():\n"
                 "    from noisy_student.model import layers\n"})
    problems = layering_violations(import_graph(pkg))
    assert problems == ["noisy_student.data.sources imports "
                        "noisy_student.model",
                        "noisy_student.data.sources imports "
                        "noisy_student.model.layers"], problems
    _write(pkg, {"utils/storage.py": "from noisy_student.data import x\n",
                 "data/sources.py": ""})
    problems = layering_violations(import_graph(pkg))
    assert problems == ["noisy_student.utils.storage imports "
                        "noisy_student.data"], problems


def test_packages_import_only_lower_layers():
    graph = import_graph()
    problems = layering_violations(graph)
    assert not problems, (
        "Expected each package of noisy_student/ to import only packages "
        "of a lower layer (tests/test_structure.py LAYERS, "
        "docs/architecture.md). Received:\n" + "\n".join(problems))


def reachable(graph, start):
    """Every module `start` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_serving_and_evaluation_never_import_the_kernel_compiler():
    # Loading a model to serve or evaluate it must not import (or build)
    # the training kernels: only training switches a model to them.
    graph = import_graph()
    readers = [m for m in graph if m.split(".")[1:2] in (
        ["model"], ["serving"], ["evaluation"], ["data"])]
    assert "noisy_student.serving.export" in readers
    found = {m: sorted(t for t in reachable(graph, m)
                       if t.startswith("noisy_student.kernels"))
             for m in readers}
    found = {m: t for m, t in found.items() if t}
    assert not found, f"Expected no import of noisy_student.kernels. Received: {found}"
    assert "noisy_student.kernels.loader" in reachable(
        graph, "noisy_student.training.state")


def test_only_the_api_sits_at_the_top_of_the_package():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "api.py"], modules


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.decode().split("\0") if p]


def test_no_reference_to_a_design_file_outside_the_repo():
    # Comments, docs and tests cite the paper, the official code or
    # docs/architecture.md, never a file this repository does not have.
    # Spelled in two halves so that this test does not find itself.
    name = "DESIGN" + ".md"
    found = []
    for path in _tracked_files():
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if name.lower() in text.lower():
            found.append(str(path.relative_to(REPO)))
    assert not found, f"Expected no reference to {name}. Received: {found}"
    assert (REPO / "docs" / "architecture.md").exists()


# Methods that override a Keras or dataclass hook: their contract is the base
# class's documentation.
OVERRIDES = {"call", "build", "get_config", "from_config",
             "compute_output_shape", "compute_output_spec", "convolution_op",
             "update_step", "__init__", "__post_init__", "__call__",
             "__enter__", "__exit__"}


def undocumented(root=PACKAGE):
    """Public definitions without a docstring, and public functions of two
    or more parameters whose docstring has no "Args:" section."""
    problems = []

    def visit(node, name, private):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                continue
            hidden = private or child.name.startswith("_")
            where = f"{name}.{child.name} (line {child.lineno})"
            is_function = isinstance(child, ast.FunctionDef)
            public = not hidden and not (is_function and isinstance(
                node, ast.ClassDef) and child.name in OVERRIDES)
            doc = ast.get_docstring(child)
            if public and not doc:
                problems.append(f"{where}: no docstring")
            elif public and is_function and "Args:" not in doc:
                params = [a.arg for a in child.args.args + child.args.kwonlyargs
                          if a.arg not in ("self", "cls")]
                if len(params) >= 2:
                    problems.append(f"{where}: no Args section for "
                                    + ", ".join(params))
            if not is_function:
                visit(child, f"{name}.{child.name}", hidden)

    for name, path in _modules(root).items():
        visit(ast.parse(path.read_text(), str(path)), name, False)
    return problems


def test_the_docstring_check_sees_missing_docs_and_args(tmp_path):
    pkg = tmp_path / "pkg"
    _write(pkg, {"__init__.py": "", "m.py": (
        "def bare(x):\n    return x\n"
        "def two(x, y):\n    '''Adds.'''\n    return x + y\n"
        "def _private(x, y):\n    return x\n"
        "def good(x, y):\n    '''Adds.\n\n    Args:\n      x: a.\n      y: b.\n"
        "    '''\n"
        "class Layer:\n    '''A layer.'''\n    def call(self, x, y):\n"
        "        return x\n    def method(self):\n        return 1\n")})
    problems = undocumented(pkg)
    assert sorted(p.split(" ")[0] for p in problems) == [
        "pkg.m.Layer.method", "pkg.m.bare", "pkg.m.two"], problems


def test_public_definitions_are_documented():
    problems = undocumented()
    assert not problems, (
        "Expected a docstring on every public definition of noisy_student/ "
        "and an Args section where a function takes two or more "
        "parameters. Received:\n" + "\n".join(problems))
