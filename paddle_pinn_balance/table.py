"""``table``: every balancer x every problem, several seeds, one fixed budget per problem; resumable.

The table YAML file (``examples/table.yaml``)::

    iters: 2000            # the budget of every problem that names none of its own
    seeds: 3               # a count (seeds 0..K-1) or a list of seeds
    problems:
      - label: poisson1d   # optional, default the problem's key; unique
        problem: poisson1d # a key of paddle_pinn_balance.problems.PROBLEMS
        settings: {}       # the problem's constructor arguments (optional)
        iters: 1000        # this problem's budget (optional)
        skip: [ntk]        # method labels not run on this problem (optional)
    methods:
      - label: sum
        balancer: {name: sum}
      - label: lra
        balancer: {name: lr_annealing, ref: res}

Every (problem, method, seed) cell trains with :func:`~paddle_pinn_balance.train.train` (the problem's own
optimizer and schedule; fresh points per iteration as the problem samples them) and is written to
``DIR/results.json`` as soon as it finishes (an atomic replace), so a killed table continues where it stopped:
a cell is reused when its problem settings, budget and balancer config are those of the file, else trained
again. A method whose balancer cannot be built for a problem (``ntk`` trace on a problem without kernels) is
recorded as not applicable, with the reason.

``results.json``: ``{"table_file", "iters", "seeds", "problems": [labels], "methods": [labels],
"records": [one per problem x method]}``; a record holds ``problem``, ``method``, ``problem_key``, ``settings``,
``iters``, ``balancer``, ``seeds``, ``errors`` (per seed, in seed order), ``median``, ``min``, ``max``,
``weights`` (final, per seed), ``time_per_step_ms`` (per seed), ``time_ratio`` (median time per step over
the plain-sum method's, same problem) and ``error_name``; or ``problem``, ``method``, ``skipped`` (the reason).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time

from .checks import is_int
from .plots import _fmt, plot_heatmap
from .runner import _fail, read_yaml

__all__ = ["load_table", "run_table", "summarise", "table_text"]

_TOP_KEYS = {"iters", "seeds", "problems", "methods", "description", "log_every"}
_PROBLEM_KEYS = {"label", "problem", "settings", "iters", "skip", "note"}
_METHOD_KEYS = {"label", "title", "balancer", "note"}


def load_table(path: str, iters: int | None = None, seeds: int | None = None) -> dict:
    """Read and validate a table YAML file (see the module docstring); raises ``UsageError`` (one line).

    ``iters`` / ``seeds`` (a count) replace the file's budget of *every* problem and its seeds. Every
    problem is built and every method's balancer config checked (name and keys) before anything trains.
    Returns the mapping with ``seeds`` a list, each problem's ``iters`` filled in and its object under
    ``"_problem"``.
    """
    from .config import REGISTRY, allowed_keys
    from .problems import PROBLEMS, get_problem

    spec = read_yaml(path, "table")
    fail = lambda msg: _fail(path, msg, "table")  # noqa: E731
    if not isinstance(spec, dict):
        fail(f"malformed table: the file must hold a mapping with `problems` and `methods`; got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in _TOP_KEYS)
    if unknown:
        fail(f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("problems", "methods"):
        if not isinstance(spec.get(key), list) or not spec[key]:
            fail(f"`{key}` must be a non-empty list of mappings")
    default_iters = spec.get("iters")
    if default_iters is not None and not is_int(default_iters, 1):
        fail(f"`iters` must be an integer >= 1; got {default_iters!r}")
    seed_list = spec.get("seeds", 1) if seeds is None else seeds
    if is_int(seed_list, 1):
        seed_list = list(range(seed_list))
    elif not (isinstance(seed_list, list) and seed_list and all(is_int(s, 0) for s in seed_list)
              and len(set(seed_list)) == len(seed_list)):
        fail(f"`seeds` must be a count >= 1 or a list of distinct integers >= 0; got {seed_list!r}")

    methods, labels = [], []
    for i, m in enumerate(spec["methods"]):
        if not isinstance(m, dict) or "label" not in m or "balancer" not in m:
            fail(f"methods[{i}] must be a mapping with `label` and `balancer`; got {m!r}")
        bad = sorted(str(k) for k in m if k not in _METHOD_KEYS)
        if bad:
            fail(f"methods[{i}]: unknown key(s) {bad}; allowed: {sorted(_METHOD_KEYS)}")
        label, cfg = m["label"], m["balancer"]
        if not isinstance(label, str) or not label or label in labels:
            fail(f"methods[{i}]: `label` must be a non-empty string, unique in the file; got {label!r}")
        if not isinstance(cfg, dict) or cfg.get("name") not in REGISTRY:
            got = cfg.get("name") if isinstance(cfg, dict) else cfg
            fail(f"method {label!r}: unknown balancer {got!r}; allowed: {sorted(REGISTRY)}")
        allowed = allowed_keys(cfg["name"])
        bad = sorted(str(k) for k in cfg if k != "name" and k not in allowed)
        if bad:
            fail(f"method {label!r}: unknown key(s) {bad} for balancer {cfg['name']!r}; allowed: {allowed}")
        labels.append(label)
        methods.append(dict(m))

    problems, plabels = [], []
    for i, p in enumerate(spec["problems"]):
        if not isinstance(p, dict) or "problem" not in p:
            fail(f"problems[{i}] must be a mapping with `problem`; got {p!r}")
        bad = sorted(str(k) for k in p if k not in _PROBLEM_KEYS)
        if bad:
            fail(f"problems[{i}]: unknown key(s) {bad}; allowed: {sorted(_PROBLEM_KEYS)}")
        key = p["problem"]
        if not isinstance(key, str) or key not in PROBLEMS:
            fail(f"problems[{i}]: unknown problem {key!r}; allowed: {sorted(PROBLEMS)}")
        label = p.get("label", key)
        if not isinstance(label, str) or not label or label in plabels:
            fail(f"problems[{i}]: `label` must be a non-empty string, unique in the file; got {label!r}")
        settings = p.get("settings") or {}
        if not isinstance(settings, dict):
            fail(f"problem {label!r}: `settings` must be a mapping; got {type(settings).__name__}")
        budget = iters if iters is not None else p.get("iters", default_iters)
        if budget is None:
            fail(f"problem {label!r}: no `iters` (give one for the problem or for the whole table)")
        if not is_int(budget, 1):
            fail(f"problem {label!r}: `iters` must be an integer >= 1; got {budget!r}")
        skip = p.get("skip") or []
        if not isinstance(skip, list) or any(s not in labels for s in skip):
            fail(f"problem {label!r}: `skip` must list method labels of the file {labels}; got {skip!r}")
        try:
            problem = get_problem(key, **settings)
        except (TypeError, ValueError) as e:
            fail(f"bad settings for problem {label!r}: {' '.join(str(e).split())}")
        plabels.append(label)
        problems.append({"label": label, "problem": key, "settings": dict(settings), "iters": int(budget),
                         "skip": list(skip), "_problem": problem})
    return {"table_file": path, "seeds": [int(s) for s in seed_list], "problems": problems, "methods": methods}


# ------------------------------------------------------------------ running (resumable)


def _load_records(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {(r["problem"], r["method"]): r for r in data.get("records", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        print(f"warning: cannot read {path}; starting the table afresh", file=sys.stderr)
        return {}


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)  # atomic: a kill never leaves half a file


def _same_cell(old: dict, new: dict) -> bool:
    return all(old.get(k) == new[k] for k in ("problem_key", "settings", "iters", "balancer"))


def run_table(spec: dict, out: str = os.path.join("runs", "table"), progress: bool = True,
              plots: bool = True) -> int:
    """Train every cell of a validated table (:func:`load_table`), reusing finished ones in ``out/results.json``;
    prints a progress line per cell, then the tables (:func:`table_text`); writes ``results.json`` after each
    cell and, with matplotlib, ``heatmap.png``; returns 0."""
    from .train import problem_balancer, train

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    previous = _load_records(path)
    records = {}
    cells = [(p, m) for p in spec["problems"] for m in spec["methods"] if m["label"] not in p["skip"]]
    n_cells = len(cells) * len(spec["seeds"])
    done = 0
    started = time.perf_counter()

    def save():
        order = [(p["label"], m["label"]) for p, m in cells]
        data = {"table_file": spec["table_file"], "seeds": spec["seeds"],
                "problems": [p["label"] for p in spec["problems"]], "methods": [m["label"] for m in spec["methods"]],
                "records": [summarise(records[k]) for k in order if k in records]}
        _write_json(path, data)
        return data

    for p, m in cells:
        problem = p["_problem"]
        rec = {"problem": p["label"], "method": m["label"], "problem_key": p["problem"], "settings": p["settings"],
               "iters": p["iters"], "balancer": m["balancer"], "error_name": problem.error_name, "runs": {}}
        old = previous.get((p["label"], m["label"]))
        if old is not None and _same_cell(old, rec):
            if "skipped" in old:
                rec["skipped"] = old["skipped"]
            else:
                rec["runs"] = {str(k): v for k, v in old.get("runs", {}).items()}
        if "skipped" not in rec:
            try:
                problem_balancer(problem, m["balancer"], problem.build_model(0), seed=0)
            except (TypeError, ValueError) as e:
                rec["skipped"] = " ".join(str(e).split())
        records[(p["label"], m["label"])] = rec
        for seed in spec["seeds"]:
            done += 1
            tag = f"[{done}/{n_cells}] {p['label']} / {m['label']} / seed {seed}"
            if "skipped" in rec:
                print(f"{tag}: not applicable ({rec['skipped']})", flush=True)
                continue
            if str(seed) in rec["runs"]:
                print(f"{tag}: done before, rel. error {rec['runs'][str(seed)]['error']:.3e}", flush=True)
                continue
            r = train(problem, m["balancer"], iters=p["iters"], seed=seed, log_every=p["iters"], progress=progress,
                      desc=f"{p['label']} {m['label']} s{seed}")
            r.pop("model")
            rec["runs"][str(seed)] = {"error": r["rel_l2"], "weights": r["weights"],
                                      "time_per_step_ms": r["time_per_step_ms"]}
            save()
            elapsed = time.perf_counter() - started
            print(f"{tag}: rel. error {r['rel_l2']:.3e}, {r['time_per_step_ms']:.2f} ms/step "
                  f"({elapsed:.0f} s so far)", flush=True)
    data = save()
    _add_time_ratios(data["records"])
    _write_json(path, data)
    print()
    print(table_text(data))
    files = []
    if plots:
        files = plot_heatmap(data, os.path.join(out, "heatmap.png"))
    print(f"\nwrote {path}")
    for f in files:
        print(f"wrote {f}")
    return 0


def summarise(rec: dict) -> dict:
    """A record with its per-seed runs reduced: ``seeds``, ``errors`` (seed order), ``median``, ``min``,
    ``max``, ``weights`` and ``time_per_step_ms`` per seed (the runs stay under ``runs`` for the resume)."""
    rec = {k: v for k, v in rec.items() if k not in ("seeds", "errors", "median", "min", "max", "weights",
                                                     "time_per_step_ms", "time_ratio")}
    if "skipped" in rec:
        return rec
    seeds = sorted(int(s) for s in rec["runs"])
    runs = [rec["runs"][str(s)] for s in seeds]
    errors = [r["error"] for r in runs]
    finite = [e for e in errors if math.isfinite(e)]
    rec.update(seeds=seeds, errors=errors,
               median=statistics.median(errors) if len(finite) == len(errors) and errors else float("nan"),
               min=min(finite) if finite else float("nan"), max=max(finite) if finite else float("nan"),
               weights=[r["weights"] for r in runs], time_per_step_ms=[r["time_per_step_ms"] for r in runs])
    return rec


def _add_time_ratios(records: list) -> None:
    """``time_ratio``: median time per step over that of the problem's plain ``sum`` method (None without one)."""
    plain = {}
    for r in records:
        if r.get("balancer", {}).get("name") == "sum" and r.get("time_per_step_ms"):
            plain.setdefault(r["problem"], statistics.median(r["time_per_step_ms"]))
    for r in records:
        base = plain.get(r["problem"])
        r["time_ratio"] = (statistics.median(r["time_per_step_ms"]) / base
                           if base and r.get("time_per_step_ms") else None)


