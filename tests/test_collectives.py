"""Collectives as NCCL takes them: it reduces and gathers GPU tensors only ("No backend type associated with device
type cpu"), and the trainer builds many small tensors (counts, flags, rewards) on the host. Every tensor collective
goes through vlmfast/ranks.py, which moves a host tensor to the current GPU under NCCL and back (its rule is tested in
test_faults.py); a collective called anywhere else would meet NCCL with whatever tensor it was given. Read from the
source with `ast`, so a new call site fails here, not on the first multi-GPU run."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TENSOR_COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                      "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single"}


def _collective_calls(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in TENSOR_COLLECTIVES and "distributed" in ast.unparse(node.func.value):
            out.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node.func)}")
    return out


def test_every_tensor_collective_goes_through_ranks_py():
    calls = [c for p in sorted((ROOT / "vlmfast").rglob("*.py")) for c in _collective_calls(p)]
    assert calls, "the scan found no collective at all: it reads the wrong thing"
    outside = [c for c in calls if not c.startswith("vlmfast/ranks.py")]
    assert not outside, outside


def test_ranks_py_moves_every_tensor_it_hands_a_collective():
    """In ranks.py each tensor collective's tensor comes from `.to(_collective_device(...))`."""
    source = (ROOT / "vlmfast" / "ranks.py").read_text()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, ast.FunctionDef) and any(c.split()[-1].rsplit(".", 1)[-1] in TENSOR_COLLECTIVES
                                                   for c in _fn_calls(fn)):
            assert "_collective_device(" in ast.unparse(fn), fn.name


def _fn_calls(fn) -> list[str]:
    return [ast.unparse(n.func) for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr in TENSOR_COLLECTIVES and "distributed" in ast.unparse(n.func.value)]
