"""Command line: ``pinn-balance demo | run | report`` (also ``python -m paddle_pinn_balance ...``).

``demo`` trains the Helmholtz 2D PINN of Wang, Teng & Perdikaris (2021) twice from the same seed, with
plain weights (``sum``) and with learning-rate annealing (``lr_annealing``, preset ``wang2021_code``),
prints a table, and writes ``results.json`` and plots (with the optional ``matplotlib``) into ``--out``.

``run CONFIG.yaml`` trains any benchmark problem with each method (balancer) the YAML file lists, for one
or several seeds, and writes ``results.json`` and the demo's plots. The YAML file::

    problem: helmholtz          # a key of paddle_pinn_balance.problems.PROBLEMS
    settings: {batch_size: 128} # keyword arguments of the problem's constructor (optional)
    iters: 40000
    seeds: 1                    # a count (seeds 0..K-1) or a list of seeds (optional, default 1)
    log_every: 400              # history interval (optional, default iters // 100)
    reference: "LRA paper, Sec. 3.1"   # where the published numbers come from (optional)
    methods:
      - label: plain
        balancer: {name: sum}
        published: 1.81e-1      # the paper's error for this method (optional)
      - label: lra
        balancer: {name: lr_annealing, ref: res, preset: wang2021_code}

``report DIR...`` reads the ``results.json`` of finished runs and writes a markdown table and a comparison
plot. Errors in the arguments or the YAML file print one line on stderr and exit with code 2.
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

    run = commands.add_parser(
        "run", help="a benchmark from a YAML file: every method listed there (or one), one or more seeds",
        description="Train the problem a YAML file names with each of its methods; write results.json and plots.",
    )
    run.add_argument("config", help="YAML file (see examples/benchmarks/)")
    run.add_argument("--method", action="append", default=None, metavar="LABEL",
                     help="run only the method with this label (repeatable; default: all)")
    run.add_argument("--iters", type=_int_at_least(1), default=None, help="override the file's `iters`")
    run.add_argument("--seeds", type=_int_at_least(1), default=None,
                     help="number of seeds, 0..K-1 (overrides the file's `seeds`)")
    run.add_argument("--out", default=None, help="output folder (default runs/<config file name>)")
    run.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", dest="overrides",
                     help="override one of the problem's settings (VALUE read as YAML, e.g. layers=[2,50,50,1])")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--no-plots", action="store_true", help="write results.json only")

    report = commands.add_parser(
        "report", help="markdown table and comparison plot from finished runs",
        description="Read DIR/results.json (or DIR/*/results.json) of finished `run`s; print a markdown table "
        "and write report.md and comparison.png into --out.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (or folders holding run folders)")
    report.add_argument("--out", default=os.path.join("runs", "report"), help="output folder (default runs/report)")
    report.add_argument("--dpi", type=_int_at_least(20), default=80, help="resolution of the plots (default 80)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pinn-balance``; returns the exit code (2 on bad arguments)."""
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            spec = load_benchmark(args.config, overrides=args.overrides)
            methods = _select_methods(spec, args.method, args.config)
            _check_balancers(spec, methods, args.config)
            if args.out is None:
                args.out = os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise _UsageError(f"pinn-balance {args.command}: error: --out {args.out!r} exists and is not a folder")
        if args.command == "report":
            found = _find_results(args.dirs)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.command == "run":
        return run(spec, methods, iters=args.iters, seeds=args.seeds, out=args.out, progress=not args.quiet,
                   plots=not args.no_plots)
    if args.command == "report":
        return report(found, out=args.out, dpi=args.dpi)
    return demo(iters=args.iters, out=args.out, seed=args.seed)


# ------------------------------------------------------------------ run: a benchmark from a YAML file

_TOP_KEYS = {"problem", "settings", "iters", "seeds", "log_every", "reference", "description", "methods"}
_METHOD_KEYS = {"label", "balancer", "published", "note"}


def _fail(path, message):
    raise _UsageError(f"pinn-balance run: error: {path}: {message}")


