"""Pictures and the short report of a diagnosis (:class:`~paddle_pinn_balance.recorder.Diagnosis`).

Every function takes the ``diagnosis.json`` mapping (``Diagnosis.to_dict()``), so the figures can be redrawn
from a saved file. matplotlib is optional: without it only the numbers and ``diagnosis.md`` are written.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap

import numpy as np

__all__ = ["markdown", "plot_all", "plot_histograms", "plot_ntk", "plot_ratios"]


def _colors(terms) -> dict:
    return {t: f"C{i}" for i, t in enumerate(terms)}


def _verdict_line(data, inches: float = 11.0) -> str:
    """The verdict, wrapped to the figure's width (about 11 characters of the title's font per inch)."""
    v = data["verdict"]
    return textwrap.fill(f"verdict: {v['kind']}: {v['remedy']}", width=max(40, int(11 * inches)))


def plot_histograms(Figure, data: dict, path: str, dpi: int = 80) -> str:
    """One panel per layer (weight matrix), one colour per term: the share of the layer's gradient entries per
    bin of log10|g|, at the first recorded step (top row) and the last (bottom row)."""
    recs = data["records"]
    rows = [recs[0]] if len(recs) == 1 else [recs[0], recs[-1]]
    layers = len(rows[0]["layers"])
    width = 2.7 * layers + 0.8
    fig = Figure(figsize=(width, 2.4 * len(rows) + 0.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), layers, squeeze=False))
    colors = _colors(rows[0]["terms"])
    for r, rec in enumerate(rows):
        for c, layer in enumerate(rec["layers"]):
            ax = axes[r, c]
            edges = np.asarray(layer["edges"])
            for t in rec["terms"]:
                counts = np.asarray(layer["counts"][t], dtype=float)
                total = counts.sum() + layer["zeros"][t]
                if total:
                    ax.stairs(counts / total, edges, color=colors[t], fill=True, alpha=0.25)
                    ax.stairs(counts / total, edges, color=colors[t], label=t, linewidth=1.4)
            ax.set_title(f"{layer['name']} {'x'.join(map(str, layer['shape']))}", fontsize=8)
            ax.grid(True, alpha=0.3)
            if r == len(rows) - 1:
                ax.set_xlabel("log10 |gradient entry|")
            if c == 0:
                ax.set_ylabel(f"step {rec['step']}\nshare of entries")
    axes[0, 0].legend(fontsize=7, title="term", title_fontsize=7)
    fig.suptitle(f"{data.get('title') or 'diagnosis'}: each term's gradient per layer "
                 f"(right = larger)\n{_verdict_line(data, width)}", fontsize=9)
    fig.savefig(path, dpi=dpi)
    return path


def plot_ratios(Figure, data: dict, path: str, dpi: int = 80) -> str:
    """Left: log10 of each term's gradient norm over the residual's against the step, the imbalance thresholds
    dashed. Right: the cosine of every pair of terms' gradients, the conflict and opposition thresholds dashed."""
    recs, th = data["records"], data["verdict"]["thresholds"]
    terms, ref = recs[0]["terms"], recs[0]["ref"]
    steps = [r["step"] for r in recs]
    colors = _colors(terms)
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for t in terms:
        if t != ref:
            left.plot(steps, [r["log10_ratio"][t] for r in recs], "o-", color=colors[t], label=t)
    d = th["imbalance_decades"]
    left.axhspan(-d, d, color="tab:green", alpha=0.08, label=f"balanced: within 10^±{d:g}")
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_ylabel(f"log10(|grad term| / |grad {ref}|)")
    left.set_title(f"gradient scale of each term relative to {ref}")
    n = len(terms)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    for k, (a, b) in enumerate(pairs):
        right.plot(steps, [r["cosine"][a][b] for r in recs], "o-", color=f"C{k % 10}",
                   label=f"{terms[a]} · {terms[b]}")
    for key, color, what in (("conflict_cosine", "tab:orange", "conflict"),
                             ("opposed_cosine", "tab:red", f"{ref} opposed")):
        right.axhline(th[key], color=color, linestyle="--", label=f"{what} <= {th[key]:g}")
    right.set_ylim(-1.05, 1.05)
    right.set_ylabel("cosine between the two terms' gradients")
    right.set_title("agreement of the terms' gradients")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if n > 3 else 1)
    fig.suptitle(f"{data.get('title') or 'diagnosis'}\n{_verdict_line(data)}", fontsize=9)
    fig.savefig(path, dpi=dpi)
    return path


