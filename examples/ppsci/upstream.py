"""Run one of PaddleScience's own example scripts, unmodified, with a paddle_pinn_balance loss aggregator.

PaddleScience's examples (``examples/<problem>/<script>.py`` in its repository, not in the pip package) build
their constraints, optimizer and ``ppsci.solver.Solver`` themselves. This runner runs such a script exactly as
``python SCRIPT [overrides]`` does (its ``@hydra.main``, hence its Hydra callbacks: ``InitCallback`` seeds the
run and opens ``<mode>.log``; its ``mode`` dispatch: ``mode=eval`` evaluates a saved checkpoint in the
script's own code); the only change is the Solver's ``loss_aggregator``. While the script runs:

* a Solver built with constraints and no aggregator gets ``build_for_solver(balancer, model, constraints)``;
  the balancer's own learned weights (uncertainty's ``log_vars``, GradNorm's ``loss_weights``) join the
  script's optimizer; the weights are logged in its ``[Train]`` lines (``attach_logging``; not for ``sum``,
  whose weights are constant);
* a second Solver on the same model (Adam, then L-BFGS) continues with the SAME balancer: its weights and
  every state (GradNorm's L(0), SoftAdapt's previous losses, NTK traces) carry over, ``restart_steps()``
  lets the new Solver's steps count from 0 again. An L-BFGS stage does not take GradNorm's weights (they
  follow their own objective, not the total L-BFGS minimises: held by L-BFGS the PDE weight falls to its
  floor at the first step); they get an Adam (1e-3) of their own (``attach_weight_optimizer``).

    git clone https://github.com/PaddlePaddle/PaddleScience    # once (any checkout of its examples)
    python examples/ppsci/upstream.py PaddleScience/examples/euler_beam/euler_beam.py \\
        --balancer "{name: lr_annealing, ref: biharmonic}" TRAIN.epochs=200

``--balancer`` is a YAML mapping (``yaml.safe_load``; the keys of ``paddle_pinn_balance.build_balancer``) or a
YAML file such as ``examples/lr_annealing.yaml``. ``--out DIR`` sets ``hydra.run.dir`` and ``output_dir``
(default: the script's own, as ``python SCRIPT`` would). With ``{name: sum}`` a run reproduces ``python
SCRIPT`` bit for bit (parameters, optimizer state, losses and metrics; the checkpoints add ``.pdagg``).
The same edit by hand: ``docs/paddlescience.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import runpy
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout


def balancer_block(text: str) -> dict:
    """The balancer mapping from ``--balancer``: a YAML file or an inline YAML mapping (never evaluated)."""
    import yaml

    from paddle_pinn_balance.config import load_config

    if os.path.isfile(text):
        return dict(load_config(text))
    try:
        block = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SystemExit(f"upstream.py: error: --balancer: malformed YAML: {' '.join(str(e).split())}") from None
    if not isinstance(block, dict) or "name" not in block:
        raise SystemExit(f"upstream.py: error: --balancer must be a mapping with `name` or a YAML file; got {text!r}")
    return block


@contextlib.contextmanager
def balanced_solvers(block: dict, built: list):
    """While active, every ``ppsci.solver.Solver(...)`` given constraints and no ``loss_aggregator`` is built
    with ours: ``build_for_solver(block, model, constraints)``, or, for a later Solver on the same model and
    loss terms (Adam, then L-BFGS), the earlier one's balancer; then ``attach(solver)`` (learned weights into
    the script's optimizer, the L-BFGS stage, logging). ``(solver, balancer)`` is appended to ``built``."""
    import ppsci

    from paddle_pinn_balance import ppsci as balance

    solver_cls = ppsci.solver.Solver
    original = solver_cls.__init__
    signature = inspect.signature(original)
    by_model = {}  # id(model) -> (model, balancer): the balancer a later Solver on that model continues

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a.get("constraint") or a.get("loss_aggregator") is not None:
            return original(*bound.args, **bound.kwargs)
        model, balancer = by_model.get(id(a["model"]), (None, None))
        if model is not a["model"] or tuple(balance.loss_names(a["constraint"])) != balancer.loss_names:
            model, balancer = balance.build_for_solver(block, a["model"], a["constraint"])
        a["model"], a["loss_aggregator"] = model, balancer
        original(*bound.args, **bound.kwargs)
        balance.attach(self, balancer, log=block["name"] != "sum")  # sum: the log stays the script's own
        by_model[id(model)] = (model, balancer)
        built.append((self, balancer))

    solver_cls.__init__ = __init__
    try:
        yield built
    finally:
        solver_cls.__init__ = original


def hydra_argv(script: str, overrides, out: str | None, config_name: str | None) -> list:
    """``sys.argv`` of ``python SCRIPT [--config-name NAME] [overrides]`` (``--out``: the run's folder)."""
    argv = [script]
    if config_name:
        argv += ["--config-name", config_name]
    if out:
        argv += [f"hydra.run.dir={out}", f"output_dir={out}"]
    return argv + list(overrides)


def run(script: str, block: dict, overrides=(), out: str | None = None, config_name: str | None = None) -> list:
    """Run ``python script [overrides]`` in this process (its ``@hydra.main``: config, callbacks, ``mode``)
    with ``block`` as the aggregator of its Solver(s); returns the ``[(solver, balancer)]`` built (none for
    ``mode=eval`` / ``export``: those Solvers have no constraints and run as the script wrote them)."""
    if not os.path.isfile(script):
        raise SystemExit(f"upstream.py: error: {script!r} is not a file")
    script = os.path.abspath(script)
    built = []
    argv, path = sys.argv, list(sys.path)
    sys.argv = hydra_argv(script, overrides, out, config_name)
    sys.path.insert(0, os.path.dirname(script))  # the script's own sibling imports, as `python SCRIPT`
    try:
        with balanced_solvers(block, built):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = argv, path
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="a PaddleScience example script (@hydra.main, conf/<script>.yaml)")
    parser.add_argument("--balancer", default="{name: lr_annealing}", help="YAML mapping or YAML file")
    parser.add_argument("--config-name", default=None, help="default: the script's own")
    parser.add_argument("--out", default=None, help="output folder (hydra.run.dir and output_dir)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the script's config (KEY=VALUE)")
    args = parser.parse_intermixed_args(argv)
    block = balancer_block(args.balancer)
    built = run(args.script, block, args.overrides, args.out, args.config_name)
    if not built:
        print("upstream.py: the script built no Solver with constraints (mode=eval / export?): nothing was balanced",
              file=sys.stderr)
    for _, balancer in {id(b): (s, b) for s, b in built}.values():
        print(f"{block['name']}: final weights {balancer.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
