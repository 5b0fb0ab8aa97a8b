"""Command line: ``pinn-balance demo`` (also ``python -m paddle_pinn_balance demo``).

``demo`` trains the Helmholtz 2D PINN of Wang, Teng & Perdikaris (2021) twice from the same seed, with
plain weights (``sum``) and with learning-rate annealing (``lr_annealing``, preset ``wang2021_code``),
prints a table, and writes ``results.json`` and plots (with the optional ``matplotlib``) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

#: Default length of the demo: about a minute per run on a 2-core CPU (~10 ms per step).
DEFAULT_ITERS = 5000

#: (key, label, balancer config) of the demo's runs, plain first.
DEMO_RUNS = (
    ("plain", "plain (sum)", {"name": "sum"}),
    ("lra", "LRA (wang2021_code)", {"name": "lr_annealing", "preset": "wang2021_code"}),
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit code 2, instead of argparse's usage dump
        raise _UsageError(f"{self.prog}: error: {message}")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pinn-balance", description="Loss balancing for PINNs in PaddlePaddle.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="Helmholtz 2D: plain weights vs learning-rate annealing",
        description="Train the Helmholtz 2D PINN with plain weights and with learning-rate annealing "
        "(same seed), print a table and write results.json and plots.",
    )
    demo.add_argument("--iters", type=_int_at_least(1), default=DEFAULT_ITERS,
                      help=f"training iterations per run (default {DEFAULT_ITERS}; the paper uses 40000)")
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default runs/demo)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of both runs (default 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pinn-balance``; returns the exit code (2 on bad arguments)."""
    try:
        args = _parser().parse_args(argv)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise _UsageError(f"pinn-balance demo: error: --out {args.out!r} exists and is not a folder")
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    return demo(iters=args.iters, out=args.out, seed=args.seed)


def demo(iters: int = DEFAULT_ITERS, out: str = os.path.join("runs", "demo"), seed: int = 0) -> int:
    """Run the demo (see the module docstring); returns 0."""
    from .problems import Helmholtz2D
    from .train import train

    problem = Helmholtz2D()
    print(f"{problem.name}: u_xx + u_yy + k^2 u = q on [-1,1]^2, k={problem.k:g}, a1={problem.a1:g}, "
          f"a2={problem.a2:g}; net {'-'.join(map(str, problem.layers))} tanh; {iters} iterations, seed {seed}")
    results, models = {}, {}
    for key, label, config in DEMO_RUNS:
        run = train(problem, config, iters=iters, seed=seed, progress=True, desc=label)
        models[key] = run.pop("model")
        run["label"] = label
        results[key] = run

    print()
    print(_table(results))
    ratio = results["plain"]["rel_l2"] / results["lra"]["rel_l2"]
    print(f"\nLRA error is {ratio:.1f}x {'smaller' if ratio >= 1 else 'LARGER'} than plain "
          f"(paper, 40000 iterations: plain 1.81e-1, LRA 1.27e-2)")

    os.makedirs(out, exist_ok=True)
    files = _plots(problem, results, models, out)
    summary = {
        "problem": problem.name,
        "settings": {"k": problem.k, "a1": problem.a1, "a2": problem.a2, "layers": list(problem.layers),
                     "batch_size": problem.batch_size, "test_grid": list(problem.grid_shape),
                     "lr": problem.lr, "decay_rate": problem.decay_rate, "decay_steps": problem.decay_steps},
        "iters": iters,
        "seed": seed,
        "runs": results,
        "plots": [os.path.basename(f) for f in files],
    }
    path = os.path.join(out, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {path}")
    for f in files:
        print(f"wrote {f}")
    return 0


def _table(results: dict) -> str:
    rows = [("method", "rel. L2 error", "final weights", "wall time")]
    for run in results.values():
        weights = ", ".join(f"{n}={w:.3g}" for n, w in run["weights"].items())
        rows.append((run["label"], f"{run['rel_l2']:.3e}", weights, f"{run['wall_time_s']:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ plots (optional matplotlib)


def _plots(problem, results: dict, models: dict, out: str) -> list:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'paddle_pinn_balance[plot]')",
              file=sys.stderr)
        return []
    files = [_plot_weights(Figure, problem, results, out), _plot_losses(Figure, problem, results, out),
             _plot_error(Figure, problem, results, out)]
    for key, run in results.items():
        files.append(_plot_fields(Figure, problem, run, models[key], os.path.join(out, f"fields_{key}.png")))
    return files


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_weights(Figure, problem, results, out):
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for run in results.values():
        h = run["history"]
        for name, values in h["weight"].items():
            ax.plot(h["step"], values, label=f"{run['label']}: $\\lambda_{{{name}}}$",
                    linestyle="-" if name != "res" else ":")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss weight $\\lambda$ (log scale)")
    ax.set_title(f"{problem.name}: loss weights during training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(out, "weights.png"))


def _plot_losses(Figure, problem, results, out):
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False)[0]
    for ax, run in zip(axes, results.values()):
        h = run["history"]
        for name, values in h["loss"].items():
            ax.plot(h["step"], values, label=f"$L_{{{name}}}$ (unweighted)")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_title(f"{problem.name}, {run['label']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss (log scale)")
    fig.suptitle(f"{problem.name}: loss terms during training")
    return _save(fig, os.path.join(out, "losses.png"))


def _plot_error(Figure, problem, results, out):
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for run in results.values():
        ax.plot(run["history"]["step"], run["history"]["rel_l2"], label=run["label"])
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative $L_2$ error on the test grid (log scale)")
    ax.set_title(f"{problem.name}: test error during training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(out, "rel_l2.png"))


def _plot_fields(Figure, problem, run, model, path):
    x = problem.test_grid()
    shape = problem.grid_shape
    exact = problem.exact(x).reshape(shape)
    pred = problem.predict(model, x).reshape(shape)
    gx, gy = x[:, 0].reshape(shape), x[:, 1].reshape(shape)
    vmax = float(max(abs(exact).max(), abs(pred).max()))
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("exact $u$", exact, "RdBu_r", (-vmax, vmax)),
              ("predicted $\\hat u$", pred, "RdBu_r", (-vmax, vmax)),
              ("error $|u - \\hat u|$", abs(exact - pred), "viridis", (0.0, None))]
    for ax, (title, field, cmap, (lo, hi)) in zip(axes, panels):
        mesh = ax.pcolormesh(gx, gy, field, cmap=cmap, vmin=lo, vmax=hi, shading="auto")
        fig.colorbar(mesh, ax=ax, shrink=0.85)
        ax.set_xlabel(problem.axis_labels[0])
        ax.set_ylabel(problem.axis_labels[1])
        ax.set_aspect("equal")
        ax.set_title(title)
    fig.suptitle(f"{problem.name}, {run['label']}: relative $L_2$ error {run['rel_l2']:.2e} "
                 f"after {run['iters']} iterations")
    return _save(fig, path)


if __name__ == "__main__":
    sys.exit(main())
