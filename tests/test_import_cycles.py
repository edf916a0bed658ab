"""No import circle in vlmfast/ or bench/: every import of a module of ours (at the top of a file or inside a
function: a lazy import still ties the two files together) is read from the source with `ast`, and the graph must
have no cycle. Importing a package from inside it (`from vlmfast import x` in vlmfast/ops) is not an edge."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(packages=("vlmfast", "bench")) -> dict[str, set[str]]:
    files = {_module(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                full = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                names = [full] + [f"{full}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `from pkg import name`: the module, or its package
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_vlmfast_or_bench():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "vlmfast.kernels.rows" in graph["vlmfast.kernels.token_stats_sm90"]  # edges are read
    assert "vlmfast.data.loading" in graph["vlmfast.plan"]  # lazy imports too
