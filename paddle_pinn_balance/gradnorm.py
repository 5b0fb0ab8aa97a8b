"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018), as a balancer and a network wrapper."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import paddle

from . import ops
from .balancer import Balancer, check_float, check_int
from .contract import Slot, register
from .gradients import (
    flat_grad,
    mean_across_ranks,
    shared_parameters,  # noqa: F401  (importable from here as before)
    trainable_parameters,
    weights_first,
)


def gradnorm_weight_gradient(norms: paddle.Tensor, losses: paddle.Tensor, initial_losses: paddle.Tensor,
                             weights: paddle.Tensor, alpha: float, eps: float = 1e-8,
                             has_initial: Optional[paddle.Tensor] = None) -> tuple:
    r"""GradNorm's loss :math:`L_\mathrm{grad}` and its gradient with respect to the weights (all ``[T]``
    vectors: ``norms`` :math:`\|\nabla_W L_i\|_2`, ``losses`` :math:`L_i(t)`, ``initial_losses``
    :math:`L_i(0)`, ``weights`` :math:`w_i`):

    .. math::

        G_i = w_i \|\nabla_W L_i\|_2, \quad \bar G = \tfrac1T \textstyle\sum_i G_i, \quad
        \tilde L_i = \frac{L_i(t)}{L_i(0) + \epsilon}, \quad
        r_i = \frac{\tilde L_i}{\tfrac1T \sum_j \tilde L_j + \epsilon},

    .. math::

        L_\mathrm{grad} = \sum_i \big| G_i - \bar G\, r_i^{\alpha} \big|, \qquad
        \frac{\partial L_\mathrm{grad}}{\partial w_i}
            = \mathrm{sign}\big(G_i - \bar G\, r_i^{\alpha}\big)\, \|\nabla_W L_i\|_2

    (Chen et al. 2018, eq. 2 and Algorithm 1; the target :math:`\bar G r_i^\alpha` is held constant, and
    :math:`\partial G_i / \partial w_i = \|\nabla_W L_i\|_2` gives the closed form). ``eps`` is not in the
    paper (it guards a zero :math:`L_i(0)` or ratio sum). ``has_initial`` (bool ``[T]``): terms whose
    :math:`L_i(0)` is not taken yet (``False``) get :math:`\tilde L_i = 1`; ``None``: all taken.

    Returns ``(L_grad, grad)``, detached. A non-finite entry of the gradient is replaced by 0 (that weight
    does not move); ``L_grad`` stays as computed (NaN then). No host synchronisation.

    Example: ``weights = [2, 0.5]``, ``norms = [1, 4]`` (:math:`G = [2, 2]`, :math:`\bar G = 2`),
    ``losses = [2, 3]``, ``initial_losses = [2, 1]`` (:math:`\tilde L = [1, 3]`, :math:`r = [0.5, 1.5]`),
    ``alpha = 2``, ``eps = 0``: targets ``[0.5, 4.5]``, ``L_grad = 1.5 + 2.5 = 4``, ``grad = [1, -4]``.
    """
    diff, grad = _gradnorm_difference(norms, losses, initial_losses, weights, alpha, eps, has_initial)
    return ops.total(ops.abs(diff)), grad


def _gradnorm_difference(norms, losses, initial_losses, weights, alpha, eps, has_initial) -> tuple:
    """:func:`gradnorm_weight_gradient` short of its sum: ``(G - target, grad)``; :math:`L_\\mathrm{grad}` is the
    sum of ``|G - target|`` (taken only when read: a logging value)."""
    # every input is detached: the arithmetic below builds no graph
    w = weights.detach()
    norms = ops.cast(norms.detach(), w.dtype)
    n = norms.shape[0]
    G = w * norms
    ratio = losses / ops.scale(initial_losses, 1.0, eps)
    if has_initial is not None:  # ratio 1 for terms whose L_i(0) is not taken yet
        ratio = ops.where(has_initial, ratio, ops.filled(n, 1.0, ratio))
    r = ratio / ops.scale(ops.total(ratio), 1.0 / n, eps)
    target = ops.scale(ops.total(G), 1.0 / n) * ops.pow(r, alpha)
    diff = G - target
    grad = ops.sign(diff) * norms
    return diff, ops.where(ops.isfinite(grad), grad, ops.filled(n, 0.0, grad))


