"""Run one of PaddleScience's own example scripts, unmodified, with a paddle_pinn_balance loss aggregator.

PaddleScience's examples (``examples/<problem>/<script>.py`` in its repository, not in the pip package) build
their constraints, optimizer and ``ppsci.solver.Solver`` themselves. This runner imports such a script as it
is, composes its Hydra config from the script's own ``conf/<script>.yaml`` with your overrides, and calls its
``train(cfg)``; the only change is the Solver's ``loss_aggregator``: while the script runs, a Solver built
with constraints and no aggregator gets ``build_for_solver(balancer, model, constraints)``, the balancer's
own learned weights (GradNorm, uncertainty) join the script's optimizer, and the weights are logged.

    git clone https://github.com/PaddlePaddle/PaddleScience    # once (any checkout of its examples)
    python examples/ppsci/upstream.py PaddleScience/examples/ldc/ldc2d_steady_Re10.py \\
        --balancer "{name: lr_annealing, ref: continuity}" TRAIN.epochs=20 TRAIN.eval_during_train=false

``--balancer`` is a YAML mapping (``yaml.safe_load``; the keys of ``paddle_pinn_balance.build_balancer``) or a
YAML file such as ``examples/lr_annealing.yaml``; ``--out`` the output folder (default ``outputs_upstream/
<script>/<balancer>``). The smallest edit a user makes to such a script by hand is the same: build
``model, balancer = build_for_solver(cfg.TRAIN.balancer, model, constraint)`` after the constraints, give
``optimizer_layers(model, balancer)`` to the optimizer and ``loss_aggregator=balancer`` to the Solver.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import os
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
    with ours: ``build_for_solver(block, model, constraints)``; missing balancer parameters are added to the
    script's optimizer; ``(solver, balancer)`` is appended to ``built``."""
    import ppsci

    from paddle_pinn_balance import ppsci as balance

    solver_cls = ppsci.solver.Solver
    original = solver_cls.__init__
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a.get("constraint") or a.get("loss_aggregator") is not None:
            return original(*bound.args, **bound.kwargs)
        model, balancer = balance.build_for_solver(block, a["model"], a["constraint"])
        optimizer = a.get("optimizer")
        if optimizer is not None:  # the script built it from the bare model: add what the balancer learns
            held = {id(p) for p in optimizer._parameter_list}
            for layer in balance.optimizer_layers(model, balancer):
                optimizer._parameter_list.extend(p for p in layer.parameters() if id(p) not in held)
                held.update(id(p) for p in layer.parameters())
        a["model"], a["loss_aggregator"] = model, balancer
        original(*bound.args, **bound.kwargs)
        balance.attach_logging(self)
        built.append((self, balancer))

    solver_cls.__init__ = __init__
    try:
        yield built
    finally:
        solver_cls.__init__ = original


def load_script(path: str):
    spec = importlib.util.spec_from_file_location(f"upstream_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # the script's own sibling imports
    spec.loader.exec_module(module)
    if not callable(getattr(module, "train", None)):
        raise SystemExit(f"upstream.py: error: {path} has no train(cfg) function")
    return module


def compose(script: str, config_name: str | None, overrides: list, out: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = os.path.join(os.path.dirname(os.path.abspath(script)), "conf")
    name = config_name or os.path.splitext(os.path.basename(script))[0] + ".yaml"
    if not os.path.isfile(os.path.join(conf, name)):
        raise SystemExit(f"upstream.py: error: no config {name} in {conf} (give --config-name)")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return hydra_compose(config_name=name, overrides=[f"output_dir={out}", *overrides])


def run(script: str, block: dict, overrides=(), out: str | None = None, config_name: str | None = None) -> list:
    """Run ``script``'s ``train(cfg)`` with ``block`` as the aggregator of its Solver(s); returns the
    ``[(solver, balancer)]`` built. ``SystemExit`` (one line) when the script builds no Solver with constraints."""
    if not os.path.isfile(script):
        raise SystemExit(f"upstream.py: error: {script!r} is not a file")
    stem = os.path.splitext(os.path.basename(script))[0]
    out = out or os.path.join("outputs_upstream", stem, str(block["name"]))
    cfg = compose(script, config_name, list(overrides), out)
    module = load_script(script)
    built = []
    with balanced_solvers(block, built):
        module.train(cfg)
    if not built:
        raise SystemExit("upstream.py: error: the script built no Solver with constraints: nothing was balanced")
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("script", help="a PaddleScience example script with train(cfg) and conf/<script>.yaml")
    parser.add_argument("--balancer", default="{name: lr_annealing}", help="YAML mapping or YAML file")
    parser.add_argument("--config-name", default=None, help="default: <script>.yaml")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the script's config (KEY=VALUE)")
    args = parser.parse_intermixed_args(argv)
    block = balancer_block(args.balancer)
    for _, balancer in run(args.script, block, args.overrides, args.out, args.config_name):
        print(f"{block['name']}: final weights {balancer.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
