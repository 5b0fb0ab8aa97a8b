"""Time the exact NTK trace: the expanded (per-point parameter copies) path against the per-point loop.

Network: the Helmholtz PINN, 2-50-50-50-1 tanh (``paddle.nn.Sequential`` of ``Linear``); kernel: the
Helmholtz residual u_xx + u_yy + k^2 u - q on N uniform points of [-1, 1]^2 (second derivatives with
``paddle.grad(create_graph=True)``). For each N the fast path is timed (best of ``--repeats`` after a
warm-up) and the loop once; for N above ``--loop-max`` the loop is timed on its first ``--loop-max``
points only and its full time extrapolated linearly (one backward per point; said so in the output).

    python benchmarks/ntk_trace.py [--sizes 64 256 1024] [--loop-max 256]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from paddle_pinn_balance.per_point import per_point_sq_grad_norms

A1, A2, K = 1.0, 4.0, 1.0  # Helmholtz 2D of the learning-rate annealing paper (Sec. 2.2)


def helmholtz_net(seed: int = 0) -> paddle.nn.Sequential:
    paddle.seed(seed)
    init = {"weight_attr": paddle.nn.initializer.XavierNormal(), "bias_attr": paddle.nn.initializer.Constant(0.0)}
    sizes = [2, 50, 50, 50, 1]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(paddle.nn.Linear(sizes[i], sizes[i + 1], **init))
        if i < len(sizes) - 2:
            layers.append(paddle.nn.Tanh())
    return paddle.nn.Sequential(*layers)


def residual_kernel(x: paddle.Tensor):
    xs = x.numpy()
    u_exact = np.sin(A1 * math.pi * xs[:, 0]) * np.sin(A2 * math.pi * xs[:, 1])
    q = paddle.to_tensor(((-(A1 * math.pi) ** 2 - (A2 * math.pi) ** 2 + K ** 2) * u_exact).astype("float32"))

    def kernel(model):
        xx = x.detach()
        xx.stop_gradient = False
        u = model(xx)
        g = paddle.grad(u.sum(), xx, create_graph=True)[0]
        u_xx = paddle.grad(g[:, 0].sum(), xx, create_graph=True)[0][:, 0]
        u_yy = paddle.grad(g[:, 1].sum(), xx, create_graph=True)[0][:, 1]
        return u_xx + u_yy + K ** 2 * u[:, 0] - q

    return kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--loop-max", type=int, default=256, help="loop on at most this many points (extrapolate)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=1024)
    args = ap.parse_args()
    paddle.set_device("cpu")
    net = helmholtz_net()
    n_params = sum(int(np.prod(p.shape)) for p in net.parameters())
    print(f"paddle {paddle.__version__}, device {paddle.get_device()}, net 2-50-50-50-1 tanh ({n_params} params), "
          f"Helmholtz residual (second derivatives), chunk_size {args.chunk_size}")
    print(f"{'N':>6} {'expanded [s]':>13} {'loop [s]':>10} {'ratio':>7} {'max rel diff':>13}  note")
    for n in args.sizes:
        paddle.seed(1)
        x = paddle.rand([n, 2]) * 2 - 1
        kernel = residual_kernel(x)
        per_point_sq_grad_norms(net, kernel, chunk_size=args.chunk_size)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fast, path = per_point_sq_grad_norms(net, kernel, chunk_size=args.chunk_size, return_path=True)
            fast = fast.numpy()
            times.append(time.perf_counter() - t0)
        t_fast = min(times)
        m = min(n, args.loop_max)
        sub = residual_kernel(x[:m])
        t0 = time.perf_counter()
        loop = per_point_sq_grad_norms(net, sub, path="loop").numpy()
        t_loop = (time.perf_counter() - t0) * n / m
        rel = float(np.max(np.abs(fast[:m] - loop) / np.abs(loop)))
        note = f"path={path}" + ("" if m == n else f"; loop timed on {m} of {n} points, x{n / m:g} extrapolated")
        if m == n:
            note += f"; trace rel diff {abs(fast.sum() - loop.sum()) / loop.sum():.1e}"
        print(f"{n:>6} {t_fast:>13.4f} {t_loop:>10.3f} {t_loop / t_fast:>7.1f} {rel:>13.2e}  {note}")


if __name__ == "__main__":
    main()
