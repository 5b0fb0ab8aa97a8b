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


def _one_dtype(tensors: Sequence[paddle.Tensor]) -> list:
    """The tensors in one dtype, for one flat vector: parameters of several dtypes (a float32 parameter added
    to a float64 net) give their gradients in the widest (a flattening copy would reinterpret the bytes)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return list(tensors)
    dtype = paddle.float64 if paddle.float64 in dtypes else paddle.float32
    return [ops.cast(t, dtype) for t in tensors]


class _RankMeanGradient(paddle.autograd.PyLayer):
    """Identity forward; backward: the incoming gradient averaged over the data-parallel ranks."""

    @staticmethod
    def forward(ctx, x):
        return paddle.assign(x)

    @staticmethod
    def backward(ctx, grad):
        return mean_across_ranks(grad)


def rank_mean_gradient(x: paddle.Tensor) -> paddle.Tensor:
    r"""``x`` itself, whose gradient is averaged over the data-parallel ranks (``x`` on one rank, at no cost).

    For a balancer's own learned tensors outside ``DataParallel`` (uncertainty weighting's
    :math:`\log\sigma^2`): their gradient is then that of the mean loss over all ranks' points, identical on
    every rank, as ``DataParallel``'s reducer makes the network's."""
    return x if world_size() == 1 else _RankMeanGradient.apply(x)


def flat_grad(loss: paddle.Tensor, params: Sequence[paddle.Tensor], retain_graph: bool = True) -> paddle.Tensor:
    """``d loss / d params`` flattened into one vector; parameters the loss does not reach give zeros.

    With ``retain_graph=True`` the caller's own ``backward()`` still works afterwards.
    """
    if loss.stop_gradient:
        grads = [None] * len(params)
    else:
        grads = paddle.grad([loss], list(params), retain_graph=retain_graph, allow_unused=True)
    return ops.flatten_cat(_one_dtype([paddle.zeros_like(p) if g is None else g for g, p in zip(grads, params)]))


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


def term_gradients_by_backward(values: Sequence[paddle.Tensor], params: Sequence[paddle.Tensor],
                               scratch: Optional[dict] = None) -> paddle.Tensor:
    """Per-term gradients as :func:`term_gradients`, from ``backward()`` into ``.grad`` instead of
    ``paddle.grad``: in PaddlePaddle a backward frees the graph's saved tensors as it goes and costs less
    than a partial ``paddle.grad``, so the step's peak memory and time stay those of a plain backward.

    ``.grad`` is left as it was found: what it held before (gradient accumulation, zeros after
    ``clear_grad()``) is set aside, each term's gradient is read alone, and what was set aside is given back;
    a parameter that had no gradient has none again. The graph is freed (the first term, usually the residual
    with the largest graph, goes last and frees as it goes). Single process only: under data parallelism each
    backward would trigger the gradient all-reduce.

    Setting aside moves storage, not values (:func:`~paddle_pinn_balance.ops.move_buffer`): tensors kept in
    ``scratch`` (a dict the caller keeps between calls, one per parameter list) take over the storage of
    ``.grad`` before each backward and give it back after the last, so the one copy is of the ``K`` rows into
    ``G`` at the end. They hold no memory between calls.
    """
    hold, one_dtype = _holders({} if scratch is None else scratch, params, len(values))  # [-1]: what .grad held
    had = [p.grad is not None for p in params]
    if any(had):
        for p, h, t in zip(params, had, hold[-1]):
            if h:
                ops.move_buffer(p.grad, t)
        _clear(params)
    try:
        G = _stacked_by_backward(values, params, hold if one_dtype else None)
    finally:  # also when a backward raises: .grad is given back what it held
        for p, h, t in zip(params, had, hold[-1]):
            if not h:
                p.clear_gradient(False)
            elif p.grad is None:  # term 0 left no gradient here: the setter copies
                p.grad = ops.reshape(t, p.shape)
            else:
                ops.move_buffer(t, p.grad)
        for row in hold:
            for t in row:
                ops.release(t)
    G.stop_gradient = True  # `.grad` tensors are not marked constant: nothing downstream may record a graph
    return G


def _stacked_by_backward(values, params, hold) -> paddle.Tensor:
    """``G`` of :func:`term_gradients_by_backward`, from a ``.grad`` that holds nothing; leaves term 0's gradient
    in ``.grad``. ``hold[i]``: flat tensors that take over term ``i``'s gradient storage (parameters of one
    dtype); ``None``: each row is copied out in the widest dtype."""
    k = len(values)
    rows = []  # parameters of several dtypes: terms K-1 .. 1, each copied out flat
    for i in reversed(range(k)):
        v = values[i]
        if v.stop_gradient:
            grads = [paddle.zeros_like(p) for p in params]
        else:
            v.backward(retain_graph=i > 0)
            grads = [paddle.zeros_like(p) if p.grad is None else p.grad for p in params]
        if hold is not None:
            for g, t in zip(grads, hold[i]):
                ops.move_buffer(g, t)
        elif i > 0:
            rows.append(ops.flatten_copy(_one_dtype(grads)))
        if i > 0:
            _clear(params)
    if hold is not None:  # the K rows, flat, in one copy: the stacked matrix
        return ops.reshape(ops.flatten_cat([t for row in hold[:k] for t in row]), [k, -1])
    return ops.reshape(ops.flatten_copy(_one_dtype(grads) + rows[::-1]), [k, -1])


def _holders(scratch: dict, params: Sequence[paddle.Tensor], k: int) -> tuple:
    """``(hold, one_dtype)``: whether ``params`` share one dtype, and lists of empty flat tensors, one per parameter,
    of its size and dtype: ``k + 1`` lists if they do (the terms' and what ``.grad`` held), else one (what ``.grad``
    held). Created once and kept in ``scratch`` while the parameter list and its dtype stay the same."""
    hold = scratch.get("holders")
    if not hold or scratch["params"] is not params or hold[0][0].dtype != params[0].dtype:
        hold = []  # first call, another parameter list, or the net cast to another dtype
        scratch.update(params=params, holders=hold, one_dtype=len({p.dtype for p in params}) == 1)
    while len(hold) < (k + 1 if scratch["one_dtype"] else 1):
        hold.append([paddle.empty([int(np.prod(p.shape))], p.dtype) for p in params])
    return hold, scratch["one_dtype"]


def _clear(params: Sequence[paddle.Tensor]) -> None:
    for p in params:
        p.clear_gradient(False)


class _AssembledTotal(paddle.autograd.PyLayer):
    """``forward(value, g, flat) = value``; ``backward(c) = (None, None, c * g)``.

    ``flat`` is the leaves flattened into one vector by ordinary (C++) operations: its backward splits
    ``c * g`` into the leaves' gradients, so the engine accumulates them into ``.grad`` at backward time,
    returns them from ``paddle.grad`` (with respect to any subset of the leaves: the split prunes the rest),
    and runs every hook registered on them (``DataParallel``'s reducer included). One differentiable input:
    a PyLayer must return ``None`` exactly where ``paddle.grad`` prunes an input, which it cannot see.
    """

    @staticmethod
    def forward(ctx, value, g, flat):
        ctx.g = g
        return ops.scale(value, 1.0)

    @staticmethod
    def backward(ctx, c):
        g = ctx.g
        return None, None, ops.multiply(g, ops.cast(c, g.dtype))


class _AssembledTotalLeaves(paddle.autograd.PyLayer):
    """Data-parallel form of :class:`_AssembledTotal`: ``forward(value, g, *leaves) = value``; ``backward(c) =
    (None, None, c * g`` split like ``leaves)``. ``paddle.DataParallel(GradNorm(net))`` fails with the flattened
    input (its reducer reports GradNorm's weights "ready before"); with the leaves as the node's inputs it does
    not. The price: ``paddle.grad`` with respect to some of the leaves only raises (Paddle requires a PyLayer to
    return None where ``paddle.grad`` prunes an input)."""

    @staticmethod
    def forward(ctx, value, g, *leaves):
        ctx.g = g
        ctx.leaves = leaves
        return ops.scale(value, 1.0)

    @staticmethod
    def backward(ctx, c):
        g = ctx.g
        flat = ops.multiply(g, ops.cast(c, g.dtype))
        leaves = ctx.leaves
        if all(p.dtype == g.dtype for p in leaves):  # one fresh buffer with a view per leaf (one operation)
            views = ops.views_like(leaves)
            ops.assign_(flat, views[0])
            parts = views[1:]
        else:  # leaves of several dtypes (an added parameter in float64 beside a float32 net)
            ends = np.cumsum([int(np.prod(p.shape)) for p in leaves]).tolist()  # slices: paddle.split warns on 3.2
            parts = [ops.cast(ops.reshape(flat[e - int(np.prod(p.shape)):e], p.shape), p.dtype)
                     for e, p in zip(ends, leaves)]
        return (None, None) + tuple(None if p.stop_gradient else v for p, v in zip(leaves, parts))

def weighted_sum(stacked: paddle.Tensor, weights: paddle.Tensor) -> paddle.Tensor:
    """``sum_i w_i L_i`` (``stacked``: the losses as one vector), weights detached, in the losses' dtype. A
    product and a sum, not ``dot`` or a vector ``matmul``: a loop may differentiate the total's gradient again
    (``paddle.grad(..., create_graph=True)``, a gradient penalty), and in Paddle 3.3 ``dot`` has no second
    derivative and a 0-d ``matmul`` result added to anything fails in the add's second derivative."""
    return ops.total(ops.multiply(stacked, ops.cast(weights.detach(), stacked.dtype)))



def assembled_total(stacked: paddle.Tensor, weights: paddle.Tensor, g: paddle.Tensor,
                    leaves: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """A scalar whose value is ``sum_i w_i L_i`` and whose gradient with respect to ``leaves`` is ``g``.

    ``stacked``: the losses as one detached vector; ``g``: the flat gradient (``w^T G``, or a method's own
    direction, followed by any extra leaf's gradient), detached. The total is an ordinary differentiable
    tensor to its caller: ``total.backward()`` adds ``c * g`` to whatever ``.grad`` holds at that time
    (``c`` the factor the caller put on the total: 1, a ``GradScaler``'s scale, ``1/n`` for gradient
    accumulation), ``paddle.grad(total, some_leaves)`` returns their part of it, and ``DataParallel``'s hooks
    see it; no second backward through the losses' graph is made.
    """
    value = ops.dot(stacked, ops.cast(weights.detach(), stacked.dtype))
    g = g.detach()
    if world_size() > 1:
        return _AssembledTotalLeaves.apply(value, g, *leaves)
    return _AssembledTotal.apply(value, g, ops.flatten_cat([ops.cast(p, g.dtype) for p in leaves]))


def weights_first(params: Sequence[paddle.Tensor], first: Sequence[paddle.Tensor]) -> List[paddle.Tensor]:
    """``params`` reordered so that those in ``first`` lead (in ``first``'s order): statistics on them then
    read the leading columns of the gradient matrix, a slice instead of a gather."""
    ids = {id(p) for p in first}
    return list(first) + [p for p in params if id(p) not in ids]


def shared_parameters(net: paddle.nn.Layer, shared_params=None) -> list:
    """The parameters ``W`` whose gradient norms GradNorm equalises.

    In order: ``net.get_last_shared_layer()`` if the net defines it (its weight matrix, else its
    parameters); else ``shared_params`` (parameters or parameter names of ``net``); else the last
    weight matrix (a parameter with two or more dimensions) of ``net``.
    """
    if shared_params is not None:
        if isinstance(shared_params, (str, paddle.Tensor)):
            shared_params = [shared_params]
        named = dict(net.named_parameters())
        out = []
        for p in shared_params:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"`shared_params`: {p!r} is not a parameter of the net; it has {list(named)}")
                p = named[p]
            out.append(p)
        return trainable_parameters(out)
    getter = getattr(net, "get_last_shared_layer", None)
    if callable(getter):
        layer = getter()
        if not isinstance(layer, paddle.nn.Layer):
            raise ValueError(f"`get_last_shared_layer()` must return a paddle.nn.Layer; got {type(layer).__name__}")
        weight = getattr(layer, "weight", None)
        if isinstance(weight, paddle.Tensor) and not weight.stop_gradient:
            return [weight]
        return trainable_parameters(layer)
    matrices = [p for p in net.parameters() if not p.stop_gradient and len(p.shape) >= 2]
    if not matrices:
        raise ValueError(
            "GradNorm needs the last shared layer: the net has no `get_last_shared_layer()`, no "
            "`shared_params` were given, and it has no trainable weight matrix"
        )
    return [matrices[-1]]
