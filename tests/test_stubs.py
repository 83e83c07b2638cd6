"""The type stubs and the compiled module name the same classes, methods and functions."""

import ast
import inspect
from pathlib import Path

import exo
import exo._core as core

STUB = Path(exo.__file__).parent / "_core.pyi"


def _public(names: set[str]) -> set[str]:
    return {n for n in names if not n.startswith("_")}


def _stub_module() -> ast.Module:
    return ast.parse(STUB.read_text())


def _stub_top_level() -> dict[str, ast.stmt]:
    members: dict[str, ast.stmt] = {}
    for node in _stub_module().body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            members[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members[node.target.id] = node
    return members


def test_module_level_names_match() -> None:
    assert _public(set(_stub_top_level())) == _public(set(dir(core)))


def test_class_members_match() -> None:
    for name, node in _stub_top_level().items():
        if not isinstance(node, ast.ClassDef) or name.startswith("_"):
            continue
        declared = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        runtime = set(vars(getattr(core, name)))
        assert _public(declared) == _public(runtime), name


def test_stubbed_functions_are_functions() -> None:
    for name, node in _stub_top_level().items():
        if isinstance(node, ast.FunctionDef):
            assert callable(getattr(core, name)), name
        if isinstance(node, ast.ClassDef) and not name.startswith("_"):
            assert inspect.isclass(getattr(core, name)), name
