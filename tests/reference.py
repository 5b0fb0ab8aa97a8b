"""Independent references: a numpy MLP with hand-written backpropagation, and the papers' statistics
written as plain numpy loops (no code shared with the library)."""

import os

import numpy as np
import paddle

# The suite's floating dtype (conftest.py makes it Paddle's default): PADDLE_PINN_BALANCE_DTYPE=float64 runs
# every test whose data has no dtype of its own in float64.
DTYPE = os.environ.get("PADDLE_PINN_BALANCE_DTYPE", "float32")
if DTYPE not in ("float32", "float64"):
    raise ValueError(f"PADDLE_PINN_BALANCE_DTYPE must be float32 or float64; got {DTYPE!r}")

# The suite's device (conftest.py sets it): PADDLE_PINN_BALANCE_DEVICE=gpu:0 runs the suite on the first GPU.
DEVICE = os.environ.get("PADDLE_PINN_BALANCE_DEVICE", "").strip() or "cpu"


def allocated() -> int:
    """The bytes Paddle's allocator holds on the suite's device (host memory on the CPU)."""
    from paddle.base import core

    device = paddle.device.get_device()
    if device == "cpu":
        return core.host_memory_stat_current_value("Allocated", 0)
    return core.device_memory_stat_current_value("Allocated", int(device.rpartition(":")[2] or 0))


def make_net(sizes=(2, 5, 4, 1), seed=0, dtype=DTYPE):
    """A tanh MLP of paddle Linear layers with random (non-zero) biases."""
    paddle.seed(seed)
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = paddle.nn.Linear(a, b)
        rng = np.random.default_rng(seed + 100 + i)
        lin.weight.set_value(rng.normal(0, 0.8, size=(a, b)).astype(dtype))
        lin.bias.set_value(rng.normal(0, 0.3, size=(b,)).astype(dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(paddle.nn.Tanh())
    paddle.set_default_dtype(previous)
    return paddle.nn.Sequential(*layers)


def numpy_params(net):
    """[(W, b), ...] as float64 numpy arrays, in layer order."""
    lins = [m for m in net.sublayers() if isinstance(m, paddle.nn.Linear)]
    return [(lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)) for lin in lins]


def mse_and_grads(params, x, t):
    """L = mean((f(x) - t)^2) of the tanh MLP and dL/dW, dL/db per layer, by hand.

    Returns (L, [gW1, gb1, gW2, gb2, ...]) in the order of ``net.parameters()``.
    """
    acts, pre = [x], []
    h = x
    for i, (W, b) in enumerate(params):
        z = h @ W + b
        pre.append(z)
        h = np.tanh(z) if i < len(params) - 1 else z
        acts.append(h)
    r = h - t
    loss = np.mean(r ** 2)
    delta = 2.0 * r / r.size  # dL/dz of the last layer
    grads = []
    for i in reversed(range(len(params))):
        W, _ = params[i]
        gW = acts[i].T @ delta
        gb = delta.sum(axis=0)
        grads = [gW, gb] + grads
        if i > 0:
            delta = (delta @ W.T) * (1.0 - np.tanh(pre[i - 1]) ** 2)
    return loss, grads


def lra_estimate(grads, ref, lambdas, statistic, reduction, lambda_inside, eps):
    """Learning-rate annealing estimates, written as the papers / authors' code state them.

    grads: {name: [array per selected parameter]}; lambdas: {name: float}.
    """
    def num_stat(arrs):
        if reduction == "flat":
            a = np.concatenate([np.abs(g).ravel() for g in arrs])
            return {"max": a.max(), "mean": a.mean(), "norm": np.sqrt((a ** 2).sum())}[statistic]
        per = [{"max": np.abs(g).max(), "mean": np.abs(g).mean(), "norm": np.sqrt((g ** 2).sum())}[statistic]
               for g in arrs]
        return max(per) if statistic == "max" else float(np.mean(per))

    def den_stat(arrs):
        kind = "norm" if statistic == "norm" else "mean"
        if reduction == "flat":
            a = np.concatenate([np.abs(g).ravel() for g in arrs])
            return a.mean() if kind == "mean" else np.sqrt((a ** 2).sum())
        per = [np.abs(g).mean() if kind == "mean" else np.sqrt((g ** 2).sum()) for g in arrs]
        return float(np.mean(per))

    out = {}
    for name, arrs in grads.items():
        if name in ref:
            out[name] = 1.0
            continue
        lam = lambdas[name] if lambda_inside else 1.0
        if reduction == "layer_max_ratio":
            ratios = []
            for j, g in enumerate(arrs):
                per_ref = []
                for r in ref:
                    gr = grads[r][j]
                    per_ref.append({"max": np.abs(gr).max(), "mean": np.abs(gr).mean(),
                                    "norm": np.sqrt((gr ** 2).sum())}[statistic])
                d = np.sqrt((g ** 2).sum()) if statistic == "norm" else np.abs(g).mean()
                ratios.append(max(per_ref) / (lam * d + eps))
            out[name] = max(ratios)
        else:
            num = max(num_stat(grads[r]) for r in ref)
            out[name] = num / (lam * den_stat(arrs) + eps)
    return out


class Analytic(paddle.nn.Layer):
    """A parameter-free 'network' given by a formula in paddle ops of the input columns."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(*[x[:, i:i + 1] for i in range(x.shape[1])])


def fd_first(fn, x, axis, h=1e-5):
    """Central first difference of the numpy function ``fn`` along input column ``axis``."""
    e = np.zeros((1, x.shape[1]))
    e[0, axis] = h
    return (fn(x + e) - fn(x - e)) / (2 * h)


def fd_second(fn, x, axis, h=1e-4):
    """Central second difference of the numpy function ``fn`` along input column ``axis``."""
    e = np.zeros((1, x.shape[1]))
    e[0, axis] = h
    return (fn(x + e) - 2 * fn(x) + fn(x - e)) / h**2


def update_with_gradients(bal, G, step: int):
    """One call of ``bal`` (a gradient-reading balancer) at update step ``step`` whose per-term gradients are
    ``G`` (``[K, P]``, numpy or tensor) instead of the losses' own: the public call (``bal(losses, step)``) runs
    the method's update, the base's smoothing, bounds and non-finite guard on ``G``; returns the total."""
    G = paddle.to_tensor(G) if not isinstance(G, paddle.Tensor) else G
    object.__setattr__(bal, "_term_gradients", lambda values: G)
    try:
        return bal({n: bal._params[0].sum() * 0.0 for n in bal.loss_names}, step)  # values unread
    finally:
        object.__delattr__(bal, "_term_gradients")
