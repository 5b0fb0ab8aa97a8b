"""``pinn-balance diagnose CONFIG``: a short training of a benchmark (or of every problem of a table file) with
a :class:`~paddle_pinn_balance.recorder.Diagnosis` recording, then its pictures, numbers and verdict.

The loop is :func:`paddle_pinn_balance.train.train`'s (same seeding, sampling, optimizer and scheduler), so the
recorded run is the run ``pinn-balance run`` trains, for its first ``steps`` iterations. The balancer is the
plain sum unless ``method`` names one of the file's methods. Kernels (for the NTK traces and spectra) come from
``problem.kernels`` on one batch drawn from ``numpy.random.default_rng([seed, 1])``, as NTK weighting gets
them; a problem without kernels (Klein-Gordon, the GradNorm toy) gets none.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .recorder import Diagnosis
from .runner import UsageError, read_yaml

__all__ = ["DEFAULT_STEPS", "diagnose_problem", "main", "table_check"]

#: Default training length of a diagnosis, and the default number of recorded steps.
DEFAULT_STEPS = 200
DEFAULT_RECORDS = 5


def record_steps(steps: int, records: int = DEFAULT_RECORDS) -> list:
    """``records`` evenly spaced steps in ``[0, steps - 1]`` (0 and the last included)."""
    return sorted({int(round(s)) for s in np.linspace(0, steps - 1, max(1, min(records, steps)))})


def diagnose_problem(problem, balancer_config=None, steps: int = DEFAULT_STEPS, seed: int = 0,
                     records: int = DEFAULT_RECORDS, ntk_points: int = 64) -> Diagnosis:
    """Train ``problem`` for ``steps`` iterations with ``balancer_config`` (default ``{name: sum}``) as
    :func:`~paddle_pinn_balance.train.train` does, recording ``records`` evenly spaced steps; returns the
    :class:`Diagnosis` (``.model`` the trained network)."""
    from .train import setup_run, train_step

    config = dict(balancer_config or {"name": "sum"})
    model, rng, balancer, net, optimizer, scheduler = setup_run(problem, config, seed)
    kernels = None
    if callable(getattr(problem, "kernels", None)):
        kernels = problem.kernels(problem.sample(np.random.default_rng([int(seed), 1])))
    diag = Diagnosis(model, balancer=balancer, steps=record_steps(steps, records), kernels=kernels,
                     ntk_points=ntk_points, names=list(problem.loss_names))
    for step in range(steps):
        train_step(problem, net, rng, diag, step, optimizer, scheduler)
    return diag


def _one(problem, key, settings, config, label, steps, seed, records, ntk_points, out, plots) -> dict:
    start = time.perf_counter()
    diag = diagnose_problem(problem, config, steps=steps, seed=seed, records=records, ntk_points=ntk_points)
    seconds = time.perf_counter() - start
    files = diag.report(out, title=f"{problem.name}: {label}, {steps} steps, seed {seed}", plots=plots,
                        problem=key, problem_name=problem.name, settings=settings, method=label,
                        balancer=config, steps=steps, seed=seed, seconds=seconds)
    v = diag.verdict()
    print(f"{problem.name} ({label}, {steps} steps, {seconds:.1f} s): {v['text']}")
    for f in files:
        print(f"  wrote {f}")
    return {"problem": key, "problem_name": problem.name, "method": label, "kind": v["kind"], "text": v["text"],
            "summary": diag.summary(), "seconds": seconds}


def _check(problem, config, label, path) -> None:
    """Build the balancer once before training (as ``run`` does): a bad one is a one-line error, exit code 2."""
    from .train import problem_balancer

    try:
        problem_balancer(problem, config, problem.build_model(0), seed=0)
    except (TypeError, ValueError) as e:
        raise UsageError(f"pinn-balance diagnose: error: {path}: method {label!r} on {problem.name}: "
                         f"{' '.join(str(e).split())}") from None


def _method(methods, label, path):
    if label is None:
        return "sum", {"name": "sum"}
    for m in methods:
        if m["label"] == label:
            return label, dict(m["balancer"])
    raise UsageError(f"pinn-balance diagnose: error: unknown method {label!r} in {path}; "
                     f"allowed: {[m['label'] for m in methods]}")


def main(config: str, steps: int | None = None, out: str | None = None, method: str | None = None,
         seed: int = 0, records: int = DEFAULT_RECORDS, ntk_points: int = 64, plots: bool = True) -> int:
    """The ``diagnose`` command: a benchmark file (one problem) or a table file (``problems:``, each problem
    into ``out/<label>/`` and a summary ``out/diagnosis.md``). Bad files raise ``UsageError``."""
    from .runner import benchmark_path, load_benchmark
    from .table import load_table

    config = benchmark_path(config, "diagnose")  # a path, or the name of a shipped benchmark
    steps = steps or DEFAULT_STEPS
    out = out or os.path.join("runs", "diagnose_" + os.path.splitext(os.path.basename(config))[0])
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"pinn-balance diagnose: error: --out {out!r} exists and is not a folder")
    raw = read_yaml(config, "diagnose")
    if isinstance(raw, dict) and "problems" in raw:
        spec = load_table(config)
        label, cfg = _method(spec["methods"], method, config)
        todo = [p for p in spec["problems"] if label not in p["skip"]]
        for p in todo:
            _check(p["_problem"], cfg, label, config)
        rows = []
        for p in todo:
            rows.append(_one(p["_problem"], p["problem"], p["settings"], cfg, label, steps, seed, records,
                             ntk_points, os.path.join(out, p["label"]), plots))
        path = os.path.join(out, "diagnosis.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(table_check(rows, steps))
        print(f"wrote {path}")
        return 0
    spec = load_benchmark(config)
    label, cfg = _method(spec["methods"], method, config)
    _check(spec["_problem"], cfg, label, config)
    _one(spec["_problem"], spec["problem"], spec["settings"], cfg, label, steps, seed, records, ntk_points, out,
         plots)
    return 0


def table_check(rows: list, steps: int) -> str:
    """A markdown table: per problem the verdict's kind, the numbers it read and its reading."""
    lines = [f"# Diagnosis of every problem ({steps} steps, plain sum unless stated)\n",
             "| problem | verdict | largest log10 ratio to res | lowest cosine | seconds | reading |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        ratios = [v for t, v in s["log10_ratio"].items() if t != s["ref"] and v is not None]
        worst = max(ratios, key=abs) if ratios else float("nan")
        cos = [c for c in s["cosine"].values() if c is not None]
        lines.append(f"| {r['problem_name']} | {r['kind']} | {worst:+.2f} | {min(cos, default=float('nan')):.2f} | "
                     f"{r['seconds']:.1f} | {r['text'].replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"
