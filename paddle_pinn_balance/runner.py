"""``demo`` and ``run``: a benchmark from a YAML file, trained and plotted.

(``report``, the table of finished runs, is :mod:`paddle_pinn_balance.report`.)

``demo`` is a ``run`` of :data:`DEMO` (Helmholtz 2D, plain weights vs learning-rate annealing, the methods
``plain`` and ``lra`` of the shipped benchmark ``helmholtz2d``) shortened to ``--iters``; its
``results.json`` has the layout of every ``run``, so ``report`` reads it.

``run`` takes a path or the name of a benchmark shipped with the package (``paddle_pinn_balance/benchmarks/
NAME.yaml``, listed by :func:`shipped_benchmarks`). The benchmark YAML file::

    problem: helmholtz          # a key of paddle_pinn_balance.problems.PROBLEMS
    settings: {batch_size: 128} # keyword arguments of the problem's constructor (optional)
    iters: 40000
    seeds: 1                    # a count (seeds 0..K-1) or a list of seeds (optional, default 1)
    log_every: 400              # history interval (optional, default iters // 100)
    reference: "LRA paper, Sec. 3.1"   # where the published numbers come from (optional)
    methods:
      - label: plain
        title: "plain (sum)"    # the name printed in tables (optional, default the label)
        balancer: {name: sum}
        published: 1.81e-1      # the paper's error for this method (optional)
      - label: lra
        balancer: {name: lr_annealing, ref: res, preset: wang2021_code}
"""

from __future__ import annotations

import json
import os
import sys

from .checks import is_int
from .plots import plot_run

__all__ = ["DEFAULT_ITERS", "DEMO", "SHIPPED", "UsageError", "benchmark_path", "check_balancers", "demo",
           "load_benchmark", "read_yaml", "run", "select_methods", "shipped_benchmarks", "text_table"]


class UsageError(Exception):
    """A bad argument or configuration: the command prints the message (one line) and exits with code 2."""


_TOP_KEYS = {"problem", "settings", "iters", "seeds", "log_every", "reference", "description", "methods"}
_METHOD_KEYS = {"label", "title", "balancer", "published", "note"}


#: Default length of the demo: about a minute per run on a 2-core CPU (~10 ms per step).
DEFAULT_ITERS = 5000

#: The folder of the benchmark files shipped with the package (package data: a wheel installs them).
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")

#: The demo's benchmark: ``plain`` and ``lra`` of the shipped benchmark ``helmholtz2d`` (LRA paper, Sec. 3.1).
DEMO = {
    "problem": "helmholtz",
    "settings": {"k": 1.0, "a1": 1.0, "a2": 4.0, "layers": [2, 50, 50, 50, 1], "batch_size": 128, "test_n": 100},
    "iters": 40000,
    "seeds": 1,
    "reference": "LRA paper, Sec. 3.1, 40,000 iterations",
    "methods": [
        {"label": "plain", "title": "plain (sum)", "balancer": {"name": "sum"}, "published": 1.81e-1},
        {"label": "lra", "title": "LRA (wang2021_code)",
         "balancer": {"name": "lr_annealing", "preset": "wang2021_code"}, "published": 1.27e-2},
    ],
}


def _fail(path, message, command="run"):
    raise UsageError(f"pinn-balance {command}: error: {path}: {message}")


def shipped_benchmarks() -> list:
    """Names of the benchmark files shipped with the package (``pinn-balance run NAME``), sorted."""
    return sorted(f[:-5] for f in os.listdir(SHIPPED) if f.endswith(".yaml"))


def benchmark_path(config: str, command: str = "run") -> str:
    """The file ``config`` names: an existing path as given, else a shipped benchmark's file (``helmholtz2d``
    or ``helmholtz2d.yaml``); anything else raises ``UsageError`` listing the shipped names."""
    if os.path.isfile(config):
        return config
    name = config[:-5] if config.endswith(".yaml") else config
    if os.sep not in config and "/" not in config and name in shipped_benchmarks():
        return os.path.join(SHIPPED, name + ".yaml")
    _fail(config, f"config file not found, nor a shipped benchmark name; shipped: {shipped_benchmarks()}", command)


def read_yaml(path: str, command: str = "run"):
    """``yaml.safe_load`` of the file at ``path``; a missing, unreadable or malformed file raises ``UsageError``."""
    import yaml

    if not os.path.isfile(path):
        _fail(path, "config file not found", command)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        _fail(path, "malformed YAML: " + " ".join(str(e).split()), command)
    except (OSError, UnicodeDecodeError) as e:
        _fail(path, f"cannot read it: {e}", command)


