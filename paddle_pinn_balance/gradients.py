"""Per-term gradients as one flat ``[terms, params]`` array, and the statistics every method reads.

Statistics are whole-array operations on the stacked gradient matrix ``G`` (row ``i`` is
``d L_i / d theta`` flattened over the selected parameters), so their cost does not grow with the
number of parameter tensors. A "segment" is one parameter tensor (one weight matrix when only weights
are selected); the ``layer_*`` reductions treat every segment once, whatever its size, as the
authors' code of the learning-rate annealing paper does.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import numpy as np
import paddle

from . import ops

PARAM_SUBSETS = ("all", "weights")


def world_size() -> int:
    """Number of data-parallel ranks (1 without ``paddle.distributed``); reads the environment only."""
    try:
        import paddle.distributed as dist

        return dist.get_world_size() if dist.is_initialized() else 1
    except (ImportError, RuntimeError, ValueError):  # a build or a state without distributed support
        return 1


def mean_across_ranks(t: paddle.Tensor) -> paddle.Tensor:
    """``t`` averaged over data-parallel ranks (identity, at no cost, on one rank).

    Each rank's loss is a mean over its own points, so with equal batches the mean of the ranks'
    gradients (and losses) is the gradient (and loss) of the mean over the union of their points: every
    statistic computed from it afterwards (max, mean, norm, GradNorm's G_i and loss ratios) is exactly the
    single-process statistic on all the points, identical on every rank.
    """
    n = world_size()
    if n == 1:
        return t
    import paddle.distributed as dist

    out = t.clone()
    dist.all_reduce(out)
    return out / n


def sum_across_ranks(t: paddle.Tensor) -> paddle.Tensor:
    """``t`` summed over data-parallel ranks (identity on one rank): for sums over points (NTK traces)."""
    if world_size() == 1:
        return t
    import paddle.distributed as dist

    out = t.clone()
    dist.all_reduce(out)
    return out


def trainable_parameters(model_or_params, subset: str = "all") -> List[paddle.Tensor]:
    """The trainable parameters of a ``paddle.nn.Layer`` (or of a list of parameters).

    ``subset="weights"`` keeps tensors with two or more dimensions (weight matrices, no biases), as in
    the authors' code of Wang, Teng & Perdikaris (2021).
    """
    if subset not in PARAM_SUBSETS:
        raise ValueError(f"`params` must be one of {list(PARAM_SUBSETS)}; got {subset!r}")
    if isinstance(model_or_params, paddle.nn.Layer):
        params = model_or_params.parameters()
    elif isinstance(model_or_params, Iterable):
        params = list(model_or_params)
    else:
        raise ValueError(f"expected a paddle.nn.Layer or a list of parameters; got {type(model_or_params).__name__}")
    seen, out = set(), []
    for p in params:
        if not isinstance(p, paddle.Tensor):
            raise ValueError(f"expected parameters (paddle.Tensor); got {type(p).__name__}")
        if p.stop_gradient or id(p) in seen:
            continue
        if subset == "weights" and len(p.shape) < 2:
            continue
        seen.add(id(p))
        out.append(p)
    if not out:
        raise ValueError(f"the model has no trainable parameters in subset {subset!r}")
    return out


def flat_grad(loss: paddle.Tensor, params: Sequence[paddle.Tensor], retain_graph: bool = True) -> paddle.Tensor:
    """``d loss / d params`` flattened into one vector; parameters the loss does not reach give zeros.

    With ``retain_graph=True`` the caller's own ``backward()`` still works afterwards.
    """
    if loss.stop_gradient:
        grads = [None] * len(params)
    else:
        grads = paddle.grad([loss], list(params), retain_graph=retain_graph, allow_unused=True)
    return ops.flatten_cat([paddle.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def term_gradients(values: Sequence[paddle.Tensor], params: Sequence[paddle.Tensor],
                   retain_graph: bool = True) -> paddle.Tensor:
    """Stacked per-term gradients ``G[i] = d L_i / d theta``, shape ``[len(values), n_params]``.

    One backward per term, each over its own part of the graph (in a PINN the terms live on their own
    points, so together they cost about one backward of the summed loss). ``retain_graph=False`` frees
    the graph during the last backward (when no backward through the losses follows); the terms are
    differentiated last to first, so that this is the first term, usually the PDE residual, whose
    higher-order graph is the largest: peak memory then stays close to a plain step's.
    """
    rows = [flat_grad(v, params, retain_graph or i > 0) for i, v in reversed(list(enumerate(values)))]
    return ops.stack(rows[::-1])


def _flat_param_grads(params: Sequence[paddle.Tensor]) -> paddle.Tensor:
    grads = [p.grad for p in params]
    return ops.flatten_copy([paddle.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def term_gradients_by_backward(values: Sequence[paddle.Tensor], params: Sequence[paddle.Tensor]) -> tuple:
    """Per-term gradients as :func:`term_gradients`, from ``backward()`` into ``.grad`` instead of
    ``paddle.grad``: in PaddlePaddle a backward frees the graph's saved tensors as it goes and costs less
    than a partial ``paddle.grad``, so the step's peak memory and time stay those of a plain backward.

    Returns ``(G, prior)``: ``prior`` is what ``.grad`` held before (flat, or ``None`` if nothing), taken
    out so that each row is exactly one term's gradient; every ``.grad`` is left empty, for the
    assembled total to write ``prior + sum_i w_i G[i]``. The graph is freed (the first term, usually the
    residual with the largest graph, goes last and frees as it goes). Single process only: under data
    parallelism each backward would trigger the gradient all-reduce.
    """
    prior = None
    if any(p.grad is not None for p in params):
        prior = _flat_param_grads(params)
        prior.stop_gradient = True
        _clear(params)
    rows = []  # terms K-1 .. 1, each copied out flat
    for i in reversed(range(len(values))):
        v = values[i]
        if v.stop_gradient:
            grads = [paddle.zeros_like(p) for p in params]
        else:
            v.backward(retain_graph=i > 0)
            grads = [paddle.zeros_like(p) if p.grad is None else p.grad for p in params]
        if i > 0:
            rows.append(ops.flatten_copy(grads))
            _clear(params)
    # term 0 last: its gradients and the rows above in one copy, which is the stacked matrix
    G = ops.reshape(ops.flatten_copy(grads + rows[::-1]), [len(values), -1])
    _clear(params)
    G.stop_gradient = True  # `.grad` tensors are not marked constant: nothing downstream may record a graph
    return G, prior


def _clear(params: Sequence[paddle.Tensor]) -> None:
    for p in params:
        p.clear_gradient(False)


def assembled_total(stacked: paddle.Tensor, weights: paddle.Tensor, G: paddle.Tensor,
                    params: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """A scalar whose value is ``sum_i w_i L_i`` and whose backward adds ``sum_i w_i G[i]`` to the gradients
    of ``params`` through the autograd graph (so that a ``DataParallel`` model's hooks see it).

    ``stacked``: the losses as one detached vector. ``s = theta . g`` with ``g = w^T G`` held constant;
    ``value + (s - s.detach())`` adds exactly zero to the value, and its backward is ``d s / d theta = g``:
    no second backward through the losses' graph.
    """
    w = weights.detach()
    value = ops.dot(stacked, ops.cast(w, stacked.dtype))
    g = ops.matmul(ops.cast(w, G.dtype), G)
    s = ops.dot(ops.flatten_cat(params), g)
    return value + ops.cast(s - s.detach(), value.dtype)


def gradient_writing_total(stacked: paddle.Tensor, weights: paddle.Tensor, G: paddle.Tensor,
                           params: Sequence[paddle.Tensor], prior: Optional[paddle.Tensor] = None,
                           extra: Optional[tuple] = None, views: Optional[list] = None) -> paddle.Tensor:
    """A scalar whose value is ``sum_i w_i L_i`` and whose ``backward()`` writes
    ``prior + c * sum_i w_i G[i]`` into the ``.grad`` of ``params``, ``c`` being the gradient the backward
    brings to the total: 1, a ``GradScaler``'s scale, ``1/n`` when the caller divides the total for gradient
    accumulation. ``prior``: the flat gradients the parameters held before (unscaled), or ``None``.
    ``extra``: ``(param, grad)``, one more gradient to add, as ``c * grad``, to ``param.grad``.
    ``views``: :func:`ops.views_like` of ``params``, a buffer the caller keeps from step to step (made here
    if ``None``).

    The total is ``value + a`` with ``a`` a fresh 0-d leaf of value 0; a hook on ``a`` receives ``c`` and
    writes the gradients with three operations (a product, a sum with ``prior``, a copy into ``views``) and
    a copy per parameter (the ``.grad`` setter), where a graph through the parameters (as
    :func:`assembled_total` builds) costs a reshape and a backward node per parameter tensor. For the
    single-process path, whose ``.grad`` the per-term backward passes left empty; ``paddle.grad`` of the
    total with respect to the parameters is not defined (use ``assemble=False`` for that).
    """
    w = weights.detach()
    value = ops.dot(stacked, ops.cast(w, stacked.dtype))
    g = ops.matmul(ops.cast(w, G.dtype), G)

    def write(c):
        c = c.detach()
        flat = ops.multiply(g, ops.cast(c, g.dtype))
        if prior is not None:
            flat = flat + prior
        ops.assign_(flat, views[0])
        pairs = list(zip(params, views[1:]))
        if extra is not None:
            pairs.append((extra[0], ops.multiply(extra[1], ops.cast(c, extra[1].dtype))))
        for p, v in pairs:
            if p.grad is None:
                p.grad = v  # the setter copies
            else:  # another backward wrote into .grad since the balancer's call: add to it
                ops.add_(p.grad, v)

    if views is None:
        views = ops.views_like(params)
    anchor = ops.fresh_zero(value)
    anchor.stop_gradient = False
    anchor.register_hook(write)
    return value + anchor


def weights_first(params: Sequence[paddle.Tensor], first: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
    """``params`` reordered so that those in ``first`` lead (in ``first``'s order): statistics on them then
    read the leading columns of the gradient matrix, a slice instead of a gather."""
    ids = {id(p) for p in first}
    return list(first) + [p for p in params if id(p) not in ids]


class Segments:
    """Which flat-gradient entries belong to which parameter tensor, with whole-array reductions."""

    def __init__(self, params: Sequence[paddle.Tensor]):
        self.sizes = [int(np.prod(p.shape)) for p in params]
        n, s = sum(self.sizes), len(self.sizes)
        mean = np.zeros([n, s], dtype=np.float32)
        start = 0
        for j, size in enumerate(self.sizes):
            mean[start:start + size, j] = 1.0 / size
            start += size
        self._mean = paddle.to_tensor(mean)
        self._count = paddle.to_tensor((mean > 0).astype(np.float32))

    def _matrix(self, m: paddle.Tensor, dtype) -> paddle.Tensor:
        return m if m.dtype == dtype else m.astype(dtype)

    def mean(self, a: paddle.Tensor) -> paddle.Tensor:
        """Per-segment mean of ``a`` (``[K, P]`` -> ``[K, S]``)."""
        return paddle.matmul(a, self._matrix(self._mean, a.dtype))

    def sum(self, a: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(a, self._matrix(self._count, a.dtype))

    def max(self, a: paddle.Tensor) -> paddle.Tensor:
        """Per-segment max of ``a`` (``[K, P]`` -> ``[K, S]``)."""
        parts = paddle.split(a, self.sizes, axis=1) if len(self.sizes) > 1 else [a]
        return paddle.stack([p.max(axis=1) for p in parts], axis=1)


STATISTICS = ("max", "mean", "norm")
REDUCTIONS = ("flat", "layer_mean", "layer_max_ratio")


def ratio_statistics(G: paddle.Tensor, stat: str, reduction: str, segments: Segments) -> tuple:
    """``(numerator, denominator)`` statistics of each row of ``G``, sharing one pass over ``|G|``.

    * ``stat="max"``: ``max |g|`` over ``mean |g|``; ``"mean"``: ``mean |g|`` over ``mean |g|``;
      ``"norm"``: ``||g||_2`` over ``||g||_2``.
    * ``reduction="flat"``: over all entries; ``"layer_mean"``: means (norms) per parameter tensor, then
      their mean (the max of per-tensor maxima is the global max); ``"layer_max_ratio"``: per parameter
      tensor, shape ``[K, S]`` (the caller takes the max of the ratios).
    """
    per_layer = reduction == "layer_max_ratio"
    if stat == "norm":
        if reduction == "flat":
            v = ops.row_norm(G)
        else:
            v = paddle.sqrt(segments.sum(G * G))
            v = v if per_layer else ops.row_mean(v)
        return v, v
    A = ops.abs(G)
    if reduction == "flat":
        den = ops.row_mean(A)
    else:
        den = segments.mean(A)
        den = den if per_layer else ops.row_mean(den)
    if stat == "mean":
        return den, den
    return (segments.max(A) if per_layer else ops.row_max(A)), den
