"""Why is my PINN not training? The statistics of a diagnosis and its verdict (pure functions of numpy arrays).

A diagnosis records, at chosen steps, each loss term's gradient with respect to the network's parameters
(:class:`~paddle_pinn_balance.recorder.Diagnosis` takes them from a model; this module never sees one) and,
where per-point kernels exist, each term's NTK block. From those arrays:

* :func:`grad_norms`: :math:`\\|\\nabla_\\theta L_i\\|_2` per term; :func:`log_scale_ratios`:
  :math:`r_i = \\log_{10}(\\|\\nabla_\\theta L_i\\|_2 / \\|\\nabla_\\theta L_{ref}\\|_2)`, the decades between a term's
  gradient and the residual's (the imbalance the learning-rate-annealing paper shows, Wang, Teng & Perdikaris,
  SIAM J. Sci. Comput. 43, 2021, Sec. 2.3, Fig. 2);
* :func:`cosines`: :math:`\\cos(g_i, g_j) = g_i\\cdot g_j / (\\|g_i\\|\\|g_j\\|)` for every pair (the conflict of
  gradient surgery: PCGrad, Yu et al. 2020, Def. 1, "conflicting" when negative; ConFIG, Liu et al. 2024);
* :func:`log_histogram`: counts of :math:`\\log_{10}|g|` of one layer's gradient entries in common bins (the
  per-layer histograms of the LRA paper, Fig. 2, on a log axis so that terms decades apart share a panel);
* :func:`kernel_spectrum`: the eigenvalues of :math:`K = J J^\\top` from a term's per-point Jacobian
  :math:`J` (rows :math:`\\partial f(x_p)/\\partial\\theta`), the NTK block of Wang, Yu & Perdikaris (JCP 449,
  2022, Sec. 4, Figs. 2-3), whose trace :math:`\\operatorname{Tr} K = \\sum_p \\|\\partial f(x_p)/\\partial\\theta\\|^2`
  NTK weighting reads (Algorithm 1).

:func:`verdict` reads the medians over the recorded steps (:func:`summarize`) with :data:`THRESHOLDS`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["THRESHOLDS", "cosines", "grad_norms", "histogram_edges", "kernel_spectrum", "log_histogram",
           "log_scale_ratios", "lra_estimates", "reference_term", "summarize", "verdict"]

#: The verdict's thresholds (see :func:`verdict` and ``design/diagnose.md`` for why these values).
THRESHOLDS = {
    # a term's gradient norm at least this many decades (log10) from the residual's: a gradient-scale imbalance
    "imbalance_decades": 1.0,
    # a pair of terms with a median cosine at or below this: conflicting gradients (gradient surgery)
    "conflict_cosine": -0.2,
    # the residual and a term at or below this: opposed gradients, which no weighting separates
    "opposed_cosine": -0.7,
}

#: Histogram bins per decade of |g| (:func:`histogram_edges`).
BINS_PER_DECADE = 4


def reference_term(names) -> str:
    """The term the others are compared with: ``"res"`` (the PDE residual) if present, else the first term."""
    names = list(names)
    if not names:
        raise ValueError("no loss terms")
    return "res" if "res" in names else names[0]


def grad_norms(G) -> np.ndarray:
    """:math:`\\|g_i\\|_2` of each row of ``G`` (``[terms, params]``), in float64."""
    G = np.asarray(G, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", G, G))


def log_scale_ratios(norms, ref: int) -> np.ndarray:
    """:math:`\\log_{10}(n_i / n_{ref})` for the norms ``norms``; ``-inf`` for a zero norm, ``nan`` when the
    reference's norm is zero."""
    n = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(n) - np.log10(n[ref])
    if not n[ref] > 0:
        out[:] = np.nan
    return out


def cosines(G) -> np.ndarray:
    """``[terms, terms]`` matrix of :math:`g_i\\cdot g_j / (\\|g_i\\|\\|g_j\\|)`; ``nan`` where a norm is zero."""
    G = np.asarray(G, dtype=np.float64)
    n = grad_norms(G)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (G @ G.T) / np.outer(n, n)
    return np.clip(c, -1.0, 1.0)


def lra_estimates(G, ref: int) -> np.ndarray:
    r""":math:`\hat\lambda_i = \max|g_{ref}| / \operatorname{mean}|g_i|`, the weight learning-rate annealing would
    set before smoothing (Wang, Teng & Perdikaris, SIAM J. Sci. Comput. 2021, eq. 2.30, over all parameters at
    once); ``inf`` for a zero gradient."""
    A = np.abs(np.asarray(G, dtype=np.float64))
    with np.errstate(divide="ignore"):
        return A[ref].max() / A.mean(axis=1)


