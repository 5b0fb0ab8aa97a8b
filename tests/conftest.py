import os
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

from reference import DEVICE, DTYPE  # noqa: E402

# PADDLE_PINN_BALANCE_DEVICE=gpu:0 runs the suite on that device (default: the CPU, also on a GPU build).
paddle.set_device(DEVICE)

# PADDLE_PINN_BALANCE_DTYPE=float64 runs the suite with float64 as Paddle's default dtype (reference.DTYPE:
# test helpers build their nets and data in it).
paddle.set_default_dtype(DTYPE)

# Warnings of our own package (category BalanceWarning) are errors in tests (pytest.ini); a test that expects
# one catches it with `pytest.warns`.


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _doctest_seed(doctest_namespace):
    doctest_namespace["paddle"] = paddle
    doctest_namespace["np"] = np
