"""Plots of ``pinn-balance`` runs (optional ``matplotlib``): weights, losses, errors, fields, comparisons."""

from __future__ import annotations

import math
import os
import sys

__all__ = ["plot_comparison", "plot_curves", "plot_heatmap", "plot_run"]


def plot_curves(Figure, data: dict, path: str, dpi: int = 80) -> str:
    """Test error (left) and loss weights (right) against iterations for every method of one run (first seed)."""
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    error_name = data.get("error_name", "relative $L_2$ error")
    for i, (label, m) in enumerate(data["methods"].items()):
        h = m["history"]
        color = f"C{i}"
        left.plot(h["step"], h["rel_l2"], color=color, label=f"{label}: final {m['error_mean']:.2e}")
        if m.get("published") is not None:
            left.axhline(m["published"], color=color, linestyle=":", label=f"{label}: published {m['published']:.2e}")
        for j, (term, values) in enumerate(h["weight"].items()):
            right.plot(h["step"], values, color=color, linestyle=["-", "--", "-.", ":"][j % 4],
                       label=f"{label}: $\\lambda_{{{term}}}$")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    left.set_ylabel(f"{error_name} (log scale)")
    right.set_ylabel("loss weight $\\lambda$ (log scale)")
    title = data.get("problem_name", data.get("problem"))
    methods = " vs ".join(data["methods"])
    left.set_title("test error")
    right.set_title("loss weights")
    fig.suptitle(f"{title}: {methods} ({data['iters']} iterations, seed {data['seeds'][0]})")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_comparison(Figure, rows, path: str, title: str | None = None, dpi: int = 80) -> str:
    """Horizontal bars of our mean error (± std over seeds) and the published number per row, log scale."""
    import numpy as np

    fig = Figure(figsize=(8.5, 1.2 + 0.42 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    ours = np.array([r["mean"] for r in rows], dtype=float)
    std = np.array([r["std"] for r in rows], dtype=float)
    ax.barh(y + 0.2, ours, 0.4, xerr=np.minimum(std, 0.999 * ours), capsize=3, label="ours (mean ± std over seeds)")
    pub = np.array([np.nan if r["published"] is None else r["published"] for r in rows], dtype=float)
    ax.barh(y - 0.2, np.nan_to_num(pub, nan=0.0), 0.4, label="published", color="tab:gray")
    labels = [f"{r['problem']}: {r['method']}\n({os.path.basename(os.path.dirname(r['path']))}, {r['iters']} it, "
              f"{r['seeds']} seed{'s' if r['seeds'] != 1 else ''})" for r in rows]
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("error on the test set (log scale): relative $L_2$; GradNorm toy: normalised loss")
    ax.set_title(title or "Benchmarks: our error vs the published one")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_run(problem, results: dict, models: dict, out: str) -> list:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install 'paddle_pinn_balance[plot]')",
              file=sys.stderr)
        return []
    files = [_plot_weights(Figure, problem, results, out), _plot_losses(Figure, problem, results, out),
             _plot_error(Figure, problem, results, out)]
    if any(r["history"].get("monitor") for r in results.values()):  # the recipes (causal residual): their curves
        files += [_plot_error_time(Figure, problem, results, out), _plot_causal(Figure, problem, results, out)]
    if len(problem.grid_shape) in (1, 2) and len(problem.axis_labels) == len(problem.grid_shape) \
            and problem.axis_labels != ("sample",):
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
    ax.set_ylabel(f"{getattr(problem, 'error_name', 'relative $L_2$ error')} on the test set (log scale)")
    ax.set_title(f"{problem.name}: test error during training, "
                 f"{' vs '.join(r['label'] for r in results.values())}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(out, "rel_l2.png"))


def _plot_error_time(Figure, problem, results, out):
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for run in results.values():
        h = run["history"]
        if h.get("wall_s"):
            ax.plot(h["wall_s"], h["rel_l2"], label=run["label"])
    ax.set_yscale("log")
    ax.set_xlabel("training wall time (s; error evaluations excluded)")
    ax.set_ylabel(f"{getattr(problem, 'error_name', 'relative $L_2$ error')} (log scale)")
    ax.set_title(f"{problem.name}: test error against wall time", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(out, "rel_l2_time.png"))


def _plot_causal(Figure, problem, results, out):
    """The causal residual's epsilon (left) and minimum chunk weight (right) against iterations."""
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for run in results.values():
        h = run["history"]
        mon = h.get("monitor") or {}
        if "causal_eps" in mon:
            left.plot(h["step"], mon["causal_eps"], label=run["label"])
            right.plot(h["step"], mon["causal_min_weight"], label=f"{run['label']}: min")
            if "causal_mean_weight" in mon:
                right.plot(h["step"], mon["causal_mean_weight"], linestyle="--", label=f"{run['label']}: mean")
    left.set_yscale("log")
    left.set_ylabel("causal $\\epsilon$ (log scale)")
    right.set_ylabel("causal weights: $\\min_i w_i$ (last chunk), mean")
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{problem.name}: causal training schedule")
    return _save(fig, os.path.join(out, "causal.png"))


def _plot_fields(Figure, problem, run, model, path):
    x = problem.test_grid()
    shape = problem.grid_shape
    exact = problem.exact(x).reshape(shape)
    pred = problem.predict(model, x).reshape(shape)
    if len(shape) == 1:
        return _plot_line(Figure, problem, run, x[:, 0], exact, pred, path)
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
        spans = (float(gx.max() - gx.min()), float(gy.max() - gy.min()))
        if max(spans) <= 3 * min(spans):  # a long thin domain (x in [0, 2 pi], t in [0, 1]) keeps the panel's shape
            ax.set_aspect("equal")
        ax.set_title(title)
    fig.suptitle(f"{problem.name}, {run['label']}: relative $L_2$ error {run['rel_l2']:.2e} "
                 f"after {run['iters']} iterations")
    return _save(fig, path)


def _plot_line(Figure, problem, run, x, exact, pred, path):
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(x, exact, label="exact $u$")
    left.plot(x, pred, "--", label="predicted $\\hat u$")
    left.set_xlabel(problem.axis_labels[0])
    left.set_ylabel("$u$")
    left.legend(fontsize=8)
    left.set_title("solution")
    right.semilogy(x, abs(exact - pred) + 1e-16)
    right.set_xlabel(problem.axis_labels[0])
    right.set_ylabel("$|u - \\hat u|$ (log scale)")
    right.set_title("pointwise error")
    fig.suptitle(f"{problem.name}, {run['label']}: relative $L_2$ error {run['rel_l2']:.2e} "
                 f"after {run['iters']} iterations")
    return _save(fig, path)


def _fmt(x) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.2e}"


