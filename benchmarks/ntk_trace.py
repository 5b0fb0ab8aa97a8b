"""Time the exact NTK trace: the fast (recorded) path against the per-point loop and against a plain step.

Three tables (``--tables``, all by default):

* ``sizes``: the Helmholtz PINN, 2-50-50-50-1 tanh (``paddle.nn.Sequential`` of ``Linear``), Helmholtz
  residual u_xx + u_yy + k^2 u - q on N uniform points of [-1, 1]^2 (second derivatives with
  ``paddle.grad(create_graph=True)``). For each N the fast path is timed (best of ``--repeats`` after a
  warm-up) and the loop once; for N above ``--loop-max`` the loop is timed on its first ``--loop-max``
  points only and its full time extrapolated linearly (one backward per point; said so in the output).
* ``archs``: one row per architecture (plain ``paddle.nn`` networks and PaddleScience's ``MLP`` with each
  option, ``ModifiedMLP``, ``PirateNet``), width 50 (``--arch-width``), the same residual on
  ``--arch-points`` points: path taken, fast and loop times, their ratio and the largest relative difference
  of the per-point values (loop on all points).
* ``cost``: an exact trace update (``NTKWeighting``'s statistics: the traces of both terms) beside a plain
  training step (one forward and backward of the summed loss) of a 2D Poisson PINN, 3 hidden layers of
  ``--widths``, tanh, residual u_xx + u_yy + f on N (``--points``) interior points plus a Dirichlet term on
  N / 4 boundary points. "update" is a later update; "first" is the first update of a kernel (with the point
  check, one backward more). Peak memory: what the operation allocates beyond what was allocated before it
  (Paddle's allocator counters, host or device).

Times are CPU time of the process on a CPU (robust to other load), wall time on a GPU; one thread unless
``--threads`` says otherwise.

    python benchmarks/ntk_trace.py [--tables sizes archs cost] [--sizes 64 256 1024] [--loop-max 256]
    python benchmarks/ntk_trace.py --tables cost --widths 50 100 200 500 --points 128 512 2048
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from _common import add_device_argument, clock, use_device  # noqa: E402  (imported first: sets the thread count before paddle loads)

from paddle_pinn_balance import expanded  # noqa: E402
from paddle_pinn_balance.per_point import per_point_sq_grad_norms  # noqa: E402
from paddle_pinn_balance.problems import MLP as ProblemMLP  # noqa: E402

A1, A2, K = 1.0, 4.0, 1.0  # Helmholtz 2D of the learning-rate annealing paper (Sec. 2.2)


def helmholtz_net(seed: int = 0, width: int = 50) -> paddle.nn.Sequential:
    paddle.seed(seed)
    init = {"weight_attr": paddle.nn.initializer.XavierNormal(), "bias_attr": paddle.nn.initializer.Constant(0.0)}
    sizes = [2, width, width, width, 1]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(paddle.nn.Linear(sizes[i], sizes[i + 1], **init))
        if i < len(sizes) - 2:
            layers.append(paddle.nn.Tanh())
    return paddle.nn.Sequential(*layers)


def _is_arch(model) -> bool:
    try:
        import ppsci
    except ImportError:
        return False
    return isinstance(model, ppsci.arch.Arch)


def _u(model, x, y):
    if _is_arch(model):
        return model({"x": x, "y": y})["u"][:, 0]
    return model(paddle.concat([x, y], axis=1))[:, 0]


def residual_kernel(pts: paddle.Tensor, q=None, k2: float = K ** 2):
    """``u_xx + u_yy + k2 u - q`` on ``pts`` (``q``: numpy values, or the Helmholtz source when None)."""
    if q is None:
        xs = pts.numpy()
        u_exact = np.sin(A1 * math.pi * xs[:, 0]) * np.sin(A2 * math.pi * xs[:, 1])
        q = (-(A1 * math.pi) ** 2 - (A2 * math.pi) ** 2 + K ** 2) * u_exact
    q = paddle.to_tensor(np.asarray(q, dtype=np.float32))

    def kernel(model):
        x, y = pts[:, :1].detach(), pts[:, 1:].detach()
        x.stop_gradient = False
        y.stop_gradient = False
        u = _u(model, x, y)
        u_x, u_y = paddle.grad(u.sum(), [x, y], create_graph=True)
        u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0][:, 0]
        u_yy = paddle.grad(u_y.sum(), y, create_graph=True)[0][:, 0]
        return u_xx + u_yy + (k2 * u if k2 else 0.0) - q

    return kernel


def boundary_kernel(pts: paddle.Tensor):
    return lambda model: _u(model, pts[:, :1], pts[:, 1:])


def _best(fn, repeats: int) -> float:
    fn()  # warm-up (and the first-call point check of the fast path)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times)


def _sync(t):
    return t.numpy()


# --------------------------------------------------------------------------- table: sizes


def table_sizes(args):
    net = helmholtz_net()
    n_params = sum(int(np.prod(p.shape)) for p in net.parameters())
    print(f"\n## sizes: net 2-50-50-50-1 tanh ({n_params} params), Helmholtz residual (second derivatives)")
    print(f"{'N':>6} {'fast [s]':>10} {'loop [s]':>10} {'ratio':>7} {'max rel diff':>13}  note")
    for n in args.sizes:
        paddle.seed(1)
        x = paddle.rand([n, 2]) * 2 - 1
        kernel = residual_kernel(x)
        t_fast, path, fast = _time_fast(net, kernel, args)
        m = min(n, args.loop_max)
        sub = residual_kernel(x[:m])
        t0 = clock()
        loop = per_point_sq_grad_norms(net, sub, path="loop").numpy()
        t_loop = (clock() - t0) * n / m
        rel = float(np.max(np.abs(fast[:m] - loop) / np.abs(loop)))
        note = f"path={path}" + ("" if m == n else f"; loop timed on {m} of {n} points, x{n / m:g} extrapolated")
        if m == n:
            note += f"; trace rel diff {abs(fast.sum() - loop.sum()) / loop.sum():.1e}"
        print(f"{n:>6} {t_fast:>10.4f} {t_loop:>10.3f} {t_loop / t_fast:>7.1f} {rel:>13.2e}  {note}", flush=True)


def _time_fast(model, kernel, args):
    """(best time of a later update, the path, the per-point values) of the default (auto) path."""
    out = []

    def run():
        sq, path = per_point_sq_grad_norms(model, kernel, chunk_size=args.chunk_size, return_path=True)
        out[:] = [path, sq.numpy()]

    t = _best(run, args.repeats)
    return t, out[0], out[1]


# --------------------------------------------------------------------------- table: archs


class ResidualNet(paddle.nn.Layer):
    """tanh(L0 x), then h + tanh(L_i h) residual blocks, then a linear output."""

    def __init__(self, width, blocks=2):
        super().__init__()
        self.inp = paddle.nn.Linear(2, width)
        self.blocks = paddle.nn.LayerList([paddle.nn.Linear(width, width) for _ in range(blocks)])
        self.out = paddle.nn.Linear(width, 1)

    def forward(self, x):
        h = paddle.tanh(self.inp(x))
        for lin in self.blocks:
            h = h + paddle.tanh(lin(h))
        return self.out(h)


class FourierNet(paddle.nn.Layer):
    """Trainable Fourier features [cos(x B), sin(x B)] (``paddle.matmul``), then a tanh MLP."""

    def __init__(self, width):
        super().__init__()
        self.B = self.create_parameter([2, width // 2], default_initializer=paddle.nn.initializer.Normal(0, 1.0))
        self.mlp = paddle.nn.Sequential(paddle.nn.Linear(width, width), paddle.nn.Tanh(),
                                        paddle.nn.Linear(width, width), paddle.nn.Tanh(), paddle.nn.Linear(width, 1))

    def forward(self, x):
        z = paddle.matmul(x, self.B)
        return self.mlp(paddle.concat([paddle.cos(z), paddle.sin(z)], axis=1))


def architectures(width):
    archs = {
        "nn.Sequential (Helmholtz net)": lambda: helmholtz_net(width=width),
        "problems.MLP (normalised inputs)": lambda: ProblemMLP((2, width, width, width, 1), (0.0, 0.0), (0.5, 0.5)),
        "residual blocks (paddle.nn)": lambda: ResidualNet(width),
        "Fourier features (paddle.nn)": lambda: FourierNet(width),
    }
    try:
        import ppsci
    except ImportError:
        return archs
    keys, out = ("x", "y"), ("u",)
    rwf, four = {"mean": 0.5, "std": 0.1}, {"dim": width, "scale": 1.0}
    mlp = ppsci.arch.MLP
    archs.update({
        "ppsci MLP": lambda: mlp(keys, out, 3, width),
        "ppsci MLP skip_connection": lambda: mlp(keys, out, 4, width, skip_connection=True),
        "ppsci MLP weight_norm": lambda: mlp(keys, out, 3, width, weight_norm=True),
        "ppsci MLP random_weight": lambda: mlp(keys, out, 3, width, random_weight=rwf),
        "ppsci MLP fourier": lambda: mlp(keys, out, 3, width, fourier=four),
        "ppsci MLP periods (trainable)": lambda: mlp(keys, out, 3, width, periods={"x": (2.0, True)}),
        "ppsci MLP stan activation": lambda: mlp(keys, out, 3, width, activation="stan"),
        "ppsci ModifiedMLP": lambda: ppsci.arch.ModifiedMLP(keys, out, 3, width),
    })
    if hasattr(ppsci.arch, "PirateNet"):
        archs["ppsci PirateNet (fourier)"] = lambda: ppsci.arch.PirateNet(keys, out, 2, width, fourier=four)
        archs["ppsci PirateNet (fourier, rwf)"] = lambda: ppsci.arch.PirateNet(keys, out, 2, width, fourier=four,
                                                                               random_weight=rwf)
    return archs


def table_archs(args):
    print(f"\n## archs: width {args.arch_width}, Helmholtz residual (second derivatives) on {args.arch_points} "
          "points; fast = a later update (best of repeats), loop on all points")
    print(f"{'architecture':<34} {'params':>7} {'path':>9} {'fast [s]':>9} {'loop [s]':>9} {'ratio':>7} "
          f"{'max rel diff':>13}")
    paddle.seed(1)
    x = paddle.rand([args.arch_points, 2]) * 2 - 1
    kernel = residual_kernel(x)
    rng = np.random.default_rng(7)
    for name, make in architectures(args.arch_width).items():
        paddle.seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = make()
        for p in model.parameters():  # every parameter off its initial value (zero biases, PirateNet's alpha)
            if not p.stop_gradient:
                p.set_value(np.asarray(p.numpy() + rng.normal(0, 0.05, size=p.shape), dtype=np.float32))
        n_params = sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)
        t_fast, path, fast = _time_fast(model, kernel, args)
        t0 = clock()
        loop = per_point_sq_grad_norms(model, kernel, path="loop").numpy()
        t_loop = clock() - t0
        rel = float(np.max(np.abs(fast - loop) / np.abs(loop)))
        print(f"{name:<34} {n_params:>7} {path:>9} {t_fast:>9.4f} {t_loop:>9.3f} {t_loop / t_fast:>7.1f} "
              f"{rel:>13.2e}", flush=True)
        if path != "expanded":
            print(f"{'':<34} reason: {path.reason}")


# --------------------------------------------------------------------------- table: cost


def _memory_counters():
    from paddle.base import core

    gpu = paddle.device.get_device().startswith("gpu")
    if gpu:
        return core.device_memory_stat_current_value, core.device_memory_stat_peak_value, \
            core.device_memory_stat_reset_peak_value
    return core.host_memory_stat_current_value, core.host_memory_stat_peak_value, core.host_memory_stat_reset_peak_value


def _peak_mb(fn, runs: int = 3) -> float:
    """The most memory ``fn`` allocates beyond what is allocated before it (MB), the largest of ``runs``."""
    current, peak, reset = _memory_counters()
    out = 0.0
    for _ in range(runs):
        gc.collect()
        before = current("Allocated", 0)
        reset("Allocated", 0)
        fn()
        out = max(out, (peak("Allocated", 0) - before) / 2 ** 20)
    return out


def table_cost(args):
    print(f"\n## cost: 2D Poisson PINN, 3 hidden layers, tanh; residual u_xx + u_yy + f on N points + boundary u "
          f"on N/4 points; median of {args.cost_repeats} interleaved rounds")
    print(f"{'width':>6} {'N':>6} {'params':>7} {'plain [ms]':>11} {'update [ms]':>12} {'x plain':>8} "
          f"{'first [ms]':>11} {'x plain':>8} {'plain MB':>9} {'update MB':>10} {'x plain':>8}")
    for width in args.widths:
        for n in args.points:
            _cost_row(args, width, n)


def _cost_row(args, width, n):
    net = helmholtz_net(width=width)
    n_params = sum(int(np.prod(p.shape)) for p in net.parameters())
    paddle.seed(2)
    xi = paddle.rand([n, 2]) * 2 - 1
    t = paddle.rand([max(1, n // 4), 1]) * 2 - 1
    side = paddle.cast(paddle.rand([max(1, n // 4), 1]) > 0.5, "float32") * 2 - 1
    xb = paddle.concat([t, side], axis=1)  # points on the edges y = -1 and y = 1
    xs = xi.numpy()
    f = 2 * math.pi ** 2 * np.sin(math.pi * xs[:, 0]) * np.sin(math.pi * xs[:, 1])  # u = sin(pi x) sin(pi y)
    kernels = [residual_kernel(xi, q=-f, k2=0.0), boundary_kernel(xb)]

    def plain():
        loss = sum((k(net) ** 2).mean() for k in kernels)
        loss.backward()
        net.clear_gradients()

    def update():
        sums = [per_point_sq_grad_norms(net, k, chunk_size=args.chunk_size).sum() for k in kernels]
        paddle.stack(sums).numpy()

    def first():
        expanded._CHECKED.clear()  # as at the first update: the point check runs again
        update()

    plain(), update()  # warm-up
    tp, tu, tf = [], [], []
    for _ in range(args.cost_repeats):  # interleaved: drifts of a shared machine hit all three alike
        for fn, out in ((plain, tp), (update, tu), (first, tf)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    mp, mu = _peak_mb(plain), _peak_mb(update)
    p, u, fr = (statistics.median(v) for v in (tp, tu, tf))
    print(f"{width:>6} {n:>6} {n_params:>7} {p * 1e3:>11.1f} {u * 1e3:>12.1f} {u / p:>8.2f} {fr * 1e3:>11.1f} "
          f"{fr / p:>8.2f} {mp:>9.1f} {mu:>10.1f} {mu / max(mp, 1e-9):>8.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", nargs="+", default=["sizes", "archs", "cost"], choices=["sizes", "archs", "cost"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--loop-max", type=int, default=256, help="loop on at most this many points (extrapolate)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--arch-width", type=int, default=50)
    ap.add_argument("--arch-points", type=int, default=128)
    ap.add_argument("--widths", type=int, nargs="+", default=[50, 100, 200, 500])
    ap.add_argument("--points", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--cost-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (read by _common before paddle loads)")
    add_device_argument(ap)
    args = ap.parse_args()
    use_device(args.device)
    print(f"paddle {paddle.__version__}, device {paddle.get_device()}, threads {os.environ.get('OMP_NUM_THREADS')}, "
          f"chunk_size {args.chunk_size}")
    for name in args.tables:
        {"sizes": table_sizes, "archs": table_archs, "cost": table_cost}[name](args)


if __name__ == "__main__":
    main()
