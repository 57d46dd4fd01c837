"""The library's source keeps the shape the design asks for (AST scans: fast, no backend).

- Owned resources (task groups, guards, connections) are entered with ``async with`` or through an
  ``AsyncExitStack``, never by calling ``__aenter__``/``__aexit__`` by hand. The one call allowed is an object's own
  ``__aexit__`` handing its arguments, unchanged, to the ``AsyncExitStack`` that holds what it entered (a stack is
  the only way to give an exit the body's exception).
- No module-level registry keyed by session: per-session state lives on the `Session`.
- No function over 50 lines (``end_lineno - lineno``, docstring included).
- Every public method and property of the public classes (``coordkit.__all__``) has a docstring, and every field
  of a public dataclass or named tuple is described in its class's docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Iterator
from pathlib import Path

import coordkit

SOURCE = Path(coordkit.__file__).parent

MAX_FUNCTION_LINES = 50
ALLOWED_LONG_FUNCTIONS = {
    # The linearizability checker's search: one hot loop over a linked list of events, kept whole for speed.
    "testing/_linearizability.py:_search",
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
    assert sorted(f"{where} (line {line})" for where, line in found) == []


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


def test_no_long_functions() -> None:
    found = {
        f"{path}:{qualname}": function.end_lineno - function.lineno
        for path, tree in _modules()
        for qualname, function in _functions(tree)
        if function.end_lineno is not None and function.end_lineno - function.lineno > MAX_FUNCTION_LINES
    }
    assert {where: lines for where, lines in found.items() if where not in ALLOWED_LONG_FUNCTIONS} == {}
    assert set(found) >= ALLOWED_LONG_FUNCTIONS, "an allowed function is short now: take it off the list"


def _described(docstring: str) -> set[str]:
    """Names a docstring describes: ``name:`` (or ``a, b:``) starting a line, or ``name`` in double backquotes."""
    described = set(re.findall(r"``(\w+)``", docstring))
    for line in docstring.splitlines():
        if match := re.match(r"\s*(\w+(?:, \w+)*):", line):
            described.update(match.group(1).split(", "))
    return described


def _undocumented() -> Iterator[str]:
    for name in coordkit.__all__:
        public = getattr(coordkit, name)
        if not inspect.isclass(public):
            continue
        for cls in public.__mro__:
            if not cls.__module__.startswith("coordkit"):
                continue  # object, tuple, Enum...: documented where they are defined
            for attribute, value in vars(cls).items():
                function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if not attribute.startswith("_") and inspect.isfunction(function) and not function.__doc__:
                    yield f"{name}.{attribute}"
        fields: tuple[str, ...] = getattr(public, "_fields", ())  # a named tuple's
        if dataclasses.is_dataclass(public):
            fields = tuple(f.name for f in dataclasses.fields(public))
        described = _described(public.__doc__ or "")
        for field in fields:
            if field not in described:
                yield f"{name}.{field}"


def test_public_methods_properties_and_fields_are_documented() -> None:
    missing = set(_undocumented())
    assert sorted(missing) == []
