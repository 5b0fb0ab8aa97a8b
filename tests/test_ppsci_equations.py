"""PaddleScience's built-in equations with several outputs: NTK trace kernels evaluate a term as the Solver
does (all of the constraint's expressions in order on one dict, sharing fused derivative results)."""

import numpy as np
import paddle
import pytest

ppsci = pytest.importorskip("ppsci")

from paddle_pinn_balance.ppsci import build_for_solver  # noqa: E402


def navier_stokes_problem():
    paddle.seed(0)
    np.random.seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u", "v", "p"), 2, 8)
    ns = ppsci.equation.NavierStokes(0.01, 1.0, 2, False)
    rect = ppsci.geometry.Rectangle((0, 0), (1, 1))
    pde = ppsci.constraint.InteriorConstraint(
        ns.equations, {"continuity": 0, "momentum_x": 0, "momentum_y": 0}, rect,
        {"dataset": "IterableNamedArrayDataset", "batch_size": 12, "iters_per_epoch": 1}, ppsci.loss.MSELoss("sum"),
        name="EQ")
    bc = ppsci.constraint.BoundaryConstraint(
        {"u": lambda d: d["u"], "v": lambda d: d["v"]}, {"u": 0, "v": 0}, rect,
        {"dataset": "IterableNamedArrayDataset", "batch_size": 8, "iters_per_epoch": 1}, ppsci.loss.MSELoss("sum"),
        name="BC")
    return model, {pde.name: pde, bc.name: bc}


@pytest.mark.parametrize("fast", [True, False])
def test_navier_stokes_three_outputs_trains_with_ntk_traces(tmp_path, fast):
    model, cons = navier_stokes_problem()
    model2, bal = build_for_solver({"name": "ntk", "update_freq": 1, "fast": fast}, model, cons)
    opt = ppsci.optimizer.Adam(1e-3)(model2)
    solver = ppsci.solver.Solver(model2, cons, output_dir=str(tmp_path), optimizer=opt, epochs=1, iters_per_epoch=2,
                                 loss_aggregator=bal)
    solver.train()  # failed with KeyError 'u__x__x' when a kernel evaluated one expression alone
    assert sorted(bal.weights) == ["continuity", "momentum_x", "momentum_y", "u", "v"]
    traces = bal.traces()
    assert all(np.isfinite(v) and v > 0 for v in traces.values())
    assert int(bal.num_updates.numpy()[0]) == 2