class GradNormBalancer(Balancer):
    r"""GradNorm's learnable loss weights, as a balancer (``balancer(losses, step)``).

    .. math::

        G_i = \|\nabla_W (w_i L_i)\|_2, \quad \bar G = \tfrac1T \textstyle\sum_i G_i, \quad
        \tilde L_i = L_i(t) / L_i(0), \quad r_i = \tilde L_i / \overline{\tilde L},

    .. math:: L_\mathrm{grad} = \sum_i \big| G_i - \bar G\, r_i^{\alpha} \big|
        \quad (\text{Chen et al. 2018, eq. 2 and Algorithm 1}),

    with the target :math:`\bar G r_i^\alpha` held constant, so that
    :math:`\partial L_\mathrm{grad}/\partial w_i = \mathrm{sign}(G_i - \bar G r_i^\alpha)\,\|\nabla_W L_i\|_2`
    (:func:`gradnorm_weight_gradient`).

    The returned total has the value :math:`\sum_i w_i L_i`; its backward gives the network the gradient of
    :math:`\sum_i w_i L_i` (weights held constant) and gives ``loss_weights`` the gradient of
    :math:`L_\mathrm{grad}` only (nothing of one leaks into the other). The optimizer that trains the
    network must also hold ``loss_weights`` (``balancer.parameters()``). The per-term gradients are taken
    once over all of the net's parameters; :math:`G_i` reads their ``W`` part and, with ``assemble=True``,
    the total's backward reuses them (no second backward).

    where

    * ``alpha``: the asymmetry :math:`\alpha` (1.5 on NYUv2, 0.12 on the paper's toy problem);
    * :math:`W`: see :func:`~paddle_pinn_balance.gradients.shared_parameters` (``shared_params``);
    * :math:`L_i(0)`: the losses of the first update (the first finite, positive one of each term;
      ``reset_initial_losses()`` takes them again);
    * ``weight_attr``: initial weights (a number, a list of ``T`` numbers, or a
      ``paddle.ParamAttr``); ones by default.

    Renormalisation :math:`\sum_i w_i = T` (Algorithm 1, after every optimizer step) is applied lazily, in
    place, at the start of the call after an update (or of the next ``get_grad_norm_loss``); ``weights`` and
    ``get_weights()`` report renormalised values. The optimizer needs no hook. With ``update_freq > 1`` the
    calls between updates leave the weights without a gradient (``None``), so the optimizer does not move
    them (Adam's momentum would, on a zero gradient). (A loop that forms
    ``(loss_weights * losses).sum()`` itself, as in the community design, uses the weights of the last
    renormalisation plus one optimizer step for that sum; the aggregator call has no such lag.)
    Weights are first clipped to ``[min_weight, max_weight]`` (``min_weight`` defaults to ``eps``: a
    weight pushed to or below zero by the optimizer would otherwise flip the sign of its term).

    Note:
        PaddleScience's ``ppsci.loss.mtl.GradNorm`` is gradient-norm balancing
        (:math:`\overline{\|\nabla L_j\|} / \|\nabla L_i\|`), not this method.

    References:
        Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich. GradNorm: Gradient normalization for adaptive
        loss balancing in deep multitask networks. ICML 2018 (arXiv:1711.02257).
    """

    learns_weights = True

    def __init__(
        self,
        net: paddle.nn.Layer,
        n_loss: Optional[int] = None,
        alpha: float = 1.5,
        weight_attr=None,
        shared_params=None,
        loss_names: Optional[Sequence[str]] = None,
        update_freq: int = 1,
        min_weight: Optional[float] = None,
        max_weight: Optional[float] = None,
        eps: float = 1e-8,
        assemble: bool = True,
        check_every: int = 100,
    ):
        if loss_names is not None and (isinstance(loss_names, str) or not isinstance(loss_names, Sequence)):
            raise ValueError(f"`loss_names` must be a list of strings; got {loss_names!r}")
        if n_loss is None:
            if loss_names is None:
                raise ValueError("GradNorm needs `n_loss` or `loss_names`")
            n_loss = len(loss_names)
        self.n_loss = check_int("n_loss", n_loss)
        self.alpha = check_float("alpha", alpha, 0.0)
        self._shared = shared_parameters(net, shared_params)
        self._n_shared = sum(int(np.prod(p.shape)) for p in self._shared)
        self._params = weights_first(trainable_parameters(net), self._shared)  # W leads: G[:, :n_shared]
        super().__init__(loss_names=None, update_freq=update_freq, min_weight=min_weight, max_weight=max_weight,
                         eps=eps, assemble=assemble, check_every=check_every)
        if self.min_weight is None:
            self.min_weight = self.eps
        # float64 nets get float64 weights (one optimizer must hold both); anything else float32
        dtype = "float64" if self._shared[0].dtype == paddle.float64 else "float32"
        self.loss_weights = self.create_parameter(
            [self.n_loss], dtype=dtype, attr=_weight_attr(weight_attr, self.n_loss, dtype)
        )
        self._dtype = dtype  # of the weights and the slots (state_spec)
        self._renormalised_tol = 4.0 * self.n_loss ** 2 * float(np.finfo(dtype).eps)  # |sum(w) - T|: rounding only
        self._last_difference = None  # G_i - target_i of the last update: L_grad, for logging, when read
        self._host["renormalise"] = True  # the weights may have changed since the last renormalisation
        if loss_names is not None:
            self._set_names(loss_names)

    # ------------------------------------------------------------------ state

    def _check_names(self, names):
        if len(names) != self.n_loss:
            raise ValueError(f"GradNorm was built for n_loss={self.n_loss} terms; got {len(names)}: {list(names)}")

    #: L_i(0) is taken per term, at its first finite, positive loss: the flags are the slot `has_initial_losses`
    taken_slot = "has_initial_losses"

    def state_spec(self, k):
        # the learned weights are a parameter made in __init__ (the optimizer is built before the first call)
        return {"initial_losses": Slot([k], 1.0, self._dtype), "has_initial_losses": Slot([k], False, "bool")}

    def _weight_vector(self):
        return self.loss_weights

    def _after_load(self):
        super()._after_load()
        self._host["renormalise"] = True
        self._host.pop("renormalised_at", None)
        self._learn_initialised(self.has_initial_losses, now=True)

    def check_terms(self) -> dict:
        out = super().check_terms()  # synchronises anyway: learn whether every L_i(0) has been taken
        if hasattr(self, "has_initial_losses"):
            self._learn_initialised(self.has_initial_losses, now=True)
        return out

    def reset_initial_losses(self) -> None:
        """Take :math:`L_i(0)` again at the next call."""
        if self._names is None:
            return  # no state yet: nothing taken
        self.has_initial_losses.set_value(paddle.zeros([self.n_loss], dtype="bool"))
        self._host["initialised"] = False
        self._host["unknown_updates"] = 0

    # ------------------------------------------------------------------ the method

    def _normalised(self) -> paddle.Tensor:
        w = self._clip(self.loss_weights.detach())
        total = ops.total(w)
        # weights that sum to T up to rounding are kept as they are: renormalising twice is renormalising once
        # (T w / sum(w) of renormalised weights can move them by an ulp: a second L-BFGS closure call of a step
        # would then see other weights than the first)
        done = ops.abs(total - float(self.n_loss)) <= self._renormalised_tol
        return ops.where(done, w, ops.scale(w, self.n_loss) / total)

    @property
    def weights(self) -> dict:
        w = self._normalised().numpy().astype(np.float64).tolist()
        names = self._names or [str(i) for i in range(self.n_loss)]
        return dict(zip(names, w))

    def get_weights(self) -> np.ndarray:
        """The (renormalised) weights as a numpy array."""
        return self._normalised().numpy()

    def _renormalise(self) -> None:
        """``w <- T w / sum(w)`` in place, after bounds (no graph: detached). The weights stay finite and
        their sum positive: the weight gradient is zeroed where non-finite, and ``min_weight > 0``. Training
        calls it once per step (:meth:`_before_call`), so the calls of one step see the same weights."""
        w = self._clip(self.loss_weights.detach())
        ops.assign_(ops.scale(w, float(self.n_loss)) / ops.total(w), self.loss_weights)

    def _capture_initial(self, current) -> None:
        """:math:`L_i(0)`: the first finite, positive loss of each term (on the device, no sync): a term
        whose first loss is NaN, Inf or 0 is taken at a later update, and its ratio is 1 until then.
        ``current``: this call's losses (:meth:`_current_losses`)."""
        init, has = _take_initial(current, self.initial_losses, self.has_initial_losses)
        ops.assign_(init, self.initial_losses)
        ops.assign_(has, self.has_initial_losses)

    def _current_losses(self, losses: paddle.Tensor) -> paddle.Tensor:
        """This call's losses (one detached vector) in the weights' dtype, averaged over ranks."""
        return mean_across_ranks(ops.cast(losses, self.initial_losses.dtype))

    def _before_call(self, values, update):
        """Renormalise once after the weights may have changed (an update call, whose optimizer step
        follows; a load), at the first call of the next step: later calls of that step (an L-BFGS closure,
        accumulated micro-batches) see the same weights. A call that does not update leaves the weights without
        a gradient (``None``, not zeros), so the optimizer skips them: they keep their value between updates,
        as no L_grad was taken (with zeros Adam's momentum would still move them)."""
        h = self._host
        if h["renormalise"] and h["step"] != h.get("renormalised_at"):
            self._renormalise()
            h["renormalise"] = False
            h["renormalised_at"] = h["step"]
        if update:
            h["renormalise"] = True
        else:
            self.loss_weights.clear_gradient(False)

    def weight_gradient(self, values, norms=None) -> tuple:
        """``(L_grad, dL_grad/dw)`` for this call's losses; both detached, no host synchronisation.

        ``norms``: :math:`\\|\\nabla_W L_i\\|_2` if already known (else taken here with ``paddle.grad``).
        """
        if norms is None:
            norms = ops.stack([paddle.linalg.norm(flat_grad(v, self._shared)) for v in values])
        grad = self._weight_gradient(self._current_losses(ops.stack([v.detach() for v in values])), norms)
        return self.last_grad_norm_loss, grad

    def _weight_gradient(self, current, norms, initial=None, has_initial=None) -> paddle.Tensor:
        """The gradient of :func:`gradnorm_weight_gradient` with this balancer's weights and :math:`L_i(0)`
        (``initial``, ``has_initial``: given by :meth:`update`; ``has_initial`` ``None`` there means all taken);
        keeps what :attr:`last_grad_norm_loss` reads (a logging value, not state)."""
        if initial is None:
            initial = self.initial_losses
            has_initial = None if self._host.get("initialised") else self.has_initial_losses
        diff, grad = _gradnorm_difference(norms, current, initial, self.loss_weights, self.alpha, self.eps,
                                          has_initial)
        object.__setattr__(self, "_last_difference", diff)
        return grad

    @property
    def last_grad_norm_loss(self) -> paddle.Tensor:
        """:math:`L_\\mathrm{grad}` of the last update (0 before the first), for logging (not state: a checkpoint does
        not hold it)."""
        diff = self.__dict__.get("_last_difference")
        if diff is None:
            return paddle.zeros([], dtype=self.loss_weights.dtype)
        return ops.total(ops.abs(diff))

    needs_gradients = True

    def update(self, losses, G, state):
        r"""The contract's update of a learned-weight method: returns :math:`\partial L_\mathrm{grad}/\partial w`
        (the update step's total delivers it to ``loss_weights``, nothing into the net), the captured
        :math:`L_i(0)` and the norms :math:`\|\nabla_W L_i\|_2` (the warnings' statistic). ``losses`` are
        rank-averaged in the weights' dtype; ``state["taken"]`` is ``has_initial_losses``, ``None`` once the host
        knows every :math:`L_i(0)` is taken (no capture arithmetic then)."""
        init, has = state["initial_losses"], state["taken"]
        new = {}
        if has is not None:
            init, has = _take_initial(losses, init, has)
            new = {"initial_losses": init, "has_initial_losses": has}
        norms = ops.row_norm(ops.leading_columns(G, self._n_shared))
        return self._weight_gradient(losses, norms, init, has), new, norms

    def get_grad_norm_loss(self, losses) -> paddle.Tensor:
        """GradNorm's :math:`L_\\mathrm{grad}`; writes :math:`\\partial L_\\mathrm{grad}/\\partial w` into
        ``loss_weights.grad`` (``grad.set_value``), replacing what a backward of the weighted sum put there.

        Call it after ``backward(retain_graph=True)`` of the weighted total (it differentiates the losses
        again) and before ``optimizer.step()``. ``losses``: a list, a dict (in the order of
        ``loss_names``) or a 1-D tensor of the ``n_loss`` losses.
        """
        values = self._as_list(losses)
        self._renormalise()
        current = self._current_losses(ops.stack([v.detach() for v in values]))
        self._capture_initial(current)
        norms = ops.stack([paddle.linalg.norm(flat_grad(v, self._shared)) for v in values])
        grad = self._weight_gradient(current, norms)
        l_grad = self.last_grad_norm_loss
        if self.loss_weights.grad is None:
            self.loss_weights.grad = grad.astype(self.loss_weights.dtype)
        else:
            self.loss_weights.grad.set_value(grad.astype(self.loss_weights.grad.dtype))
        return l_grad

    def _as_list(self, losses) -> list:
        if isinstance(losses, Mapping):
            return self._validate(losses)
        if isinstance(losses, paddle.Tensor):
            if len(losses.shape) != 1:
                raise ValueError(f"a tensor of losses must be 1-D; got shape {list(losses.shape)}")
            values = [losses[i] for i in range(losses.shape[0])]
        elif isinstance(losses, Sequence):
            values = list(losses)
        else:
            raise ValueError(f"losses must be a list, dict or 1-D tensor; got {type(losses).__name__}")
        if len(values) != self.n_loss:
            raise ValueError(f"expected {self.n_loss} losses (n_loss); got {len(values)}")
        names = self._names or [f"loss_{i}" for i in range(self.n_loss)]
        return self._validate(dict(zip(names, values)))

    def renormalise(self) -> None:
        """``w <- T w / sum(w)`` now, after bounds (what the first call of each step does): for weights stepped by
        an optimizer outside the training loop's (``paddle_pinn_balance.ppsci.attach_weight_optimizer``)."""
        self._renormalise()


