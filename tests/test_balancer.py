"""Properties every balancer keeps: the calling contract, validation, checkpoint round-trips."""

import numpy as np
import paddle
import pytest
from reference import DTYPE, allocated, make_net

from paddle_pinn_balance import GradNorm, LRAnnealing, NTKWeighting, Sum

NAMES = ("res", "bc")


def batch(step, dtype=DTYPE):
    rng = np.random.default_rng(1000 + step)  # fresh points each step, as in PINN training
    xr = paddle.to_tensor(rng.uniform(-1, 1, (16, 2)).astype(dtype))
    xb = paddle.to_tensor(rng.uniform(-1, 1, (8, 2)).astype(dtype))
    return xr, xb


def losses_of(net, step, dtype=DTYPE):
    xr, xb = batch(step, dtype)
    return {"res": (net(xr) ** 2).mean(), "bc": ((net(xb) - 5.0) ** 2).mean()}


def ntk_trace(net):
    """NTK weights from kernels on their own fixed points (in the net's dtype)."""
    dtype = net.parameters()[0].dtype
    pts = {n: paddle.to_tensor(np.random.default_rng(i).uniform(-1, 1, (k, 2))).astype(dtype)
           for i, (n, k) in enumerate((("res", 10), ("bc", 6)))}
    kernels = {n: (lambda m, n=n: m(pts[n]).reshape([-1])) for n in pts}
    return net, NTKWeighting(net, kernels=kernels, update_freq=2, momentum=0.5)


BUILDERS = {
    "sum": lambda net: (net, Sum(weights={"bc": 3.0})),
    "lra_siam": lambda net: (net, LRAnnealing(net, ref="res", update_freq=2)),
    "lra_arxiv": lambda net: (net, LRAnnealing(net, ref="res", variant="arxiv", update_freq=3, statistic="mean")),
    "gradnorm": lambda net: (lambda w: (w, w.aggregator))(GradNorm(net, n_loss=2, alpha=0.5)),
    "ntk_trace": ntk_trace,
    "ntk_grad_norm": lambda net: (net, NTKWeighting(net, mode="grad_norm", update_freq=2, reduction="sum")),
}


def run(kind, steps, start=0, state=None, dtype=DTYPE):
    """Train `steps` steps from `start`; optionally restore a checkpoint first."""
    with paddle.utils.unique_name.guard():  # the parameter and optimizer-state names of a fresh process
        model, bal = BUILDERS[kind](make_net(dtype=dtype))
        opt = paddle.optimizer.Adam(1e-2, parameters=model.parameters())
        if state is not None:
            model.set_state_dict(state["model"])
            opt.set_state_dict(state["opt"])
            if model is not bal:
                bal.set_state_dict(state["bal"])
        for step in range(start, start + steps):
            total = bal(losses_of(model, step, dtype), step)
            total.backward()
            opt.step()
            opt.clear_grad()
    return model, bal, opt


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_checkpoint_resume_is_bit_for_bit(kind, tmp_path):
    ref_model, ref_bal, _ = run(kind, 9)
    model, bal, opt = run(kind, 5)
    path = str(tmp_path / "ckpt.pd")
    paddle.save({"model": model.state_dict(), "opt": opt.state_dict(), "bal": bal.state_dict()}, path)
    resumed_model, resumed_bal, _ = run(kind, 4, start=5, state=paddle.load(path))
    assert resumed_bal.weights == ref_bal.weights
    for a, b in zip(ref_model.parameters(), resumed_model.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for key, value in ref_bal.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), resumed_bal.state_dict()[key].numpy(), err_msg=key)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_float64_model(kind):
    model, bal, _ = run(kind, 3, dtype="float64")
    total = bal(losses_of(model, 3, "float64"), 4)
    assert total.dtype == paddle.float64
    assert all(np.isfinite(v) for v in bal.weights.values())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_contract_and_bad_input(kind):
    model, bal = BUILDERS[kind](make_net())
    assert bal.should_persist is True
    good = losses_of(model, 0)
    bal(good, 0)
    with pytest.raises(ValueError, match="pde"):
        bal({"res": good["res"], "pde": good["bc"]}, 1)
    with pytest.raises(ValueError, match="missing \\['bc'\\]"):
        bal({"res": good["res"]}, 1)
    with pytest.raises(ValueError, match="extra"):
        bal({**good, "extra": good["bc"]}, 1)
    with pytest.raises(ValueError, match="'bc' must be a scalar"):
        bal({"res": good["res"], "bc": paddle.ones([3])}, 1)
    with pytest.raises(ValueError, match="empty"):
        bal({}, 1)
    with pytest.raises(ValueError, match="mapping"):
        bal([good["res"], good["bc"]], 1)
    with pytest.raises(ValueError, match="step"):
        bal(good, 1.5)


