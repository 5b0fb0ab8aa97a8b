"""Every registry method with ``ppsci.optimizer.LBFGS`` in ``ppsci.solver.Solver`` (``train_LBFGS_epoch_func``).

The solver calls the aggregator once per closure evaluation, several times per step, all with the same
``global_step``: only the first call of a step updates the weights. Poisson 2D, three constraints, three
L-BFGS steps of ``max_iter=4`` (strong Wolfe line search, ppsci's default), update_freq 1.
"""

import numpy as np
import paddle
import pytest

ppsci = pytest.importorskip("ppsci")

from test_ppsci_methods import (  # noqa: E402
    FIXED_WEIGHTS,
    POISSON_NAMES,
    SOLVER_CONFIGS,
    finite_parameters,
    poisson_solver,
    train,
)

from paddle_pinn_balance import ppsci as adapter  # noqa: E402
from paddle_pinn_balance.config import REGISTRY, allowed_keys  # noqa: E402

STEPS = 3
#: L-BFGS steps change the residual loss by ~100: SoftAdapt's beta 1 would saturate its softmax (1, 0, 0)
OVERRIDES = {"softadapt": {"beta": 0.01}}


def lbfgs():
    return ppsci.optimizer.LBFGS(learning_rate=1.0, max_iter=4)


def config(name):
    cfg = {"name": name, **SOLVER_CONFIGS[name], **OVERRIDES.get(name, {})}
    if "update_freq" in allowed_keys(name):
        cfg["update_freq"] = 1
    return cfg


def record_calls(agg):
    """``[(step, weights applied in that call)]`` for every aggregator call."""
    calls = []

    def hook(layer, inputs, output):
        calls.append((int(inputs[1]), agg._weight_vector().numpy().copy()))

    agg.register_forward_post_hook(hook)
    return calls


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_method_with_lbfgs_in_the_solver(name, tmp_path):
    """Finite parameters; one weight update per optimizer step (the first closure evaluation), so every
    evaluation of a step sees the same weights; weights moved where the method moves them.

    * ``grad_norm``: L-BFGS holds the network only (``optimizer_layers(..., lbfgs=True)``); the weights follow
      :math:`L_\\mathrm{grad}`, not the total L-BFGS minimises (held by L-BFGS they turn NaN), so they get an
      Adam of their own (``attach_weight_optimizer``), stepped once per solver step.
    * ``uncertainty``: the exception to "one update per step": its total is one objective of the network
      and ``log_vars``, which L-BFGS minimises jointly, so the weights move at every L-BFGS iteration.
    """
    solver, net, agg = poisson_solver(config(name), tmp_path, iters=STEPS, optimizer=lbfgs(), lbfgs=True)
    held = {id(p) for p in solver.optimizer._parameter_list}
    if name == "grad_norm":
        assert id(agg.loss_weights) not in held
        adapter.attach_weight_optimizer(agg, paddle.optimizer.Adam(0.01, parameters=[agg.loss_weights]))
    if name == "uncertainty":
        assert id(agg.log_vars) in held
    w0 = agg.weights
    calls = record_calls(agg)
    train(solver)
    assert finite_parameters(solver.model) and finite_parameters(agg)
    assert len(calls) > STEPS  # several closure evaluations per step
    assert sorted({s for s, _ in calls}) == list(range(STEPS))
    assert int(agg.num_updates.numpy()[0]) == STEPS and agg._host["last_update_step"] == STEPS - 1
    distinct = [len({w.tobytes() for s, w in calls if s == step}) for step in range(STEPS)]
    if name == "uncertainty":
        assert max(distinct) > 1
    else:
        assert distinct == [1] * STEPS, distinct
    w = agg.weights
    assert all(np.isfinite(v) for v in w.values())
    if name in FIXED_WEIGHTS:
        assert w == w0
    else:
        moved = [k for k in POISSON_NAMES if w[k] != w0[k]]
        assert moved == (["p_lr", "p_tb"] if name == "lr_annealing" else list(POISSON_NAMES))
    if name == "grad_norm":  # stepped between solver steps: step 0 at the initial weights, then moving
        per_step = [next(w for s, w in calls if s == step) for step in range(STEPS)]
        assert np.array_equal(per_step[0], np.ones(3, "float32"))
        assert not np.array_equal(per_step[1], per_step[0]) and not np.array_equal(per_step[2], per_step[1])
        np.testing.assert_allclose(per_step[-1].sum(), 3.0, rtol=1e-6)  # renormalised before use


def test_lbfgs_sum_equals_ppsci_sum_aggregation(tmp_path):
    ours, _, agg = poisson_solver({"name": "sum"}, tmp_path / "ours", iters=STEPS, optimizer=lbfgs(), lbfgs=True)
    plain, _, none = poisson_solver(None, tmp_path / "plain", iters=STEPS, optimizer=lbfgs())
    assert none is None and isinstance(plain.loss_aggregator, ppsci.loss.mtl.Sum)
    train(ours)
    train(plain)
    assert int(agg.num_calls.numpy()[0]) > STEPS
    for (k, p), (_, q) in zip(ours.model.state_dict().items(), plain.model.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)
