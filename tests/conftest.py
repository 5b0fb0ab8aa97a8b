import os
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

paddle.set_device("cpu")


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(0)
    np.random.seed(0)
    yield