def plot_heatmap(data: dict, path: str, dpi: int = 80) -> list:
    """A problems x methods heat map of log10(median error / plain median error), each cell annotated with its
    median error; returns ``[path]`` (``[]`` without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: heat map skipped", file=sys.stderr)
        return []
    import numpy as np

    cell = {(r["problem"], r["method"]): r for r in data["records"]}
    problems, methods = data["problems"], data["methods"]
    z = np.full((len(problems), len(methods)), np.nan)
    for i, p in enumerate(problems):
        base = next((r["median"] for r in data["records"] if r["problem"] == p and "skipped" not in r
                     and r.get("balancer", {}).get("name") == "sum"), None)
        for j, m in enumerate(methods):
            r = cell.get((p, m))
            if r is None or "skipped" in r or not math.isfinite(r["median"]) or r["median"] <= 0:
                continue
            z[i, j] = math.log10(r["median"] / base) if base else math.log10(r["median"])
    fig = Figure(figsize=(1.0 + 1.1 * len(methods), 1.0 + 0.6 * len(problems)))
    ax = fig.add_subplot(1, 1, 1)
    lim = max(1e-3, float(np.nanmax(np.abs(z)))) if np.isfinite(z).any() else 1.0
    im = ax.imshow(z, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, p in enumerate(problems):
        for j, m in enumerate(methods):
            r = cell.get((p, m))
            text = "" if r is None else "n/a" if "skipped" in r else _fmt(r["median"])
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(problems)))
    ax.set_yticklabels(problems, fontsize=8)
    fig.colorbar(im, ax=ax, label="log10(median error / plain sum's)")
    ax.set_title(f"median error over seeds {data['seeds']}: blue = better than plain")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return [path]

