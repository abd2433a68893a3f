"""The package's layout as docs/architecture.md states it, read from the code:
no import cycle (function-level imports included), no import from a later
stage, short orchestrating functions, and each rule written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cnnexp"
DOCS = Path(__file__).resolve().parents[1] / "docs"

# Stages, earliest first: a module may import its own stage or an earlier one.
LAYERS = [
    ["cnnexp", "cnnexp.version", "cnnexp.errors", "cnnexp.safeio", "cnnexp.observers", "cnnexp.cpu",
     "cnnexp.warm_pool"],
    ["cnnexp.models", "cnnexp.data"],
    ["cnnexp.engine"],
    ["cnnexp.results"],
    ["cnnexp.config"],
    ["cnnexp.figures"],
    ["cnnexp.tracking", "cnnexp.sweep"],
    ["cnnexp.run"],
    ["cnnexp.use"],
    ["cnnexp.cli", "cnnexp.__main__", "cnnexp.plot", "cnnexp.preflight", "cnnexp.evaluate", "cnnexp.predict",
     "cnnexp.export", "cnnexp.compare"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every cnnexp module `path` imports, at any depth of the code (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name in known:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer_of(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or (prefix != "cnnexp" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} belongs to no stage: add it to LAYERS and docs/architecture.md"
    return best[0]


def test_every_module_has_a_stage():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_later_stage():
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert wrong == []


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_kernels_and_data_readers_do_not_import_what_uses_them():
    g = graph()
    assert not any(d.startswith("cnnexp.engine.autotune") for d in g["cnnexp.engine.kernels.build"])
    for reader in ("cnnexp.data.cifar10", "cnnexp.data.imagefolder", "cnnexp.data.synthetic"):
        assert "cnnexp.data" not in g[reader], f"{reader} imports the data registry"


def function_lengths(name: str, path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {f"{name}.{n.name}": n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


@pytest.mark.parametrize("function, limit", [("cnnexp.run.job.run_job", 60), ("cnnexp.run.job.run", 60),
                                             ("cnnexp.run.loop.train", 40)])
def test_orchestrating_functions_read_top_to_bottom(function, limit):
    module, name = function.rsplit(".", 1)
    lengths = function_lengths(module, modules()[module])
    assert lengths[function] <= limit


def test_no_function_takes_more_than_seven_positional_parameters():
    wide = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 7:  # ~6: pass a small dataclass beyond that
                    wide.append(f"{name}.{node.name} ({len(positional)})")
    assert wide == []


@pytest.mark.parametrize("pattern, home", [
    (r'"(metrics\.csv|run\.json|search\.yaml|summary\.csv|optuna\.db|best\.txt|model(_best)?\.pt|checkpoints/last\.pt)"',
     "cnnexp/results/files.py"),
    (r'"/proc/cpuinfo"', "cnnexp/cpu.py"),
    (r"_HYDRA_KEYS = |HYDRA_KEYS = ", "cnnexp/config/targets.py"),
    (r"def selected_row|idxmax\(", "cnnexp/results/objective.py"),
    (r"def cache_dir\(", "cnnexp/cpu.py"),
    (r"os\.cpu_count\(\)", "cnnexp/cpu.py"),
])
def test_each_rule_is_written_once(pattern, home):
    root = PACKAGE.parent
    places = [str(p.relative_to(root)) for p in [*PACKAGE.rglob("*.py"), *(root / "hydra_plugins").rglob("*.py")]
              if re.search(pattern, p.read_text())]
    assert places == [home]


def test_the_resume_docs_list_exactly_the_resumable_keys():
    from cnnexp.config.schema import resumable_keys

    text = (DOCS / "resuming.md").read_text()
    listed = re.search(r"<!-- resumable-keys -->(.*?)<!-- /resumable-keys -->", text, re.S).group(1)
    assert re.findall(r"^- `([\w.]+)`", listed, re.M) == resumable_keys()


def test_the_architecture_page_names_every_module():
    text = (DOCS / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if p.name != "__init__.py" and str(p.relative_to(PACKAGE)) not in text]
    assert missing == []
