"""Cheap static guards that hold, on a CPU-only CI, rules that otherwise only a GPU run would show.

No unmarked host synchronization in the launch paths: the README promises a forward and backward
with no host sync (and CUDA graphs depend on it), but on the CPU a sync costs nothing and no test
can see one. So every module of vmoe/ that launches kernels is parsed, and each call that reads a
device value back to the host is flagged unless its line says ``# host-ok`` (with the reason):

- ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``torch.cuda.synchronize()``;
- ``int(...)``, ``float(...)``, ``bool(...)`` of anything that is not evidently a host value.

Evidently host values: literals; ``len()``; ``.shape``, ``.ndim``, ``.stride()``, ``.size()``,
``.numel()``, ``.dim()``, ``.element_size()``; parameters annotated ``int``, ``float`` or ``bool``;
local names bound only to such values (or to a ``range``'s items); and arithmetic, comparisons,
subscripts, ``min``/``max``/``abs``/``round``/``cdiv``/``next_power_of_2`` of those. A bare name
of unknown type is flagged: ``int(w)`` syncs when ``w`` is a CUDA tensor.

Implicit syncs (``if t.any():``, ``t.nonzero()``, a tensor used as a Python index) are not seen:
they need types, which the AST does not have.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vmoe"
# Off the launch paths: the oracle, the checks and the measuring tools (vmoe/bench/) may read values
# back. Paths relative to vmoe/; a folder ends in "/".
OFF_LAUNCH_PATH = {"reference.py", "validate.py", "testing.py", "bench/"}
MARKER = "# host-ok"

SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
CASTS = {"int", "float", "bool"}
HOST_ATTRS = {"shape", "ndim"}
HOST_METHODS = {"stride", "size", "numel", "dim", "element_size"}
HOST_FUNCS = {"min", "max", "abs", "round", "cdiv", "next_power_of_2"}
HOST_ANNOTATIONS = {"int", "float", "bool"}


def _func_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


HOST, UNKNOWN = "host", "unknown"  # bindings that are not expressions: a range item, a parameter


class _Scope:
    """Names of one function that are evidently host values."""

    def __init__(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | None):
        self.host: set[str] = set()
        if fn is None:
            return
        bindings: dict[str, list] = {}
        args = fn.args
        for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
            if a is not None:
                host = isinstance(a.annotation, ast.Name) and a.annotation.id in HOST_ANNOTATIONS
                bindings.setdefault(a.arg, []).append(HOST if host else UNKNOWN)
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    self._bind(target, node.value, bindings)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value:
                self._bind(node.target, node.value, bindings)  # n += v is host when n and v are
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                it = node.iter
                kind = HOST if isinstance(it, ast.Call) and _func_name(it.func) == "range" else UNKNOWN
                for name in ast.walk(node.target):
                    if isinstance(name, ast.Name):
                        bindings.setdefault(name.id, []).append(kind)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        self._bind(item.optional_vars, UNKNOWN, bindings)
        # Least fixpoint: a name is host once every one of its bindings is, so T = x.shape[0];
        # n = T * k makes n host, and a name bound once to a tensor never is.
        changed = True
        while changed:
            changed = False
            for name, values in bindings.items():
                if name not in self.host and all(
                        v == HOST or (v != UNKNOWN and self.is_host(v)) for v in values):
                    self.host.add(name)
                    changed = True

    @staticmethod
    def _bind(target, value, bindings):
        if isinstance(target, ast.Name):
            bindings.setdefault(target.id, []).append(value)
        elif isinstance(target, ast.Starred):
            _Scope._bind(target.value, UNKNOWN, bindings)
        elif isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for t, v in zip(target.elts, value.elts):
                    _Scope._bind(t, v, bindings)
            else:  # T, d = x.shape is host (an item of a host value); T, d = f(x) is unknown
                item = UNKNOWN if value == UNKNOWN else ast.Subscript(value, ast.Constant(0))
                for t in target.elts:
                    _Scope._bind(t, item, bindings)

    def is_host(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.Name):
            return node.id in self.host
        if isinstance(node, ast.Attribute):
            return node.attr in HOST_ATTRS
        if isinstance(node, ast.Subscript):
            return self.is_host(node.value)
        if isinstance(node, (ast.Tuple, ast.List)):
            return all(self.is_host(e) for e in node.elts)
        if isinstance(node, ast.BinOp):
            return self.is_host(node.left) and self.is_host(node.right)
        if isinstance(node, ast.UnaryOp):
            return self.is_host(node.operand)
        if isinstance(node, ast.BoolOp):
            return all(self.is_host(v) for v in node.values)
        if isinstance(node, ast.Compare):
            return self.is_host(node.left) and all(self.is_host(c) for c in node.comparators)
        if isinstance(node, ast.IfExp):
            return self.is_host(node.body) and self.is_host(node.orelse)
        if isinstance(node, ast.Call):
            name = _func_name(node.func)
            if isinstance(node.func, ast.Attribute) and name in HOST_METHODS:
                return True
            if name == "len" and isinstance(node.func, ast.Name):
                return True
            if name in HOST_FUNCS and (isinstance(node.func, ast.Name)
                                       or name in ("cdiv", "next_power_of_2")):
                return all(self.is_host(a) for a in node.args) and not node.keywords
            if name in CASTS and not isinstance(node.func, ast.Attribute):
                return all(self.is_host(a) for a in node.args)
        return False


def _sync_reason(call: ast.Call, scope: _Scope) -> str | None:
    func = call.func
    if isinstance(func, ast.Attribute):
        if func.attr in SYNC_METHODS:
            return f".{func.attr}()"
        if (func.attr == "synchronize" and isinstance(func.value, ast.Attribute)
                and func.value.attr == "cuda"):
            return "torch.cuda.synchronize()"
        return None
    if isinstance(func, ast.Name) and func.id in CASTS and call.args:
        if not all(scope.is_host(a) for a in call.args):
            return f"{func.id}() of {ast.unparse(call.args[0])}"
    return None


def find_host_syncs(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every unmarked host synchronization in ``source``."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, _Scope(child))
                continue
            if isinstance(child, ast.Call):
                reason = _sync_reason(child, scope)
                span = lines[child.lineno - 1:(child.end_lineno or child.lineno)]
                if reason and not any(MARKER in line for line in span):
                    found.append(f"{filename}:{child.lineno}: {reason} reads a device value on the "
                                 f"host; avoid it, or mark the line '{MARKER}: <why>'")
            visit(child, scope)

    visit(tree, _Scope(None))
    return found


def launch_path_modules() -> list[Path]:
    def off(p: Path) -> bool:
        rel = p.relative_to(PACKAGE).as_posix()
        return any(rel == o or (o.endswith("/") and rel.startswith(o)) for o in OFF_LAUNCH_PATH)

    return sorted(p for p in PACKAGE.rglob("*.py") if not off(p))


PLANTED = '''
import torch

def launch(x: torch.Tensor, counts, n: int, flag: bool):
    T, d = x.shape
    rows = T * 2 + len(counts)
    n_max = int(counts.max())
    if bool(counts.any()):
        pass
    first = counts[0].item()
    ids = counts.tolist()
    torch.cuda.synchronize()
    host = counts.cpu()
    for w in counts:
        width = int(w)
    for i in range(3):
        ok_loop = int(i * d)
    ok = int(rows) + int(n) + float(x.stride(0) * x.element_size()) + int(bool(flag))
    ok_shape = int(max(x.size(1), 1)) + int(x.numel() // x.dim())
    fill = float("nan")
    marked = int(counts.sum())  # host-ok: planted, and marked
    return int(
        counts.sum())  # host-ok: a marker on the call's last line counts too
'''


def test_checker_catches_planted_syncs():
    found = find_host_syncs(PLANTED, "planted.py")
    got = {(int(f.split(":")[1]), f.split(": ", 1)[1].split(" reads")[0]) for f in found}
    assert got == {
        (7, "int() of counts.max()"),
        (8, "bool() of counts.any()"),
        (10, ".item()"),
        (11, ".tolist()"),
        (12, "torch.cuda.synchronize()"),
        (13, ".cpu()"),
        (15, "int() of w"),
    }, "\n".join(found)
    assert all(f.startswith("planted.py:") for f in found)


def test_checker_tracks_rebinding():
    src = "def f(x, t):\n    n = x.shape[0]\n    n = t.sum()\n    return int(n)\n"
    assert [f.split(":")[1] for f in find_host_syncs(src, "f.py")] == ["4"]


def test_no_unmarked_host_sync_in_launch_paths():
    modules = launch_path_modules()
    assert any(p.name == "grouped_gemm.py" for p in modules), "the scan found no launch-path module"
    found = []
    for path in modules:
        rel = str(path.relative_to(ROOT))
        found += find_host_syncs(path.read_text(), rel)
    assert not found, "unmarked host synchronization:\n" + "\n".join(found)
