"""Every registry method in ``ppsci.solver.Solver`` (Poisson 2D, three constraints); correspondence with
``ppsci.loss.mtl.GradNorm``; ReLoBRaLo, SoftAdapt, uncertainty resume; causal weighting; loop idioms."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

ppsci = pytest.importorskip("ppsci")

from paddle_pinn_balance import (  # noqa: E402
    BalanceWarning,
    CausalResidual,
    GradNorm,
    GradNormRatio,
    ReLoBRaLo,
    SoftAdapt,
    UncertaintyWeighting,
)
from paddle_pinn_balance import ppsci as adapter  # noqa: E402
from paddle_pinn_balance.config import REGISTRY  # noqa: E402

NAMES = ["helmholtz", "u"]
CONFIGS = {
    "relobralo": {"name": "relobralo", "expected_rho": 0.5, "seed": 3},
    "softadapt": {"name": "softadapt", "beta": 1.0},
    "uncertainty": {"name": "uncertainty"},  # names (hence log_vars) come from the constraints
}
CLASSES = {"relobralo": ReLoBRaLo, "softadapt": SoftAdapt, "uncertainty": UncertaintyWeighting}


def constraints(n=32):
    from ppsci.autodiff import hessian

    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    data = {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": n}
    return {
        "EQ": ppsci.constraint.InteriorConstraint(
            {"helmholtz": lambda o: hessian(o["u"], o["x"]) + hessian(o["u"], o["y"]) + o["u"]},
            {"helmholtz": lambda d: np.sin(np.pi * d["x"])}, rect, data, mse, name="EQ"),
        "BC": ppsci.constraint.BoundaryConstraint({"u": lambda o: o["u"]}, {"u": 0.0}, rect, data, mse, name="BC"),
    }


def make_solver(cfg, out_dir, epochs, iters=5, checkpoint_path=None, lbfgs=False):
    ppsci.utils.misc.set_random_seed(0)
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 8, "tanh")
        cons = constraints()
        net, agg = adapter.build_for_solver(cfg, model, cons)
        # the uncertainty balancer's log-variances train with the network
        opt = (ppsci.optimizer.LBFGS(max_iter=3) if lbfgs else ppsci.optimizer.Adam(1e-3))(
            adapter.optimizer_layers(net, agg))
        solver = ppsci.solver.Solver(net, cons, str(out_dir), opt, epochs=epochs, iters_per_epoch=iters,
                                     log_freq=100, loss_aggregator=agg, checkpoint_path=checkpoint_path)
    return solver, agg


def train(solver):
    with paddle.utils.unique_name.guard():
        solver.train()


# --------------------------------------------------------------------------- every registry method


POISSON_NAMES = ("poisson", "p_lr", "p_tb")
#: one configuration per registry name (update_freq 1 where the method has it: 3 steps, 3 updates)
SOLVER_CONFIGS = {
    "sum": {},
    "lr_annealing": {"ref": "poisson", "update_freq": 1},
    "grad_norm": {"alpha": 0.5},
    "ntk": {"update_freq": 1},
    "grad_norm_ratio": {"update_freq": 1, "momentum": 0.5},
    "relobralo": {"expected_rho": 0.5},
    "softadapt": {"beta": 1.0},
    "uncertainty": {},
    "pcgrad": {},
    "conflict_free": {},
    "upgrad": {},
    "m_conflict_free": {},
    "dwa": {},
}
#: methods whose weights stay 1 by design (the surgery methods change the direction, not the weights)
FIXED_WEIGHTS = ("sum", "pcgrad", "conflict_free", "upgrad", "m_conflict_free")


def poisson_constraints():
    """Poisson 2D (``ppsci.equation.Poisson``: ``p_xx + p_yy = f``) on the unit square, three constraints:
    the interior residual ``poisson`` and two boundary pieces with their own keys ``p_lr`` and ``p_tb``
    (the per-constraint recipe), full batch."""
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    pde = ppsci.equation.Poisson(2)

    def data(n):
        return {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": n}

    def lr(x, y):
        return np.isclose(x, 0.0) | np.isclose(x, 1.0)

    src = {"poisson": lambda d: -2 * np.pi**2 * np.sin(np.pi * d["x"]) * np.sin(np.pi * d["y"])}
    cons = [ppsci.constraint.InteriorConstraint(pde.equations, src, rect, data(16), mse, name="EQ"),
            ppsci.constraint.BoundaryConstraint({"p_lr": lambda o: o["p"]}, {"p_lr": 0.0}, rect, data(8), mse,
                                                criteria=lr, name="BC_lr"),
            ppsci.constraint.BoundaryConstraint({"p_tb": lambda o: 3.0 * o["p"]}, {"p_tb": 0.0}, rect, data(8), mse,
                                                criteria=lambda x, y: ~lr(x, y), name="BC_tb")]
    return {c.name: c for c in cons}, pde


def poisson_solver(cfg, out_dir, iters=3, optimizer=None, aggregator=None, lbfgs=False):
    """``(solver, net, balancer)``: ``build_for_solver`` on the Poisson problem, the optimizer built from
    ``optimizer_layers``. ``optimizer``: a ppsci optimizer factory (default Adam 1e-2); ``aggregator``:
    replaces the balancer given to the solver (None with ``cfg=None``: ppsci's default ``mtl.Sum``)."""
    ppsci.utils.misc.set_random_seed(0)
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("p",), 2, 8, "tanh")
        cons, pde = poisson_constraints()
        net, agg = (model, None) if cfg is None else adapter.build_for_solver(cfg, model, cons)
        layers = net if agg is None else adapter.optimizer_layers(net, agg, lbfgs=lbfgs)
        opt = (optimizer or ppsci.optimizer.Adam(1e-2))(layers)
        solver = ppsci.solver.Solver(net, cons, str(out_dir), opt, epochs=1, iters_per_epoch=iters, log_freq=100,
                                     loss_aggregator=agg if aggregator is None else aggregator,
                                     equation={"Poisson": pde})
    return solver, net, agg


