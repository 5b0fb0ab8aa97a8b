"""The diagnosis inside a ``ppsci.solver.Solver`` (issue 27): recorded through a hook, training unchanged."""

import numpy as np
import paddle
import pytest

ppsci = pytest.importorskip("ppsci")

from test_ppsci import CONFIGS, make_constraints, make_solver, train  # noqa: E402

from paddle_pinn_balance.recorder import attach_diagnosis  # noqa: E402


def params(solver):
    return [p.numpy().copy() for p in solver.model.parameters()]


@pytest.mark.parametrize("name", ["lr_annealing", pytest.param("grad_norm", marks=pytest.mark.slow),
                                  pytest.param("ntk", marks=pytest.mark.slow)])
def test_solver_hook_records_and_leaves_training_unchanged(name, tmp_path):
    base, agg0, _ = make_solver(CONFIGS[name], tmp_path / "a", epochs=1, iters=12, log_freq=100)
    train(base)
    solver, agg, _ = make_solver(CONFIGS[name], tmp_path / "b", epochs=1, iters=12, log_freq=100)
    diag = attach_diagnosis(solver, every=5, ntk_points=8)
    train(solver)
    for a, b in zip(params(base), params(solver)):
        assert np.array_equal(a, b)
    assert agg0.weights == agg.weights
    assert [r["step"] for r in diag.records] == [0, 5, 10]  # the aggregator sees global_step 0, 1, ...
    assert diag.records[0]["terms"] == ["helmholtz", "u"]
    assert (diag.records[0]["ntk"] is not None) == (name == "ntk")  # the balancer's own kernels
    files = diag.report(str(tmp_path / "diag"))
    assert {f.rsplit("/", 1)[-1] for f in files} >= {"diagnosis.json", "diagnosis.md", "ratios_cosines.png"}
    diag.remove()
    n = len(diag.records)
    agg.restart_steps()  # a second run of the same Solver counts its steps from 0 again
    train(solver)
    assert len(diag.records) == n  # detached


def test_solver_default_sum_is_wrapped_and_restored(tmp_path):
    def build(out):
        ppsci.utils.misc.set_random_seed(0)
        with paddle.utils.unique_name.guard():
            model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 12, "tanh")
            opt = ppsci.optimizer.Adam(1e-3)(model)
            return ppsci.solver.Solver(model, make_constraints(), str(out), opt, epochs=1, iters_per_epoch=6,
                                       log_freq=100)

    base = build(tmp_path / "a")
    train(base)
    solver = build(tmp_path / "b")
    inner = solver.loss_aggregator
    diag = attach_diagnosis(solver, steps=[0, 5])
    assert solver.loss_aggregator is not inner and not solver.loss_aggregator.should_persist
    train(solver)
    for a, b in zip(params(base), params(solver)):
        assert np.array_equal(a, b)
    assert [r["step"] for r in diag.records] == [0, 5] and diag.verdict()["kind"]
    diag.remove()
    assert solver.loss_aggregator is inner