def load_benchmark(path, overrides=None, name: str | None = None) -> dict:
    """Read and validate a benchmark YAML file (see the module docstring); raises ``UsageError`` (one line).

    ``path`` is the file, the name of a shipped benchmark (:func:`benchmark_path`), or the benchmark mapping
    itself (then ``name`` is what messages call it, e.g. ``demo``).
    Checks the keys, the problem name and its settings (by building the problem), every method's label
    (unique) and balancer (name and keys), ``iters``, ``seeds`` and ``log_every``. ``overrides``: a list of
    ``"key=value"`` strings replacing problem settings (the value read as YAML). Returns the mapping with
    ``seeds`` as a list and the built ``problem`` object under ``"_problem"``.
    """
    import yaml

    from .config import REGISTRY, allowed_keys
    from .problems import PROBLEMS, get_problem

    if isinstance(path, dict):
        spec, path = path, name or "benchmark"
    else:
        path = benchmark_path(path)
        spec = read_yaml(path)
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
            raise UsageError(f"pinn-balance run: error: --set needs KEY=VALUE; got {item!r}")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"pinn-balance run: error: --set {key.strip()}: malformed value {value!r}") from None
    try:
        problem = get_problem(name, **settings)
    except (TypeError, ValueError) as e:
        _fail(path, f"bad settings for problem {name!r}: {' '.join(str(e).split())}")
    if not is_int(spec["iters"]):
        _fail(path, f"`iters` must be an integer >= 1; got {spec['iters']!r}")
    seeds = spec.get("seeds", 1)
    if is_int(seeds):
        seeds = list(range(seeds))
    elif not (isinstance(seeds, list) and seeds and all(is_int(s, 0) for s in seeds)):
        _fail(path, f"`seeds` must be a count >= 1 or a list of integers >= 0; got {seeds!r}")
    if "log_every" in spec and not is_int(spec["log_every"]):
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


def select_methods(spec: dict, wanted, path) -> list:
    if not wanted:
        return list(spec["methods"])
    labels = [m["label"] for m in spec["methods"]]
    missing = [w for w in wanted if w not in labels]
    if missing:
        raise UsageError(f"pinn-balance run: error: unknown method {missing[0]!r} in {path}; allowed: {labels}")
    return [m for m in spec["methods"] if m["label"] in wanted]