def test_names_fixed_at_construction():
    lra = LRAnnealing(make_net(), ref="res", loss_names=["res", "bc"])
    assert lra.weights == {"res": 1.0, "bc": 1.0}
    net = make_net()
    with pytest.raises(ValueError, match="unexpected \\['ic'\\]"):
        lra({**losses_of(net, 0), "ic": losses_of(net, 0)["bc"]}, 0)
    with pytest.raises(ValueError, match="duplicates"):
        LRAnnealing(make_net(), loss_names=["res", "res"])
    with pytest.raises(ValueError, match="loss_names"):
        Sum(loss_names="res")


def test_sum_is_the_plain_weighted_sum_and_never_updates():
    agg = Sum(weights={"bc": 10.0})
    total = agg({"res": paddle.to_tensor(1.0), "bc": paddle.to_tensor(2.0)}, 0)
    assert float(total) == 21.0 and agg.weights == {"res": 1.0, "bc": 10.0}
    with pytest.raises(ValueError, match="ic"):
        Sum(weights={"ic": 1.0})({"res": paddle.to_tensor(1.0)})
    with pytest.raises(ValueError, match="weights"):
        Sum(weights={"bc": -1.0})


def test_state_dict_with_other_names_or_values_is_refused_and_changes_nothing():
    net = make_net()
    a = LRAnnealing(net, ref="res", update_freq=1)
    a(losses_of(net, 0), 0)
    state = a.state_dict()
    other = LRAnnealing(net, ref="res", loss_names=["res", "ic"])
    with pytest.raises(ValueError, match="\\['res', 'bc'\\].*\\['res', 'ic'\\]"):
        other.set_state_dict(state)
    assert other.weights == {"res": 1.0, "ic": 1.0}
    three = LRAnnealing(net, ref="res", loss_names=["res", "bc", "ic"])
    with pytest.raises(ValueError, match="loss names"):
        three.set_state_dict(state)
    bad = dict(state)
    bad["lambdas"] = paddle.to_tensor([1.0, float("nan")])
    fresh = LRAnnealing(net, ref="res")
    with pytest.raises(ValueError, match="non-finite"):
        fresh.set_state_dict(bad)
    assert fresh.loss_names is None
    short = dict(state)
    short["lambdas"] = paddle.to_tensor([1.0])
    with pytest.raises(ValueError, match="shape"):
        LRAnnealing(net, ref="res").set_state_dict(short)
    wide = dict(state)
    wide["lambdas"] = paddle.to_tensor(state["lambdas"].numpy().astype("float64"))  # another dtype loads
    LRAnnealing(net, ref="res").set_state_dict(wide)
    text = dict(state)
    text["lambdas"] = np.array(["1", "2"])
    with pytest.raises(ValueError, match="not numeric"):
        LRAnnealing(net, ref="res").set_state_dict(text)
    with pytest.raises(ValueError, match="names_utf8"):
        LRAnnealing(net, ref="res").set_state_dict({"lambdas": state["lambdas"]})
    # a fresh balancer without names takes them from the checkpoint
    fresh = LRAnnealing(net, ref="res")
    fresh.set_state_dict(state)
    assert fresh.weights == a.weights and fresh.loss_names == ("res", "bc")


