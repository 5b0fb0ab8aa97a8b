"""``examples/ppsci/upstream.py``: a PaddleScience-style example script, unmodified, balanced by ours."""

import importlib.util
import os
import warnings

import numpy as np
import pytest

from paddle_pinn_balance import BalanceWarning

ppsci = pytest.importorskip("ppsci")
pytest.importorskip("hydra")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAND_IN = os.path.join(HERE, "upstream_like", "poisson_like.py")
#: PaddleScience's own lid-driven cavity example, where a checkout of its repository is at hand
LDC = os.environ.get("PADDLESCIENCE_LDC_SCRIPT", "")


def upstream():
    spec = importlib.util.spec_from_file_location("upstream_runner", os.path.join(ROOT, "examples", "ppsci",
                                                                                   "upstream.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("block", ["{name: lr_annealing, ref: poisson, update_freq: 1}",
                                   "{name: grad_norm, alpha: 1.5}", "{name: uncertainty}", "{name: relobralo}",
                                   "{name: ntk, update_freq: 2}"])
def test_unmodified_script_trains_with_our_aggregator(block, tmp_path):
    runner = upstream()
    with warnings.catch_warnings():
        # ntk: the two boundary constraints share the label `p`, one term evaluated per constraint: the exact
        # per-point loop (its warning says so)
        warnings.simplefilter("ignore", BalanceWarning)
        (solver, balancer), = runner.run(STAND_IN, runner.balancer_block(block), out=str(tmp_path))
    assert balancer.loss_names == ("poisson", "p") and ppsci.solver.Solver.__init__ is not None
    assert int(balancer.num_calls.numpy()[0]) == 3
    held = {id(p) for p in solver.optimizer._parameter_list}
    assert all(id(p) in held for p in balancer.parameters() if not p.stop_gradient)  # learned weights train
    w = balancer.weights
    assert all(np.isfinite(v) for v in w.values()) and w != {"poisson": 1.0, "p": 1.0}
    log = (tmp_path / "train.log").read_text()
    assert "weight/poisson" in log and "weight/p" in log
    # the patch is gone afterwards: a Solver built later is PaddleScience's own
    assert ppsci.solver.Solver.__init__.__qualname__.startswith("Solver.")


def test_bad_balancer_argument_names_it(tmp_path):
    runner = upstream()
    with pytest.raises(SystemExit, match="--balancer"):
        runner.main([STAND_IN, "--balancer", "[1, 2]", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a file"):
        runner.main([str(tmp_path / "nope.py")])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(LDC), reason="set PADDLESCIENCE_LDC_SCRIPT to a PaddleScience checkout's "
                    "examples/ldc/ldc2d_steady_Re10.py (not in the pip package)")
def test_paddlescience_lid_driven_cavity_example(tmp_path):
    runner = upstream()
    assert runner.main([LDC, "--balancer", "{name: lr_annealing, ref: continuity, update_freq: 1}", "--out",
                        str(tmp_path), "TRAIN.epochs=2", "TRAIN.eval_during_train=false"]) == 0
    assert "weight/momentum_x" in (tmp_path / "train.log").read_text()