def _take_initial(current, initial, has_initial) -> tuple:
    """``(initial, has_initial)`` after taking :math:`L_i(0)` from ``current`` for every term without one whose
    loss is finite and positive (``where``: on the device, no sync)."""
    take = ~has_initial & ops.isfinite(current) & (current > 0)
    return ops.where(take, current, initial), has_initial | take


def _weight_attr(weight_attr, n: int, dtype: str):
    if weight_attr is None:
        weight_attr = 1.0
    if isinstance(weight_attr, paddle.ParamAttr):
        return weight_attr
    values = np.asarray(weight_attr, dtype=np.float64)
    if values.ndim == 0:
        values = np.full([n], float(values))
    if values.shape != (n,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"`weight_attr` must be a positive number or {n} positive numbers; got {weight_attr!r}")
    return paddle.ParamAttr(initializer=paddle.nn.initializer.Assign(values.astype(dtype)))


def _build_grad_norm(model, **kw):
    """``build_balancer``'s builder: wrap the model (unless it is a wrapper already); the aggregator is the balancer."""
    wrapper = model if isinstance(model, GradNorm) else GradNorm(model, **kw)
    if wrapper is model and kw:
        raise ValueError(f"the model is already a GradNorm wrapper; remove keys {sorted(kw)} from the config")
    return wrapper.aggregator


