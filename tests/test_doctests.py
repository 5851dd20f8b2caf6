"""The examples in the package's docstrings run as written (they render as code blocks on the
API page): every module with a `>>>` example is doctested, and each must have examples that ran."""

import doctest
import importlib
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "modeling_performer"
MODULES = sorted(f"modeling_performer.{p.stem}" for p in PACKAGE.glob("*.py") if ">>>" in p.read_text())


def test_the_modules_with_examples_are_found():
    assert {"modeling_performer.configuration_performer", "modeling_performer.bundled"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