def table_text(data: dict) -> str:
    """Per problem: method, median error [min, max] over seeds, final weights (first seed); then the problems x
    methods matrix of median errors (markdown). No time column (cells run at different times, under different
    loads; ``time_per_step_ms`` stays in ``results.json``)."""
    blocks = []
    by_problem = {}
    for r in data["records"]:
        by_problem.setdefault(r["problem"], []).append(r)
    for label in data["problems"]:
        recs = by_problem.get(label, [])
        if not recs:
            continue
        first = next((r for r in recs if "skipped" not in r), recs[0])
        head = f"{label}: {first.get('iters')} iterations, {first.get('error_name', 'relative $L_2$ error')}"
        # no time column: cells run one after another, so their times compare machine loads as much as methods
        # (the cost of each method side by side: design/performance.md, benchmarks/step_overhead.py)
        rows = [("method", "median [min, max] over seeds", "seeds", "final weights (seed 0)")]
        for r in recs:
            if "skipped" in r:
                rows.append((r["method"], "n/a", "-", r["skipped"][:60]))
                continue
            w = r["weights"][0] if r.get("weights") else {}
            rows.append((r["method"], f"{_fmt(r['median'])} [{_fmt(r['min'])}, {_fmt(r['max'])}]",
                         str(len(r["errors"])), ", ".join(f"{n}={v:.3g}" for n, v in w.items())))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(2, "  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    cell = {(r["problem"], r["method"]): r for r in data["records"]}
    matrix = ["| problem | " + " | ".join(data["methods"]) + " |", "|---" * (len(data["methods"]) + 1) + "|"]
    for p in data["problems"]:
        vals = []
        for m in data["methods"]:
            r = cell.get((p, m))
            vals.append("-" if r is None else "n/a" if "skipped" in r else _fmt(r["median"]))
        matrix.append(f"| {p} | " + " | ".join(vals) + " |")
    blocks.append("median error over seeds (problems x methods):\n" + "\n".join(matrix))
    return "\n\n".join(blocks)
