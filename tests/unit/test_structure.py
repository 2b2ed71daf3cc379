"""The package's shape: no import circle, CP traffic only in titan_cp/cp/, small files.

- Import graph: the titan_cp modules each module imports when it is imported,
  plus the implicit edge to the parent packages' ``__init__`` of what it
  imports, form a DAG; in the core layers (kernels, GDN ops, CP, model) and
  the config layer with titan_cp.hf also counting imports inside functions
  (no function-local import hides a circle there). And a fresh interpreter imports everything with each layer
  first (the order in which a circle would show).
- torch.distributed collectives (all-gather, all-to-all, point-to-point, ...)
  are called only in titan_cp/cp/ (comm.py does the calls), except the
  allow-listed non-CP uses below.
- No source file over 450 lines, except the kernels, whose length is their math.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "titan_cp"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _import_nodes(tree: ast.Module, function_level: bool):
    """Import statements anywhere (``function_level``) or only those run at import time."""
    if function_level:
        yield from ast.walk(tree)
        return
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):  # module-level blocks run at import
            is_type_checking = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            if not is_type_checking:
                todo.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            todo.extend(node.body)


def imported_modules(path: Path, modules: set[str], function_level: bool = True) -> set[str]:
    """titan_cp modules ``path`` imports (``from x import y``: x.y if that is a module, else x)."""
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text()), function_level):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # "import a.b.c" where c is an attribute
                name = name.rpartition(".")[0]
            if name and name != own:
                found.add(name)
    return found


def import_graph(function_level: bool = True, within: tuple[str, ...] = ("titan_cp",)) -> dict[str, set[str]]:
    """Module -> the titan_cp modules importing it runs, for modules named ``within*``."""
    files = {n: p for n, p in source_files().items() if n.startswith(within)}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        edges = imported_modules(path, modules, function_level)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless they are this module's own
        # ancestors (already being imported when this module runs).
        ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        for target in list(edges):
            parent = target.rpartition(".")[0]
            while parent:
                if parent not in ancestors and parent != name:
                    edges.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = {e for e in edges if e in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# The layers, lowest first. A module may import its own layer and those below it, never one above,
# not even inside a function (that is how upward arrows hide). Family folders hold two layers:
# the model (model.py, layers, parallelize, adapters) and, at the trainer layer, config_registry.py.
LAYERS = (
    ("errors", ("titan_cp.errors",)),
    ("ops", ("titan_cp.ops",)),
    ("cp", ("titan_cp.cp",)),
    ("models", ("titan_cp.models",)),
    ("analysis and library", ("titan_cp.analysis", "titan_cp.library")),
    ("components", ("titan_cp.components",)),
    ("trainer", ("titan_cp.train", "titan_cp.models.registry", "titan_cp.config_registry",
                 *(f"titan_cp.models.{f.parent.name}.config_registry"
                   for f in sorted((REPO / "titan_cp" / "models").glob("*/config_registry.py"))))),
    ("cli", ("titan_cp.cli",)),
    ("testing", ("titan_cp.testing",)),
)


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the longest prefix naming ``module`` (None: the package root, which imports lazily)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


FAMILY_FILES = ("__init__.py", "config_registry.py", "model.py", "parallelize.py", "state_dict_adapter.py")


def test_every_module_has_a_layer():
    missing = [n for n in source_files() if n != "titan_cp" and layer_of(n) is None]
    assert not missing, f"add these modules' packages to LAYERS: {missing}"


def test_no_import_from_a_higher_layer():
    graph = import_graph(function_level=True)
    upward = []
    for source, targets in graph.items():
        for target in targets:
            if target == "titan_cp" or source == "titan_cp":
                continue
            if layer_of(target) > layer_of(source):
                upward.append(f"{source} ({LAYERS[layer_of(source)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_import_graph_has_no_circle():
    graph = import_graph(function_level=False)
    assert "titan_cp.cp.state_passing" in graph["titan_cp.cp"]  # the parser sees the edges
    assert "titan_cp.cp" in graph["titan_cp.models.gdn.layers"]  # and the parent packages of what they import
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_circle_even_through_function_level_imports():
    graph = import_graph(function_level=True)
    assert "titan_cp.ops.gated_delta_rule.mixing" in graph["titan_cp.cp.head_parallel"]
    assert "titan_cp.models.gdn.state_dict_adapter" in graph["titan_cp.models.gdn.config_registry"]  # function-level
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_family_folder_has_the_common_files():
    families = [d for d in (PACKAGE / "models").iterdir() if d.is_dir() and d.name not in ("common", "__pycache__")]
    assert {"gdn", "qwen3_5"} <= {d.name for d in families}
    missing = {d.name: [f for f in FAMILY_FILES if not (d / f).exists()] for d in families}
    assert not any(missing.values()), f"family folders lack the common files: {missing}"


def test_no_sys_path_edits():
    pattern = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path \+?=")
    here = Path(__file__).resolve()
    offenders = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*.py")
                 if ".git" not in p.parts and p.resolve() != here and pattern.search(p.read_text())]
    assert not offenders, f"sys.path edits (import through the packages instead): {offenders}"


@pytest.mark.parametrize("first", ["titan_cp.cp.comm", "titan_cp.ops.gated_delta_rule.mixing", "titan_cp.models.gdn.layers"])
def test_each_layer_imports_first_in_a_fresh_interpreter(first):
    names = [first] + sorted(n for n in source_files() if n != first and not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


COLLECTIVES = (
    r"all_gather\w*|all_reduce\w*|reduce_scatter\w*|all_to_all\w*|batch_isend_irecv|isend|irecv|send|recv"
    r"|broadcast\w*|P2POp|gather|scatter|_functional_collectives|nn\.functional"
)
COLLECTIVE_CALL = re.compile(rf"\b(?:dist|torch\.distributed)\.(?:{COLLECTIVES})\b"
                             rf"|from\s+torch\.distributed(?:\.nn)?(?:\.functional)?\s+import\s+[^\n]*\b(?:{COLLECTIVES})\b"
                             r"|_functional_collectives")
NOT_CP_TRAFFIC = {
    "titan_cp/components/metrics.py": "all-gathers each rank's step metrics for the log (not CP traffic)",
    "titan_cp/components/checkpoint_integrity.py": "gathers checkpoint checksums across ranks (not CP traffic)",
    "titan_cp/cli/evaluate.py": "sums the evaluation loss totals over the ranks (not CP traffic)",
    "titan_cp/models/gdn/mamba2_layer.py": "averages the gated norm's mean of squares over the TP ranks (TP, not CP traffic)",
}


def test_collective_regex_is_precise():
    hits = ["dist.all_gather(parts, x)", "torch.distributed.batch_isend_irecv(ops)", "dist.P2POp(dist.isend, t, 1)",
            "from torch.distributed import all_to_all_single", "funcol = torch.distributed._functional_collectives"]
    misses = ["dist.get_world_size(group)", "dist.get_rank()", "dist.barrier()", "import torch.distributed as dist",
              "comm.all_gather_list(x, group, P)", "dist.is_initialized()"]
    assert all(COLLECTIVE_CALL.search(h) for h in hits)
    assert not any(COLLECTIVE_CALL.search(m) for m in misses)


def test_cp_traffic_only_in_cp_package():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("titan_cp/cp/") or rel in NOT_CP_TRAFFIC:
            continue
        lines = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                 if COLLECTIVE_CALL.search(line)]
        if lines:
            offenders[rel] = lines
    assert not offenders, f"torch.distributed collectives outside titan_cp/cp/ (route them through cp/comm.py): {offenders}"
    cp_callers = {p.name for p in (PACKAGE / "cp").glob("*.py") if COLLECTIVE_CALL.search(p.read_text())}
    assert cp_callers == {"comm.py"}, f"inside cp/, only comm.py calls torch.distributed collectives: {cp_callers}"


LONG_FILE_LINES = 450
# Kernels, whose length is their math: the chunked WY/UT algorithm, forward and hand-written backward.
LONG_BY_MATH = {"titan_cp/ops/gated_delta_rule/chunk.py"}
CHECKED_FOR_LENGTH = ("titan_cp", "benchmarks", "tools", "tests")


def test_no_file_is_too_long():
    long = {}
    paths = [p for d in CHECKED_FOR_LENGTH for p in (REPO / d).rglob("*.py")]
    for path in sorted(paths):
        rel = path.relative_to(REPO).as_posix()
        n = len(path.read_text().splitlines())
        if n > LONG_FILE_LINES and rel not in LONG_BY_MATH:
            long[rel] = n
    assert not long, f"files over {LONG_FILE_LINES} lines (split them by concern): {long}"
