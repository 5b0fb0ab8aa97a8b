"""Importing the package and training with it print nothing on any supported Paddle: Paddle 3.2 warns
("Non compatible API") at the first call of ``paddle.max``, ``paddle.min``, ``paddle.split`` and
``paddle.sort`` whatever the arguments, so the package calls none of them on its import or update paths.
A fresh interpreter: Paddle warns once per process."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import os, warnings
import paddle  # Paddle's own import-time warnings (ccache) are not ours
paddle.set_device(os.environ.get("PADDLE_PINN_BALANCE_DEVICE", "").strip() or "cpu")
warnings.simplefilter("error")
import paddle_pinn_balance as ppb
import paddle_pinn_balance.ops, paddle_pinn_balance.ppsci  # noqa: E401
print("imported")
net = paddle.nn.Sequential(paddle.nn.Linear(2, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
x = paddle.rand([6, 2])
kernels = {"res": lambda m: m(x).reshape([-1]), "bc": lambda m: m(x[:2]).reshape([-1])}
for bal in (ppb.LRAnnealing(net, update_freq=1), ppb.LRAnnealing(net, reduction="layer_max_ratio", update_freq=1),
            ppb.LRAnnealing(net, ref=["res"], update_freq=1), ppb.NTKWeighting(net, mode="grad_norm", update_freq=1),
            ppb.NTKWeighting(net, kernels=kernels, update_freq=1), ppb.GradNorm(net, n_loss=2).aggregator,
            ppb.ReLoBRaLo(update_freq=1), ppb.SoftAdapt(update_freq=1)):
    for step in range(2):
        bal({"res": (net(x) ** 2).mean(), "bc": ((net(x) - 1) ** 2).mean()}, step).backward()
ppb.CausalResidual(n_chunks=2)(net(x).reshape([-1]), t=x[:, 0]).backward()
print("trained")
"""


@pytest.mark.slow
def test_import_and_updates_warn_nothing():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["imported", "trained"], out.stdout
