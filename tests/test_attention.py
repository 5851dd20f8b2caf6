"""`attention` is the kernels' public face and nothing more: it re-exports each variant's public
names, as the very objects the variant modules define, and defines nothing of its own."""

import ast
import importlib

from modeling_performer import attention

from .conftest import ROOT


def test_the_module_only_imports_and_lists_what_it_exports():
    tree = ast.parse((ROOT / "modeling_performer" / "attention.py").read_text())
    kinds = {type(node).__name__ for node in tree.body[1:]}  # after the docstring
    assert kinds <= {"ImportFrom", "Assign"}, kinds
    (listing,) = [node for node in tree.body if isinstance(node, ast.Assign)]
    assert [target.id for target in listing.targets] == ["__all__"]
    imported = {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert set(attention.__all__) == imported and attention.__all__ == sorted(attention.__all__)


def test_every_exported_name_is_the_variant_modules_own_public_object():
    tree = ast.parse((ROOT / "modeling_performer" / "attention.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            source = importlib.import_module(f"modeling_performer.{node.module}")
            for alias in node.names:
                assert not alias.name.startswith("_"), alias.name
                assert getattr(attention, alias.name) is getattr(source, alias.name), alias.name
