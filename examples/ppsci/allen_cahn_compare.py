"""PaddleScience's Allen-Cahn recipe side by side with this package's balancers, same network, loss and points.

PaddleScience ships Allen-Cahn (``examples/allen_cahn/allen_cahn_defalut_ntk.py`` with
``conf/allen_cahn_defalut_ntk.yaml``) as: ``ppsci.arch.MLP`` (inputs ``t, x``; 4 x 256 tanh; ``periods: {x: [2.0,
False]}``, ``fourier: {dim: 256, scale: 2.0}``, ``random_weight: {mean: 1.0, std: 0.1}``), the residual of
``ppsci.equation.AllenCahn`` under ``ppsci.loss.CausalMSELoss(n_chunks=32, tol=1.0)`` on 4096 uniform points per
step (sorted by ``t``), the initial condition on the reference's 512 grid points (``MSELoss``), no boundary term
(the periodic embedding), the two terms weighted by ``ppsci.loss.mtl.NTK(model, 2, update_freq=1000)``, Adam with
``ExponentialDecay(1e-3, gamma 0.9, decay_steps 5000)``.

This script trains that recipe and, from the same initial weights on the same points at every step, the same
network and loss with the weights of this package instead (``--methods``):

* ``ppsci_ntk``: ``ppsci.loss.mtl.NTK`` as the example uses it. NB: it is a gradient-norm ratio
  :math:`w_i = \\sum_j \\|\\nabla_\\theta L_j\\| / \\|\\nabla_\\theta L_i\\|` (no NTK trace, no moving average);
* ``ntk``: :class:`~paddle_pinn_balance.NTKWeighting` with exact traces :math:`\\mathrm{tr} K_i = \\sum_p
  \\|\\partial f_i(x_p) / \\partial \\theta\\|^2` on ``--ntk-points`` fixed points per term;
* ``grad_norm_ratio``: :class:`~paddle_pinn_balance.GradNormRatio` (Expert's Guide Alg. 1, momentum 0.9);
* ``lra``: :class:`~paddle_pinn_balance.LRAnnealing` (``preset: wang2021_code``); ``sum``: no weights.

The methods step in turn inside one process (interleaved), so their time per step is measured under the same
machine load. The reference is this package's ETDRK4 solution (``problems/allen_cahn.py``; the example's
``allen_cahn.mat`` is not in the pip package), written as ``allen_cahn.mat`` in the layout the example reads
(``usol [nt, nx]``, ``t``, ``x``) and read back from it.

The PDE coefficient: ``ppsci.equation.AllenCahn(eps)`` is :math:`u_t - \\epsilon^2 u_{xx} + 5u^3 - 5u`, and the
example passes ``eps = 0.01**2`` (diffusion 1e-8, not the benchmark's 1e-4 that its data is for); ``--pde-eps``
defaults to 0.01 (diffusion 1e-4, the reference's equation); ``--pde-eps 0.0001`` trains the example's.

Run (PaddleScience installed; from the repository root)::

    python examples/ppsci/allen_cahn_compare.py --steps 2000 --out runs/ppsci_allen_cahn
    python examples/ppsci/allen_cahn_compare.py --steps 3 --log-every 1 --out /tmp/ac   # smoke test

Writes ``OUT/results.json`` (per method: steps, errors, weights, seconds per step), ``OUT/table.md`` and
``OUT/error_vs_steps.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import paddle

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout
from paddle_pinn_balance import build_balancer  # noqa: E402
from paddle_pinn_balance.problems import AllenCahn1D  # noqa: E402

METHODS = ("ppsci_ntk", "ntk", "grad_norm_ratio", "lra", "sum")
TITLES = {"ppsci_ntk": "ppsci.loss.mtl.NTK (PaddleScience's recipe)", "ntk": "NTKWeighting, exact traces",
          "grad_norm_ratio": "GradNormRatio", "lra": "LRAnnealing (wang2021_code)", "sum": "sum (no weights)"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--methods", default="ppsci_ntk,ntk,grad_norm_ratio", help=f"comma-separated, of {METHODS}")
    p.add_argument("--batch", type=int, default=4096, help="residual points per step (example: 4096)")
    p.add_argument("--n-chunks", type=int, default=32, help="causal chunks (example: 32)")
    p.add_argument("--tol", type=float, default=1.0, help="causal tolerance epsilon (example: 1.0)")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (example: 256)")
    p.add_argument("--layers", type=int, default=4, help="hidden layers (example: 4)")
    p.add_argument("--fourier-dim", type=int, default=256, help="Fourier features (example: 256)")
    p.add_argument("--update-freq", type=int, default=1000, help="weight update interval (example: 1000)")
    p.add_argument("--decay-steps", type=int, default=5000, help="learning-rate decay interval (example: 5000)")
    p.add_argument("--ntk-points", type=int, default=512, help="points per term of the exact NTK traces")
    p.add_argument("--pde-eps", type=float, default=0.01, help="AllenCahn(eps): diffusion eps^2 (example: 1e-4)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=42, help="example: 42")
    p.add_argument("--ref-dt", type=float, default=1e-3, help="ETDRK4 step of the reference")
    p.add_argument("--out", default=os.path.join("runs", "ppsci_allen_cahn"))
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad}; allowed: {list(METHODS)}")
    if args.batch % args.n_chunks:
        p.error(f"--batch {args.batch} must be a multiple of --n-chunks {args.n_chunks} (CausalMSELoss reshapes)")
    args.methods = methods
    return args


def write_reference(out: str, ref_dt: float) -> str:
    """This package's ETDRK4 reference as ``allen_cahn.mat`` in the example's layout."""
    import scipy.io as sio

    x, t, u, _ = AllenCahn1D(ref_dt=ref_dt).reference
    path = os.path.join(out, "allen_cahn.mat")
    sio.savemat(path, {"usol": u, "t": t[None, :], "x": x[None, :]})
    return path


class Run:
    """One method: its network (same initial weights for every method), optimizer and weights."""

    def __init__(self, method, args, ppsci, ic, kernel_points, dtype):
        self.method, self.ppsci = method, ppsci
        paddle.seed(args.seed)
        self.model = ppsci.arch.MLP(
            input_keys=("t", "x"), output_keys=("u",), num_layers=args.layers, hidden_size=args.hidden,
            activation="tanh", periods={"x": [2.0, False]}, fourier={"dim": args.fourier_dim, "scale": 2.0},
            random_weight={"mean": 1.0, "std": 0.1})
        self.equation = ppsci.equation.AllenCahn(args.pde_eps)
        self.causal = ppsci.loss.CausalMSELoss(args.n_chunks, "mean", tol=args.tol)
        self.mse = ppsci.loss.MSELoss("mean")
        sched = ppsci.optimizer.lr_scheduler.ExponentialDecay(
            epochs=1, iters_per_epoch=args.steps, learning_rate=1e-3, gamma=0.9, decay_steps=args.decay_steps,
            by_epoch=False)()
        self.sched = sched
        self.optimizer = ppsci.optimizer.Adam(sched)(self.model)
        self.ic, self.diffusion = ic, args.pde_eps ** 2
        if method == "ppsci_ntk":
            self.balancer = ppsci.loss.mtl.NTK(self.model, 2, args.update_freq)
        elif method == "ntk":
            self.balancer = build_balancer({"name": "ntk", "update_freq": args.update_freq, "loss_names": ["res", "ic"],
                                            "kernels": self.kernels(kernel_points)}, self.model)
        elif method == "grad_norm_ratio":
            self.balancer = build_balancer({"name": "grad_norm_ratio", "update_freq": args.update_freq,
                                            "loss_names": ["res", "ic"]}, self.model)
        elif method == "lra":
            self.balancer = build_balancer({"name": "lr_annealing", "preset": "wang2021_code",
                                            "loss_names": ["res", "ic"]}, self.model)
        else:
            self.balancer = build_balancer({"name": "sum", "loss_names": ["res", "ic"]}, self.model)
        self.seconds, self.history = [], {"step": [], "rel_l2": [], "weights": [], "res": [], "ic": []}

    def kernels(self, pts):
        """Per-point quantities of the two terms on fixed points (``paddle.grad`` derivatives)."""
        diffusion = self.diffusion

        def res(m):
            t, x = pts["t"].detach(), pts["x"].detach()
            t.stop_gradient = x.stop_gradient = False
            u = m({"t": t, "x": x})["u"]
            u_t, u_x = paddle.grad(u.sum(), [t, x], create_graph=True)
            u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0]
            return u_t - diffusion * u_xx + 5 * u ** 3 - 5 * u

        ic_in = {"t": self.ic["t"][:len(pts["t"])], "x": self.ic["x"][:len(pts["t"])]}
        return {"res": res, "ic": lambda m: m(ic_in)["u"]}

    def losses(self, batch):
        t, x = batch["t"].detach(), batch["x"].detach()
        t.stop_gradient = x.stop_gradient = False
        out = self.model({"t": t, "x": x})
        out.update({"t": t, "x": x})
        res = self.equation.equations["allen_cahn"](out)
        l_res = self.causal({"allen_cahn": res}, {"allen_cahn": paddle.zeros_like(res)})["allen_cahn"]
        l_ic = self.mse({"u": self.model({"t": self.ic["t"], "x": self.ic["x"]})["u"]}, {"u": self.ic["u"]})["u"]
        return l_res, l_ic

    def step(self, step, batch):
        start = time.perf_counter()
        l_res, l_ic = self.losses(batch)
        if self.method == "ppsci_ntk":
            total = self.balancer({"PDE": l_res, "IC": l_ic}, step)
        else:
            total = self.balancer({"res": l_res, "ic": l_ic}, step)
        total.backward()
        self.optimizer.step()
        self.optimizer.clear_grad()
        self.sched.step()
        self.ppsci.autodiff.clear()
        self.seconds.append(time.perf_counter() - start)
        return l_res, l_ic

    def weights(self):
        if self.method == "ppsci_ntk":
            w = self.balancer.weight.numpy()
            return {"res": float(w[0]), "ic": float(w[1])}
        return dict(self.balancer.weights)

    @paddle.no_grad()
    def error(self, grid, u_ref):
        pred = np.concatenate([self.model({"t": grid["t"][s:s + 8192], "x": grid["x"][s:s + 8192]})["u"].numpy()
                               for s in range(0, grid["t"].shape[0], 8192)])
        return float(np.linalg.norm(pred.ravel() - u_ref.ravel()) / np.linalg.norm(u_ref.ravel()))


def main(argv=None) -> int:
    args = parse(argv)
    import ppsci
    import scipy.io as sio

    os.makedirs(args.out, exist_ok=True)
    dtype = paddle.get_default_dtype()
    data = sio.loadmat(write_reference(args.out, args.ref_dt))  # read back as the example reads it
    u_ref = data["usol"].astype(dtype)
    t_star, x_star = data["t"].flatten().astype(dtype), data["x"].flatten().astype(dtype)
    tx = np.stack(np.meshgrid(t_star, x_star, indexing="ij"), -1).reshape(-1, 2)
    grid = {"t": paddle.to_tensor(tx[:, 0:1]), "x": paddle.to_tensor(tx[:, 1:2])}
    ic = {"t": paddle.full([len(x_star), 1], float(t_star[0]), dtype), "x": paddle.to_tensor(x_star[:, None]),
          "u": paddle.to_tensor(u_ref[0][:, None])}
    rng = np.random.default_rng(args.seed)

    def batch(n, sort=True):
        b = rng.uniform([t_star[0], x_star[0]], [t_star[-1], x_star[-1]], (n, 2)).astype(dtype)
        t = np.sort(b[:, 0:1], axis=0) if sort else b[:, 0:1]
        return {"t": paddle.to_tensor(t), "x": paddle.to_tensor(b[:, 1:2])}

    kernel_points = batch(min(args.ntk_points, len(x_star)), sort=False)
    runs = [Run(m, args, ppsci, ic, kernel_points, dtype) for m in args.methods]
    print(f"Allen-Cahn, PaddleScience's recipe vs this package: {args.steps} steps, batch {args.batch}, "
          f"{args.layers} x {args.hidden}, fourier {args.fourier_dim}, update_freq {args.update_freq}; "
          f"methods {args.methods}", flush=True)
    for step in range(args.steps):
        b = batch(args.batch)
        for r in runs:
            l_res, l_ic = r.step(step, b)
            if step % args.log_every == 0 or step == args.steps - 1:
                h = r.history
                h["step"].append(step)
                h["rel_l2"].append(r.error(grid, u_ref))
                h["weights"].append(r.weights())
                h["res"].append(float(l_res))
                h["ic"].append(float(l_ic))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step}: " + "; ".join(f"{r.method} {r.history['rel_l2'][-1]:.3e}" for r in runs), flush=True)
            save(args, runs)
    save(args, runs, final=True)
    return 0


def save(args, runs, final=False):
    results = {"args": {k: v for k, v in vars(args).items()}, "final": final, "methods": {}}
    for r in runs:
        sec = r.seconds[1:] or r.seconds  # the first step builds caches
        results["methods"][r.method] = {
            "title": TITLES[r.method], "rel_l2": r.history["rel_l2"][-1], "history": r.history,
            "seconds_per_step_median": statistics.median(sec), "seconds_per_step_mean": statistics.fmean(sec),
            # the steps that update the weights (every --update-freq; the first also builds caches)
            "seconds_update_steps": r.seconds[::args.update_freq],
            "ntk_path": str(getattr(r.balancer, "last_path", "")) or None}
    base = results["methods"].get("ppsci_ntk")
    lines = ["| method | rel. L2 error | final weights (res, ic) | s / step (median) | vs ppsci_ntk |",
             "|---|---|---|---|---|"]
    for v in results["methods"].values():
        w = v["history"]["weights"][-1]
        ratio = f"{v['seconds_per_step_median'] / base['seconds_per_step_median']:.2f}x" if base else "-"
        lines.append(f"| {v['title']} | {v['rel_l2']:.3e} | {w['res']:.3g}, {w['ic']:.3g} | "
                     f"{v['seconds_per_step_median']:.3f} | {ratio} |")
    with open(os.path.join(args.out, "results.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(args.out, "results.json.tmp"), os.path.join(args.out, "results.json"))
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for v in results["methods"].values():
        ax.plot(v["history"]["step"], v["history"]["rel_l2"], label=f"{v['title']}: {v['rel_l2']:.2e}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("relative $L_2$ error (log scale)")
    ax.set_title(f"Allen-Cahn, PaddleScience's network and causal loss: batch {args.batch}, "
                 f"{args.layers}x{args.hidden}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(os.path.join(args.out, "error_vs_steps.png"), dpi=80)


if __name__ == "__main__":
    sys.exit(main())
