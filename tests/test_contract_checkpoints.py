"""Checkpoints of the methods moved onto the contract (LRA, NTK both modes, GradNorm, uncertainty) written by the
code before the move still load and resume bit-exactly.

The layout before the move is written here by hand (``OLD_LAYOUT``: every key, its dtype and shape, as the older
code's ``state_dict()`` held them for two terms); the values are those of a run stopped after ``m`` steps. A fresh
balancer (and network) loads them and the run goes on: every later weight equals, bit for bit, that of the run
that was never stopped."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

import paddle_pinn_balance as ppb
from paddle_pinn_balance.gradnorm import GradNorm

_COUNTERS = {"num_calls": ("int64", [1]), "num_updates": ("int64", [1]), "last_update_step": ("int64", [1])}
#: method -> {key: (dtype, shape)} of the older code's state_dict for the terms ("res", "bc"); `names_utf8` and
#: `method_utf8` are the UTF-8 bytes of "res\nbc" and of the class name; the floating state in the model's dtype
#: (the suite's, DTYPE)
_F = DTYPE
OLD_LAYOUT = {
    "lra": {**_COUNTERS, "lambdas": (_F, [2])},
    "lra_code": {**_COUNTERS, "lambdas": (_F, [2])},
    "ntk": {**_COUNTERS, "lambdas": (_F, [2]), "traces_buf": (_F, [2])},
    "ntk_grad_norm": {**_COUNTERS, "lambdas": (_F, [2]), "traces_buf": (_F, [2])},
    "gradnorm": {**_COUNTERS, "loss_weights": (_F, [2]), "initial_losses": (_F, [2]),
                 "has_initial_losses": ("bool", [2])},
    "uncertainty": {**_COUNTERS, "log_vars": (_F, [2])},
}
CLASS_NAME = {"lra": "LRAnnealing", "lra_code": "LRAnnealing", "ntk": "NTKWeighting",
              "ntk_grad_norm": "NTKWeighting", "gradnorm": "GradNormBalancer", "uncertainty": "UncertaintyWeighting"}


def _setup(kind):
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(1, 6), paddle.nn.Tanh(), paddle.nn.Linear(6, 1))
    xs = paddle.linspace(0, 1, 12).reshape([-1, 1])
    xb = paddle.to_tensor([[0.0], [1.0]])

    def residual(model):  # u' - cos x
        x = xs.detach()
        x.stop_gradient = False
        u = model(x)
        return paddle.grad(u.sum(), x, create_graph=True)[0] - paddle.cos(x)

    names = ["res", "bc"]
    if kind == "lra":
        bal = ppb.LRAnnealing(net, ref="res", update_freq=2, loss_names=names)
    elif kind == "lra_code":
        bal = ppb.LRAnnealing(net, ref="res", preset="wang2021_code", update_freq=1, min_weight=0.5, loss_names=names)
    elif kind == "ntk":
        bal = ppb.NTKWeighting(net, kernels={"res": residual, "bc": lambda m: m(xb)}, update_freq=2, momentum=0.5,
                               loss_names=names)
    elif kind == "ntk_grad_norm":
        bal = ppb.NTKWeighting(net, mode="grad_norm", update_freq=1, momentum=0.3, loss_names=names)
    elif kind == "gradnorm":
        bal = GradNorm(net, n_loss=2, alpha=1.5, loss_names=names).aggregator
    else:
        bal = ppb.UncertaintyWeighting(loss_names=names, init_log_var=0.3)
    opt = paddle.optimizer.SGD(1e-2, parameters=list(net.parameters()) + list(bal.parameters()))

    def step(t):
        total = bal({"res": residual(net).pow(2).mean(), "bc": (net(xb) - 1).pow(2).mean()}, t)
        total.backward()
        opt.step()
        opt.clear_grad()
        w = bal.get_weights() if hasattr(bal, "get_weights") else np.array(list(bal.weights.values()))
        return np.asarray(w).tobytes()

    return net, bal, step


@pytest.mark.parametrize("m", [0, 3])
@pytest.mark.parametrize("kind", sorted(OLD_LAYOUT))
def test_a_checkpoint_of_the_older_layout_resumes_bit_exactly(kind, m):
    n = 7
    _, _, step = _setup(kind)
    whole = [step(t) for t in range(n)]

    net, bal, step = _setup(kind)
    for t in range(m):
        step(t)
    state = {k: v.numpy().copy() for k, v in bal.state_dict().items()}
    layout = OLD_LAYOUT[kind]
    assert sorted(state) == sorted([*layout, "names_utf8", "method_utf8"])  # no key renamed, added or dropped
    old = {k: state[k].astype(dtype).reshape(shape) for k, (dtype, shape) in layout.items()}  # the old layout
    old["names_utf8"] = np.frombuffer(b"res\nbc", dtype=np.uint8).copy()
    old["method_utf8"] = np.frombuffer(CLASS_NAME[kind].encode(), dtype=np.uint8).copy()
    net_state = {k: v.numpy().copy() for k, v in net.state_dict().items()}

    net2, bal2, step2 = _setup(kind)
    net2.set_state_dict(net_state)
    bal2.set_state_dict(old)
    assert [step2(t) for t in range(m, n)] == whole[m:]
