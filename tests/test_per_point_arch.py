"""The fast (recorded) per-point path on the architectures PINN users train, against the exact per-point loop.

For every architecture: the network output and a PDE residual with first and second derivatives
(``paddle.grad(create_graph=True)``), 16 points; the fast path's per-point squared norms must equal the
loop's, and the path taken is asserted: fast where every parameter use is recorded, the loop (with a
reason) where a parameter enters through an operation the fast path does not record, or the kernel mixes
points.
"""

import numpy as np
import paddle
import pytest

from paddle_pinn_balance import expanded, recording
from paddle_pinn_balance.per_point import per_point_sq_grad_norms
from paddle_pinn_balance.problems import MLP as ProblemMLP
from paddle_pinn_balance.problems.nets import sequential_mlp

try:
    import ppsci
except ImportError:  # pragma: no cover - the plain-paddle cases run without PaddleScience
    ppsci = None

N = 16
W = 8  # hidden width


def _dtype():
    return paddle.get_default_dtype()


def _rtol():
    return 1e-4 if _dtype() == "float32" else 1e-9


def _points(n=N, seed=3):
    return paddle.to_tensor(np.random.default_rng(seed).uniform(-1, 1, size=(n, 2)).astype(_dtype()))


def _is_arch(model):
    return ppsci is not None and isinstance(model, ppsci.arch.Arch)


def _u(model, x, y):
    """The network output at columns ``x``, ``y`` (``[N, 1]`` each): dict in / dict out for ppsci models."""
    if _is_arch(model):
        return model({"x": x, "y": y})["u"]
    return model(paddle.concat([x, y], axis=1))


def output_kernel(pts):
    return lambda model: _u(model, pts[:, :1], pts[:, 1:])


def residual_kernel(pts, a=(0.7, -0.4), c=0.5):
    """``a . grad u + c u + laplacian u`` (first and second derivatives in each input column)."""
    def kernel(model):
        x, y = pts[:, :1].detach(), pts[:, 1:].detach()
        x.stop_gradient = False
        y.stop_gradient = False
        u = _u(model, x, y)
        u_x, u_y = paddle.grad(u.sum(), [x, y], create_graph=True)
        u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0]
        u_yy = paddle.grad(u_y.sum(), y, create_graph=True)[0]
        return a[0] * u_x + a[1] * u_y + c * u + u_xx + u_yy
    return kernel


KERNELS = {"output": output_kernel, "residual": residual_kernel}


def _perturb(model, seed=7):
    """Move every trainable parameter off its initial value (zero biases, PirateNet's alpha = 0, ...) so
    that each one reaches the kernel's values."""
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        if not p.stop_gradient:
            p.set_value(np.asarray(p.numpy() + rng.normal(0, 0.2, size=p.shape), dtype=_dtype()))
    return model


def _compare(model, make_kernel, expect="expanded", **kw):
    pts = _points()
    fast, ran = per_point_sq_grad_norms(model, make_kernel(pts), return_path=True, **kw)
    loop, ran_loop = per_point_sq_grad_norms(model, make_kernel(pts), path="loop", return_path=True)
    assert (ran, ran_loop) == (expect, "loop"), ran.reason
    assert list(fast.shape) == [N] and float(loop.numpy().min()) > 0
    np.testing.assert_allclose(fast.numpy(), loop.numpy(), rtol=_rtol())
    return ran


# ----------------------------------------------------------------------------- plain paddle.nn networks


class SinNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.a = paddle.nn.Linear(2, W)
        self.b = paddle.nn.Linear(W, 1)

    def forward(self, x):
        return self.b(paddle.sin(self.a(x)))


class ResidualNet(paddle.nn.Layer):
    """h + tanh(L h) residual blocks between an input and an output map."""

    def __init__(self, blocks=2):
        super().__init__()
        self.inp = paddle.nn.Linear(2, W)
        self.blocks = paddle.nn.LayerList([paddle.nn.Linear(W, W) for _ in range(blocks)])
        self.out = paddle.nn.Linear(W, 1)

    def forward(self, x):
        h = paddle.tanh(self.inp(x))
        for lin in self.blocks:
            h = h + paddle.tanh(lin(h))
        return self.out(h)


