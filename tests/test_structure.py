"""The package's shape: no import circle among alum_ds modules (module- and function-level
imports alike), no function body over 60 lines of code (its docstring not counted: it is the
function's documentation), both trainers' entry points short."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "alum_ds"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        name = ".".join(("alum_ds", *f.relative_to(PKG).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(tree: ast.AST, mods: dict[str, Path], me: str) -> set[str]:
    out = set()
    for n in ast.walk(tree):
        names = []
        if isinstance(n, ast.ImportFrom) and n.module:
            names = [n.module, *(f"{n.module}.{a.name}" for a in n.names)]
        elif isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        out |= {x for x in names if x in mods and x != me}
    return out


def test_no_import_circle() -> None:
    mods = _modules()
    edges = {m: _imports(ast.parse(f.read_text()), mods, m) for m, f in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif not state.get(v):
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(mods):
        if not state.get(m):
            visit(m)
    assert not cycles, cycles


def test_function_lengths() -> None:
    lengths = {}
    for f in PKG.rglob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{f.relative_to(PKG)}:{n.name}"] = n.end_lineno - _code_start(n) + 1
    too_long = {k: v for k, v in lengths.items() if v > 60}
    assert not too_long, too_long
    assert lengths["trainer.py:train"] < 40 and lengths["finetune/loop.py:finetune"] < 40


def _code_start(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The line of a function's first statement after its docstring."""
    body = fn.body
    doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    return body[1].lineno if doc and len(body) > 1 else body[0].lineno