def plot_ntk(Figure, data: dict, path: str, dpi: int = 80) -> str:
    """Left: eigenvalues of each term's NTK block on its point subset, largest first, at the first (dashed) and
    last (solid) recorded step. Right: each block's trace (all its points) against the step."""
    recs = [r for r in data["records"] if r.get("ntk")]
    first, last = recs[0]["ntk"], recs[-1]["ntk"]
    colors = _colors(list(last["trace"]))
    fig = Figure(figsize=(11, 4.0), layout="constrained")
    left, right = fig.subplots(1, 2)
    for t in last["trace"]:
        if last["eigenvalues"].get(t):
            for ntk, style, lab in ((first, "--", None), (last, "-", t)):
                eig = np.asarray(ntk["eigenvalues"][t], dtype=float)
                eig = eig[eig > 0]
                left.plot(np.arange(1, eig.size + 1), eig, style, color=colors[t], label=lab)
        right.plot([r["step"] for r in recs], [r["ntk"]["trace"][t] for r in recs], "o-", color=colors[t],
                   label=f"{t} ({last['points'][t]} points)")
    left.set_xscale("log")
    left.set_ylabel("eigenvalue of K_term (log scale)")
    left.set_xlabel("index (largest first)")
    m = ", ".join(f"{t} {k}" for t, k in last["subset"].items())
    left.set_title(f"NTK spectrum per term (points: {m}); dashed: step {recs[0]['step']}, "
                   f"solid: step {recs[-1]['step']}", fontsize=8)
    right.set_ylabel("Tr K_term (log scale)")
    right.set_xlabel("step")
    right.set_title("NTK trace per term (NTK weighting equalises these)")
    for ax in (left, right):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{data.get('title') or 'diagnosis'}\n{_verdict_line(data)}", fontsize=9)
    fig.savefig(path, dpi=dpi)
    return path


def plot_all(data: dict, out: str, dpi: int = 80) -> list:
    """``gradient_histograms.png``, ``ratios_cosines.png`` and, with kernels, ``ntk_spectra.png`` in ``out``."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: plots skipped", file=sys.stderr)
        return []
    files = [plot_histograms(Figure, data, os.path.join(out, "gradient_histograms.png"), dpi),
             plot_ratios(Figure, data, os.path.join(out, "ratios_cosines.png"), dpi)]
    if any(r.get("ntk") for r in data["records"]):
        files.append(plot_ntk(Figure, data, os.path.join(out, "ntk_spectra.png"), dpi))
    return files


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def _num(x) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"


def markdown(data: dict) -> str:
    """The short report ``diagnosis.md``: the verdict, its reasons and thresholds, the medians it read."""
    s, v = data["summary"], data["verdict"]
    th = v["thresholds"]
    lines = [f"# Diagnosis: {data.get('title') or 'run'}", "",
             f"**Verdict: {v['kind']}.** {v['remedy']}.", "", "Reasons (medians over the recorded steps "
             f"{s['steps']}):", ""]
    lines += [f"- {r}" for r in v["reasons"]]
    lines += ["", "Thresholds: a term whose gradient norm is at least "
              f"{th['imbalance_decades']:g} decade(s) from the residual's ({s['ref']}) is out of balance; "
              f"a pair with cosine <= {th['conflict_cosine']:g} conflicts (gradient surgery helps); the residual "
              f"and a term with cosine <= {th['opposed_cosine']:g} are opposed (no weighting helps). Why: "
              "`design/diagnose.md` (checked against the method x problem table).", "",
              f"| term | log10 grad-norm ratio to {s['ref']} | log10 NTK trace ratio | LRA's weight estimate "
              f"max\\|g_{s['ref']}\\| / mean\\|g_term\\| |", "|---|---|---|---|"]
    tr, lra = s.get("log10_trace_ratio") or {}, s.get("lra_estimate") or {}
    for t in s["terms"]:
        est = "(reference)" if t == s["ref"] else _num(lra.get(t))
        lines.append(f"| {t} | {_fmt(s['log10_ratio'][t])} | {_fmt(tr.get(t))} | {est} |")
    lines += ["", "| pair | median cosine |", "|---|---|"]
    lines += [f"| {p.replace('|', ' · ')} | {_fmt(c)} |" for p, c in s["cosine"].items()]
    if data.get("plots"):
        lines += ["", "Pictures: " + ", ".join(f"[{p}]({p})" for p in data["plots"]) + "; every number: "
                  "`diagnosis.json`."]
    return "\n".join(lines) + "\n"
