r"""Per-point squared gradient norms :math:`\|\partial f(x_p) / \partial\theta\|^2`, without one backward per point.

A *kernel* is a callable ``kernel(model) -> Tensor`` of shape ``[N]`` or ``[N, 1]``: the per-point quantity
:math:`f(x_p)` of one loss term (the network output at boundary points, the PDE residual at collocation
points, ...). It closes over its points or draws them from a sampler, and evaluates the network (``model(x)``,
a dict in / dict out PaddleScience model, ``model.forward_tensor(x)``, ...; derivatives in ``x`` with
``paddle.grad(..., create_graph=True)`` or ``ppsci.autodiff`` are fine).

Two exact paths compute :math:`s_p = \|\partial f(x_p)/\partial\theta\|^2` over all trainable parameters:

* ``"expanded"`` (fast; :mod:`paddle_pinn_balance.expanded`): the kernel runs once on the model itself while
  every operation that takes a parameter is recorded (matrix products: ``nn.Linear``, ``F.linear``,
  ``paddle.matmul``, ``@``; elementwise ``+ - * /`` with broadcasting; operations on parameters alone such
  as ``1 - alpha``, ``g * v``, ``v / v.norm(axis=0)``), including the uses inside the derivative graphs the
  kernel builds. One backward then gives each use's adjoint per point, and the per-point squared norms follow
  from outer-product ("ghost") norms, without a copy of the parameters per point. Any composition of these
  qualifies: skip connections, Fourier and periodic feature embeddings, weight normalisation, random weight
  factorisation, gated (modified) MLPs, PirateNet blocks, custom layers. Its cost is about that of a
  training step on the same points (``design/performance.md``).
* ``"loop"`` (any model, any kernel): one kernel evaluation, then one ``paddle.grad`` per point.

``path="auto"`` takes the fast path where it is exact and the loop otherwise; the returned :class:`Path`
says which ran and why. The fast path checks, and falls back when:

* a parameter reaches the kernel's values through an operation it does not record (indexing, ``paddle.exp``
  of a parameter, ``model.parameters()`` in the kernel, a layer implemented by one fused operation such as
  ``F.layer_norm``): the parameter is named;
* a parameter is used on another number of rows than the kernel has values (a model called on ``2N`` rows
  for ``N`` values);
* the kernel or the model mixes points (a mean over points, batch normalisation): a second backward, at the
  first evaluation of each kernel with each model (``check_points``).

The fast path needs entry ``p`` of the kernel to depend on row ``p`` of the model's inputs only (true of
residual, boundary and initial terms); the point check above verifies it. Patching: while a kernel runs on
the fast path, ``paddle.matmul``, ``paddle.add`` / ``subtract`` / ``multiply`` / ``divide`` /
``broadcast_to`` / ``expand``, ``paddle.nn.functional.linear`` and the arithmetic operators of
``Parameter`` are replaced by recording versions (restored afterwards, also on errors); only the recording
thread's calls on the model's parameters are recorded, every other call passes through to what was installed
when the recording began (:mod:`paddle_pinn_balance.recording`).
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from . import expanded
from .balancer import check_choice, check_int
from .expanded import Unsupported as _Unsupported
from .gradients import trainable_parameters

__all__ = ["ELEMENTWISE", "PATHS", "Path", "per_point_sq_grad_norms", "register_elementwise", "supports_expansion"]

PATHS = ("auto", "expanded", "loop")

#: Parameter-free layers applied entry by entry; the expanded path calls them unchanged on ``[rows, width]``.
ELEMENTWISE = {
    paddle.nn.Tanh, paddle.nn.Sigmoid, paddle.nn.ReLU, paddle.nn.GELU, paddle.nn.Silu, paddle.nn.Swish,
    paddle.nn.Softplus, paddle.nn.ELU, paddle.nn.SELU, paddle.nn.CELU, paddle.nn.LeakyReLU, paddle.nn.Mish,
    paddle.nn.Hardtanh, paddle.nn.Softsign, paddle.nn.Tanhshrink, paddle.nn.LogSigmoid, paddle.nn.Identity,
}


def register_elementwise(layer_type: type) -> type:
    """Declare a parameter-free layer class elementwise (usable as a decorator), e.g. a ``Sin`` activation."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, paddle.nn.Layer)):
        raise ValueError(f"expected a paddle.nn.Layer subclass; got {layer_type!r}")
    ELEMENTWISE.add(layer_type)
    return layer_type


def supports_expansion(model) -> bool:
    """Whether the fast path may apply to ``model`` (any ``paddle.nn.Layer``): whether it does is decided when
    a kernel runs (every parameter use recorded, one row per point), else the exact loop runs."""
    return isinstance(model, paddle.nn.Layer)


class Path(str):
    """The path that ran, ``"expanded"`` or ``"loop"`` (a ``str``, equal to those strings); ``reason`` says why
    the fast path did not run (``None`` on the fast path)."""

    reason: str | None = None

    def __new__(cls, value: str, reason: str | None = None):
        out = super().__new__(cls, value)
        out.reason = reason
        return out


class _BadKernel(ValueError):
    """The kernel's output is not one value per point (raised on either path)."""