def test_weights_are_buffers_not_parameters():
    lra = LRAnnealing(make_net(), ref="res", loss_names=["res", "bc"])
    assert lra.parameters() == []
    assert "lambdas" in dict(lra.named_buffers())
    gn = GradNorm(make_net(), n_loss=2).aggregator
    assert [n for n, _ in gn.named_parameters()] == ["loss_weights"]


class PartlyConnected(paddle.nn.Layer):
    """Two heads: `bc` never reaches `head_r`, `res` never reaches `head_b`; `extra` has no parameters."""

    def __init__(self):
        super().__init__()
        self.trunk = make_net((2, 6, 5))
        self.head_r = paddle.nn.Linear(5, 1)
        self.head_b = paddle.nn.Linear(5, 1)

    def forward(self, x):
        h = paddle.tanh(self.trunk(x))
        return self.head_r(h), self.head_b(h)


def partly_connected_losses(net, step):
    xr, xb = batch(step)
    return {"res": (net(xr)[0] ** 2).mean(), "bc": ((net(xb)[1] - 3.0) ** 2).mean(),
            "extra": paddle.to_tensor(0.5)}


FAST_VS_PLAIN = {
    "lra_siam": lambda net, a: LRAnnealing(net, ref="res", update_freq=2, assemble=a),
    "lra_arxiv_norm": lambda net, a: LRAnnealing(net, ref="res", variant="arxiv", statistic="norm", update_freq=1,
                                                 assemble=a),
    "lra_code_preset": lambda net, a: LRAnnealing(net, ref="res", preset="wang2021_code", update_freq=1, assemble=a),
    "lra_cavity": lambda net, a: LRAnnealing(net, ref="res", reduction="layer_max_ratio", params="weights",
                                             update_freq=1, assemble=a),
    "gradnorm": lambda net, a: GradNorm(net, n_loss=3, alpha=1.0, shared_params=["trunk.2.weight"],
                                        assemble=a).aggregator,
    "ntk_grad_norm": lambda net, a: NTKWeighting(net, mode="grad_norm", update_freq=1, momentum=0.5, assemble=a),
}


# every LRA variant on top of the named set-ups: variant x statistic x params x reduction
for _v in ("siam", "arxiv"):
    for _s in ("max", "mean", "norm"):
        for _p in ("all", "weights"):
            for _r in ("flat", "layer_mean", "layer_max_ratio"):
                FAST_VS_PLAIN[f"lra_{_v}_{_s}_{_p}_{_r}"] = (
                    lambda net, a, v=_v, st=_s, pa=_p, r=_r: LRAnnealing(
                        net, ref="res", variant=v, statistic=st, params=pa, reduction=r, update_freq=1, assemble=a))


