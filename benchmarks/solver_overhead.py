"""Cost of a balanced training step inside PaddleScience's ``ppsci.solver.Solver``, relative to its plain ``Sum``.

The solver-side twin of ``step_overhead.py``: the Helmholtz PINN (``ppsci.arch.MLP`` 2-50-50-50-1 tanh,
residual ``u_xx + u_yy + u - q`` through ``ppsci.autodiff.hessian``), 128 fixed points per loss term
(full-batch ``IterableNamedArrayDataset``), in two setups:

* 2 terms: ``InteriorConstraint`` "EQ" (term ``helmholtz``) + one ``BoundaryConstraint`` (term ``u``);
* 5 terms: "EQ" + four edge ``BoundaryConstraint``s of the ``Rectangle`` (criteria), keys ``u_left``,
  ``u_right``, ``u_bottom``, ``u_top`` (one loss term each).

Aggregators: ``ppsci.loss.mtl.Sum`` (the reference), ours (LRAnnealing, GradNorm = the wrapper as the
solver's model and its aggregator as ``loss_aggregator``, NTKWeighting(mode="grad_norm"), all built with
``paddle_pinn_balance.ppsci.build_for_solver``) and PaddleScience's ``mtl.GradNorm`` / ``mtl.NTK``, at each
update_freq. Every solver starts from the same weights and points. Each round runs, for every method in an
order that rotates from round to round, one short epoch (``solver.train_epoch_func``, ``--iters`` steps) of
the plain solver and then one of the method's; no eval, checkpoint or log line in the timed section.

Step times: a thin clock around the solver's ``loss_aggregator`` stamps every call (CPU time of the process
on a CPU, robust to other load on a shared machine; wall time on a GPU), so every step is timed on its own
(aggregator call to the next one; the last step of an epoch adds the epoch's lead-in). Each step of the
method is divided by the median plain step of the epoch just before it; steps where the weights update
(``global_step % update_freq == 0``) and the others are kept apart, and the reported ratio is amortised:
``(median update ratio + (update_freq - 1) * median other ratio) / update_freq``. The timed steps start at a
multiple of every update_freq, so each window holds update steps (``n_upd``); with few of them
(update_freq 100) that part is noisy.

    python benchmarks/solver_overhead.py                        # both setups, update_freq 1, 10, 100
    python benchmarks/solver_overhead.py --terms 5 --freqs 10 --rounds 9 --iters 40 --json out.json

Two versions of this package side by side, in one process (``--baseline``: a checkout of the older one; its
methods appear as ``lra@base`` etc., interleaved with the rest):

    git worktree add /tmp/base a6ea480
    python benchmarks/solver_overhead.py --terms 2 5 --freqs 1 --rounds 15 --baseline /tmp/base

One CPU thread by default (``--threads``); on a GPU machine it runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import ppsci  # noqa: E402
from _common import add_device_argument, amortised_ratio, clock, use_device  # noqa: E402  (sets OMP_NUM_THREADS etc. before paddle)
from ppsci.autodiff import hessian  # noqa: E402
from ppsci.loss import mtl  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from paddle_pinn_balance import ppsci as adapter  # noqa: E402

N_POINTS = 128
A1, A2, K = 1.0, 4.0, 1.0  # u = sin(pi x) sin(4 pi y), as in step_overhead.py
EDGES = {  # term name -> criteria on the boundary of [-1, 1]^2
    "u_left": lambda x, y: np.isclose(x, -1.0),
    "u_right": lambda x, y: np.isclose(x, 1.0),
    "u_bottom": lambda x, y: np.isclose(y, -1.0),
    "u_top": lambda x, y: np.isclose(y, 1.0),
}
OURS = ("lra", "gradnorm", "ntk_grad_norm")
THEIRS = ("ppsci_gradnorm", "ppsci_ntk")
NEVER = 10**9  # log_freq: no log line in the timed section


def source(d):
    x, y = d["x"], d["y"]
    return (-((A1 * np.pi) ** 2) - (A2 * np.pi) ** 2 + K**2) * np.sin(A1 * np.pi * x) * np.sin(A2 * np.pi * y)


def residual(out):
    return hessian(out["u"], out["x"]) + hessian(out["u"], out["y"]) + K**2 * out["u"]


def full_batch(n=N_POINTS):
    """The same n points at every step (no sampler, no shuffling): the data path is common to all methods."""
    return {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": n}


def make_constraints(terms):
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    cons = {"EQ": ppsci.constraint.InteriorConstraint(
        {"helmholtz": residual}, {"helmholtz": source}, rect, full_batch(), mse, name="EQ")}
    if terms == 2:
        cons["BC"] = ppsci.constraint.BoundaryConstraint(
            {"u": lambda out: out["u"]}, {"u": 0.0}, rect, full_batch(), mse, name="BC")
    elif terms == 5:
        for key, crit in EDGES.items():
            name = "BC_" + key[2:]
            cons[name] = ppsci.constraint.BoundaryConstraint(
                {key: lambda out: out["u"]}, {key: 0.0}, rect, full_batch(), mse, criteria=crit, name=name)
    else:
        raise ValueError(f"--terms must be 2 or 5; got {terms}")
    return cons


BASE = "@base"  # suffix of the methods built with the --baseline package
_BASELINE = {}  # "adapter": the --baseline package's paddle_pinn_balance.ppsci


def load_baseline(root):
    """The ``paddle_pinn_balance.ppsci`` adapter of the package under ``root`` (another checkout), imported
    under another name so that both versions live in one process."""
    import importlib
    import importlib.util

    init = os.path.join(root, "paddle_pinn_balance", "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"--baseline: {init} does not exist (expected a checkout of this repository)")
    spec = importlib.util.spec_from_file_location("_baseline_ppb", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["_baseline_ppb"] = module
    spec.loader.exec_module(module)
    _BASELINE["adapter"] = importlib.import_module("_baseline_ppb.ppsci")


def build(method, freq, terms, model, cons):
    """(model for the solver, loss aggregator) for a method name (``name@base``: built with the baseline)."""
    if method.endswith(BASE):
        return _build(method[:-len(BASE)], freq, terms, model, cons, _BASELINE["adapter"])
    return _build(method, freq, terms, model, cons, adapter)


def _build(method, freq, terms, model, cons, adapter):
    if method == "plain":
        return model, mtl.Sum()
    if method == "lra":
        return adapter.build_for_solver({"name": "lr_annealing", "ref": "helmholtz", "update_freq": freq}, model, cons)
    if method == "gradnorm":  # the GradNorm wrapper is the solver's model; its aggregator the loss_aggregator
        return adapter.build_for_solver({"name": "grad_norm", "alpha": 1.5, "update_freq": freq}, model, cons)
    if method == "ntk_grad_norm":
        return adapter.build_for_solver({"name": "ntk", "mode": "grad_norm", "update_freq": freq}, model, cons)
    if method == "ppsci_gradnorm":
        return model, mtl.GradNorm(model, num_losses=terms, update_freq=freq)
    if method == "ppsci_ntk":
        return model, mtl.NTK(model, num_losses=terms, update_freq=freq)
    raise ValueError(f"unknown method {method!r}")


class Clock:
    """Stands in for the solver's loss_aggregator: stamps each call (global step, time), then delegates."""

    def __init__(self, agg):
        self.agg = agg
        self.marks = []

    def __call__(self, losses, step=0):
        self.marks.append((int(step), clock()))
        return self.agg(losses, step)


