"""The core package works without PaddleScience (an optional extra): imports and a training step with
``ppsci`` made unimportable, in a fresh interpreter."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import sys
sys.modules["ppsci"] = None  # any `import ppsci` now raises ImportError
import os
import paddle
paddle.set_device(os.environ.get("PADDLE_PINN_BALANCE_DEVICE", "").strip() or "cpu")  # the suite's device
import paddle_pinn_balance as ppb
import paddle_pinn_balance.ppsci  # the adapter module itself imports ppsci lazily
net = paddle.nn.Sequential(paddle.nn.Linear(2, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
x = paddle.rand([4, 2])
for bal in (ppb.LRAnnealing(net, ref="res", update_freq=1), ppb.NTKWeighting(net, mode="grad_norm", update_freq=1),
            ppb.build_balancer({"name": "sum"})):
    bal({"res": (net(x) ** 2).mean(), "bc": ((net(x) - 1) ** 2).mean()}, 0).backward()
try:
    paddle_pinn_balance.ppsci._ppsci()
    raise SystemExit("ppsci imported although it is blocked")
except ImportError as e:
    assert "pip install" in str(e), e  # a clear message naming the extra
print("ok", sorted(ppb.__all__))
"""


@pytest.mark.slow
def test_core_runs_without_paddlescience():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok [" in out.stdout
