"""The NTK fast path's recording is scoped (recording.py, _Intercept): only the recording thread's calls on the
recorded model's parameters are recorded; every other call passes through to what was installed at entry."""

import threading

import numpy as np
import paddle
from reference import DTYPE, make_net

from paddle_pinn_balance import expanded, recording
from paddle_pinn_balance.per_point import per_point_sq_grad_norms


def _points(n=6):
    return paddle.to_tensor(np.random.default_rng(1).uniform(-1, 1, (n, 2)), dtype=DTYPE)


def _kernel(pts):
    return lambda model: model(pts).reshape([-1])


def test_another_threads_calls_during_a_recording_are_not_recorded():
    net, other = make_net(seed=0), make_net(seed=0)
    w = net.parameters()[0]
    seen = {}

    def elsewhere():  # another thread, on the very parameter being recorded, while the kernel runs
        y = paddle.matmul(paddle.ones([1, w.shape[0]], dtype=w.dtype), w) * 2.0 + w.sum()
        seen["stop_gradient"], seen["value"] = y.stop_gradient, y.numpy()
        seen["grad"] = paddle.grad(y.sum(), w)[0].numpy()

    def kernel(model):
        t = threading.Thread(target=elsewhere)
        t.start()
        t.join()
        return _kernel(_points())(model)

    got, ran = per_point_sq_grad_norms(net, kernel, return_path=True)
    assert ran == "expanded"
    ref = per_point_sq_grad_norms(other, _kernel(_points()), path="loop")
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5)
    # an ordinary differentiable result: the parameter was not replaced by a recorded constant in that thread
    assert seen["stop_gradient"] is False
    expect = paddle.matmul(paddle.ones([1, w.shape[0]], dtype=w.dtype), w) * 2.0 + w.sum()
    np.testing.assert_allclose(seen["value"], expect.numpy(), rtol=1e-6)
    np.testing.assert_allclose(seen["grad"], np.full(w.shape, 2.0) + 1.0 * w.shape[1], rtol=1e-6)
    assert recording._ACTIVE is None


def test_calls_pass_through_to_what_was_installed_at_entry(monkeypatch):
    calls = []
    installed = paddle.add

    def counting_add(x, y, *args, **kwargs):
        calls.append(1)
        return installed(x, y, *args, **kwargs)

    monkeypatch.setattr(paddle, "add", counting_add)  # another library's patch, installed before the recording
    net = make_net(seed=0)
    pts = _points()

    def kernel(model):
        paddle.add(pts, pts)  # no parameter: passes through, to the patch
        return _kernel(pts)(model)

    _, ran = per_point_sq_grad_norms(net, kernel, return_path=True)
    assert ran == "expanded" and calls
    assert paddle.add is counting_add  # restored to the patch, not to the import-time function


def test_expanded_active_is_this_threads_recording():
    """``expanded._ACTIVE`` (read by ppsci/kernels.py): set in the recording thread only, while it records."""
    seen = {}

    def kernel(model):
        seen["here"] = expanded._ACTIVE is not None
        t = threading.Thread(target=lambda: seen.setdefault("other", expanded._ACTIVE))
        t.start()
        t.join()
        return _kernel(_points())(model)

    per_point_sq_grad_norms(make_net(seed=0), kernel, path="expanded")
    assert seen == {"here": True, "other": None} and expanded._ACTIVE is None
