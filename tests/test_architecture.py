"""The import graph keeps the layers of ARCHITECTURE.md: read from the source (ast, nothing is
imported), every module of the repository sits in one layer; a module imports only modules of
its own layer or of the layers below; packages form no import cycle; a stage uses
another stage only through that stage's public modules; and nothing of the product imports
``studies``. The layer table below is the one place that says which module belongs where.
Beside the graph, one convention of every source file: no line longer than 120 characters."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The core: imports no stage. Wire format, geometry, images, the synthetic world, logs,
    # CURVE, the config machinery with the sections every process shares, a bounded mapping, durable writes.
    ("core", ("reliev3r.protocol", "reliev3r.geometry", "reliev3r.imaging", "reliev3r.synthetic",
              "reliev3r.log", "reliev3r.security", "reliev3r.config_base", "reliev3r.recent", "reliev3r.durable")),
    # The stages' libraries: import the core, and other stages only through their public modules.
    ("stages", ("monitoring", "streamer", "labelers", "replay", "learner", "evaluation")),
    # Each stage's process (its ``run(cfg, runtime)``) and what every process shares: the
    # assembled PipelineConfig and the Runtime.
    ("processes", ("reliev3r.config", "reliev3r.service", "streamer.service", "labelers.service",
                   "replay.service", "learner.service", "evaluation.service", "evaluation.cli")),
    # The application face: command line, supervisor, status, reconstruct, export (any other
    # module of ``reliev3r`` lands here unless listed above).
    ("app", ("reliev3r",)),
    # Research tooling: may import the whole product; the product never imports it.
    ("studies", ("studies",)),
    # Measurements, tests and deployment helpers: may import anything; nothing imports them.
    ("tools", ("benchmarks", "tests", "deploy")),
)
"""(layer, module prefixes), lowest layer first; the longest matching prefix places a module."""

PUBLIC: dict[str, tuple[str, ...]] = {
    "monitoring": ("monitoring.config", "monitoring.metrics"),
    "streamer": ("streamer.config",),
    "labelers": ("labelers.config", "labelers.depth", "labelers.matches"),
    "replay": ("replay.config", "replay.client"),
    "learner": ("learner.config", "learner.model", "learner.snapshot", "learner.api", "learner.posefit"),
    "evaluation": ("evaluation.config", "evaluation.datasets", "evaluation.tum", "evaluation.metrics",
                   "evaluation.evaluate"),
}
"""What a stage offers the other stages (and their processes); the rest is its own business."""

PRODUCT = ("core", "stages", "processes", "app")
SKIP = {"runs", "build", "dist"}

ORDER = {name: k for k, (name, _) in enumerate(LAYERS)}
PREFIXES = sorted(((p, name) for name, ps in LAYERS for p in ps), key=lambda x: -len(x[0]))
TOP_LEVEL = {p.split(".")[0] for _, ps in LAYERS for p in ps}


def layer_of(module: str) -> str | None:
    for prefix, name in PREFIXES:
        if module == prefix or module.startswith(prefix + "."):
            return name
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the repository (not hidden or build folders)."""
    out = {}
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO).parts
        if any(p.startswith(".") or p in SKIP or p.endswith(".egg-info") for p in rel[:-1]):
            continue
        out[_module_name(path)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The repository modules ``module`` imports anywhere in its file (top level, functions,
    ``TYPE_CHECKING`` blocks alike), resolved to the longest known module name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from a import b": the module a.b when there is one, else (a name in) a.
            names.update(f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names)
    out = set()
    for name in names:
        if name.split(".")[0] not in TOP_LEVEL:
            continue
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            candidate = ".".join(parts[:k])
            if candidate in known:
                out.add(candidate)
                break
    out.discard(module)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = source_files()
    known = set(files)
    return {m: imports_of(m, p, known) for m, p in files.items()}


def test_every_module_has_a_layer():
    files = source_files()
    assert files, "no source found"
    unplaced = sorted(m for m in files if layer_of(m) is None)
    assert not unplaced, f"modules outside the layer table of {Path(__file__).name}: {unplaced}"


def test_no_module_imports_a_higher_layer(graph):
    bad = []
    for module, targets in graph.items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if mine and theirs and ORDER[theirs] > ORDER[mine]:
                bad.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not bad, "imports against the layers (ARCHITECTURE.md):\n" + "\n".join(sorted(bad))


def test_no_cycle_between_packages(graph):
    # Nodes: a top-level package's modules within one layer ("stages:learner", "core:reliev3r").
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        a = f"{layer_of(module)}:{module.split('.')[0]}"
        for target in targets:
            b = f"{layer_of(target)}:{target.split('.')[0]}"
            if a != b:
                edges[a].add(b)
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert not cycles, f"import cycles between packages: {cycles}"


def test_stages_use_each_other_only_through_public_modules(graph):
    bad = []
    for module, targets in graph.items():
        mine = module.split(".")[0]
        if mine not in PUBLIC:
            continue
        for target in targets:
            theirs = target.split(".")[0]
            if theirs in PUBLIC and theirs != mine and not any(
                    target == p or target.startswith(p + ".") for p in PUBLIC[theirs]):
                bad.append(f"{module} imports {target} (public in {theirs}: {', '.join(PUBLIC[theirs])})")
    assert not bad, "\n".join(sorted(bad))


def test_the_product_never_imports_studies(graph):
    bad = sorted(f"{m} imports {t}" for m, ts in graph.items() if layer_of(m) in PRODUCT
                 for t in ts if t.split(".")[0] == "studies")
    assert not bad, "\n".join(bad)


SERVICES = {"streamer": "Streamer", "labelers": "Labeler", "replay": "Replay", "learner": "Learner",
            "evaluation": "Evaluator"}
"""Each stage's package and the name its service classes start with."""


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_every_stage_service_follows_one_pattern(package):
    # ARCHITECTURE.md, "Where a change goes": a ``<Stage>Metrics`` class that owns the stage's
    # Prometheus series, a ``<Stage>Service`` with ``step()`` (one unit of work), and a
    # ``run(cfg, runtime)`` that builds both and loops.
    tree = ast.parse((REPO / package / "service.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    stage = SERVICES[package]
    assert f"{stage}Metrics" in classes and f"{stage}Service" in classes, sorted(classes)
    methods = {n.name for n in classes[f"{stage}Service"].body if isinstance(n, ast.FunctionDef)}
    assert "step" in methods, sorted(methods)
    assert "run" in functions and [a.arg for a in functions["run"].args.args] == ["cfg", "runtime"]
    built = {n.func.id for n in ast.walk(functions["run"]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {f"{stage}Metrics", f"{stage}Service"} <= built, sorted(built)


def test_no_test_module_imports_another():
    """Helpers several test modules use live in tests/conftest.py or a ``tests/helpers_*.py``
    module, never in a test module that others import (bare ``test_x`` or ``tests.test_x``)."""
    bad = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.name} imports {n}" for n in names if n.rpartition(".")[2].startswith("test_")]
    assert not bad, bad


PATH_PATCHERS = {"benchmarks/reconstruct_memory.py": "imports tests.tiny_snapshot; tests/ is no installed package"}
"""The scripts that put a folder on ``sys.path`` themselves, and why (ARCHITECTURE.md: the product
is installed in editable mode, so no other script does)."""


def test_no_script_patches_sys_path_but_the_listed_ones():
    def patches(path: Path) -> bool:  # a call sys.path.insert/append/extend(...)
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                   and n.func.attr in ("insert", "append", "extend") and isinstance(n.func.value, ast.Attribute)
                   and n.func.value.attr == "path" and isinstance(n.func.value.value, ast.Name)
                   and n.func.value.value.id == "sys" for n in ast.walk(ast.parse(path.read_text())))

    patching = {path.relative_to(REPO).as_posix() for path in source_files().values()
                if "sys.path" in path.read_text() and patches(path)}
    assert patching == set(PATH_PATCHERS), sorted(patching ^ set(PATH_PATCHERS))


MAX_LINE = 120
"""The longest line (in characters) a .py file of the repository may have."""


def test_no_line_is_longer_than_the_limit():
    long = [f"{path.relative_to(REPO)}:{n}: {len(line)}" for path in source_files().values()
            for n, line in enumerate(path.read_text().split("\n"), 1) if len(line) > MAX_LINE]
    assert not long, f"lines longer than {MAX_LINE} characters:\n" + "\n".join(long)


def test_the_checker_sees_what_it_must(tmp_path):
    # Plain, TYPE_CHECKING-only, function-level and relative imports all count.
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from learner import model\n"
                     "from . import geometry\ndef f():\n    import evaluation.metrics\n")
    known = {"reliev3r", "reliev3r.geometry", "learner", "learner.model", "evaluation", "evaluation.metrics"}
    assert imports_of("reliev3r.probe", probe, known) == {"learner.model", "reliev3r.geometry", "evaluation.metrics"}
    assert layer_of("reliev3r.config") == "processes" and layer_of("reliev3r.config_base") == "core"
    assert layer_of("learner.losses.depth") == "stages" and layer_of("reliev3r.cli") == "app"
    assert [c for c in _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) if len(c) > 1] == [["a", "b"]]


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out
