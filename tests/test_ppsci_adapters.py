"""The adapter package's own contracts: its public names, the optimizer helper (the one place that reads Paddle's
optimizer internals), the public host counters and methods it uses instead of privates, and the kernels' model."""

import types

import numpy as np
import paddle
import pytest
from reference import DTYPE

import paddle_pinn_balance.ppsci as adapter
from paddle_pinn_balance import GradNorm, LRAnnealing, NTKWeighting, UncertaintyWeighting
from paddle_pinn_balance.ppsci import config, kernels, log, optimizers, solver
from paddle_pinn_balance.ppsci.optimizers import _add_parameters, _held_parameters

# every name users, tests, examples and the README import from paddle_pinn_balance.ppsci, and its module
NAMES = {"to_container": config, "balancer_config": config, "loss_names": config, "build_for_solver": solver,
         "attach": solver, "SolverSum": solver, "NTK_ADAPTER_KEYS": solver, "GRADNORM_LBFGS_WEIGHT_LR": solver,
         "optimizer_layers": optimizers, "attach_weight_optimizer": optimizers, "constraint_kernels": kernels,
         "ntk_model": kernels, "attach_logging": log}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_every_name_is_importable_from_the_package(name):
    assert getattr(adapter, name) is getattr(NAMES[name], name)
    assert name in adapter.__all__
    exec(f"from paddle_pinn_balance.ppsci import {name}", {})  # noqa: S102 - the import statement itself


def test_the_package_lists_no_name_it_does_not_have():
    assert sorted(adapter.__all__) == sorted(NAMES)


def _net():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(2, 4), paddle.nn.Tanh(), paddle.nn.Linear(4, 1))


def _stepped(opt, p):
    """Whether ``opt.step()`` moves ``p`` (given a gradient of ones)."""
    before = p.numpy().copy()
    p.grad = paddle.ones_like(p)
    opt.step()
    opt.clear_grad()
    return not np.array_equal(before, p.numpy())


def test_added_parameters_are_stepped_plain_list_and_groups():
    a, b = _net().parameters()[:2]
    extra = paddle.create_parameter([3], "float32")
    plain = paddle.optimizer.SGD(0.1, parameters=[a])
    assert [id(p) for p in _held_parameters(plain)] == [id(a)]
    _add_parameters(plain, [extra])
    assert [id(p) for p in _held_parameters(plain)] == [id(a), id(extra)] and _stepped(plain, extra)

    extra2 = paddle.create_parameter([3], "float32")
    groups = paddle.optimizer.SGD(0.1, parameters=[{"params": [a]}, {"params": [b], "learning_rate": 0.5}])
    assert [id(p) for p in _held_parameters(groups)] == [id(a), id(b)]
    # a group's list given to the optimizer is copied: what step() reads is not parameters[0]["params"]
    assert groups._parameter_list[0]["params"] is not groups._param_groups[0]["params"]
    _add_parameters(groups, [extra2])
    assert [id(p) for p in _held_parameters(groups)] == [id(a), id(extra2), id(b)]  # joins the first group
    assert _stepped(groups, extra2)


