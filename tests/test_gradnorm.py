import numpy as np
import paddle
import pytest
from reference import DTYPE, make_net, mse_and_grads, numpy_params

from paddle_pinn_balance import GradNorm
from paddle_pinn_balance.gradnorm import GradNormBalancer, shared_parameters

NAMES = ("res", "bc", "ic")


def make_data(seed=3):
    rng = np.random.default_rng(seed)
    return {n: (rng.uniform(-1, 1, (k, 2)), s * rng.normal(size=(k, 1)))
            for n, k, s in zip(NAMES, (10, 6, 4), (1.0, 20.0, 0.1))}


def paddle_losses(model, data):
    return {n: ((model(paddle.to_tensor(x, dtype=DTYPE)) - paddle.to_tensor(t, dtype=DTYPE)) ** 2).mean()
            for n, (x, t) in data.items()}


def numpy_terms(net, data):
    params = numpy_params(net)
    out = {n: mse_and_grads(params, x, t) for n, (x, t) in data.items()}
    return {n: v[0] for n, v in out.items()}, {n: v[1] for n, v in out.items()}


def reference_grad_norm(w, losses, initial, grads_W, alpha):
    """Chen et al. 2018, Algorithm 1, in numpy: (L_grad, dL_grad/dw) with the target held constant."""
    norms = np.array([np.linalg.norm(g) for g in grads_W])
    G = w * norms
    ratio = np.asarray(losses) / np.asarray(initial)
    r = ratio / ratio.mean()
    target = G.mean() * r ** alpha
    return np.abs(G - target).sum(), np.sign(G - target) * norms


def test_weight_and_network_gradients_match_algorithm_1():
    net = make_net()
    wrapper = GradNorm(net, n_loss=3, alpha=0.7)
    opt = paddle.optimizer.Adam(0.05, parameters=wrapper.parameters())
    data = make_data()
    initial = None
    for step in range(4):
        w = wrapper.get_weights().astype(np.float64)  # renormalised weights the call will use
        losses_np, grads = numpy_terms(net, data)
        if initial is None:
            initial = [losses_np[n] for n in NAMES]
        total = wrapper.aggregator(paddle_losses(wrapper, data), step)
        total.backward()
        l_grad, dw = reference_grad_norm(w, [losses_np[n] for n in NAMES], initial,
                                         [grads[n][-2] for n in NAMES], 0.7)
        np.testing.assert_allclose(wrapper.loss_weights.grad.numpy(), dw, rtol=1e-4)
        assert float(wrapper.aggregator.last_grad_norm_loss.numpy()) == pytest.approx(l_grad, rel=1e-4)
        assert float(total) == pytest.approx(sum(wi * losses_np[n] for wi, n in zip(w, NAMES)), rel=1e-5)
        # the network gets the gradient of sum_i w_i L_i only
        for p, *per_term in zip(net.parameters(), *(grads[n] for n in NAMES)):
            expected = sum(wi * g for wi, g in zip(w, per_term))
            np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-4, atol=1e-6)
        opt.step()
        opt.clear_grad()
    assert not np.allclose(wrapper.get_weights(), 1.0)


def test_renormalisation_after_optimizer_steps():
    net = make_net()
    wrapper = GradNorm(net, n_loss=3, alpha=1.5)
    opt = paddle.optimizer.SGD(0.5, parameters=wrapper.parameters())
    data = make_data()
    for step in range(0, 10, 2):
        wrapper.aggregator(paddle_losses(wrapper, data), step).backward()
        opt.step()
        opt.clear_grad()
        assert wrapper.loss_weights.numpy().sum() != pytest.approx(3.0)  # the optimizer broke it ...
        assert wrapper.get_weights().sum() == pytest.approx(3.0, rel=1e-6)  # ... reported renormalised
        wrapper.aggregator(paddle_losses(wrapper, data), step + 1)  # ... and renormalised in place at the next call
        assert wrapper.loss_weights.numpy().sum() == pytest.approx(3.0, rel=1e-6)
    assert sum(wrapper.aggregator.weights.values()) == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_calls_of_one_step_see_the_same_weights(dtype):
    """Weights an optimizer step left off sum(w) = T are renormalised at the first call of the next step, once:
    the later calls of that step (an L-BFGS closure, accumulated micro-batches) see them bit for bit (T w / sum(w)
    of renormalised weights could move them by an ulp), and ``get_weights()`` reports exactly them."""
    wrapper = GradNorm(make_net(dtype=dtype), n_loss=3)
    agg = wrapper.aggregator
    data = make_data()

    def losses():
        return {n: ((wrapper(paddle.to_tensor(x, dtype=dtype)) - paddle.to_tensor(t, dtype=dtype)) ** 2).mean()
                for n, (x, t) in data.items()}

    rng = np.random.default_rng(0)
    for step in range(20):
        raw = rng.uniform(0.2, 2.0, 3).astype(dtype)
        agg.loss_weights.set_value(raw)  # as an optimizer step leaves them
        agg(losses(), step)
        once = agg.loss_weights.numpy().copy()
        np.testing.assert_allclose(once, 3.0 * raw / raw.sum(), rtol=1e-6)
        for _ in range(2):
            agg(losses(), step)
            np.testing.assert_array_equal(agg.loss_weights.numpy(), once)
        np.testing.assert_array_equal(agg.get_weights(), once)  # reported as used