@pytest.mark.parametrize("kind", list(FAST_VS_PLAIN))
def test_assembled_gradient_equals_second_backward(kind):
    """The fast path (total's backward reuses the per-term gradients) changes nothing numerically."""
    results = []
    for assemble in (True, False):
        with paddle.utils.unique_name.guard():
            paddle.seed(0)
            net = PartlyConnected()
            bal = FAST_VS_PLAIN[kind](net, assemble)
            model = getattr(bal, "wrapper", net)
            opt = paddle.optimizer.SGD(0.05, parameters=model.parameters())
            grads, weights = [], []
            for step in range(4):
                total = bal(partly_connected_losses(model, step), step)
                total.backward()
                grads.append([p.grad.numpy().copy() for p in model.parameters() if p.grad is not None])
                weights.append(bal.weights)
                opt.step()
                opt.clear_grad()
            results.append((float(total), grads, weights))
    (t1, g1, w1), (t2, g2, w2) = results
    assert t1 == pytest.approx(t2, rel=1e-6)
    for step in range(4):
        assert len(g1[step]) == len(g2[step])
        for a, b in zip(g1[step], g2[step]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        for n in w1[step]:
            assert w1[step][n] == pytest.approx(w2[step][n], rel=1e-5)


@pytest.mark.parametrize("kind", ["lra_siam", "gradnorm", "ntk_grad_norm"])
def test_update_step_makes_no_host_synchronisation(kind, monkeypatch):
    net = PartlyConnected()
    bal = FAST_VS_PLAIN[kind](net, True)
    model = getattr(bal, "wrapper", net)
    bal(partly_connected_losses(model, 0), 0).backward()  # names fixed, state created

    def sync(*args, **kwargs):
        raise AssertionError("host synchronisation on the training hot path")

    for name in ("numpy", "item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(paddle.Tensor, name, sync, raising=False)
    for step in (2, 3):  # an update step and a plain step
        bal(partly_connected_losses(model, step), step).backward()
    with pytest.raises(AssertionError, match="synchronisation"):
        _ = bal.weights  # inspection does synchronise: the patch is live
    monkeypatch.undo()
    assert all(np.isfinite(v) for v in bal.weights.values())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_training_keeps_state_constant_and_allocates_nothing_per_step(kind):
    """Buffers never record a graph (a chain through them would grow every step), and after warm-up the
    allocator holds the same memory after each step."""
    model, bal = BUILDERS[kind](make_net())
    opt = paddle.optimizer.Adam(1e-3, parameters=model.parameters())

    def step(i):
        total = bal(losses_of(model, i), i)
        total.backward()
        opt.step()
        opt.clear_grad()

    for i in range(4):
        step(i)
    held = allocated()
    for i in range(4, 12):
        step(i)
        now = allocated()
        assert now <= held, f"step {i}: {now} > {held}"  # no growth (a PyLayer context may be freed late)
        held = max(now, held)
    for name, buf in bal.named_buffers():
        assert buf.stop_gradient, name


@pytest.mark.parametrize("kind", ["lra_siam", "gradnorm", "ntk_grad_norm"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 1024.0])
def test_gradients_already_accumulated_are_kept(kind, scale):
    """Gradient accumulation: what `.grad` held before an update call is still there after backward,
    unscaled when the caller scales the total (0.5: the Solver's accumulation; 1024: a GradScaler)."""
    grads = []
    for assemble in (True, False):
        with paddle.utils.unique_name.guard():
            net = make_net()
            model, bal = BUILDERS[kind](net)
            bal.assemble = assemble
        (net(paddle.ones([3, 2])) ** 2).mean().backward()  # an earlier micro-batch
        (bal(losses_of(model, 0), 0) * scale).backward()
        grads.append([p.grad.numpy().copy() for p in net.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


@pytest.mark.parametrize("kind", ["lra_siam", "gradnorm", "ntk_grad_norm"])
def test_a_failing_term_backward_gives_grad_back(kind):
    """A per-term backward that raises (a loss whose graph was freed) leaves `.grad` as it was found, and the
    next call works."""
    net = make_net()
    model, bal = BUILDERS[kind](net)
    losses = losses_of(model, 0)
    losses["bc"].backward()  # frees the graph of "bc", the term differentiated first; .grad holds its gradient
    before = [p.grad.numpy().copy() for p in net.parameters()]
    with pytest.raises(Exception, match="retain_graph"):
        bal(losses, 0)
    for p, b in zip(net.parameters(), before):
        np.testing.assert_array_equal(p.grad.numpy(), b)
    for p in net.parameters():
        p.clear_gradient(False)
    bal(losses_of(model, 2), 2).backward()
    w = bal.weights
    ref = paddle.grad(sum(w[n] * v for n, v in losses_of(model, 2).items()), net.parameters())
    for p, r in zip(net.parameters(), ref):
        np.testing.assert_allclose(p.grad.numpy(), r.numpy(), rtol=1e-5, atol=1e-6 * np.abs(r.numpy()).max())


def test_a_parameter_the_first_term_does_not_reach_keeps_its_earlier_gradient():
    """`.grad` held before the call is given back also where term 0 (differentiated last) leaves no gradient."""
    grads = []
    for assemble in (True, False):
        net = make_net()
        c = paddle.create_parameter([1], DTYPE, default_initializer=paddle.nn.initializer.Constant(0.7))
        bal = LRAnnealing(net, ref="res", update_freq=1, assemble=assemble)
        bal.add_parameters([c])
        params = net.parameters() + [c]
        for step in range(2):
            for p in params:
                (p * 0.5).sum().backward()  # an earlier micro-batch
            xr, xb = batch(step)
            bal({"res": (net(xr) ** 2).mean(), "bc": ((net(xb) - c) ** 2).mean()}, step).backward()
            grads.append([p.grad.numpy().copy() for p in params])
            for p in params:
                p.clear_gradient(False)
    for a, b in zip(grads[:2], grads[2:]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * np.abs(y).max())
    assert not np.allclose(grads[0][-1], 0.5)  # the prior 0.5 plus bc's gradient, not the prior alone


def test_model_cast_to_float64_after_an_update_gets_float64_gradients():
    """The buffer the gradient-writing hook keeps follows the model's dtype (and device)."""
    grads = []
    for assemble in (True, False):
        net = make_net()
        bal = LRAnnealing(net, ref="res", update_freq=1, assemble=assemble)
        bal(losses_of(net, 0), 0).backward()
        for p in net.parameters():
            p.clear_gradient()
        net.to(dtype="float64")
        x = paddle.rand([5, 2], dtype="float64")
        u = net(x)
        bal({"res": (u ** 2).mean(), "bc": ((u - 1.0) ** 2).mean()}, 1).backward()
        grads.append([p.grad.numpy() for p in net.parameters()])
    for a, b in zip(*grads):
        assert a.dtype == np.float64
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("assemble", [True, False])
def test_parameters_of_several_dtypes_get_their_own_gradients(assemble):
    """A float32 parameter added to a float64 net (SelfAdaptive weights built under the float32 default): the
    per-term gradients are one float64 matrix, each parameter gets its own gradient in its own dtype, and
    what `.grad` held before is kept (a flattening copy of mixed dtypes would reinterpret the bytes)."""
    net = make_net(dtype="float64")
    extra = paddle.create_parameter([3], dtype="float32", default_initializer=paddle.nn.initializer.Constant(0.5))
    bal = LRAnnealing(net, ref="res", update_freq=1, assemble=assemble)
    bal.add_parameters([extra])
    params = net.parameters() + [extra]

    def losses(step):
        xr, xb = batch(step, "float64")
        s = (extra.astype("float64") * paddle.to_tensor([1.0, 2.0, 3.0], dtype="float64")).sum()
        return {"res": (net(xr) ** 2).mean() * s, "bc": ((net(xb) - 5.0) ** 2).mean() + s ** 2}

    for step in range(3):
        sum((p * 0.25).sum() for p in params).backward()  # an earlier micro-batch: .grad = 0.25
        bal(losses(step), step).backward()
        w = bal.weights
        ref = paddle.grad(sum(w[n] * v for n, v in losses(step).items()), params)
        for p, r in zip(params, ref):
            assert p.grad.dtype == p.dtype
            np.testing.assert_allclose(p.grad.numpy() - 0.25, r.numpy(), rtol=1e-5, atol=1e-6 * np.abs(r.numpy()).max())
            p.clear_gradient(False)
        assert w["bc"] != pytest.approx(1.0)


def test_a_method_without_an_update_hook_is_refused_when_defined():
    from paddle_pinn_balance import Balancer

    with pytest.raises(TypeError, match=r"must define `update\(self, losses, G, state\)`"):
        type("NoHook", (Balancer,), {})
    type("OwnTotal", (Balancer,), {"_total": lambda self, values, update: None})  # fixed weights: fine