def test_added_parameters_reach_lbfgs():
    net = _net()
    extra = paddle.create_parameter([1], DTYPE, default_initializer=paddle.nn.initializer.Constant(3.0))
    opt = paddle.optimizer.LBFGS(1.0, max_iter=2, parameters=net.parameters())
    _add_parameters(opt, [extra])
    assert any(p is extra for p in opt._params)  # L-BFGS's own list is the same object

    def closure():
        opt.clear_grad()
        loss = (extra ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    assert abs(float(extra.numpy()[0])) < 3.0
    with pytest.raises(ValueError, match="parameter groups"):
        _add_parameters(paddle.optimizer.LBFGS(1.0, parameters=[{"params": net.parameters()}]), [extra])
    with pytest.raises(ValueError, match="_param_groups"):
        _held_parameters(object())


class FakeSolver(types.SimpleNamespace):
    """What ``attach`` reads of a Solver (weakly referenced: a subclass, unlike SimpleNamespace itself)."""


def test_attach_adds_learned_weights_to_a_grouped_optimizer():
    """``attach`` on an optimizer built from parameter groups: uncertainty's ``log_vars`` are then stepped (they
    used to be appended to the copy of the first group that ``step()`` never reads)."""
    net = _net()
    unc = UncertaintyWeighting(loss_names=["a", "b"])
    opt = paddle.optimizer.Adam(0.1, parameters=[{"params": net.parameters()}])
    fake = FakeSolver(model=net, optimizer=opt, loss_aggregator=unc)
    adapter.attach(fake, log=False)  # warns (BalanceWarning, an error here) if the weights are not held
    x = paddle.rand([8, 2])
    before = unc.log_vars.numpy().copy()
    unc({"a": (net(x) ** 2).mean(), "b": ((net(x) - 1) ** 2).mean()}, 0).backward()
    opt.step()
    assert not np.array_equal(before, unc.log_vars.numpy())


def test_host_counters_follow_the_calls_without_synchronising():
    net = _net()
    bal = LRAnnealing(net, ref="a", update_freq=2)
    x = paddle.rand([4, 2])

    def losses():
        return {"a": (net(x) ** 2).mean(), "b": ((net(x) - 1) ** 2).mean()}
    assert (bal.call_count, bal.last_update_at) == (0, None)
    bal(losses())  # no step: the call count, 0, is the step
    assert (bal.call_count, bal.last_update_at) == (1, 0)
    bal(losses(), 1)  # not an update step
    assert (bal.call_count, bal.last_update_at) == (2, 0)
    bal(losses(), 4)
    assert (bal.call_count, bal.last_update_at) == (3, 4)
    assert int(bal.num_calls.numpy()[0]) == bal.call_count
    state = bal.state_dict()
    assert int(state["last_update_step"].numpy()[0]) == 4
    fresh = LRAnnealing(net, ref="a", update_freq=2)
    fresh.set_state_dict(state)
    assert (fresh.call_count, fresh.last_update_at) == (3, 4)  # restored from the checkpoint
    fresh.restart_steps()
    assert fresh.last_update_at is None


def test_gradnorm_renormalise_is_public():
    net = _net()
    gn = GradNorm(net, n_loss=2).aggregator
    gn.loss_weights.set_value(paddle.to_tensor([1.0, 3.0]))
    gn.renormalise()
    np.testing.assert_allclose(gn.loss_weights.numpy(), [0.5, 1.5], rtol=1e-7)  # T w / sum(w), T = 2


def test_ntk_kernels_public_and_replaceable():
    net = _net()
    x = paddle.rand([5, 2])
    ks = {"a": lambda m: m(x), "b": lambda m: 2.0 * m(x)}
    ntk = NTKWeighting(net, kernels=ks, loss_names=["a", "b"])
    got = ntk.kernels
    assert got == ks and got is not ntk.kernels  # a copy
    traces = ntk.compute_traces().numpy()
    ntk.set_kernels({"a": ks["b"], "b": ks["a"]})
    np.testing.assert_allclose(ntk.compute_traces().numpy(), traces[::-1], rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['a', 'b'\]"):
        ntk.set_kernels({"a": ks["a"]})
    with pytest.raises(ValueError, match="mode='trace'"):
        NTKWeighting(net, mode="grad_norm").set_kernels(ks)


def test_kernels_take_the_paddlescience_network_itself():
    ppsci = pytest.importorskip("ppsci")
    ppsci.utils.misc.set_random_seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 8, "tanh", skip_connection=True)  # not a plain MLP
    wrapper = GradNorm(model, n_loss=1)
    assert adapter.ntk_model(model) is model and adapter.ntk_model(wrapper) is model
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    cons = {"BC": ppsci.constraint.BoundaryConstraint(
        {"u": lambda out: out["u"]}, {"u": 0.0}, rect,
        {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": 6}, ppsci.loss.MSELoss("mean"),
        name="BC")}
    kernel = adapter.constraint_kernels(cons, wrapper)["u"]
    assert kernel(model).shape == [6] and kernel(wrapper).shape == [6]
    with pytest.raises(ValueError, match="dict in, dict out"):
        kernel(lambda data: paddle.concat([data["x"], data["y"]], axis=-1))  # a tensor-out model


def test_build_for_solver_keeps_a_gradnorm_wrappers_balancer_with_constraints():
    """The docstring: a GradNorm wrapper given to ``build_for_solver`` is unwrapped and, for ``grad_norm``, its
    balancer is the one returned, also with the constraints given (their loss names were refused before)."""
    ppsci = pytest.importorskip("ppsci")
    ppsci.utils.misc.set_random_seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 8, "tanh")
    wrapper = GradNorm(model, n_loss=1, alpha=0.5)
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    cons = {"BC": ppsci.constraint.BoundaryConstraint(
        {"u": lambda out: out["u"]}, {"u": 0.0}, rect,
        {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": 4}, ppsci.loss.MSELoss("mean"),
        name="BC")}
    net, agg = adapter.build_for_solver({"name": "grad_norm"}, wrapper, cons)
    assert net is model and agg is wrapper.aggregator and agg.alpha == 0.5
    net, agg = adapter.build_for_solver({"name": "sum"}, wrapper, cons)
    assert net is model and agg.loss_names == ("u",)