def _positive_int(value, minimum=1):
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def load_benchmark(path: str, overrides=None) -> dict:
    """Read and validate a benchmark YAML file (see the module docstring); raises ``_UsageError`` (one line).

    Checks the keys, the problem name and its settings (by building the problem), every method's label
    (unique) and balancer (name and keys), ``iters``, ``seeds`` and ``log_every``. ``overrides``: a list of
    ``"key=value"`` strings replacing problem settings (the value read as YAML). Returns the mapping with
    ``seeds`` as a list and the built ``problem`` object under ``"_problem"``.
    """
    import yaml

    from .config import REGISTRY, allowed_keys
    from .problems import PROBLEMS, get_problem

    if not os.path.isfile(path):
        _fail(path, "config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
    except yaml.YAMLError as e:
        _fail(path, "malformed YAML: " + " ".join(str(e).split()))
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, f"cannot read it: {e}")
    if not isinstance(spec, dict):
        _fail(path, f"malformed benchmark: the file must hold a mapping with `problem` and `methods`; "
              f"got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in _TOP_KEYS)
    if unknown:
        _fail(path, f"unknown key(s) {unknown}; allowed: {sorted(_TOP_KEYS)}")
    for key in ("problem", "iters", "methods"):
        if key not in spec:
            _fail(path, f"missing key `{key}`")
    name = spec["problem"]
    if not isinstance(name, str) or name not in PROBLEMS:
        _fail(path, f"unknown problem {name!r}; allowed: {sorted(PROBLEMS)}")
    settings = spec.get("settings") or {}
    if not isinstance(settings, dict):
        _fail(path, f"`settings` must be a mapping of {name}'s constructor arguments; got {type(settings).__name__}")
    settings = dict(settings)
    for item in overrides or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"pinn-balance run: error: --set needs KEY=VALUE; got {item!r}")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise _UsageError(f"pinn-balance run: error: --set {key.strip()}: malformed value {value!r}") from None
    try:
        problem = get_problem(name, **settings)
    except (TypeError, ValueError) as e:
        _fail(path, f"bad settings for problem {name!r}: {' '.join(str(e).split())}")
    if not _positive_int(spec["iters"]):
        _fail(path, f"`iters` must be an integer >= 1; got {spec['iters']!r}")
    seeds = spec.get("seeds", 1)
    if _positive_int(seeds):
        seeds = list(range(seeds))
    elif not (isinstance(seeds, list) and seeds and all(_positive_int(s, 0) for s in seeds)):
        _fail(path, f"`seeds` must be a count >= 1 or a list of integers >= 0; got {seeds!r}")
    if "log_every" in spec and not _positive_int(spec["log_every"]):
        _fail(path, f"`log_every` must be an integer >= 1; got {spec['log_every']!r}")
    methods = spec["methods"]
    if not isinstance(methods, list) or not methods:
        _fail(path, "`methods` must be a non-empty list of {label, balancer} mappings")
    labels = []
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or "label" not in m or "balancer" not in m:
            _fail(path, f"methods[{i}] must be a mapping with `label` and `balancer`; got {m!r}")
        bad = sorted(str(k) for k in m if k not in _METHOD_KEYS)
        if bad:
            _fail(path, f"methods[{i}]: unknown key(s) {bad}; allowed: {sorted(_METHOD_KEYS)}")
        label, cfg = m["label"], m["balancer"]
        if not isinstance(label, str) or not label or label in labels:
            _fail(path, f"methods[{i}]: `label` must be a non-empty string, unique in the file; got {label!r}")
        labels.append(label)
        if not isinstance(cfg, dict) or cfg.get("name") not in REGISTRY:
            got = cfg.get("name") if isinstance(cfg, dict) else cfg
            _fail(path, f"method {label!r}: unknown balancer {got!r}; allowed: {sorted(REGISTRY)}")
        allowed = allowed_keys(cfg["name"])
        bad = sorted(str(k) for k in cfg if k != "name" and k not in allowed)
        if bad:
            _fail(path, f"method {label!r}: unknown key(s) {bad} for balancer {cfg['name']!r}; allowed: {allowed}")
        pub = m.get("published")
        if pub is not None and (isinstance(pub, bool) or not isinstance(pub, (int, float))):
            _fail(path, f"method {label!r}: `published` must be a number or null; got {pub!r}")
    spec = dict(spec, seeds=seeds, settings=settings, config_file=path)
    spec["_problem"] = problem
    return spec