class SolverRunner:
    def __init__(self, method, freq, terms, iters, out_dir):
        self.method, self.freq = method, freq
        ppsci.utils.misc.set_random_seed(0)  # same weights and points for every method
        with paddle.utils.unique_name.guard():
            model = ppsci.arch.MLP(("x", "y"), ("u",), 3, 50, "tanh")
            cons = make_constraints(terms)
            model, agg = build(method, freq, terms, model, cons)
            opt = ppsci.optimizer.Adam(1e-3)(model)
            self.solver = ppsci.solver.Solver(
                model, cons, out_dir, opt, epochs=NEVER, iters_per_epoch=iters, save_freq=0, log_freq=NEVER,
                eval_during_train=False, loss_aggregator=agg)
        s = self.solver
        s.max_steps = -1  # set by solver.train(), which is not used: no log line at the "last" step
        self.clock = Clock(s.loss_aggregator)
        s.loss_aggregator = self.clock
        self.epoch = 1
        self.steps = []  # (global step, seconds) of the timed steps

    def epoch_run(self):
        """One epoch; returns [(global step, seconds)] of its steps."""
        s = self.solver
        self.clock.marks.clear()
        t0 = clock()
        s.train_epoch_func(s, self.epoch, s.log_freq)
        t1 = clock()
        s.train_output_info.clear()  # as solver.train() does after each epoch
        self.epoch += 1
        marks = self.clock.marks
        steps = [(step, t_next - t) for (step, t), (_, t_next) in zip(marks, marks[1:])]
        # the last step: from its aggregator call to the epoch's end, plus the data + forward of the epoch's start
        steps.append((marks[-1][0], (t1 - marks[-1][1]) + (marks[0][1] - t0)))
        return steps


