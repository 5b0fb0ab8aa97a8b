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
      :math:`L_\\mathrm{grad}`, not the total L-BFGS minimises (held by L-BFGS they collapse:
      ``test_gradnorm_weights_held_by_lbfgs_collapse``), so they get an Adam of their own
      (``attach_weight_optimizer``), stepped once per solver step.
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
    assert int(agg.num_updates.numpy()[0]) == STEPS and agg.last_update_at == STEPS - 1
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


def test_gradnorm_weights_held_by_lbfgs_collapse(tmp_path):
    """Why L-BFGS does not hold GradNorm's weights: L-BFGS takes the L_grad gradient the total delivers to
    them as the gradient of the objective it line-searches, and at its first step drives the residual's weight
    to the floor ``min_weight`` (1e-8), where it stays: the PDE leaves the objective (and the reported total
    goes negative: L-BFGS steps the weights below zero between GradNorm's clips). Nothing turns NaN (the clip
    and the non-finite guard hold), which is why it looks like training."""
    solver, net, agg = poisson_solver(config("grad_norm"), tmp_path, iters=STEPS, optimizer=lbfgs())
    assert any(p is agg.loss_weights for p in solver.optimizer._parameter_list)  # held by L-BFGS (no lbfgs=True)
    train(solver)
    w = agg.loss_weights.numpy()
    assert finite_parameters(solver.model) and np.all(np.isfinite(w))
    assert w[0] < 2 * agg.min_weight and w[1:].min() > 0.5  # the residual's weight at the floor (renormalised)


def test_lbfgs_sum_equals_ppsci_sum_aggregation(tmp_path):
    ours, _, agg = poisson_solver({"name": "sum"}, tmp_path / "ours", iters=STEPS, optimizer=lbfgs(), lbfgs=True)
    plain, _, none = poisson_solver(None, tmp_path / "plain", iters=STEPS, optimizer=lbfgs())
    assert none is None and isinstance(plain.loss_aggregator, ppsci.loss.mtl.Sum)
    train(ours)
    train(plain)
    assert int(agg.num_calls.numpy()[0]) > STEPS
    for (k, p), (_, q) in zip(ours.model.state_dict().items(), plain.model.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)


@pytest.mark.parametrize("name", ["lr_annealing", "grad_norm_ratio", "ntk_grad_norm"])
def test_lbfgs_trains_like_the_plain_weighted_sum(name, tmp_path):
    """``assemble=True`` (one backward on update steps, the gradients reused) and ``assemble=False`` (the
    plain weighted sum, autograd's own backward) give L-BFGS the same parameters to float tolerance.

    One L-BFGS step of several closure evaluations (the first updates the weights, the others reuse them):
    equal to 1e-7. Later steps are not compared: L-BFGS (learning rate 1) amplifies the paths' rounding
    difference (1e-4 after two steps) and from the third step the strong-Wolfe line search can branch on
    it (LRA here: 16 closure evaluations against 15, then 3e-2 apart)."""
    cfg = config("ntk" if name == "ntk_grad_norm" else name)
    if name == "ntk_grad_norm":
        cfg["mode"] = "grad_norm"
    runs = []
    for assemble in (True, False):
        solver, net, agg = poisson_solver({**cfg, "assemble": assemble}, tmp_path / str(assemble), iters=1,
                                          optimizer=lbfgs(), lbfgs=True)
        calls = record_calls(agg)
        train(solver)
        runs.append(([p.numpy() for p in net.parameters()], agg.weights, int(agg.num_updates.numpy()[0]),
                     len(calls)))
    (p1, w1, n1, c1), (p2, w2, n2, c2) = runs
    assert n1 == n2 == 1 and c1 == c2 > 2
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in w1:
        assert w1[k] == pytest.approx(w2[k], rel=1e-5)


def test_adam_then_lbfgs_from_the_checkpoint_keeps_weights_and_cadence(tmp_path):
    """Adam for one epoch (checkpointed), then a new Solver with L-BFGS resuming from that checkpoint: the
    balancer starts from Adam's final weights and update count, and its cadence continues (update_freq 2:
    Adam steps 0-3 update at 0 and 2, L-BFGS steps 4-7 at 4 and 6). PhysicsNeMo loses them (physicsnemo#1719)."""
    cfg = {"name": "lr_annealing", "ref": "poisson", "update_freq": 2}
    adam, _, a1 = poisson_solver(cfg, tmp_path / "adam", iters=4)
    adam.save_freq = 1
    train(adam)
    assert int(a1.num_updates.numpy()[0]) == 2 and a1.last_update_at == 2

    ppsci.utils.misc.set_random_seed(0)
    from test_ppsci_methods import poisson_constraints

    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("p",), 2, 8, "tanh")
        cons, pde = poisson_constraints()
        net, agg = adapter.build_for_solver(cfg, model, cons)
        opt = lbfgs()(adapter.optimizer_layers(net, agg, lbfgs=True))
        solver = ppsci.solver.Solver(net, cons, str(tmp_path / "lbfgs"), opt, epochs=2, iters_per_epoch=4,
                                     log_freq=100, loss_aggregator=agg, equation={"Poisson": pde},
                                     checkpoint_path=str(tmp_path / "adam" / "checkpoints" / "latest"))
    assert agg.weights == a1.weights and int(agg.num_updates.numpy()[0]) == 2
    for p, q in zip(net.parameters(), adam.model.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())
    calls = record_calls(agg)
    train(solver)
    assert sorted({s for s, _ in calls}) == [4, 5, 6, 7]
    assert int(agg.num_updates.numpy()[0]) == 4 and agg.last_update_at == 6
    assert agg.weights != a1.weights and finite_parameters(net)
