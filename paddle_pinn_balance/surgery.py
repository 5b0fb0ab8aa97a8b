"""Gradient surgery at the cost of a plain step: PCGrad, ConFIG (and its momentum variant M-ConFIG) and UPGrad.

Each method replaces the weighted sum ``w^T G`` of the per-term gradients ``G`` (``[K, P]``) by another
combination ``d(G) = c^T G``. The coefficients ``c`` are found from the ``K x K`` Gram matrix
``G G^T`` (one extra matmul), so the direction costs one more ``[K, P]`` matmul than a weighted sum and no
extra backward: the base class already holds ``G`` on update steps. :class:`MConFIG` differentiates one
term per step (the paper's point: cheaper than a plain step's backward) and combines momenta of the rows.

How they plug in (the method contract, :mod:`paddle_pinn_balance.contract`, as TorchJD composes an aggregator): a
*weighting* maps the Gram matrix to coefficients, ``weighting(gram, state) -> (c, new slots)`` (PCGrad, ConFIG,
UPGrad: :func:`~paddle_pinn_balance.directions.pcgrad_coefficients` and its siblings), and one *combiner*,
:func:`~paddle_pinn_balance.contract.combine`, turns them into ``c^T G`` (:meth:`Surgery.update`). State is
declared once in ``state_spec`` (PCGrad: its draw number; M-ConFIG: momenta, counts, its turn); :class:`Surgery`
runs the update, guards the state, counts the update steps and delivers the direction through the update step's
total. M-ConFIG combines its momenta rather than ``G`` and normalises the result: it writes its own pure
``update``, from the same weighting and combiner. The pure math is in :mod:`paddle_pinn_balance.directions`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import paddle

from . import ops
from .balancer import Balancer, check_float, check_int
from .contract import Slot, combine, register
from .directions import (  # noqa: F401  (the directions' math, importable from here as before)
    _dual_cone_weights,
    _gram,
    _nnls,
    _orders,
    config_coefficients,
    config_direction,
    pcgrad_coefficients,
    pcgrad_direction,
    upgrad_coefficients,
    upgrad_direction,
)
from .gradients import trainable_parameters

__all__ = ["pcgrad_direction", "config_direction", "upgrad_direction", "Surgery", "PCGrad", "ConFIG", "MConFIG",
           "UPGrad"]


class Surgery(Balancer):
    r"""The direction methods' half of the base: a weighting of the Gram matrix composed with one combiner.

    A direction method plugs in like any method of the contract (:mod:`paddle_pinn_balance.contract`): it
    declares its state once in ``state_spec(k)`` and its math is pure. What it computes is not weights but a
    direction: the method defines

    * ``weighting(self, gram, state) -> (c, new slots)``: coefficients ``c`` (``[K]``) from the ``K x K`` Gram
      matrix ``G G^T`` (TorchJD's ``Weighting`` of the Gramian), which :meth:`update`, the one combiner,
      turns into the direction :math:`d = c^\top G` (:func:`~paddle_pinn_balance.contract.combine`; TorchJD's
      weighted aggregator);
    * or, when its direction is not a combination of this call's ``G`` (M-ConFIG: of its momenta), ``update(self,
      losses, G, state) -> (d, new slots, statistic)`` itself, composed from the same pieces.

    This class runs the update on update steps (``_apply_update``): the statistic (``diag(G G^T)`` by default,
    non-finite exactly when a term's gradient is) feeds the warnings, the returned slots are kept only where it
    is finite (``where(ok, new, old)``, as the base guards a weighting's state), and the update step's total
    delivers ``d`` (``_direction``). The weights stay 1: the total's value is :math:`\sum_i L_i`.

    ``counter``: the name of an int64 ``[1]`` slot counting this method's update steps (PCGrad's draw number,
    M-ConFIG's turn): ``state[counter]`` is its value as a Python int (the host keeps it: no synchronisation),
    it advances on every update step whatever the guard says, and a checkpoint's negative value is refused.
    ``gradient_terms(k, count)``: the terms whose gradients ``G`` holds (default all; M-ConFIG: the turn's).
    """

    needs_gradients = True
    #: the int64 ``[1]`` slot that counts update steps, mirrored on the host (``None``: no counter)
    counter: Optional[str] = None
    #: this class is the machinery of the direction methods: the contract checks its subclasses against it
    _machinery = True

    def __init__(self, model, update_freq: int = 1, loss_names: Optional[Sequence[str]] = None,
                 check_every: int = 100, eps: float = 1e-8):
        self._params = trainable_parameters(model, "all")
        super().__init__(loss_names=loss_names, update_freq=check_int("update_freq", update_freq), eps=eps,
                         assemble=True, check_every=check_every)

    #: a non-finite gradient is not skipped (there is no weight to keep): the direction is non-finite
    _nonfinite_effect = "the direction of those updates was non-finite, as the plain sum's gradient would be"

    # ------------------------------------------------------------------ what a method defines

    def weighting(self, gram: paddle.Tensor, state: dict):
        """The coefficients ``c`` (``[K]``) of the direction ``c^T G`` from ``gram = G G^T``, and the new slots.

        Every direction method defines it (or its own :meth:`update`): the class-creation check refuses one that
        does not; ``Surgery`` itself is the machinery, not a method."""
        raise TypeError(f"{type(self).__name__} defines no `weighting(self, gram, state)`: subclass Surgery and "
                        "define it (docs/adding-a-method.md, 'A direction method')")

    def gradient_terms(self, k: int, count: int) -> Optional[list]:
        """The terms whose gradients the update reads (``None``: all ``k``), at the ``count``-th update step."""
        return None

    def update(self, losses, G, state):
        """The one combiner: ``d = c^T G``, ``c`` the method's :meth:`weighting` of ``G G^T``; the statistic
        ``||g_i||^2`` (non-finite or 0 exactly when ``g_i`` is)."""
        gram = _gram(G)
        c, new = self.weighting(gram, state)
        return combine(c, G), new, paddle.diagonal(gram)

    # ------------------------------------------------------------------ the machinery (not overridden by methods)

    def _count(self) -> int:
        return self._host.get("surgery_count", 0)

    def _term_gradients(self, values: list) -> paddle.Tensor:
        rows = self.gradient_terms(len(values), self._count())
        return super()._term_gradients(values if rows is None else [values[i] for i in rows])

    def _apply_update(self, losses, G) -> None:
        """Run :meth:`update`; record its statistic, keep its slots where the statistic is finite, advance the
        counter, and hold the direction for :meth:`_direction` (this update step's total)."""
        b, h = self._buffers, self._host
        k = len(self._names)
        slots = self.__dict__.get("_slot_meta")  # {name: (shape [k]?, dtype)} of the slots an update may return
        if slots is None:
            names = tuple(self.state_spec(k))
            if self.counter is not None and self.counter not in names:
                raise TypeError(f"{type(self).__name__}.counter {self.counter!r} is not a slot of its state_spec")
            slots = self.__dict__["_slot_meta"] = {n: (list(b[n].shape) == [k], b[n].dtype) for n in names
                                                   if n != self.counter}
        state = {n: b[n] for n in slots}
        state["weights"], state["step"] = b["lambdas"], h["step"]
        count = self._count()
        if self.counter is not None:
            state[self.counter] = count
        d, new, stat = self.update(ops.cast(losses, b["lambdas"].dtype), G, state)
        self._record_bad_terms(stat)
        if new:  # kept only if every term's gradient is finite: one verdict for all terms
            self._keep_slots(new, slots, ops.expand(ops.reshape(ops.all_finite(stat), [1]), [k]))
        if self.counter is not None:
            h["surgery_count"] = count + 1
            ops.increment_(b[self.counter])
        h["direction"] = d

    def _direction(self, G, w):
        return self._host.pop("direction")

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        if self.counter is not None and self.counter in arrays:
            check_int(f"state_dict[{self.counter!r}]", int(arrays[self.counter][0]), minimum=0)

    def _after_load(self):
        super()._after_load()
        if self.counter is not None:
            self._host["surgery_count"] = int(self._buffers[self.counter].numpy()[0])


_CADENCE = """
    ``update_freq``: the combination is applied on calls with ``step % update_freq == 0`` (default 1:
    every step). Between updates the total is the plain sum :math:`\\sum_i L_i` through the graph (no
    per-term gradients are taken); the surgery needs ``G`` on every step it is used. :class:`MConFIG` needs one
    term's gradient per step instead (momenta of the others carried over)."""


@register("pcgrad")
class PCGrad(Surgery):
    __doc__ = r"""PCGrad (Yu et al., NeurIPS 2020) as a balancer: :func:`pcgrad_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers :math:`d = \sum_i g_i^{PC}`
    (times any factor on the total). At each update every term draws its own order of the others (the
    paper's Algorithm 1), ``K`` permutations from a NumPy generator seeded with ``(seed, draw number)``; the
    draw number is saved in the ``state_dict`` (bit-exact resume).

    On the contract: ``weighting(gram, state)`` is :func:`~paddle_pinn_balance.directions.pcgrad_coefficients`
    with the orders of draw ``state["pcgrad_draws"]`` (the declared counter slot, a host int), combined as
    :math:`c^\top G` by :class:`Surgery`.
""" + _CADENCE + r"""

    Args:
        model: the ``paddle.nn.Layer`` (or list of parameters) the losses depend on.
        seed: seed of the projection order.
        eps: added to :math:`\|g_j\|^2`.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import PCGrad
        >>> net = paddle.nn.Linear(1, 1)
        >>> pc = PCGrad(net, seed=0)
        >>> x = paddle.rand([8, 1])
        >>> for step in range(3):
        ...     total = pc({"a": (net(x) - 1).pow(2).mean(), "b": (net(x) + 1).pow(2).mean()}, step)
        ...     total.backward()
        >>> pc.weights  # surgery changes the direction, not the weights: the value is sum_i L_i
        {'a': 1.0, 'b': 1.0}

    Note:
        ``ppsci.loss.mtl.PCGrad`` runs one backward per term plus the solver's; here ``G`` is reused.

    References:
        T. Yu et al. Gradient surgery for multi-task learning. NeurIPS 2020.
    """

    counter = "pcgrad_draws"  # the draw number: update steps so far

    def __init__(self, model, seed: int = 0, eps: float = 1e-20, update_freq: int = 1,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.seed = check_int("seed", seed, minimum=0)
        super().__init__(model, update_freq, loss_names, check_every, eps=eps)

    def state_spec(self, k):
        return {"pcgrad_draws": Slot([1], 0, "int64")}

    def orders(self, k: int, draw: int) -> np.ndarray:
        """The ``[k, k]`` orders of update number ``draw`` (row ``i``: term ``i``'s order)."""
        rng = np.random.default_rng([self.seed, draw])
        return np.stack([rng.permutation(k) for _ in range(k)])

    def weighting(self, gram, state):
        return pcgrad_coefficients(gram, self.orders(gram.shape[0], state["pcgrad_draws"]), self.eps), {}


@register("conflict_free")
class ConFIG(Surgery):
    __doc__ = r"""ConFIG (Liu, Chu, Thuerey, ICLR 2025) as a balancer: :func:`config_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers the conflict-free direction. On the contract:
    ``weighting(gram, state)`` is :func:`~paddle_pinn_balance.directions.config_coefficients` (no state),
    combined as :math:`c^\top G` by :class:`Surgery`.
""" + _CADENCE + r"""

    Args:
        model: the ``paddle.nn.Layer`` (or list of parameters) the losses depend on.
        rcond: relative singular-value cutoff of the pseudo-inverse.

    Note:
        The momentum variant (M-ConFIG, one term's gradient per step) is :class:`MConFIG`.

    References:
        Q. Liu, M. Chu, N. Thuerey. ConFIG: Towards conflict-free training of physics informed neural
        networks. ICLR 2025.
    """

    def __init__(self, model, rcond: float = 1e-6, update_freq: int = 1,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.rcond = check_float("rcond", rcond, 0.0, 1.0, low_open=True)
        super().__init__(model, update_freq, loss_names, check_every)

    def weighting(self, gram, state):
        return config_coefficients(gram, rcond=self.rcond), {}


@register("upgrad")
class UPGrad(Surgery):
    __doc__ = r"""UPGrad (Quinton & Rey, Jacobian Descent, TorchJD) as a balancer: :func:`upgrad_direction`.

    On the contract: ``weighting(gram, state)`` is :func:`~paddle_pinn_balance.directions.upgrad_coefficients`
    (TorchJD's ``UPGradWeighting`` of the Gramian; no state), combined as :math:`c^\top G` by :class:`Surgery`.
""" + _CADENCE + r"""

    Note:
        * The ``m x m`` dual-cone QPs are solved on the host (one small device-to-host copy per update) by
          SciPy's ``nnls``: install the extra, ``pip install 'paddle_pinn_balance[upgrad]'`` (construction
          raises ``ImportError`` naming it otherwise).
        * A non-finite gradient has no projection: that update delivers the plain sum's (non-finite)
          gradient, as PCGrad and ConFIG do, and the warning every ``check_every`` updates names the term.

    References:
        P. Quinton, V. Rey. Jacobian descent for multi-objective optimization. arXiv:2406.16232, 2024.
    """

    def __init__(self, model, update_freq: int = 1, loss_names: Optional[Sequence[str]] = None,
                 check_every: int = 100):
        _nnls()  # SciPy is an extra: say so now, not at the first update
        super().__init__(model, update_freq, loss_names, check_every)

    def weighting(self, gram, state):
        return upgrad_coefficients(gram), {}


@register("m_conflict_free")
class MConFIG(Surgery):
    __doc__ = r"""M-ConFIG (Liu, Chu, Thuerey, ICLR 2025, the M-ConFIG algorithm, "Algorithm 1" in the authors'
    documentation; its number in the paper not checked): ConFIG of per-term gradient momenta, one term's
    gradient per step.

    Each term :math:`i` keeps a momentum :math:`m_{g_i}` of its gradient and a count :math:`t_{g_i}`. An update
    step takes the gradient of one term only, in turn (term ``u % K`` at the ``u``-th update step, ``u = 0, 1,
    ...``), and updates that term's momentum; the other momenta are carried over:

    .. math::

        m_{g_i} &\leftarrow \beta_1 m_{g_i} + (1-\beta_1)\nabla_\theta L_i, \quad t_{g_i} \leftarrow t_{g_i} + 1,
        \qquad \hat m_{g_j} = m_{g_j} / (1 - \beta_1^{t_{g_j}}) \ \ \forall j, \\
        \hat m_g &= \mathcal{G}(\hat m_{g_1}, \dots, \hat m_{g_K}) \quad (\text{ConFIG, :func:`config_direction`}),

    and with ``second_moment=True`` (the paper's algorithm, which is an Adam step of its own) a pseudo first
    momentum :math:`m` and a second momentum :math:`v`, with :math:`t` the number of directions produced:

    .. math::

        g_c = \frac{\hat m_g (1-\beta_1^t) - \beta_1 m}{1-\beta_1}, \quad m \leftarrow \beta_1 m + (1-\beta_1) g_c,
        \quad v \leftarrow \beta_2 v + (1-\beta_2) g_c^2, \quad
        d = \frac{\hat m_g}{\sqrt{v / (1-\beta_2^t)} + \epsilon} .

    The total's value is :math:`\sum_i L_i`; its backward delivers :math:`d` (``second_moment=False``:
    :math:`\hat m_g` itself). The paper's update is :math:`\theta \leftarrow \theta - \gamma d`: with
    ``second_moment=True`` train with plain ``paddle.optimizer.SGD(learning_rate=gamma)`` (Adam would normalise
    twice; the authors' code gives the same advice). ``second_moment=False`` delivers the ConFIG direction of
    the bias-corrected momenta (equal positive cosine to every :math:`\hat m_{g_i}`) for any optimizer.

    ``update_freq``: an update step (``step % update_freq == 0``, default 1: every step, as the paper) takes
    one term's gradient and delivers :math:`d`; between updates the total is the plain sum
    :math:`\sum_i L_i` through the graph and the momenta are left alone. Until every term has had its turn
    once (the first ``K - 1`` update steps) the direction is zero: the other momenta have no bias correction
    yet (the authors' ``PseudoMomentumOperator`` does the same; the paper's algorithm leaves it undefined), so
    :math:`t` counts from the ``K``-th update step. The authors' code starts with term 0; the paper's
    algorithm (``i = t % m + 1`` from ``t = 1``) with the second, a cyclic shift.

    Cost: one backward of one term per update step (no backward of the others), a ``K x K`` Gram of the
    momenta and one ``[K, P]`` product; state ``K + 2`` vectors of the parameters' size.

    On the contract: the state is declared in ``state_spec`` (momenta, counts, pseudo and second momentum,
    ``direction_count``, and the counter ``mconfig_turn``, whose host value picks the term,
    ``gradient_terms``); the pure ``update`` composes ConFIG's weighting of the momenta's Gram matrix
    (:func:`~paddle_pinn_balance.directions.config_coefficients`) with the one combiner
    (:func:`~paddle_pinn_balance.contract.combine`, :math:`\hat m_g = c^\top \hat M`), then the second-moment
    step, and returns the direction; :class:`Surgery` guards the state and delivers it. :math:`\epsilon` is the
    base's ``eps``.

    A non-finite gradient of the term whose turn it is (its squared norm, the guard's statistic, non-finite) skips
    the step: momenta, counts and second moment are kept, the delivered direction is zero, and the turn moves on.
    Data-parallel: the term's gradient is averaged over ranks first, and every rank takes the same term, so the
    state is identical on every rank.

    Args:
        model: the ``paddle.nn.Layer`` (or list of parameters) the losses depend on.
        beta_1, beta_2, eps: :math:`\beta_1` (momenta, 0.9), :math:`\beta_2` (second momentum, 0.999),
            :math:`\epsilon` (1e-8), the paper's Adam coefficients.
        second_moment: apply the paper's second-momentum normalisation (default True).
        rcond: relative singular-value cutoff of ConFIG's pseudo-inverse.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance.surgery import MConFIG
        >>> net = paddle.nn.Linear(1, 1)
        >>> bal = MConFIG(net)
        >>> opt = paddle.optimizer.SGD(1e-2, parameters=net.parameters())
        >>> x = paddle.rand([8, 1])
        >>> for step in range(4):
        ...     total = bal({"a": (net(x) - 1).pow(2).mean(), "b": (net(x) + 1).pow(2).mean()}, step)
        ...     total.backward(); opt.step(); opt.clear_grad()
        >>> bal.momentum_counts.numpy().tolist()  # one gradient per step, in turn
        [2.0, 2.0]

    References:
        Q. Liu, M. Chu, N. Thuerey. ConFIG: Towards conflict-free training of physics informed neural
        networks. ICLR 2025 (the M-ConFIG algorithm); tum-pbs/ConFIG ``PseudoMomentumOperator``.
    """

    counter = "mconfig_turn"  # update steps so far: the turn is term `mconfig_turn % K`

    def __init__(self, model, beta_1: float = 0.9, beta_2: float = 0.999, eps: float = 1e-8,
                 second_moment: bool = True, rcond: float = 1e-6, update_freq: int = 1,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.beta_1 = check_float("beta_1", beta_1, 0.0, 1.0, high_open=True)
        self.beta_2 = check_float("beta_2", beta_2, 0.0, 1.0, high_open=True)
        if not isinstance(second_moment, bool):
            raise ValueError(f"`second_moment` must be true or false; got {second_moment!r}")
        self.second_moment = second_moment
        self.rcond = check_float("rcond", rcond, 0.0, 1.0, low_open=True)
        super().__init__(model, update_freq, loss_names, check_every, eps=eps)

    @property
    def _turn(self) -> int:
        """The number of update steps so far (the next turn is term ``_turn % K``)."""
        return self._count()

    def state_spec(self, k):
        n = sum(int(np.prod(p.shape)) for p in self._params)
        dtype = str(self._params[0].dtype).split(".")[-1]  # the gradients' dtype
        return {"momenta": Slot([k, n], 0.0, dtype), "momentum_counts": Slot([k], 0.0, dtype),
                "pseudo_momentum": Slot([n], 0.0, dtype), "second_momentum": Slot([n], 0.0, dtype),
                "direction_count": Slot([1], 0.0, dtype), "mconfig_turn": Slot([1], 0, "int64")}

    def add_parameters(self, params) -> None:
        if self._count():
            raise ValueError("MConFIG.add_parameters must be called before the first update step")
        super().add_parameters(params)
        if self._names is not None:  # the state was sized for the model alone
            for name in self.state_spec(len(self._names)):
                del self._buffers[name]
            self._create_state(len(self._names))

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        for key in ("mconfig_turn", "momentum_counts", "direction_count"):
            if np.any(arrays[key] < 0):
                raise ValueError(f"state_dict[{key!r}] must be >= 0 (a count); got {arrays[key].tolist()}")

    _nonfinite_effect = "those steps were skipped (momenta kept, direction zero)"

    def gradient_terms(self, k, count):
        return [count % k]  # this turn's term only

    def _row_mask(self, i: int, k: int) -> tuple:
        """``[k]`` and ``[k, 1]`` bool, true at ``i`` (constants, made once per ``(i, k)``)."""
        masks = self.__dict__.setdefault("_turn_masks", {})
        mask = masks.get((i, k))
        if mask is None:
            flags = np.arange(k) == i
            mask = masks[(i, k)] = (paddle.to_tensor(flags), paddle.to_tensor(flags[:, None]))
        return mask

    def update(self, losses, G, state):
        """Term ``i``'s momentum takes its gradient ``G`` (``[1, P]``); the direction from every momentum
        (device-side). The statistic is ``||g||^2`` for term ``i`` and 1 for the others (not read this step)."""
        b1, b2 = self.beta_1, self.beta_2
        M, counts = state["momenta"], state["momentum_counts"]
        k = M.shape[0]
        i = state["mconfig_turn"] % k
        g = ops.reshape(G, [-1])
        mask, rows = self._row_mask(i, k)
        stat = ops.where(mask, ops.expand(ops.total(g * g), [k]), ops.filled(k, 1.0, g))
        ok = ops.all_finite(stat)  # the guard's verdict on the returned slots, as the base forms it
        M = ops.where(ops.expand(rows, M.shape), ops.expand(ops.reshape(b1 * M[i] + (1.0 - b1) * g, [1, -1]),
                                                            M.shape), M)  # row i replaced
        counts = counts + ops.cast(mask, counts.dtype)
        seen = counts > 0
        one = ops.filled(None, 1.0, counts)
        bias = ops.where(seen, one - paddle.pow(ops.filled(None, b1, counts), counts), paddle.ones_like(counts))
        M_hat = M / bias.unsqueeze(1)
        m_g = combine(config_coefficients(_gram(M_hat), rcond=self.rcond), M_hat)  # ConFIG of the momenta
        go = ok & paddle.all(seen)
        t = state["direction_count"] + ops.cast(go, counts.dtype)  # [1]
        new = {"momenta": M, "momentum_counts": counts, "direction_count": t}
        if not self.second_moment:
            return ops.where(go, m_g, paddle.zeros_like(m_g)), new, stat
        m_t = m_g * (1.0 - paddle.pow(ops.filled(None, b1, counts), t))
        g_c = (m_t - b1 * state["pseudo_momentum"]) / (1.0 - b1)
        v = b2 * state["second_momentum"] + (1.0 - b2) * g_c * g_c
        v_hat = v / (1.0 - paddle.pow(ops.filled(None, b2, counts), t))
        d = m_g / (paddle.sqrt(v_hat) + self.eps)
        new["pseudo_momentum"] = ops.where(go, m_t, state["pseudo_momentum"])
        new["second_momentum"] = ops.where(go, v, state["second_momentum"])
        return ops.where(go, d, paddle.zeros_like(d)), new, stat

    def extra_repr(self):
        return (f"{super().extra_repr()}, beta_1={self.beta_1}, beta_2={self.beta_2}, eps={self.eps}, "
                f"second_moment={self.second_moment}")
