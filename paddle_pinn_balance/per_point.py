r"""Per-point squared gradient norms :math:`\|\partial f(x_p) / \partial\theta\|^2`, without one backward per point.

A *kernel* is a callable ``kernel(model) -> Tensor`` of shape ``[N]`` or ``[N, 1]``: the per-point quantity
:math:`f(x_p)` of one loss term (the network output at boundary points, the PDE residual at collocation
points, ...). It closes over its points or draws them from a sampler, and evaluates the network by calling
``model(x)`` (derivatives in ``x`` with ``paddle.grad(..., create_graph=True)`` are fine).

Two exact paths compute :math:`s_p = \|\partial f(x_p)/\partial\theta\|^2` over all trainable parameters:

* ``"expanded"`` (fast): the kernel is called with a stand-in for the model that evaluates the same
  network with one copy :math:`\theta_p` of the parameters per row ``p`` of its input (``paddle.bmm`` of
  ``[N, 1, in]`` rows with ``[N, in, out]`` weight copies). Row ``p`` then depends on :math:`\theta_p` only,
  so ONE backward of :math:`\sum_p f(x_p)` with respect to the copies gives every point's own gradient
  :math:`\partial f(x_p)/\partial\theta_p = \partial f(x_p)/\partial\theta`. Supported: a
  ``paddle.nn.Sequential`` (or a single layer) of ``paddle.nn.Linear`` and parameter-free elementwise
  activations (:data:`ELEMENTWISE`; :func:`register_elementwise` adds your own, e.g. a ``Sin`` layer).
  Points are processed ``chunk_size`` at a time to bound memory (copies cost ``chunk_size x #params``).
* ``"loop"`` (any model, any kernel): one kernel evaluation, then one ``paddle.grad`` per point.

The expanded path assumes the kernel is *pointwise*: entry ``p`` of its output depends on row ``p`` of
every ``model(x)`` call only, and every call has ``N`` rows (true of residual, boundary and initial terms).
A kernel that calls the model with another number of rows, or uses anything of the model besides calling
it, is detected and sent to the loop. A kernel that mixes rows (e.g. subtracts a mean over points) is not
detected: use ``path="loop"`` for it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import paddle

from .balancer import check_choice, check_int
from .gradients import trainable_parameters

__all__ = ["ELEMENTWISE", "PATHS", "ExpandedModel", "per_point_sq_grad_norms", "register_elementwise",
           "supports_expansion"]

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


class _Unsupported(Exception):
    """The expanded path cannot evaluate this model or kernel; use the loop."""


def _layers(model) -> list | None:
    """The layer list the expanded path would run, or ``None`` if it does not know the model."""
    layers = list(model) if type(model) is paddle.nn.Sequential else [model]
    for layer in layers:
        if type(layer) is paddle.nn.Linear:
            continue
        if type(layer) in ELEMENTWISE and not layer.parameters():
            continue
        return None
    return layers


def supports_expansion(model) -> bool:
    """Whether the expanded (fast) path knows every layer of ``model``."""
    return isinstance(model, paddle.nn.Layer) and _layers(model) is not None


class ExpandedModel:
    """Stand-in for ``model`` that gives rows ``[start, stop)`` of every input their own parameter copies.

    Calling it as ``stand_in(x)`` (``x`` of shape ``[N, in]``) returns what ``model(x)`` returns; rows in
    the chunk are computed with the copies ``copies[j]`` (shape ``[stop - start, *param.shape]``), the other
    rows with the parameters detached (their values are right, they carry no parameter gradient). Every
    trainable parameter gets copies; frozen ones are used as they are.
    """

    def __init__(self, model, start: int = 0, stop: int | None = None):
        layers = _layers(model)
        if layers is None:
            raise _Unsupported(f"no expanded evaluation for {type(model).__name__}")
        self._layers = layers
        self.start, self.stop = start, stop
        self.rows = None  # the row count of the first call; all calls must agree
        self.copies = []  # leaf tensors, created at the first call
        self._plan = None  # per layer: None (elementwise) or [(param, copy index or None), ...]

    def _make_copies(self, n: int) -> None:
        self.rows = n
        stop = n if self.stop is None else min(self.stop, n)
        if not 0 <= self.start < stop:
            raise _Unsupported(f"chunk [{self.start}, {stop}) is empty for {n} rows")
        self.stop = stop
        c = stop - self.start
        self._plan = []
        for layer in self._layers:
            if type(layer) is not paddle.nn.Linear:
                self._plan.append(None)
                continue
            entry = []
            for p in (layer.weight, layer.bias):
                if p is None or p.stop_gradient:
                    entry.append((p, None))
                    continue
                copy = p.detach().unsqueeze(0).tile([c] + [1] * len(p.shape))
                copy.stop_gradient = False
                entry.append((p, len(self.copies)))
                self.copies.append(copy)
            self._plan.append(entry)

    def __call__(self, x):
        if not isinstance(x, paddle.Tensor) or len(x.shape) != 2:
            raise _Unsupported("the expanded path needs model inputs of shape [N, in]")
        n = int(x.shape[0])
        if self.rows is None:
            self._make_copies(n)
        elif n != self.rows:
            raise _Unsupported(f"the kernel called the model with {n} and {self.rows} rows")
        s, e = self.start, self.stop
        full = s == 0 and e == n
        h = x if full else x[s:e]
        rest = None if full else [x[:s], x[e:]]
        for layer, entry in zip(self._layers, self._plan):
            if entry is None:
                h = layer(h)
                rest = None if rest is None else [layer(r) for r in rest]
                continue
            (w, wi), (b, bi) = entry
            h = paddle.bmm(h.unsqueeze(1), self.copies[wi]).squeeze(1) if wi is not None else paddle.matmul(h, w)
            if b is not None:
                h = h + (self.copies[bi] if bi is not None else b)
            if rest is not None:
                with paddle.no_grad():
                    rest = [paddle.matmul(r, w.detach()) + (0.0 if b is None else b.detach()) for r in rest]
        if rest is None:
            return h
        return paddle.concat([rest[0], h, rest[1]], axis=0)

    def __getattr__(self, name):
        # Anything but calling the model (its parameters, sublayers, ...) is not available here.
        raise _Unsupported(f"the kernel used `model.{name}`; the expanded path only supports `model(x)`")

    def __getitem__(self, index):
        raise _Unsupported("the kernel indexed the model; the expanded path only supports `model(x)`")

    def __len__(self):
        raise _Unsupported("the kernel took len(model); the expanded path only supports `model(x)`")


def _as_vector(out, name: str) -> paddle.Tensor:
    if not isinstance(out, paddle.Tensor):
        raise ValueError(f"kernel {name!r} must return a paddle.Tensor of shape [N] or [N, 1]; "
                         f"got {type(out).__name__}")
    shape = list(out.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise ValueError(f"kernel {name!r} must return one value per point, shape [N] or [N, 1]; got shape {shape}")
    return out.reshape([-1])


def _rng_state():
    return paddle.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_state(state) -> None:
    paddle.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def _expanded(model, kernel, name, chunk_size):
    """Per-point squared norms by the expanded path; raises ``_Unsupported`` where it does not apply."""
    state = _rng_state()
    parts, start, n = [], 0, None
    while n is None or start < n:
        if start > 0:  # same random draws in every chunk, for kernels that sample with the global RNGs
            _set_rng_state(state)
        stand_in = ExpandedModel(model, start, None if chunk_size is None else start + chunk_size)
        f = _as_vector(kernel(stand_in), name)
        if stand_in.rows is None:
            raise _Unsupported(f"kernel {name!r} never called the model")
        if int(f.shape[0]) != stand_in.rows:
            raise _Unsupported(f"kernel {name!r} returned {int(f.shape[0])} values from {stand_in.rows} model rows")
        if n is None:
            n = stand_in.rows
        elif stand_in.rows != n:
            raise _Unsupported(f"kernel {name!r} used {stand_in.rows} points, then {n}")
        if not stand_in.copies:  # nothing trainable
            return paddle.zeros([n], dtype=f.dtype)
        target = f[stand_in.start:stand_in.stop]
        if target.stop_gradient:
            raise _Unsupported(f"kernel {name!r} returned values without gradient")
        grads = paddle.grad([target.sum()], stand_in.copies, allow_unused=True)
        c = stand_in.stop - stand_in.start
        sq = paddle.zeros([c], dtype=f.dtype)
        for g in grads:
            if g is not None:
                sq = sq + (g * g).reshape([c, -1]).sum(axis=1).astype(f.dtype)
        parts.append(sq)
        start = stand_in.stop
    return parts[0] if len(parts) == 1 else paddle.concat(parts)


def _loop(model, kernel, name, params):
    """Per-point squared norms, one ``paddle.grad`` per point (exact for any model and kernel)."""
    f = _as_vector(kernel(model), name)
    n = int(f.shape[0])
    if f.stop_gradient:
        return paddle.zeros([n], dtype=f.dtype)
    out = []
    for p in range(n):
        grads = paddle.grad([f[p]], params, retain_graph=p < n - 1, allow_unused=True)
        out.append(paddle.add_n([(g * g).sum().astype(f.dtype) for g in grads if g is not None])
                   if any(g is not None for g in grads) else paddle.zeros([], dtype=f.dtype))
    return paddle.stack(out)


def per_point_sq_grad_norms(
    model: paddle.nn.Layer,
    kernel: Callable,
    chunk_size: int | None = 1024,
    path: str = "auto",
    name: str = "kernel",
    return_path: bool = False,
):
    r""":math:`s_p = \|\partial f(x_p)/\partial\theta\|_2^2` for every point of ``kernel``, shape ``[N]``.

    :math:`\theta` is every trainable parameter of ``model`` (weights and biases), so
    :math:`\sum_p s_p` is the trace of the term's NTK block.

    Args:
        model: the network (a ``paddle.nn.Layer``).
        kernel: ``kernel(model) -> Tensor[N] or [N, 1]`` (see the module docstring).
        chunk_size: points per backward on the expanded path (``None``: all at once). With several chunks the
            kernel is called once per chunk; paddle's, numpy's and Python's global random states are reset
            before each call so that a kernel drawing from them draws the same points every time.
        path: ``"auto"`` (expanded where supported, else loop), ``"expanded"`` (raise ``ValueError`` if not
            supported) or ``"loop"``.
        name: the term's name, for error messages.
        return_path: also return the path that ran (``"expanded"`` or ``"loop"``).

    Returns:
        The ``[N]`` tensor (detached), or ``(tensor, path)`` with ``return_path=True``.
    """
    check_choice("path", path, PATHS)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size)
    if not callable(kernel):
        raise ValueError(f"kernel {name!r} must be callable as kernel(model); got {type(kernel).__name__}")
    params = trainable_parameters(model)
    result, ran = None, "loop"
    if path != "loop":
        try:
            if not supports_expansion(model):
                raise _Unsupported(f"the expanded path does not know all layers of {type(model).__name__}")
            result, ran = _expanded(model, kernel, name, chunk_size), "expanded"
        except _Unsupported as e:
            if path == "expanded":
                raise ValueError(f"kernel {name!r}: {e}") from None
    if result is None:
        result = _loop(model, kernel, name, params)
    result = result.detach()
    return (result, ran) if return_path else result
