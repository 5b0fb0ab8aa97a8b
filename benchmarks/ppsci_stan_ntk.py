"""NTK trace update on PaddleScience darcy2d's network (``ppsci.arch.MLP`` 5 x 20, ``stan`` activation) at its
9,801 interior points (Poisson residual u_xx + u_yy): the fast (recorded) path against a plain training step
on the same points, and the per-point loop on 100 points (extrapolated: one backward per point), with the
largest relative difference of the two on those points. ``python benchmarks/ppsci_stan_ntk.py``."""

import os
import sys
import time

import numpy as np
import paddle
import ppsci
from ppsci.autodiff import clear, hessian

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from paddle_pinn_balance.per_point import per_point_sq_grad_norms  # noqa: E402

paddle.seed(0)
model = ppsci.arch.MLP(("x", "y"), ("p",), 5, 20, "stan")
g = np.linspace(0, 1, 99, dtype="float32")
X, Y = np.meshgrid(g, g)
pts = paddle.to_tensor(np.stack([X.ravel(), Y.ravel()], 1))
def kernel_on(p):
    def kernel(m):
        x, y = p[:, :1].detach(), p[:, 1:].detach()
        x.stop_gradient = False
        y.stop_gradient = False
        try:
            u = m({"x": x, "y": y})["p"]
            return (hessian(u, x) + hessian(u, y)).reshape([-1])
        finally:
            clear()
    return kernel
def step():
    r = kernel_on(pts)(model)
    (r * r).sum().backward()
    for q in model.parameters():
        q.clear_gradient()
def best(fn, n=3):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)
step()
per_point_sq_grad_norms(model, kernel_on(pts))  # warm-up (and the fast path's point check)
t_step = best(step)
out, ran = per_point_sq_grad_norms(model, kernel_on(pts), return_path=True)
t_fast = best(lambda: per_point_sq_grad_norms(model, kernel_on(pts)))
sub = pts[:100]
t_loop100 = best(lambda: per_point_sq_grad_norms(model, kernel_on(sub), path="loop"), n=1)
fast_sub = per_point_sq_grad_norms(model, kernel_on(sub)).numpy()
loop_sub = per_point_sq_grad_norms(model, kernel_on(sub), path="loop").numpy()
print(f"path {ran}; plain step {t_step:.3f} s; fast trace update {t_fast:.3f} s ({t_fast / t_step:.2f} steps) "
      f"at 9801 points; "
      f"loop {t_loop100:.3f} s per 100 points -> {t_loop100 * 98.01:.1f} s at 9801; "
      f"max rel diff fast/loop on 100 points "
      f"{np.abs(fast_sub - loop_sub).max() / np.abs(loop_sub).max():.2e}")