class RecordingWriter:
    """A VisualDL-like sink (``add_scalar(tag, value, step)``)."""

    def __init__(self):
        self.records = []

    def add_scalar(self, tag, value, step):
        self.records.append((tag, float(value), int(step)))


def finite_parameters(layer):
    return all(np.all(np.isfinite(p.numpy())) for p in layer.parameters())


def test_solver_configs_cover_the_registry():
    assert set(SOLVER_CONFIGS) == set(REGISTRY)  # a new method must be added here (and in the L-BFGS test)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registry_method_trains_in_the_solver(name, tmp_path):
    """Names from the constraints before any call, learned weights in the optimizer (once), finite
    parameters after training, weights that moved (where the method moves them), weights in the log."""
    solver, net, agg = poisson_solver({"name": name, **SOLVER_CONFIGS[name]}, tmp_path)
    assert agg.loss_names == POISSON_NAMES and int(agg.num_calls.numpy()[0]) == 0
    ids = [id(p) for p in solver.optimizer._parameter_list]
    assert len(ids) == len(set(ids))  # every tensor once
    assert {id(p) for p in net.parameters()} | {id(p) for p in agg.parameters()} == set(ids)
    if name in ("grad_norm", "uncertainty"):
        assert agg.parameters() and not isinstance(net, GradNorm)  # the bare net: .pdparams under its own names
    w0 = agg.weights
    solver.vdl_writer = RecordingWriter()
    adapter.attach_logging(solver)
    train(solver)
    assert finite_parameters(solver.model)
    w = agg.weights
    assert list(w) == list(POISSON_NAMES) and all(np.isfinite(v) for v in w.values())
    assert int(agg.num_updates.numpy()[0]) == 3
    if name in FIXED_WEIGHTS:
        assert w == w0 == dict.fromkeys(POISSON_NAMES, 1.0)
    else:  # every weight moved, except the reference term of lr_annealing (weight 1 by definition)
        moved = [k for k in POISSON_NAMES if w[k] != w0[k]]
        assert moved == (["p_lr", "p_tb"] if name == "lr_annealing" else list(POISSON_NAMES))
    if name in FIXED_WEIGHTS[1:]:  # the surgery changed the direction: other parameters than the plain sum's
        plain, _, _ = poisson_solver({"name": "sum"}, tmp_path / "sum")
        train(plain)
        pairs = zip(solver.model.parameters(), plain.model.parameters())
        diff = [np.abs(p.numpy() - q.numpy()).max() for p, q in pairs]
        assert max(diff) > 1e-6
    steps = {}
    for tag, _, step in solver.vdl_writer.records:
        steps.setdefault(tag, []).append(step)
    assert all(steps[f"train/weight/{k}"] == [1, 3] for k in POISSON_NAMES)