def histogram_edges(arrays, per_decade: int = BINS_PER_DECADE) -> np.ndarray:
    """Common bin edges of :math:`\\log_{10}|g|` spanning every non-zero entry of ``arrays`` (whole decades,
    ``per_decade`` bins each); ``[-1, 0]`` with one bin when every entry is zero or non-finite."""
    lo, hi = math.inf, -math.inf
    for a in arrays:
        a = np.abs(np.asarray(a, dtype=np.float64)).ravel()
        a = a[np.isfinite(a) & (a > 0)]
        if a.size:
            lo, hi = min(lo, float(np.log10(a.min()))), max(hi, float(np.log10(a.max())))
    if lo > hi:
        return np.array([-1.0, 0.0])
    lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    return np.linspace(lo, hi, int(hi - lo) * per_decade + 1)


def log_histogram(values, edges) -> tuple:
    """``(counts, zeros)``: how many entries of ``values`` have :math:`\\log_{10}|v|` in each bin of ``edges``
    (``numpy.histogram``'s bins: the last one closed), and how many are exactly zero (or non-finite)."""
    v = np.abs(np.asarray(values, dtype=np.float64)).ravel()
    ok = np.isfinite(v) & (v > 0)
    counts, _ = np.histogram(np.log10(v[ok]), bins=np.asarray(edges, dtype=np.float64))
    return counts.astype(np.int64), int(v.size - ok.sum())


def kernel_spectrum(J) -> np.ndarray:
    """Eigenvalues of :math:`K = J J^\\top`, largest first (``J``: ``[points, params]`` per-point Jacobian of
    one term). Symmetric by construction: ``numpy.linalg.eigvalsh`` in float64; round-off below zero is
    clipped to 0 (K is positive semi-definite)."""
    J = np.asarray(J, dtype=np.float64)
    return np.clip(np.linalg.eigvalsh(J @ J.T)[::-1], 0.0, None)


def _median(values):
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(np.median(a)) if a.size else None


def summarize(records: list) -> dict:
    """Medians over the recorded steps: ``log10_ratio`` per term, ``cosine`` per pair ``"a|b"``, and the NTK
    trace ratio ``log10_trace_ratio`` per term (where recorded). ``records``: the dicts of
    :class:`~paddle_pinn_balance.recorder.Diagnosis` (keys ``terms``, ``ref``, ``log10_ratio``, ``cosine``,
    ``ntk``)."""
    if not records:
        raise ValueError("no recorded steps: nothing to summarize")
    terms, ref = records[0]["terms"], records[0]["ref"]
    out = {"terms": list(terms), "ref": ref, "steps": [r["step"] for r in records],
           "log10_ratio": {t: _median(r["log10_ratio"][t] for r in records) for t in terms},
           "lra_estimate": {t: _median(r.get("lra_estimate", {}).get(t) for r in records) for t in terms},
           "cosine": {}, "log10_trace_ratio": None}
    for i, a in enumerate(terms):
        for j in range(i + 1, len(terms)):
            out["cosine"][f"{a}|{terms[j]}"] = _median(r["cosine"][i][j] for r in records)
    ntk = [r["ntk"] for r in records if r.get("ntk")]
    if ntk:
        names = list(ntk[0]["trace"])
        out["log10_trace_ratio"] = {t: _median(n["log10_trace_ratio"][t] for n in ntk) for t in names}
    return out


def _decades(x: float) -> str:
    return f"10^{x:+.1f}".replace("+", "")


def _scale_methods(summary) -> str:
    """The gradient-reading methods to try: LRA reads the residual's gradient (a term named ``res``), NTK
    weighting needs per-point kernels (recorded NTK traces); otherwise the grad-norm ratio / GradNorm."""
    names = (["lr_annealing (preset wang2021_code)"] if summary["ref"] == "res" else []) + \
        (["ntk"] if summary.get("log10_trace_ratio") else [])
    return " or ".join(names or ["grad_norm_ratio or grad_norm"])