def test_weights_keep_their_value_between_updates():
    """update_freq 3 with Adam: between updates the weights get no gradient (None), so Adam's momentum
    does not move them; every call uses weights summing to n_loss."""
    wrapper = GradNorm(make_net(), n_loss=3, alpha=1.5, update_freq=3)
    opt = paddle.optimizer.Adam(0.05, parameters=wrapper.parameters())
    data = make_data()
    for step in range(9):
        before = wrapper.loss_weights.numpy().copy()
        wrapper.aggregator(paddle_losses(wrapper, data), step).backward()
        assert wrapper.loss_weights.numpy().sum() == pytest.approx(3.0, rel=1e-6)  # renormalised when used
        if step % 3:
            assert wrapper.loss_weights.grad is None
            if step % 3 == 2:  # the call after the one after an update: nothing moved the weights
                np.testing.assert_array_equal(wrapper.loss_weights.numpy(), before)
        opt.step()
        opt.clear_grad()
    assert not np.allclose(wrapper.get_weights(), 1.0)


@pytest.mark.parametrize("form", ["list", "dict", "tensor"])
def test_get_grad_norm_loss_writes_weight_gradient(form):
    net = make_net()
    wrapper = GradNorm(net, n_loss=3, alpha=0.3, weight_attr=[0.5, 2.0, 0.5])
    data = make_data()
    losses_np, grads = numpy_terms(net, data)
    losses = paddle_losses(wrapper, data)
    total = (wrapper.loss_weights * paddle.stack([losses[n] for n in NAMES])).sum()
    total.backward(retain_graph=True)  # puts dL/dw = L_i into loss_weights.grad, which is then replaced
    given = {"list": [losses[n] for n in NAMES], "dict": losses,
             "tensor": paddle.stack([losses[n] for n in NAMES])}[form]
    l_grad = wrapper.get_grad_norm_loss(given)
    # first call: L(0) = L(t), r_i = 1, target = mean G
    ref_l, ref_dw = reference_grad_norm(np.array([0.5, 2.0, 0.5]), [losses_np[n] for n in NAMES],
                                        [losses_np[n] for n in NAMES], [grads[n][-2] for n in NAMES], 0.3)
    assert float(l_grad) == pytest.approx(ref_l, rel=1e-5)
    np.testing.assert_allclose(wrapper.loss_weights.grad.numpy(), ref_dw, rtol=1e-5)
    # with no gradient yet, the gradient is created
    fresh = GradNorm(make_net(), n_loss=3)
    fresh.get_grad_norm_loss(paddle_losses(fresh, data))
    assert fresh.loss_weights.grad is not None and fresh.loss_weights.grad.shape == [3]


def test_initial_losses_and_reset():
    net = make_net()
    agg = GradNormBalancer(net, n_loss=3, loss_names=NAMES)
    data = make_data()
    first = paddle_losses(net, data)
    agg(first, 0)
    np.testing.assert_allclose(agg.initial_losses.numpy(), [float(first[n]) for n in NAMES], rtol=1e-6)
    data2 = make_data(seed=9)
    second = paddle_losses(net, data2)
    agg(second, 1)  # an update call consumes the losses' graph, like a backward: recompute them below
    np.testing.assert_allclose(agg.initial_losses.numpy(), [float(first[n]) for n in NAMES], rtol=1e-6)
    agg.reset_initial_losses()
    agg(paddle_losses(net, data2), 2)
    np.testing.assert_allclose(agg.initial_losses.numpy(), [float(second[n]) for n in NAMES], rtol=1e-6)