def test_optimizer_layers_and_weight_optimizer_refuse_what_cannot_train():
    model = ppsci.arch.MLP(("x", "y"), ("p",), 2, 8, "tanh")
    with pytest.raises(ValueError, match="no parameters yet"):  # log_vars are created with the names
        adapter.optimizer_layers(model, UncertaintyWeighting())
    unc = UncertaintyWeighting(loss_names=list(POISSON_NAMES))
    assert adapter.optimizer_layers(model, unc) == (model, unc)
    cons, _ = poisson_constraints()
    net, gn = adapter.build_for_solver({"name": "grad_norm"}, model, cons)
    assert net is model and adapter.optimizer_layers(net, gn) == (model, gn)
    assert adapter.optimizer_layers(net, gn, lbfgs=True) == (model,)  # the weights: attach_weight_optimizer
    wrapper = gn.wrapper  # a GradNorm wrapper given by hand holds the weights itself
    assert adapter.optimizer_layers(wrapper, gn) == (wrapper,)
    assert adapter.optimizer_layers(wrapper, gn, lbfgs=True) == (model,)
    with pytest.raises(ValueError, match="GradNorm's balancer"):
        adapter.attach_weight_optimizer(unc, paddle.optimizer.SGD(0.1, parameters=unc.parameters()))
    with pytest.raises(ValueError, match="exactly"):
        adapter.attach_weight_optimizer(gn, paddle.optimizer.SGD(0.1, parameters=wrapper.parameters()))
    handle = adapter.attach_weight_optimizer(gn, paddle.optimizer.SGD(0.1, parameters=[gn.loss_weights]))
    handle.remove()


@pytest.mark.parametrize("name", ["grad_norm", "uncertainty"])
def test_attach_logging_names_learned_weights_the_optimizer_does_not_hold(name, tmp_path):
    """An optimizer built from the model alone (not optimizer_layers) would leave the weights at their initial
    values, silently: attach_logging (one line of the hand edit) says so, naming them."""
    solver, net, agg = poisson_solver({"name": name}, tmp_path, optimizer=lambda layers: ppsci.optimizer.Adam(
        1e-2)(layers[0]))
    with pytest.warns(BalanceWarning, match="not in the solver's optimizer") as got:
        adapter.attach_logging(solver)
    assert agg.parameters()[0].name in str(got[0].message)
    ok, _, _ = poisson_solver({"name": name}, tmp_path / "ok")
    adapter.attach_logging(ok)  # optimizer_layers: no warning (warnings are errors in the tests)


# --------------------------------------------------------------------------- ppsci.loss.mtl.GradNorm


class BothAggregators(paddle.nn.Layer):
    """A loss aggregator for the Solver that gives the SAME losses (same model, same step) first to
    ``ppsci.loss.mtl.GradNorm`` (which differentiates each term with ``retain_graph=True`` and clears the
    model's gradients) and then to ours, records both, and returns our total (which trains the model)."""

    should_persist = False  # read by the Solver (nothing to checkpoint here)

    def __init__(self, ours, theirs):
        super().__init__()
        self.ours, self.theirs, self.records = ours, theirs, []

    def forward(self, losses, step=0):
        assert tuple(losses) == self.ours.loss_names  # ppsci indexes its weights by the dict order
        theirs_total = self.theirs(losses, step)
        rec = {"step": step, "losses": np.array([float(v) for v in losses.values()]),
               "theirs_total": float(theirs_total), "theirs_w": self.theirs.weight.numpy().copy()}
        total = self.ours(losses, step)
        rec["ours_w"] = np.array(list(self.ours.weights.values()))
        rec["ours_total"] = float(total)
        self.records.append(rec)
        return total


