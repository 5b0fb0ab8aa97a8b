"""The docstring examples run: every module's ``>>>`` lines are executed and their printed output compared."""

import doctest
import importlib
import pkgutil

import pytest

import paddle_pinn_balance
from paddle_pinn_balance.contract import discover

MODULES = sorted(m.name for m in pkgutil.walk_packages(paddle_pinn_balance.__path__, "paddle_pinn_balance.")
                 if m.name != "paddle_pinn_balance.__main__")

#: the modules whose docstrings show a worked example (each method's class at least)
WITH_EXAMPLES = {"causal", "config", "self_adaptive"} | {  # (Sum, balancer.py's example, is in fixed.py)
    builder.method_class.__module__.rsplit(".", 1)[-1] for builder, _ in discover().values()}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (run it for the diff)"
    if name.rsplit(".", 1)[-1] in WITH_EXAMPLES:
        assert result.attempted > 0, f"{name} has lost its docstring examples"