def _as_vector(out, name: str, dtype=None) -> paddle.Tensor:
    """The kernel's values as ``[N]``; float64 values of a model of parameters' dtype ``dtype`` (float32: a
    float64 forcing term added to the residual) are cast to ``dtype``: their per-point gradients are the
    model's, and the fast path's checks work in the model's precision."""
    if not isinstance(out, paddle.Tensor):
        raise _BadKernel(f"kernel {name!r} must return a paddle.Tensor of shape [N] or [N, 1]; "
                         f"got {type(out).__name__}")
    shape = list(out.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise _BadKernel(f"kernel {name!r} must return one value per point, shape [N] or [N, 1]; got shape {shape}")
    out = out.reshape([-1])
    if dtype is not None and out.dtype == paddle.float64 and dtype != paddle.float64:
        out = out.astype(dtype)  # wider than the model: its extra digits are not the model's
    return out


def _loop(model, kernel, name, params):
    """Per-point squared norms, one ``paddle.grad`` per point (exact for any model and kernel)."""
    f = _as_vector(kernel(model), name, params[0].dtype if params else None)
    n = int(f.shape[0])
    if f.stop_gradient:
        return paddle.zeros([n], dtype=f.dtype)
    out = []
    for p in range(n):
        grads = paddle.grad([f[p]], params, retain_graph=p < n - 1, allow_unused=True)
        out.append(paddle.add_n([(g * g).sum().astype(f.dtype) for g in grads if g is not None])
                   if any(g is not None for g in grads) else paddle.zeros([], dtype=f.dtype))
    return paddle.stack(out)


def _names(model) -> dict:
    try:
        return {id(p): n for n, p in model.named_parameters()}
    except Exception:  # noqa: BLE001 - names are for messages only
        return {}


def per_point_sq_grad_norms(
    model: paddle.nn.Layer,
    kernel: Callable,
    chunk_size: int | None = 1024,
    path: str = "auto",
    name: str = "kernel",
    return_path: bool = False,
    check_points: str = "first",
):
    r""":math:`s_p = \|\partial f(x_p)/\partial\theta\|_2^2` for every point of ``kernel``, shape ``[N]``.

    :math:`\theta` is every trainable parameter of ``model`` (weights and biases), so
    :math:`\sum_p s_p` is the trace of the term's NTK block.

    Args:
        model: the network (a ``paddle.nn.Layer``).
        kernel: ``kernel(model) -> Tensor[N] or [N, 1]`` (see the module docstring), called with ``model``
            itself: once, or twice where the fast path falls back. The global random states (Paddle's, NumPy's,
            Python's) are never saved or restored here (another thread may be drawing from them): a kernel that
            samples its points draws again for the loop, whose points are then the ones used (the fast path's
            result is discarded).
        chunk_size: on the fast path, at most this many points per slice where per-point gradients of a tensor
            are formed (``[points, *shape]``: tensors derived from parameters such as weight-normalised
            weights, elementwise parameters, and layers where that is cheaper than the ghost norm; slices are
            also capped at ``expanded.SLICE_ENTRIES`` entries); ``None``: no cap but that one.
        path: ``"auto"`` (fast where it applies, else loop), ``"expanded"`` (raise ``ValueError`` with the
            reason if the fast path does not apply) or ``"loop"``.
        name: the term's name, for error messages.
        return_path: also return the path that ran: a :class:`Path` (``"expanded"`` or ``"loop"``, a ``str``)
            whose ``reason`` says why the fast path did not run.
        check_points: when the fast path verifies that the kernel does not mix points (a second backward,
            see the module docstring): ``"first"`` (default) at the first evaluation of each kernel with
            each model, ``"always"``, or ``"never"``.

    Returns:
        The ``[N]`` tensor (detached), or ``(tensor, path)`` with ``return_path=True``.
    """
    check_choice("path", path, PATHS)
    check_choice("check_points", check_points, expanded.CHECKS)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
    if not callable(kernel):
        raise ValueError(f"kernel {name!r} must be callable as kernel(model); got {type(kernel).__name__}")
    params = trainable_parameters(model)
    dtype = params[0].dtype if params else None
    result, ran = None, Path("loop", "path='loop' was asked for")
    if path != "loop":
        try:
            if not isinstance(model, paddle.nn.Layer):
                raise _Unsupported(f"the model is a {type(model).__name__}, not a paddle.nn.Layer")
            result = expanded.per_point_sq_norms(model, kernel, params, _names(model),
                                                 lambda out: _as_vector(out, name, dtype), chunk_size, check_points)
            ran = Path("expanded")
        except _BadKernel:
            raise
        except _Unsupported as e:
            if path == "expanded":
                raise ValueError(f"kernel {name!r}: {e}") from None
            ran = Path("loop", str(e))
        except Exception as e:  # noqa: BLE001 - the exact loop decides: a kernel's own error is raised there
            if path == "expanded":
                raise
            ran = Path("loop", f"the fast path failed: {type(e).__name__}: {e}")
    if result is None:
        result = _loop(model, kernel, name, params)
    result = result.detach()
    return (result, ran) if return_path else result