@pytest.mark.parametrize("momentum,update_freq", [(0.9, 1), (0.5, 2)])
def test_grad_norm_ratio_matches_ppsci_gradnorm_step_for_step(momentum, update_freq, tmp_path):
    r"""``ppsci.loss.mtl.GradNorm(model, K, update_freq, momentum)`` (PaddleScience 1.4, ``grad_norm.py``) is
    the grad-norm ratio of Wang et al. 2023 (jaxpi), not Chen et al.'s GradNorm: at a step with
    ``step % update_freq == 0`` it takes :math:`n_i = \|
abla_	heta L_i\|_2` over every model parameter
    (one ``backward(retain_graph=True)`` per term, read from ``.grad``), :math:`\hat w_i = ar n / n_i`
    with :math:`ar n = rac1K\sum_j n_j`, and :math:`w \leftarrow m w + (1 - m)\hat w` from
    :math:`w = 1`. It has no ``alpha``. That is ``GradNormRatio(model, reduction="mean", momentum=m,
    update_freq=f)`` term for term (same parameters, same normalisation, same momentum, same cadence,
    same initial weights).

    The one difference is the order: ppsci forms its total with the weights it holds and updates
    afterwards, ours updates first. Fed the same losses at every step (this aggregator pair in one Solver,
    the model trained by our total), exactly:

    * our weights at step ``t`` (those in our step-``t`` total) == ppsci's weights after its step-``t`` call;
    * ppsci's step-``t`` total == :math:`\sum_i w_i^{	ext{ours}}(t-1)\,L_i(t)` (ours after step ``t - 1``,
      ones before step 0): ppsci applies each update one step late (on update steps only; between updates
      both totals use the same weights).

    So a ppsci run and ours differ only by that one-step lag (and their trajectories then drift apart).
    Not compared (ppsci has no counterpart): a zero gradient norm (ppsci divides by it; ours keeps the
    weight), non-finite norms (ours skips the update), several calls per step (an L-BFGS closure: ppsci
    updates on every call, ours on the first), gradients already in ``.grad`` (ppsci's norms include them and
    its ``clear_gradients()`` discards them, e.g. the Solver's gradient accumulation; ours restores ``.grad``).
    """
    ppsci.utils.misc.set_random_seed(0)
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("p",), 2, 8, "tanh")
        cons, pde = poisson_constraints()
        _, ours = adapter.build_for_solver({"name": "grad_norm_ratio", "reduction": "mean", "momentum": momentum,
                                            "update_freq": update_freq}, model, cons)
        theirs = ppsci.loss.mtl.GradNorm(model, num_losses=3, update_freq=update_freq, momentum=momentum)
        both = BothAggregators(ours, theirs)
        solver = ppsci.solver.Solver(model, cons, str(tmp_path), ppsci.optimizer.Adam(1e-2)(model), epochs=1,
                                     iters_per_epoch=6, log_freq=100, loss_aggregator=both,
                                     equation={"Poisson": pde})
    assert isinstance(ours, GradNormRatio) and ours.reduction == "mean"
    train(solver)
    recs = both.records
    assert [r["step"] for r in recs] == list(range(6))
    prev = np.ones(3)
    for r in recs:
        np.testing.assert_allclose(r["ours_w"], r["theirs_w"], rtol=1e-6, err_msg=f"step {r['step']}")
        np.testing.assert_allclose(r["theirs_total"], prev @ r["losses"], rtol=1e-6, err_msg=f"step {r['step']}")
        np.testing.assert_allclose(r["ours_total"], r["ours_w"] @ r["losses"], rtol=1e-6)
        prev = r["ours_w"]
    w = [r["ours_w"] for r in recs]
    assert not np.allclose(w[0], 1.0) and not np.allclose(w[-1], w[0])  # the weights did move
    if update_freq == 2:  # no update on odd steps: weights carried over
        assert all(np.array_equal(w[t], w[t - 1]) for t in (1, 3, 5))


# --------------------------------------------------------------------------- resume, L-BFGS, idioms