class FourierNet(paddle.nn.Layer):
    """Fourier features [cos(x B), sin(x B)]; B a fixed buffer (``@``) or a parameter (``paddle.matmul``)."""

    def __init__(self, trainable):
        super().__init__()
        b = paddle.to_tensor(np.random.default_rng(0).normal(0, 1.0, size=(2, W // 2)).astype(_dtype()))
        if trainable:
            self.B = self.create_parameter([2, W // 2], default_initializer=paddle.nn.initializer.Assign(b))
        else:
            self.register_buffer("B", b)
        self.trainable = trainable
        self.mlp = paddle.nn.Sequential(paddle.nn.Linear(W, W), paddle.nn.Tanh(), paddle.nn.Linear(W, 1))

    def forward(self, x):
        z = paddle.matmul(x, self.B) if self.trainable else x @ self.B
        return self.mlp(paddle.concat([paddle.cos(z), paddle.sin(z)], axis=1))


class ScaledNet(paddle.nn.Layer):
    """Trainable scalars and vectors in elementwise products and differences, and tensors derived from
    parameters alone: ``1 - alpha`` (a PirateNet-style gate), ``1 / (s * s)``."""

    def __init__(self):
        super().__init__()
        self.a = paddle.nn.Linear(2, W)
        self.b = paddle.nn.Linear(W, 1)
        one = paddle.nn.initializer.Constant(1.0)
        self.scale = self.create_parameter([W], default_initializer=one)
        self.alpha = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.3))
        self.s = self.create_parameter([], default_initializer=one)
        self.shift = self.create_parameter([1, W], default_initializer=one)

    def forward(self, x):
        h = self.a(x)
        g = paddle.tanh(h * self.scale) * (1.0 / (self.s * self.s))
        h = self.alpha * g + (1 - self.alpha) * (h - self.shift)
        return self.b(paddle.tanh(h))


class DivNet(SinNet):
    """Points' rows divided by a parameter, and a parameter divided by the rows."""

    def __init__(self):
        super().__init__()
        self.s = self.create_parameter([W], default_initializer=paddle.nn.initializer.Constant(1.5))
        self.t = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.5))

    def forward(self, x):
        h = self.a(x)
        return self.b(paddle.sin(h / self.s) + self.t / (2.0 + paddle.tanh(h)))


def gradient_kernel(pts, a=(0.7, -0.4), c=0.5):
    """``a . grad u + c u`` (first derivatives only: Paddle has no third derivative of a division)."""
    def kernel(model):
        x, y = pts[:, :1].detach(), pts[:, 1:].detach()
        x.stop_gradient = False
        y.stop_gradient = False
        u = _u(model, x, y)
        u_x, u_y = paddle.grad(u.sum(), [x, y], create_graph=True)
        return a[0] * u_x + a[1] * u_y + c * u
    return kernel


class ExpScaleNet(SinNet):
    """A parameter used through ``paddle.exp`` (not recorded): the loop must run."""

    def __init__(self):
        super().__init__()
        self.log_s = self.create_parameter([W], default_initializer=paddle.nn.initializer.Constant(0.1))

    def forward(self, x):
        return self.b(paddle.sin(self.a(x) * paddle.exp(self.log_s)))


class SlicedNet(SinNet):
    """A parameter indexed in the forward (not recorded): the loop must run."""

    def forward(self, x):
        return self.b(paddle.sin(paddle.matmul(x, self.a.weight[:, :W]) + self.a.bias))


class CentredNet(SinNet):
    """Subtracts the mean over points (mixes points, no parameter in it): detected by the point check."""

    def forward(self, x):
        h = paddle.sin(self.a(x))
        return self.b(h - h.mean(axis=0, keepdim=True))


def _seeded(make):
    def build():
        paddle.seed(1)
        return _perturb(make())
    return build


PLAIN = {
    "sequential": lambda: paddle.nn.Sequential(paddle.nn.Linear(2, W), paddle.nn.Tanh(), paddle.nn.Linear(W, W),
                                               paddle.nn.Tanh(), paddle.nn.Linear(W, 1)),
    "custom_sin": SinNet,
    "residual_blocks": ResidualNet,
    "fourier_fixed": lambda: FourierNet(False),
    "fourier_trainable": lambda: FourierNet(True),
    "elementwise_params": ScaledNet,
    "problems_mlp": lambda: ProblemMLP((2, W, W, 1), mean=(0.1, -0.2), std=(0.5, 2.0)),
    "sequential_ntk_param": lambda: sequential_mlp((2, W, W, 1), mean=(0.0, 0.1), std=(1.0, 0.5),
                                                   parameterisation="ntk"),
}

FALLBACK = {
    "exp_of_parameter": (ExpScaleNet, "log_s"),
    "indexed_parameter": (SlicedNet, "a.weight"),
    "mean_over_points": (CentredNet, "mix points"),
}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("arch", list(PLAIN))
def test_plain_paddle_networks_take_the_fast_path(arch, kernel):
    _compare(_seeded(PLAIN[arch])(), KERNELS[kernel])


@pytest.mark.parametrize("kernel", [output_kernel, gradient_kernel], ids=["output", "gradient"])
def test_division_by_and_of_parameters(kernel):
    _compare(_seeded(DivNet)(), kernel)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("arch", list(FALLBACK))
def test_unrecorded_uses_and_mixed_points_fall_back_with_a_reason(arch, kernel):
    make, reason = FALLBACK[arch]
    ran = _compare(_seeded(make)(), KERNELS[kernel], expect="loop")
    assert reason in ran.reason
    with pytest.raises(ValueError, match="fast path|mix points"):
        per_point_sq_grad_norms(_seeded(make)(), KERNELS[kernel](_points()), path="expanded")


# ----------------------------------------------------------------------------- PaddleScience architectures


def _ppsci_archs():
    if ppsci is None:
        return {}
    keys, out = ("x", "y"), ("u",)
    mlp, rwf = ppsci.arch.MLP, {"mean": 0.5, "std": 0.1}
    four = {"dim": W, "scale": 1.0}
    archs = {
        "mlp": lambda: mlp(keys, out, 2, W),
        "mlp_skip_connection": lambda: mlp(keys, out, 4, W, skip_connection=True),
        "mlp_weight_norm": lambda: mlp(keys, out, 2, W, weight_norm=True),
        "mlp_random_weight": lambda: mlp(keys, out, 2, W, random_weight=rwf),
        "mlp_fourier": lambda: mlp(keys, out, 2, W, fourier=four),
        "mlp_periods_fixed": lambda: mlp(keys, out, 2, W, periods={"x": (2.0, False)}),
        "mlp_periods_trainable": lambda: mlp(keys, out, 2, W, periods={"x": (2.0, True)}),
        "mlp_every_option": lambda: mlp(keys, out, 3, W, skip_connection=True, random_weight=rwf, fourier=four,
                                        periods={"y": (3.0, True)}),
        "mlp_silu": lambda: mlp(keys, out, 2, W, activation="silu"),
        "mlp_siren": lambda: mlp(keys, out, 2, W, activation="siren"),
        "modified_mlp": lambda: ppsci.arch.ModifiedMLP(keys, out, 2, W),
        "modified_mlp_options": lambda: ppsci.arch.ModifiedMLP(keys, out, 3, W, skip_connection=True,
                                                               weight_norm=True, fourier=four,
                                                               periods={"x": (2.0, True)}),
    }
    if hasattr(ppsci.arch, "PirateNet"):
        archs["piratenet"] = lambda: ppsci.arch.PirateNet(keys, out, 2, W, fourier=four)
        archs["piratenet_random_weight"] = lambda: ppsci.arch.PirateNet(keys, out, 2, W, fourier=four,
                                                                        random_weight=rwf, periods={"y": (3.0, True)})
    return archs


PPSCI = _ppsci_archs()
needs_ppsci = pytest.mark.skipif(ppsci is None, reason="PaddleScience is not installed")


def _mlp_options():
    """The keyword options of the installed ppsci.arch.MLP (to notice one that this file does not cover)."""
    import inspect

    return set(inspect.signature(ppsci.arch.MLP.__init__).parameters) - {"self"}


@needs_ppsci
def test_every_installed_mlp_option_is_covered():
    covered = {"input_keys", "output_keys", "num_layers", "hidden_size", "activation", "skip_connection",
               "weight_norm", "periods", "fourier", "random_weight", "input_dim", "output_dim"}
    assert _mlp_options() <= covered, _mlp_options() - covered


@needs_ppsci
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("arch", list(PPSCI))
def test_paddlescience_architectures_take_the_fast_path(arch, kernel):
    _compare(_seeded(PPSCI[arch])(), KERNELS[kernel])


@needs_ppsci
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("activation", ["stan", "swish"])
def test_paddlescience_learnable_activations_take_the_fast_path(activation, kernel):
    """ppsci's learnable activations: Stan's per-neuron slope enters through ``paddle.broadcast_to(beta,
    x.shape)`` (recorded as ``ones * beta``), Swish's scalar as ``beta * x``; exact against the loop."""
    model = _seeded(lambda: ppsci.arch.MLP(("x", "y"), ("u",), 2, W, activation=activation))()
    _compare(model, KERNELS[kernel])


class BroadcastNet(SinNet):
    """A parameter broadcast to a shape without the points' rows (``[1, W]``): not a per-point use."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.s = self.create_parameter([W], default_initializer=paddle.nn.initializer.Constant(1.5))

    def forward(self, x):
        h = self.a(x)
        return self.b(paddle.tanh(h) * paddle.expand(self.s, self.shape or h.shape))


@pytest.mark.parametrize("shape, expect", [(None, "expanded"), ([1, W], "loop")])
def test_broadcast_parameter_rows_or_fallback(shape, expect):
    ran = _compare(_seeded(lambda: BroadcastNet(shape))(), residual_kernel, expect=expect)
    if expect == "loop":
        assert "used on rows [1, 8]" in ran.reason


@needs_ppsci
def test_piratenet_with_ppsci_autodiff_and_forward_tensor():
    """Derivatives through ppsci.autodiff (its cache included) and the model's forward_tensor called directly."""
    if not hasattr(ppsci.arch, "PirateNet"):
        pytest.skip("no PirateNet in this PaddleScience")
    from ppsci.autodiff import clear, hessian, jacobian

    model = _seeded(lambda: ppsci.arch.PirateNet(("x", "y"), ("u",), 2, W, fourier={"dim": W, "scale": 1.0}))()
    pts = _points()

    def kernel(m):
        x, y = pts[:, :1].detach(), pts[:, 1:].detach()
        x.stop_gradient = False
        y.stop_gradient = False
        try:
            u = m.forward_tensor(m.fourier_emb(paddle.concat([x, y], axis=1)))
            return hessian(u, x) + hessian(u, y) + 0.3 * jacobian(u, x) + u
        finally:
            clear()

    fast, ran = per_point_sq_grad_norms(model, kernel, return_path=True)
    loop = per_point_sq_grad_norms(model, kernel, path="loop")
    assert ran == "expanded", ran.reason
    np.testing.assert_allclose(fast.numpy(), loop.numpy(), rtol=_rtol())


# ----------------------------------------------------------------------------- mechanism


def test_slices_of_formed_gradients_agree():
    """Weight normalisation forms per-point gradients (derived weights): slices of 5 points = all at once."""
    model = _seeded(ScaledNet)()
    kernel = residual_kernel(_points())
    whole = per_point_sq_grad_norms(model, kernel, chunk_size=None).numpy()
    sliced = per_point_sq_grad_norms(model, kernel, chunk_size=5).numpy()
    np.testing.assert_allclose(sliced, whole, rtol=1e-6 if _dtype() == "float32" else 1e-12)


def test_kernel_that_mixes_points_is_detected_once_then_trusted():
    net = _seeded(PLAIN["sequential"])()
    pts = _points()

    def centred(model):  # a kernel that mixes points
        u = model(pts)
        return u - u.mean()

    ran = per_point_sq_grad_norms(net, centred, return_path=True)[1]
    assert ran == "loop" and "mix points" in ran.reason
    # "never": no check, the (wrong) fast-path values come back; documented, for kernels known to be pointwise
    fast, ran = per_point_sq_grad_norms(net, centred, return_path=True, check_points="never")
    loop = per_point_sq_grad_norms(net, centred, path="loop")
    assert ran == "expanded" and not np.allclose(fast.numpy(), loop.numpy(), rtol=1e-3)
    # "first": checked at the first evaluation of a kernel with a model only
    pointwise = output_kernel(pts)
    assert per_point_sq_grad_norms(net, pointwise, return_path=True)[1] == "expanded"
    assert pointwise in expanded._CHECKED and net in expanded._CHECKED[pointwise]


def test_rows_other_than_the_points_fall_back():
    net = _seeded(SinNet)()
    pts = _points()

    def extra_rows(model):  # a second call on 3 rows, reduced to a scalar
        return model(pts) + model(pts[:3]).sum()

    ran = per_point_sq_grad_norms(net, extra_rows, return_path=True)[1]
    assert ran == "loop" and "rows" in ran.reason


def test_interception_is_removed_after_every_call():
    from paddle.base.framework import EagerParamBase

    before = (dict(EagerParamBase.__dict__), paddle.matmul, paddle.nn.functional.linear, paddle.add)
    net = _seeded(ScaledNet)()

    def failing(model):
        model(_points())
        raise RuntimeError("the kernel's own error")

    per_point_sq_grad_norms(net, residual_kernel(_points()))
    with pytest.raises(RuntimeError, match="own error"):
        per_point_sq_grad_norms(net, failing)
    after = (dict(EagerParamBase.__dict__), paddle.matmul, paddle.nn.functional.linear, paddle.add)
    assert after == before and recording._ACTIVE is None


def test_fallback_draws_again_and_rewinds_no_random_state():
    """A sampling kernel on a model that falls back: the global random states are not rewound (another thread
    may draw from them), so the loop's kernel call draws the next points, and the loop's result is that of
    those points; the global state advances as by two kernel calls."""
    net = _seeded(ExpScaleNet)()

    def sampler(model):
        return output_kernel(paddle.rand([6, 2], dtype=_dtype()) * 2 - 1)(model)

    paddle.seed(5)
    got, ran = per_point_sq_grad_norms(net, sampler, return_path=True)
    after = paddle.rand([1]).numpy()
    paddle.seed(5)
    paddle.rand([6, 2], dtype=_dtype())  # the fast attempt's draw
    ref = per_point_sq_grad_norms(net, sampler, path="loop").numpy()
    assert ran == "loop"
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)
    np.testing.assert_array_equal(paddle.rand([1]).numpy(), after)
