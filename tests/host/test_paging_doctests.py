"""The runnable examples in kvcl.paging's docstrings stay correct."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["kvcl.paging", "kvcl.paging.allocator", "kvcl.paging.prefix",
           "kvcl.paging.page_table", "kvcl.paging.sequences"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0
