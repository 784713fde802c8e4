"""pipeline/ follows the data's path (docs/design.md#layers-and-the-purity-rule): no import cycles, no stage
imports a later stage or the driver, and only the recording stage imports MLflow.

Static checks: every ``pipeline/**/*.py`` is parsed and every import is counted, also those inside functions
and ``if TYPE_CHECKING:`` blocks. Each checker is first shown to catch a planted violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_purity import forbidden_imports  # tests/ is on sys.path (pytest rootdir-relative imports)

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"

# The stages in the data's order; a module may import only modules of an earlier stage or of its own package.
# Recording comes before the search because trials write their MLflow runs while they train; it imports no
# other stage. The driver is the only module that knows a study's whole shape.
STAGES = (
    ("pipeline.errors",),
    ("pipeline.fileio", "pipeline.devices"),
    ("pipeline.study_lock",),
    ("pipeline.models",),
    ("pipeline.actor_pool",),
    ("pipeline.teacher",),
    ("pipeline.recording",),
    ("pipeline.search", "pipeline.progress", "pipeline.preflight"),
    ("pipeline.evaluation",),
    ("pipeline.summary",),
    ("pipeline.study_config",),
    ("pipeline.driver",),
    ("pipeline.cli", "pipeline.export_cli", "pipeline.consumers"),
    ("pipeline.model_studies",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def pipeline_modules() -> dict[str, Path]:
    """Every module under pipeline/ but its empty top-level ``__init__``."""
    return {module_name(path): path for path in sorted(PIPELINE.rglob("*.py")) if path != PIPELINE / "__init__.py"}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The pipeline modules ``path`` imports (``from package import submodule`` counts the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path}:{node.lineno}: relative import; import pipeline modules by full name")
    return {name for name in found if name in known}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def stage_of(module: str) -> tuple[int, str]:
    """(rank, package) of a pipeline module; the package is the stage's prefix the module falls under."""
    for rank, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return rank, prefix
    raise AssertionError(f"{module} belongs to no stage; add it to STAGES in tests/test_architecture.py")


def backward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a later stage, or of another package of the same stage."""
    found = []
    for module, targets in sorted(graph.items()):
        rank, package = stage_of(module)
        for target in sorted(targets):
            target_rank, target_package = stage_of(target)
            if target_rank > rank or (target_rank == rank and target_package != package):
                found.append(f"{module} -> {target}")
    return found


def test_the_checkers_catch_planted_violations():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert backward_imports({"pipeline.teacher.cache": {"pipeline.driver"}}) == ["pipeline.teacher.cache -> pipeline.driver"]
    assert backward_imports({"pipeline.recording.runs": {"pipeline.search.trial"}})
    assert backward_imports({"pipeline.fileio": {"pipeline.devices"}})  # another package of the same stage
    assert backward_imports({"pipeline.search.trial": {"pipeline.teacher.cache"}}) == []


def test_every_pipeline_module_belongs_to_a_stage():
    for module in pipeline_modules():
        stage_of(module)


def test_pipeline_has_no_import_cycle():
    cycle = find_cycle(import_graph(pipeline_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_imports_a_later_stage_or_the_driver():
    graph = import_graph(pipeline_modules())
    assert not backward_imports(graph), "imports against the data's path:\n" + "\n".join(backward_imports(graph))
    assert all("pipeline.driver" not in targets for module, targets in graph.items()
               if stage_of(module)[0] < stage_of("pipeline.driver")[0])


def test_only_the_recording_stage_imports_mlflow():
    found = [hit for name, path in pipeline_modules().items() if not name.startswith("pipeline.recording")
             for hit in forbidden_imports(path, ("mlflow",))]
    assert not found, "MLflow outside pipeline/recording/:\n" + "\n".join(found)
    assert forbidden_imports(PIPELINE / "recording" / "runs.py", ("mlflow",))  # the scan does see MLflow imports