def verdict(summary: dict, thresholds: dict | None = None) -> dict:
    r"""A plain-language reading of :func:`summarize`'s medians, with the thresholds it used.

    * **opposed** (read first): the residual (``ref``) and another term whose median cosine is at or below
      ``opposed_cosine`` (default -0.7). The network lowers the residual by moving away from the initial or
      boundary data (the failure of convection with large beta, Krishnapriyan et al., NeurIPS 2021, and of
      Allen-Cahn, Wang, Sankaran & Perdikaris, "Respecting causality", 2022). For two anti-parallel gradients,
      :math:`g_b pprox -c\,g_a`, every weighting :math:`w_a g_a + w_b g_b` lies on one line (weights only
      trade one term for the other) and PCGrad's projection of each onto the other's normal plane leaves
      almost nothing: balancing will not help. Remedy: causal training (``CausalResidual``), a curriculum, the
      architecture. On the table: convection beta = 30 and Allen-Cahn (residual vs initial condition, medians
      -0.81 to -0.99 over three seeds), where every method stays at ~100% error.
    * **imbalance** (may hold as well): a term whose gradient norm is at least ``imbalance_decades`` (default
      1: a factor 10) from the residual's, :math:`|r_i| \ge 1`. Remedy: a method that reads gradient scales and
      rescales each term: learning-rate annealing (``lr_annealing``, preset ``wang2021_code``; it reads a term
      named ``res``), NTK trace weighting (``ntk``, where per-point kernels exist). On the table these beat the
      plain sum 4x-100x on Poisson 1D, Helmholtz, Klein-Gordon and the 5-term Poisson 2D, whose median ratios
      are 10^-1.3 to 10^-2.6.
    * **conflict**: any other pair whose median cosine is at or below ``conflict_cosine`` (default -0.2), two
      data terms opposed included (the third term keeps the weighted sum off their line). Remedy: gradient
      surgery (``pcgrad``, ``conflict_free``, ``upgrad``), which removes the opposing parts and keeps the rest.
    * **balanced**: none of these: balancing will not help; look at causal training, the architecture, the
      sampling or a longer run.

    Returns ``{"kind", "reasons", "remedy", "text", "weighting_helps", "thresholds"}``: ``kind`` is
    ``"opposed"`` (``"opposed+imbalance"`` where both hold), ``"imbalance"``, ``"conflict"``,
    ``"imbalance+conflict"`` or ``"balanced"``; ``reasons`` name the terms and the numbers; ``weighting_helps``
    is true for imbalance and conflict without opposition.
    """
    th = dict(THRESHOLDS, **(thresholds or {}))
    ref = summary["ref"]
    ratios = {t: r for t, r in summary["log10_ratio"].items() if t != ref and r is not None}
    far = {t: r for t, r in ratios.items() if abs(r) >= th["imbalance_decades"]}
    pairs = sorted(((p, c) for p, c in summary["cosine"].items() if c is not None), key=lambda kv: kv[1])
    opposed = [(p, c) for p, c in pairs if c <= th["opposed_cosine"] and ref in p.split("|")]
    conflicting = [(p, c) for p, c in pairs if c <= th["conflict_cosine"] and (p, c) not in opposed]
    reasons, kinds = [], []
    for p, c in opposed:
        a, b = p.split("|")
        reasons.append(f"terms {a} and {b} are opposed: cosine {c:.2f} <= {th['opposed_cosine']:g}")
    for t, r in sorted(far.items(), key=lambda kv: -abs(kv[1])):
        side = "of" if r < 0 else "times"
        whose = f"the residual's ({ref})" if ref == "res" else f"{ref}'s"
        reasons.append(f"term {t}'s gradients are {_decades(r)} {side} {whose}: "
                       f"|log10 ratio| {abs(r):.1f} >= {th['imbalance_decades']:g}")
    if not opposed:
        for p, c in conflicting:
            a, b = p.split("|")
            reasons.append(f"terms {a} and {b} conflict: cosine {c:.2f} <= {th['conflict_cosine']:g}")
    kinds = (["opposed"] if opposed else []) + (["imbalance"] if far else []) + \
        (["conflict"] if conflicting and not opposed else [])
    if opposed:
        remedy = ("no weighting fixes a residual opposed to the data (any weighting of the two moves along one line): "
                  "balancing will not help; see causal training (CausalResidual), a curriculum or the architecture")
    elif far or conflicting:
        remedy = "; ".join(
            ([f"a gradient-scale imbalance: try {_scale_methods(summary)}"] if far else [])
            + (["conflicting gradients: try pcgrad / conflict_free"] if conflicting else []))
    else:
        worst = max(ratios.values(), key=abs, default=0.0)
        lowest = pairs[0][1] if pairs else float("nan")
        reasons.append(f"no imbalance (largest |log10 ratio| to {ref} {abs(worst):.1f} < "
                       f"{th['imbalance_decades']:g}) and no conflict (lowest cosine {lowest:.2f} > "
                       f"{th['conflict_cosine']:g})")
        remedy = ("balancing will not help: see causal training (CausalResidual), the architecture, the sampling "
                  "or a longer run")
    kind = "+".join(kinds) if kinds else "balanced"
    text = "; ".join(reasons) + ": " + remedy
    return {"kind": kind, "reasons": reasons, "remedy": remedy, "text": text,
            "weighting_helps": bool((far or conflicting) and not opposed), "thresholds": th}