def _select_methods(spec: dict, wanted, path) -> list:
    if not wanted:
        return list(spec["methods"])
    labels = [m["label"] for m in spec["methods"]]
    missing = [w for w in wanted if w not in labels]
    if missing:
        raise _UsageError(f"pinn-balance run: error: unknown method {missing[0]!r} in {path}; allowed: {labels}")
    return [m for m in spec["methods"] if m["label"] in wanted]


def _check_balancers(spec: dict, methods: list, path) -> None:
    """Build every selected balancer once on a fresh network (values checked by the constructors) before training."""
    import numpy as np

    from .config import allowed_keys, build_balancer

    problem = spec["_problem"]
    for m in methods:
        cfg = dict(m["balancer"])
        if "loss_names" in allowed_keys(cfg["name"]) and not {"loss_names", "n_loss"} & set(cfg):
            cfg["loss_names"] = list(problem.loss_names)
        try:
            model = problem.build_model(0)
            if cfg["name"] == "ntk" and cfg.get("mode", "trace") == "trace" and "kernels" not in cfg:
                if not callable(getattr(problem, "kernels", None)):
                    raise ValueError(f"problem {spec['problem']!r} has no kernels; use `mode: grad_norm`")
                cfg["kernels"] = problem.kernels(problem.sample(np.random.default_rng(0)))
            build_balancer(cfg, model)
        except (TypeError, ValueError) as e:
            _fail(path, f"method {m['label']!r}: {' '.join(str(e).split())}")


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def run(spec: dict, methods: list, iters: int | None = None, seeds: int | None = None,
        out: str = os.path.join("runs", "run"), progress: bool = True, plots: bool = True) -> int:
    """Train every method of a validated benchmark (:func:`load_benchmark`) for every seed; returns 0."""
    import numpy as np

    from .train import train

    problem = spec["_problem"]
    iters = int(iters or spec["iters"])
    seed_list = list(range(seeds)) if seeds else list(spec["seeds"])
    log_every = spec.get("log_every")
    if log_every is not None:
        log_every = min(int(log_every), max(1, iters // 10))  # short (smoke) runs still log a few points
    print(f"{problem.name} ({spec['problem']}), settings {spec['settings']}; {iters} iterations, "
          f"seeds {seed_list}; methods {[m['label'] for m in methods]}")
    results, models = {}, {}
    for m in methods:
        runs = []
        for seed in seed_list:
            r = train(problem, m["balancer"], iters=iters, seed=seed, log_every=log_every, progress=progress,
                      desc=f"{m['label']} seed {seed}")
            model = r.pop("model")
            if not runs:
                models[m["label"]] = model
            runs.append(r)
        errors = [r["rel_l2"] for r in runs]
        results[m["label"]] = {
            "label": m["label"], "balancer": m["balancer"], "published": m.get("published"), "note": m.get("note"),
            "seeds": seed_list, "errors": errors, "error_mean": float(np.mean(errors)),
            "error_std": float(np.std(errors)), "weights": runs[0]["weights"],
            "wall_time_s": float(sum(r["wall_time_s"] for r in runs)),
            "time_per_step_ms": float(np.mean([r["time_per_step_ms"] for r in runs])),
            # the plots show the first seed's history
            "rel_l2": runs[0]["rel_l2"], "iters": iters, "history": runs[0]["history"], "runs": runs,
        }
    print()
    print(_table(results, error_name=problem.error_name))

    os.makedirs(out, exist_ok=True)
    keyed = {_slug(label): r for label, r in results.items()}
    files = _plots(problem, keyed, {_slug(k): v for k, v in models.items()}, out) if plots else []
    summary = {
        "config_file": spec["config_file"], "problem": spec["problem"], "problem_name": problem.name,
        "settings": spec["settings"], "reference": spec.get("reference"), "iters": iters, "seeds": seed_list,
        "error_name": problem.error_name, "methods": results, "plots": [os.path.basename(f) for f in files],
    }
    return _write_results(out, summary, files)


def _write_results(out: str, summary: dict, files: list) -> int:
    """Write ``results.json`` into ``out`` and list what was written; exit code 0."""
    path = os.path.join(out, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {path}")
    for f in files:
        print(f"wrote {f}")
    return 0


# ------------------------------------------------------------------ report: table and plot from finished runs


def _find_results(dirs) -> list:
    found = []
    for d in dirs:
        direct = os.path.join(d, "results.json")
        if os.path.isfile(direct):
            found.append(direct)
        elif os.path.isdir(d):
            nested = sorted(os.path.join(d, s, "results.json") for s in os.listdir(d)
                            if os.path.isfile(os.path.join(d, s, "results.json")))
            if not nested:
                raise _UsageError(f"pinn-balance report: error: no results.json in {d!r} or its subfolders")
            found.extend(nested)
        else:
            raise _UsageError(f"pinn-balance report: error: {d!r} is not a folder")
    summaries = []
    for path in found:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise _UsageError(f"pinn-balance report: error: cannot read {path}: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict) or not isinstance(data.get("methods"), dict):
            continue  # not a `run` result (e.g. the demo's): skipped
        summaries.append((path, data))
    if not summaries:
        raise _UsageError("pinn-balance report: error: none of the results.json files comes from `pinn-balance run`")
    return summaries


def report_rows(summaries) -> list:
    """One row per (run, method): problem, method, seeds, iterations, mean, std, published, error name, path."""
    rows = []
    for path, data in summaries:
        for label, m in data["methods"].items():
            rows.append({"problem": data.get("problem_name", data.get("problem")), "method": label,
                         "seeds": len(m.get("errors", [])), "iters": data.get("iters"),
                         "mean": m.get("error_mean"), "std": m.get("error_std"), "published": m.get("published"),
                         "error_name": data.get("error_name", "relative $L_2$ error"), "path": path})
    return rows


def report_table(rows) -> str:
    """A markdown table of :func:`report_rows`."""
    lines = ["| problem | method | seeds | iterations | error (mean ± std) | published | metric | run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = "–" if r["published"] is None else f"{r['published']:.2e}"
        metric = "rel. L2" if "L_2" in r["error_name"] else r["error_name"].split("$")[0].strip()
        lines.append(f"| {r['problem']} | {r['method']} | {r['seeds']} | {r['iters']} | "
                     f"{r['mean']:.2e} ± {r['std']:.1e} | {pub} | {metric} | {os.path.dirname(r['path'])} |")
    return "\n".join(lines)


def report(summaries, out: str = os.path.join("runs", "report"), dpi: int = 80) -> int:
    """Print the table; write ``report.md``, ``comparison.png`` and, per run, ``curves_<run folder>.png`` (test
    error and loss weights against iterations, every method of the run) into ``out``; returns 0."""
    rows = report_rows(summaries)
    table = report_table(rows)
    print(table)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Benchmark results\n\n" + table + "\n")
    print(f"\nwrote {path}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: plot skipped", file=sys.stderr)
        return 0
    print(f"wrote {plot_comparison(Figure, rows, os.path.join(out, 'comparison.png'), dpi=dpi)}")
    for path, data in summaries:
        name = _slug(os.path.basename(os.path.dirname(os.path.abspath(path))))
        print(f"wrote {plot_curves(Figure, data, os.path.join(out, f'curves_{name}.png'), dpi=dpi)}")
    return 0


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
    return _write_results(out, summary, files)


def _table(results: dict, error_name: str | None = None) -> str:
    if error_name is None or "L_2" in error_name:
        rows = [("method", "rel. L2 error", "final weights", "wall time")]
    else:
        rows = [("method", error_name.split("$")[0].strip(), "final weights", "wall time")]
    for run in results.values():
        weights = ", ".join(f"{n}={w:.3g}" for n, w in run["weights"].items())
        err = f"{run['rel_l2']:.3e}"
        if len(run.get("errors", [])) > 1:
            err = f"{run['error_mean']:.3e} ± {run['error_std']:.1e} ({len(run['errors'])} seeds)"
        rows.append((run["label"], err, weights, f"{run['wall_time_s']:.1f} s"))
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


if __name__ == "__main__":
    sys.exit(main())
