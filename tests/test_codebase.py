"""The library's source keeps the shape the design asks for (AST scans: fast, no backend).

- Owned resources (task groups, guards, connections) are entered with ``async with`` or through an
  ``AsyncExitStack``, never by calling ``__aenter__``/``__aexit__`` by hand. The one call allowed is an object's own
  ``__aexit__`` handing its arguments, unchanged, to the ``AsyncExitStack`` that holds what it entered (a stack is
  the only way to give an exit the body's exception).
- No module-level registry keyed by session: per-session state lives on the `Session`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import coordkit

SOURCE = Path(coordkit.__file__).parent

# The work queue is being brought into line by its owner (issue 14); the lead removes these at merge.
# Entries are "<path relative to coordkit/>:<function qualname>".
ALLOWED_DUNDER_CALLS = {
    "_recipes/workqueue.py:_Lease.__aenter__",
    "_recipes/workqueue.py:_Lease.__aexit__",
}


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(SOURCE.rglob("*.py")):
        yield path.relative_to(SOURCE).as_posix(), ast.parse(path.read_text(), filename=str(path))


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function with its qualified name (``Class.method``, ``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _forwards_exit_to_stack(function: ast.FunctionDef | ast.AsyncFunctionDef, call: ast.Call) -> bool:
    """``<...>stack.__aexit__(exc_type, exc, tb)`` inside ``__aexit__(self, exc_type, exc, tb)``."""
    assert isinstance(call.func, ast.Attribute)
    receiver = call.func.value
    name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
    params = [arg.arg for arg in function.args.args[1:]]
    args = [arg.id if isinstance(arg, ast.Name) else None for arg in call.args]
    return (
        function.name == "__aexit__"
        and call.func.attr == "__aexit__"
        and name.endswith("stack")
        and not call.keywords
        and args == params
    )


def _dunder_calls(trees: Iterator[tuple[str, ast.Module]]) -> Iterator[tuple[str, int]]:
    """``(where, line)`` of every ``__aenter__``/``__aexit__`` call that is not an exit forwarded to a stack."""
    for path, tree in trees:
        for qualname, function in _functions(tree):
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("__aenter__", "__aexit__")
                    and not _forwards_exit_to_stack(function, node)
                ):
                    yield f"{path}:{qualname}", node.lineno


def test_no_hand_called_async_dunders() -> None:
    found = set(_dunder_calls(_modules()))
    assert sorted(f"{where} (line {line})" for where, line in found if where not in ALLOWED_DUNDER_CALLS) == []
    # The allowance shrinks as the work queue is fixed: an entry nobody needs any more must go.
    assert {where for where, _ in found} >= ALLOWED_DUNDER_CALLS


def test_the_dunder_scan_finds_what_it_forbids() -> None:
    """The rule itself: a guard entered by hand, or an exit not forwarded unchanged to a stack, is found."""
    code = (
        "class A:\n"
        "    async def __aenter__(self):\n"
        "        await self._guard.__aenter__()\n"
        "    async def __aexit__(self, exc_type, exc, tb):\n"
        "        return await self._stack.__aexit__(exc_type, exc, tb)\n"
        "class B:\n"
        "    async def __aexit__(self, exc_type, exc, tb):\n"
        "        await self._task_group.__aexit__(None, None, None)\n"
        "        await self._stack.__aexit__(None, None, None)\n"
    )
    found = sorted(_dunder_calls(iter([("m.py", ast.parse(code))])))
    assert found == [("m.py:A.__aenter__", 3), ("m.py:B.__aexit__", 8), ("m.py:B.__aexit__", 9)]


def test_no_module_level_state_keyed_by_session() -> None:
    """Per-session state lives on the Session (``KeysInUse``), emptied with it: no module-level registry of it."""
    found = []
    for path, tree in _modules():
        for node in tree.body:
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if isinstance(node, ast.AnnAssign | ast.Assign) and "Session" in names:
                found.append(f"{path} (line {node.lineno}): {ast.unparse(node)}")
    assert found == []