class TwoHeads(paddle.nn.Layer):
    """The GradNorm paper's toy net: a shared ReLU trunk and one linear head per task."""

    def __init__(self, n_in, hidden, n_out, tasks):
        super().__init__()
        layers = []
        for a in [n_in] + [hidden] * 3:
            layers += [paddle.nn.Linear(a, hidden), paddle.nn.ReLU()]
        self.trunk = paddle.nn.Sequential(*layers)
        self.heads = paddle.nn.LayerList([paddle.nn.Linear(hidden, n_out) for _ in range(tasks)])
        self.marker = "toy"

    def get_last_shared_layer(self):
        return self.trunk[-2]

    def describe(self):
        return f"{self.marker} net"

    def forward(self, x):
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def test_wrapper_forwards_attributes_and_forward():
    net = TwoHeads(4, 8, 2, 2)
    wrapper = GradNorm(net, n_loss=2, alpha=0.12)
    x = paddle.rand([3, 4])
    for a, b in zip(wrapper(x), net(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert wrapper.marker == "toy" and wrapper.describe() == "toy net"
    assert wrapper.trunk is net.trunk and wrapper.heads is net.heads
    assert wrapper.get_last_shared_layer() is net.trunk[-2]
    assert [id(p) for p in wrapper.aggregator._shared] == [id(net.trunk[-2].weight)]
    assert any(p is wrapper.loss_weights for p in wrapper.parameters())
    assert set(wrapper.state_dict()) >= {"net.trunk.0.weight", "aggregator.loss_weights"}
    with pytest.raises(AttributeError):
        _ = wrapper.no_such_attribute


def test_shared_layer_resolution():
    net = make_net()
    assert shared_parameters(net)[0] is net[-1].weight  # default: the last weight matrix
    assert shared_parameters(net, ["2.weight"])[0] is net[2].weight  # by name
    assert shared_parameters(net, [net[0].weight])[0] is net[0].weight  # by parameter
    with pytest.raises(ValueError, match="nope"):
        shared_parameters(net, ["nope"])

    class OnlyVector(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.scale = self.create_parameter([3])

        def forward(self, x):
            return x * self.scale

    with pytest.raises(ValueError, match="last shared layer"):
        GradNorm(OnlyVector(), n_loss=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_loss=0), "n_loss"),
    (dict(n_loss=2, alpha=-1.0), "alpha"),
    (dict(n_loss=2, weight_attr=[1.0, 2.0, 3.0]), "weight_attr"),
    (dict(n_loss=2, weight_attr=-1.0), "weight_attr"),
    (dict(), "n_loss"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradNorm(make_net(), **kwargs)


def test_wrong_number_of_losses():
    wrapper = GradNorm(make_net(), n_loss=2)
    losses = paddle_losses(wrapper, make_data())
    with pytest.raises(ValueError, match="n_loss=2"):
        wrapper.aggregator(losses, 0)
    with pytest.raises(ValueError, match="expected 2 losses"):
        wrapper.get_grad_norm_loss([losses["res"]])


def test_toy_problem_raises_the_small_scale_task_weight():
    """GradNorm paper Sec. 4: two regression tasks of scales sigma = (1, 100), alpha = 0.12."""
    rng = np.random.default_rng(0)
    n_in, n_out, n = 25, 10, 200
    B = rng.normal(0, 10, (n_in, n_out))
    eps = [rng.normal(0, 3.5, (n_in, n_out)) for _ in range(2)]
    x = rng.normal(size=(n, n_in))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ys = [s * np.tanh(x @ (B + e)) for s, e in zip((1.0, 100.0), eps)]
    paddle.seed(0)
    wrapper = GradNorm(TwoHeads(n_in, 32, n_out, 2), n_loss=2, alpha=0.12)
    opt = paddle.optimizer.Adam(1e-3, parameters=wrapper.parameters())
    xt = paddle.to_tensor(x, dtype=DTYPE)
    yt = [paddle.to_tensor(y, dtype=DTYPE) for y in ys]
    for step in range(300):
        out = wrapper(xt)
        losses = {f"task{i}": ((o - y) ** 2).mean() for i, (o, y) in enumerate(zip(out, yt))}
        wrapper.aggregator(losses, step).backward()
        opt.step()
        opt.clear_grad()
    w = wrapper.aggregator.weights
    assert w["task0"] > 1.0 > w["task1"]
    assert w["task0"] + w["task1"] == pytest.approx(2.0, rel=1e-5)
