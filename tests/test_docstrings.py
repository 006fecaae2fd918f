"""The examples in the package's docstrings run and print what they show (``doctest``).

Examples that need a GPU, real weights or a build on disk are marked ``# doctest: +SKIP`` where
they stand; every other one runs here, as part of the default suite.
"""

import doctest
import importlib
from pathlib import Path

import pytest

import atedm_compile

PACKAGE = Path(atedm_compile.__file__).parent
MODULES = sorted(
    ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py") if ">>>" in path.read_text()
)


def test_examples_are_found():
    assert "atedm_compile.runner" in MODULES and "atedm_compile.schedule" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (output above)"
