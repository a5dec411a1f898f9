"""Every worked example in a docstring is executable documentation: run them all."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import attnstore

MODULES = sorted(m.name for m in pkgutil.walk_packages(attnstore.__path__, "attnstore."))


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