def check_balancers(spec: dict, methods: list, path, command: str = "run") -> None:
    """Build every selected balancer once on a fresh network (values checked by the constructors) before
    training, through the same :func:`~paddle_pinn_balance.train.problem_balancer` the training uses."""
    from .train import problem_balancer

    problem = spec["_problem"]
    for m in methods:
        try:
            problem_balancer(problem, m["balancer"], problem.build_model(0), seed=0)
        except (TypeError, ValueError) as e:
            _fail(path, f"method {m['label']!r}: {' '.join(str(e).split())}", command)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def run(spec: dict, methods: list, iters: int | None = None, seeds: int | None = None,
        out: str = os.path.join("runs", "run"), progress: bool = True, plots: bool = True, after=None) -> int:
    """Train every method of a validated benchmark (:func:`load_benchmark`) for every seed; returns 0.

    ``seeds``: a count (seeds ``0..seeds-1``) or a list of seeds, replacing the benchmark's.

    Writes ``out/results.json``: ``config_file``, ``problem`` (the registry key), ``problem_name``, ``settings``,
    ``reference``, ``iters``, ``seeds``, ``error_name``, ``methods`` (label -> errors per seed, mean, std,
    final weights of the first seed, timings, history, the per-seed runs) and ``plots``. ``after(summary)``, if
    given, may print and add keys before the file is written (the demo does).
    """
    from .train import train

    problem = spec["_problem"]
    iters = int(iters or spec["iters"])
    if seeds is None:
        seed_list = list(spec["seeds"])
    else:
        seed_list = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else list(range(seeds))
    log_every = spec.get("log_every")
    if log_every is not None:
        log_every = min(int(log_every), max(1, iters // 10))  # short (smoke) runs still log a few points
    print(f"{problem.name} ({spec['problem']}), settings {spec['settings']}; {iters} iterations, "
          f"seeds {seed_list}; methods {[m['label'] for m in methods]}")
    results, models = {}, {}

    def summary_of(results, files):
        return {
            "config_file": spec["config_file"], "problem": spec["problem"], "problem_name": problem.name,
            "settings": spec["settings"], "reference": spec.get("reference"), "iters": iters, "seeds": seed_list,
            "error_name": problem.error_name, "methods": results, "plots": [os.path.basename(f) for f in files],
        }

    os.makedirs(out, exist_ok=True)
    for m in methods:
        runs = []
        for seed in seed_list:
            saver = _ProgressSaver(out, problem, summary_of, results, models, m, seed, runs, plots)
            r = train(problem, m["balancer"], iters=iters, seed=seed, log_every=log_every, progress=progress,
                      desc=f"{m['label']} seed {seed}", on_log=saver)
            model = r.pop("model")
            if not runs:
                models[m["label"]] = model
            runs.append(r)
        results[m["label"]] = _method_result(m, seed_list, runs, iters)
    print()
    print(text_table(results, error_name=problem.error_name))

    keyed = {_slug(label): r for label, r in results.items()}
    files = plot_run(problem, keyed, {_slug(k): v for k, v in models.items()}, out) if plots else []
    summary = summary_of(results, files)
    if after is not None:
        after(summary)
    return _write_results(out, summary, files)


def _method_result(m: dict, seed_list: list, runs: list, iters: int, partial: bool = False) -> dict:
    import numpy as np

    errors = [r["rel_l2"] for r in runs]
    out = {
        "label": m["label"], "title": m.get("title", m["label"]), "balancer": m["balancer"],
        "published": m.get("published"), "note": m.get("note"),
        "seeds": seed_list[:len(runs)], "errors": errors, "error_mean": float(np.mean(errors)),
        "error_std": float(np.std(errors)), "weights": runs[0]["weights"],
        "wall_time_s": float(sum(r["wall_time_s"] for r in runs)),
        "time_per_step_ms": float(np.mean([r["time_per_step_ms"] for r in runs])),
        # the plots show the first seed's history
        "rel_l2": runs[0]["rel_l2"], "iters": iters, "history": runs[0]["history"], "runs": runs,
    }
    if partial:
        out["partial"] = True
    return out


class _ProgressSaver:
    """``on_log`` of a run: ``out/results.json`` rewritten at every log point with the finished methods and the
    one in progress (marked ``"partial": true``, its error the last logged one), and the plots redrawn every
    ``plot_every`` log points, so that a run killed mid-way leaves its curves."""

    plot_every = 10

    def __init__(self, out, problem, summary_of, results, models, method, seed, runs, plots):
        self.out, self.problem, self.summary_of, self.results, self.models = out, problem, summary_of, results, models
        self.method, self.seed, self.runs, self.plots, self.calls = method, seed, runs, plots, 0

    def __call__(self, history, net):
        import copy

        self.calls += 1
        h = copy.deepcopy(history)
        last = {"rel_l2": h["rel_l2"][-1], "weights": {n: v[-1] for n, v in h["weight"].items() if v},
                "wall_time_s": h["wall_s"][-1], "time_per_step_ms": 1e3 * h["wall_s"][-1] / (h["step"][-1] + 1),
                "history": h, "seed": self.seed, "steps_done": h["step"][-1] + 1}
        runs = self.runs + [last]
        label = self.method["label"]
        seeds = [r["seed"] for r in runs]
        current = dict(self.results, **{label: _method_result(self.method, seeds, runs, h["step"][-1] + 1, True)})
        files = []
        if self.plots and self.calls % self.plot_every == 0:
            keyed = {_slug(k): r for k, r in current.items()}
            models = {_slug(k): v for k, v in dict(self.models, **{label: net}).items()}
            try:
                files = plot_run(self.problem, keyed, models, self.out)
            except Exception as e:  # noqa: BLE001 - a plot must not end a long run; the final plots will say why
                print(f"plots at step {h['step'][-1]} failed: {type(e).__name__}: {e}", file=sys.stderr)
        summary = self.summary_of(current, files)
        summary["partial"] = True
        path = os.path.join(self.out, "results.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        os.replace(path + ".tmp", path)


def _write_results(out: str, summary: dict, files: list) -> int:
    """Write ``results.json`` into ``out`` and list what was written; exit code 0."""
    path = os.path.join(out, "results.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote {path}")
    for f in files:
        print(f"wrote {f}")
    return 0


def text_table(results: dict, error_name: str | None = None) -> str:
    """A plain-text table of one run's methods: title, error (mean ± std over seeds), final weights, wall time."""
    if error_name is None or "L_2" in error_name:
        rows = [("method", "rel. L2 error", "final weights", "wall time")]
    else:
        rows = [("method", error_name.split("$")[0].strip(), "final weights", "wall time")]
    for run in results.values():
        weights = ", ".join(f"{n}={w:.3g}" for n, w in run["weights"].items())
        err = f"{run['rel_l2']:.3e}"
        if len(run.get("errors", [])) > 1:
            err = f"{run['error_mean']:.3e} ± {run['error_std']:.1e} ({len(run['errors'])} seeds)"
        rows.append((run.get("title", run["label"]), err, weights, f"{run['wall_time_s']:.1f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def demo(iters: int = DEFAULT_ITERS, out: str = os.path.join("runs", "demo"), seed: int = 0,
         progress: bool = True, plots: bool = True) -> int:
    """Run :data:`DEMO` for ``iters`` iterations with one ``seed``; prints the table and how the errors compare
    with the paper's, writes ``out/results.json`` (the ``run`` layout) and the plots; returns 0."""
    spec = load_benchmark(DEMO, name="demo")

    def after(summary):
        m = summary["methods"]
        ratio = m["plain"]["rel_l2"] / m["lra"]["rel_l2"]
        print(f"\nLRA error is {ratio:.1f}x {'smaller' if ratio >= 1 else 'LARGER'} than plain "
              f"(paper, 40000 iterations: plain 1.81e-1, LRA 1.27e-2)")
        summary["demo"] = {"error_ratio_plain_over_lra": ratio}

    return run(spec, spec["methods"], iters=iters, seeds=[seed], out=out, progress=progress, plots=plots,
               after=after)