@pytest.mark.parametrize("name", list(CONFIGS))
def test_solver_resume_is_identical(name, tmp_path):
    full, agg_full = make_solver(CONFIGS[name], tmp_path / "full", epochs=2)
    train(full)
    assert isinstance(agg_full, CLASSES[name]) and list(agg_full.loss_names) == NAMES
    w = agg_full.weights
    assert all(np.isfinite(v) and v > 0 for v in w.values()) and len(set(w.values())) == 2
    half, _ = make_solver(CONFIGS[name], tmp_path / "half", epochs=1)
    train(half)
    resumed, agg_res = make_solver(CONFIGS[name], tmp_path / "res", epochs=2,
                                   checkpoint_path=str(tmp_path / "half" / "checkpoints" / "latest"))
    train(resumed)
    a, b = agg_full.state_dict(), agg_res.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    for (k, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)


def test_uncertainty_with_lbfgs_in_the_solver(tmp_path):
    solver, agg = make_solver(CONFIGS["uncertainty"], tmp_path, epochs=1, iters=3, lbfgs=True)
    s0 = agg.log_vars.numpy().copy()
    train(solver)
    s1 = agg.log_vars.numpy()
    assert np.all(np.isfinite(s1)) and not np.array_equal(s0, s1)


def test_causal_residual_in_a_solver_loss(tmp_path):
    """A causal residual as one term: ``CausalMSELoss`` semantics from our layer (time-major points)."""
    c = CausalResidual(4, eps=1.0)
    loss = c(paddle.to_tensor(np.ones([16], DTYPE)))
    np.testing.assert_allclose(float(loss), np.mean(np.exp(-np.arange(4.0))), rtol=1e-6)


@pytest.mark.parametrize("cls", [ReLoBRaLo, SoftAdapt])
def test_loop_idioms(cls):
    paddle.seed(0)
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([8, 2])
    bal = cls()

    def losses(k):
        return {"a": (net(x) ** 2).mean() * (k + 1), "b": ((net(x) - 1) ** 2).mean()}

    for step in range(3):
        t = bal(losses(step), step)
        w = bal.weights
        ref = [g.numpy() for g in paddle.grad(w["a"] * losses(step)["a"] + w["b"] * losses(step)["b"],
                                              net.parameters())]
        net.clear_gradients()  # clear_grad right before backward
        t.backward()
        for p, r in zip(net.parameters(), ref):
            np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-5, atol=1e-7)
        net.clear_gradients()
    # two calls accumulated (no update on the second: update_freq 2)
    bal2 = cls(update_freq=2)
    t1 = bal2(losses(0), 0)
    t2 = bal2(losses(0), 1)
    (t1 + t2).backward()
    g2 = [p.grad.numpy().copy() for p in net.parameters()]
    net.clear_gradients()
    w = bal2.weights
    ref = paddle.grad(2 * (w["a"] * losses(0)["a"] + w["b"] * losses(0)["b"]), net.parameters())
    for a, r in zip(g2, ref):
        np.testing.assert_allclose(a, r.numpy(), rtol=1e-5, atol=1e-7)


def test_attach_continues_the_balancer_in_a_second_solver(tmp_path):
    """A second Solver with the same balancer: restart_steps (its step 0 updates), NTK kernels rebuilt on its
    constraints when they are new objects, the logging hook moved to it (one hook, not two)."""
    solver, net, agg = poisson_solver({"name": "ntk", "update_freq": 2}, tmp_path / "a")
    adapter.attach(solver)
    train(solver)
    updates = int(agg.num_updates.numpy()[0])
    cons, pde = poisson_constraints()  # new constraint objects, same terms
    with paddle.utils.unique_name.guard():
        second = ppsci.solver.Solver(net, cons, str(tmp_path / "b"), ppsci.optimizer.Adam(1e-2)(net), epochs=1,
                                     iters_per_epoch=3, log_freq=100, loss_aggregator=agg,
                                     equation={"Poisson": pde})
    adapter.attach(second)
    assert all(p.constraint is cons[p.cname] for k in agg.kernels.values() for p in k.pieces)
    assert len(agg._forward_post_hooks) == 1
    train(second)
    assert int(agg.num_updates.numpy()[0]) == updates + 2  # steps 0 and 2 of the second Solver