@register("grad_norm", build=_build_grad_norm)
class GradNorm(paddle.nn.Layer):
    """GradNorm as a network wrapper (PaddlePaddle community design, 2022).

    ``GradNorm(net, n_loss, alpha)(x) == net(x)``; unknown attributes are looked up on ``net``;
    ``loss_weights`` is a learnable parameter of shape ``[n_loss]``, so
    ``paddle.optimizer.Adam(parameters=wrapper.parameters())`` trains it with the network, and
    ``state_dict()`` holds both (``net.*`` and ``aggregator.*``). ``wrapper.aggregator`` is the
    :class:`GradNormBalancer` holding the weights, used as ``aggregator(losses, step)``.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import GradNorm
        >>> mlp = paddle.nn.Sequential(paddle.nn.Linear(2, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 1))
        >>> net = GradNorm(mlp, n_loss=2, alpha=1.5)
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=net.parameters())
        >>> x = paddle.rand([8, 2])
        >>> for step in range(3):
        ...     u = net(x)
        ...     total = net.aggregator({"res": (u ** 2).mean(), "bc": ((u - 1) ** 2).mean()}, step)
        ...     total.backward(); opt.step(); opt.clear_grad()
        >>> round(float(net.get_weights().sum()), 5)
        2.0
    """

    def __init__(self, net: paddle.nn.Layer, n_loss: Optional[int] = None, alpha: float = 1.5, weight_attr=None,
                 shared_params=None, **kwargs):
        super().__init__()
        if not isinstance(net, paddle.nn.Layer):
            raise ValueError(f"`net` must be a paddle.nn.Layer; got {type(net).__name__}")
        self.net = net
        object.__setattr__(self, "_net", net)  # a plain reference for forward (no Layer.__getattr__ per call)
        self.aggregator = GradNormBalancer(net, n_loss=n_loss, alpha=alpha, weight_attr=weight_attr,
                                           shared_params=shared_params, **kwargs)
        object.__setattr__(self.aggregator, "wrapper", self)  # plain reference, not a sublayer

    @property
    def loss_weights(self) -> paddle.Tensor:
        return self.aggregator.loss_weights

    def forward(self, *args, **kwargs):
        return self._net(*args, **kwargs)

    def get_grad_norm_loss(self, losses) -> paddle.Tensor:
        return self.aggregator.get_grad_norm_loss(losses)

    def reset_initial_losses(self) -> None:
        self.aggregator.reset_initial_losses()

    def get_weights(self) -> np.ndarray:
        return self.aggregator.get_weights()

    def set_state_dict(self, state_dict, use_structured_name: bool = True):
        """Load ``net.*`` into the net and ``aggregator.*`` into the balancer (validated first)."""
        state = dict(state_dict)
        agg = {k[len("aggregator."):]: v for k, v in state.items() if k.startswith("aggregator.")}
        rest = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        if len(agg) + len(rest) != len(state):
            odd = [k for k in state if not k.startswith(("aggregator.", "net."))]
            raise ValueError(f"state_dict keys {odd} belong to neither `net.` nor `aggregator.`")
        self.aggregator.set_state_dict(agg, use_structured_name=use_structured_name)
        return self.net.set_state_dict(rest, use_structured_name=use_structured_name)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            net = self.__dict__.get("_sub_layers", {}).get("net")
            if net is None:
                raise
            return getattr(net, name)
