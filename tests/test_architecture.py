"""The dependency rule of docs/architecture.md, checked on the source: every import of every module
(function-level ones included), resolved to sentilens modules."""

import ast
import re
from pathlib import Path

import pytest
from PIL import Image

from sentilens.data.records import Dropped, Post, RawDataset, read_manifest, read_stats
from sentilens.errors import SentilensError

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "sentilens"

LAYERS = {
    "foundation": 0, "data": 1, "runs": 1, "metrics": 1, "decision": 1, "predict": 2, "mllm": 3, "fusion": 3,
    "ensemble": 3,
    "cli": 4, "serve": 4, "report": 4, "demo": 4, "__main__": 5, "__init__": 0,
}
FOUNDATION = {"errors", "progress", "machine", "recipes", "distributed", "tables", "cache", "stages", "training_log",
              "validation", "outputs", "jsonio"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The sentilens modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` when it is a module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports_of(path, modules) - {name} for name, path in paths.items()}


def layer(module: str) -> tuple[str, int]:
    top = module.split(".")[1] if "." in module else "__init__"
    group = "foundation" if top in FOUNDATION else top
    return group, LAYERS[group]


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(child):] + [child]))
            if child not in state:
                visit(child)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_import_goes_to_the_same_layer_or_below_and_families_stay_apart(graph):
    wrong = []
    for module, imported in graph.items():
        group, level = layer(module)
        for target in imported:
            target_group, target_level = layer(target)
            if target_level > level or (level == 3 and target_level == 3 and group != target_group):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_family_checks_outside_the_family_packages():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] in ("mllm", "fusion"):  # the family packages, subpackages included
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"family\s*[!=]=|[!=]=\s*[\"'](mllm|fusion)[\"']", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []


def test_records_is_the_bottom_of_the_data_layer(graph):
    assert all(layer(target)[0] == "foundation" for target in graph["sentilens.data.records"])  # nothing of data/
    readers = ("mvsa", "crisismmd", "table")
    for reader in readers:
        assert "sentilens.data.prepare" not in graph[f"sentilens.data.{reader}"]


def read_toy(root: Path, flavour: str = "plain") -> RawDataset:
    """A reader written the way docs/architecture.md says: one function returning a RawDataset."""
    posts = []
    for i in range(20):
        path = root / f"{i}.png"
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(path)
        posts.append(Post(f"t{i}", f"{flavour} post {i}", str(path), "yes" if i % 2 else "no"))
    return RawDataset(labels=["yes", "no"], posts=posts, dropped=[Dropped("bad", "no text: empty", "x")],
                      source={"name": "toy"})


def test_a_reader_registered_in_one_line_prepares_a_manifest(tmp_path, monkeypatch):
    from sentilens.data import prepare

    monkeypatch.setitem(prepare.READERS, "toy", "test_architecture:read_toy")
    monkeypatch.setattr(prepare, "FORMATS", tuple(prepare.READERS))
    stats = prepare.prepare("toy", tmp_path, tmp_path / "out", seed=1, show_progress=False)
    assert stats["labels"] == ["yes", "no"] and sum(stats["totals"].values()) == 20
    assert sum(len(posts) for posts in read_manifest(tmp_path / "out").values()) == 20
    assert read_stats(tmp_path / "out")["source"]["format"] == "toy"
    with pytest.raises(SentilensError, match="--task and --agreed-only apply to --format crisismmd only"):
        prepare.read_raw("toy", tmp_path, task="humanitarian")
    with pytest.raises(SentilensError, match="unknown format 'nope'"):
        prepare.read_raw("nope", tmp_path)
