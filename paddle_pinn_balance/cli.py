"""Command line: ``pinn-balance demo | run | report | table | diagnose`` (also ``python -m paddle_pinn_balance ...``).

Only the arguments live here; each command's work is a function of :mod:`paddle_pinn_balance.runner`
(``demo``, ``run``), :mod:`paddle_pinn_balance.report` (``report``) or :mod:`paddle_pinn_balance.table`
(``table``), the plots in :mod:`paddle_pinn_balance.plots`.

* ``demo``: Helmholtz 2D of Wang, Teng & Perdikaris (2021) trained from one seed with plain weights (``sum``)
  and with learning-rate annealing (preset ``wang2021_code``); prints a table, writes ``results.json`` (the
  layout of ``run``) and plots into ``--out``.
* ``run CONFIG.yaml`` or ``run NAME`` (a benchmark shipped with the package, e.g. ``helmholtz2d``): any
  benchmark problem with each method (balancer) the file lists, one or more seeds (the file's format:
  :mod:`paddle_pinn_balance.runner`).
* ``report DIR...``: a markdown table and a comparison plot from the ``results.json`` of finished runs.
* ``table TABLE.yaml``: every method x every problem, several seeds, resumable (:mod:`paddle_pinn_balance.table`).
* ``diagnose CONFIG.yaml``: why a PINN does not train: each term's gradients (and NTK blocks) at a few steps of
  a short run, pictures and a verdict (:mod:`paddle_pinn_balance.diagnose_run`).

Errors in the arguments or the YAML files print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .runner import DEFAULT_ITERS, UsageError, shipped_benchmarks


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit code 2, instead of argparse's usage dump
        raise UsageError(f"{self.prog}: error: {message}")


def _int_at_least(minimum: int):
    """An argparse ``type``: an integer >= ``minimum`` (the message names the rule and the text given)."""
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
    run.add_argument("config", help="a benchmark YAML file, or the name of one shipped with the package: "
                     + ", ".join(shipped_benchmarks()))
    run.add_argument("--method", action="append", default=None, metavar="LABEL",
                     help="run only the method with this label (repeatable; default: all)")
    run.add_argument("--set", action="append", default=None, metavar="KEY=VALUE", dest="overrides",
                     help="override one of the problem's settings (VALUE read as YAML, e.g. layers=[2,50,50,1])")
    run.add_argument("--seed", action="append", type=_int_at_least(0), default=None, dest="seed_list",
                     metavar="N", help="train this seed (repeatable; overrides --seeds and the file's `seeds`)")

    table = commands.add_parser(
        "table", help="every method x every problem of a YAML file, several seeds (resumable)",
        description="Train each method on each problem of a table file for each seed; print median errors, "
        "spread and final weights; write results.json (after every cell: a "
        "killed table continues where it stopped) and heatmap.png.",
    )
    table.add_argument("config", help="YAML file (see examples/table.yaml)")
    for p in (run, table):
        p.add_argument("--iters", type=_int_at_least(1), default=None, help="override the file's `iters`")
        p.add_argument("--seeds", type=_int_at_least(1), default=None,
                       help="number of seeds, 0..K-1 (overrides the file's `seeds`)")
        p.add_argument("--out", default=None, help="output folder (default runs/<config file name>)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--no-plots", action="store_true", help="write results.json only")

    report = commands.add_parser(
        "report", help="markdown table and comparison plot from finished runs",
        description="Read DIR/results.json (or DIR/*/results.json) of finished `run`s; print a markdown table "
        "and write report.md and comparison.png into --out.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run folders (or folders holding run folders)")
    report.add_argument("--out", default=os.path.join("runs", "report"), help="output folder (default runs/report)")
    report.add_argument("--dpi", type=_int_at_least(20), default=80, help="resolution of the plots (default 80)")

    diagnose = commands.add_parser(
        "diagnose", help="why is my PINN not training: the terms' gradients, kernels and a verdict",
        description="Train a benchmark (or every problem of a table file) for --steps iterations, recording each "
        "term's gradients (and NTK blocks where the problem has kernels) at a few steps; write PNGs, "
        "diagnosis.json, diagnosis.md and print the verdict.",
    )
    diagnose.add_argument("config", help="a shipped benchmark's name (helmholtz2d, ...), a benchmark YAML or a "
                          "table YAML (examples/table.yaml)")
    diagnose.add_argument("--steps", type=_int_at_least(1), default=None,
                          help="training iterations (default 200)")
    diagnose.add_argument("--records", type=_int_at_least(1), default=5,
                          help="recorded steps, evenly spaced from 0 to the last (default 5)")
    diagnose.add_argument("--method", default=None, metavar="LABEL",
                          help="train with this method of the file (default: the plain sum)")
    diagnose.add_argument("--seed", type=_int_at_least(0), default=0, help="seed (default 0)")
    diagnose.add_argument("--ntk-points", type=_int_at_least(0), default=64,
                          help="points per NTK block for its eigenvalues (default 64; 0: traces only)")
    diagnose.add_argument("--out", default=None, help="output folder (default runs/diagnose_<config file name>)")
    diagnose.add_argument("--no-plots", action="store_true", help="diagnosis.json and diagnosis.md only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pinn-balance``; returns the exit code (2 on bad arguments or configuration)."""
    from . import report, runner, table

    try:
        args = _parser().parse_args(argv)
        if args.command == "diagnose":
            from . import diagnose_run

            return diagnose_run.main(args.config, steps=args.steps, out=args.out, method=args.method,
                                     seed=args.seed, records=args.records, ntk_points=args.ntk_points,
                                     plots=not args.no_plots)
        if args.command in ("run", "table") and args.out is None:
            args.out = os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"pinn-balance {args.command}: error: --out {args.out!r} exists and is not a folder")
        if args.command == "run":
            spec = runner.load_benchmark(args.config, overrides=args.overrides)
            methods = runner.select_methods(spec, args.method, args.config)
            runner.check_balancers(spec, methods, args.config)
        elif args.command == "table":
            spec = table.load_table(args.config, iters=args.iters, seeds=args.seeds)
        elif args.command == "report":
            found = report.find_results(args.dirs)
    except UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.command == "run":
        seeds = args.seed_list if args.seed_list else args.seeds
        return runner.run(spec, methods, iters=args.iters, seeds=seeds, out=args.out, progress=not args.quiet,
                          plots=not args.no_plots)
    if args.command == "table":
        return table.run_table(spec, out=args.out, progress=not args.quiet, plots=not args.no_plots)
    if args.command == "report":
        return report.report(found, out=args.out, dpi=args.dpi)
    return runner.demo(iters=args.iters, out=args.out, seed=args.seed)