def time_setup(terms, freqs, rounds, iters, warmup, out_root):
    """{(method, update_freq): summary} with the ratio to the plain solver's step."""
    ours = OURS + tuple(m + BASE for m in OURS) if _BASELINE else OURS
    keys = [(m, f) for m in ours + THEIRS for f in freqs]
    runners = {k: SolverRunner(k[0], k[1], terms, iters, os.path.join(out_root, f"{terms}_{k[0]}_{k[1]}"))
               for k in [("plain", 1)] + keys}
    lcm = math.lcm(*freqs) if freqs else 1
    for r in runners.values():  # warm-up: step 0 (the first update, which fixes names and state) and more
        r.solver.iters_per_epoch = warmup
        r.epoch_run()
        r.solver.iters_per_epoch = iters
        # timed steps start at a multiple of every update_freq (a jump forward, as after a resume)
        r.solver.global_step = -(-r.solver.global_step // lcm) * lcm
    plain = runners[("plain", 1)]
    upd = {k: [] for k in keys}
    other = {k: [] for k in keys}
    absolute = {k: ([], []) for k in keys}
    plain_steps = []
    for i in range(rounds):  # interleaved; the order rotates each round (no method always runs first or last)
        j = i * len(keys) // rounds
        for k in keys[j:] + keys[:j]:
            base = statistics.median(d for _, d in plain.epoch_run())
            plain_steps.append(base)
            for step, d in runners[k].epoch_run():
                is_upd = step % k[1] == 0
                (upd if is_upd else other)[k].append(d / base)
                absolute[k][0 if is_upd else 1].append(d)
    plain_ms = statistics.median(plain_steps) * 1e3
    out = {("plain", 1): dict(ms=plain_ms, ratio=1.0, upd_ms=None, reg_ms=None, n_upd=0)}
    for k in keys:
        f = k[1]
        ratio = amortised_ratio(upd[k], other[k], f)
        up, reg = absolute[k]
        out[k] = dict(ms=ratio * plain_ms, ratio=ratio, upd_ms=statistics.median(up) * 1e3 if up else None,
                      reg_ms=statistics.median(reg) * 1e3 if reg else None, n_upd=len(up))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--terms", type=int, nargs="+", default=[2, 5], choices=[2, 5])
    p.add_argument("--freqs", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--rounds", type=int, default=7, help="timed epochs per solver, interleaved")
    p.add_argument("--iters", type=int, default=30, help="steps per timed epoch")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per solver before the rounds")
    p.add_argument("--threads", default="1")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--baseline", help="a checkout of an older version of this repository: its methods are timed "
                   "beside these (rows name@base)")
    add_device_argument(p)
    args = p.parse_args(argv)
    use_device(args.device)
    if min(args.freqs) < 1 or args.rounds < 1 or args.iters < 1 or args.warmup < 1:
        p.error("--freqs, --rounds, --iters and --warmup must be positive")
    if args.baseline:
        load_baseline(os.path.abspath(args.baseline))
    ppsci.utils.logger.init_logger("ppsci", None, "ERROR")  # the solvers' construction messages
    device = paddle.device.get_device()
    print(f"device {device}, paddle {paddle.__version__}, ppsci {getattr(ppsci, '__version__', '?')}, "
          f"threads {os.environ['OMP_NUM_THREADS']}, {args.rounds} rounds x {args.iters} steps per solver "
          "(each after as many plain steps), "
          f"{N_POINTS} points per term")
    results = []
    with tempfile.TemporaryDirectory() as out_root:
        for terms in args.terms:
            med = time_setup(terms, args.freqs, args.rounds, args.iters, args.warmup, out_root)
            plain = med[("plain", 1)]["ms"]
            print(f"\n{terms} terms: plain (mtl.Sum) step {plain:.2f} ms")
            print(f"  {'method':<20}{'update_freq':>12}{'ms/step':>10}{'x plain':>9}{'ppsci/ours':>12}"
                  f"{'upd ms':>9}{'other ms':>10}{'n_upd':>7}")
            for (m, f), r in med.items():
                ppsci_ratio = ""
                if m in OURS:
                    best = min(med[(pm, f)]["ratio"] for pm in THEIRS)
                    ppsci_ratio = f"{best / r['ratio']:.2f}"
                upd = f"{r['upd_ms']:.2f}" if r["upd_ms"] is not None and r["reg_ms"] is not None else ""
                other = f"{r['reg_ms']:.2f}" if r["reg_ms"] is not None and r["upd_ms"] is not None else ""
                print(f"  {m:<20}{f:>12}{r['ms']:>10.2f}{r['ratio']:>9.3f}{ppsci_ratio:>12}"
                      f"{upd:>9}{other:>10}{r['n_upd'] if upd else '':>7}")
                results.append(dict(terms=terms, method=m, update_freq=f, **r))
            for (m, f), r in med.items():
                if (m + BASE, f) in med:
                    print(f"  {m} at update_freq {f}: {r['ratio'] / med[(m + BASE, f)]['ratio']:.3f} of the baseline's "
                          "ratio")
    print("\nx plain: amortised ratio to the plain solver's step timed just before, (update + (freq - 1) x other) "
          "/ freq of the median ratios; ms/step: that ratio times the median plain step; upd ms / other ms: "
          "median of the steps that update the weights / of the others (n_upd update steps timed)")
    print("ppsci/ours: time of the faster of PaddleScience's GradNorm / NTK at the same update_freq over ours")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, paddle=paddle.__version__, threads=os.environ["OMP_NUM_THREADS"],
                           rounds=args.rounds, iters=args.iters, results=results), f, indent=1)


if __name__ == "__main__":
    main()
