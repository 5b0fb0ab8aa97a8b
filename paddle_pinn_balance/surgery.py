"""Gradient surgery at the cost of a plain step: PCGrad, ConFIG (and its momentum variant M-ConFIG) and UPGrad.

Each method replaces the weighted sum ``w^T G`` of the per-term gradients ``G`` (``[K, P]``) by another
combination ``d(G) = c^T G``. The coefficients ``c`` are found from the ``K x K`` Gram matrix
``G G^T`` (one extra matmul), so the direction costs one more ``[K, P]`` matmul than a weighted sum and no
extra backward: the base class already holds ``G`` on update steps. :class:`MConFIG` differentiates one
term per step (the paper's point: cheaper than a plain step's backward) and combines momenta of the rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import paddle

from . import ops
from .balancer import Balancer, check_float, check_int, weighted_sum
from .contract import register
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
from .gradients import assembled_total, trainable_parameters

__all__ = ["pcgrad_direction", "config_direction", "upgrad_direction", "PCGrad", "ConFIG", "MConFIG", "UPGrad"]


class _Surgery(Balancer):
    """Shared base: weights stay 1 (the value is ``sum_i L_i``); the update step's total delivers ``d(G)``."""

    needs_gradients = True

    def __init__(self, model, update_freq: int = 1, loss_names: Optional[Sequence[str]] = None,
                 check_every: int = 100):
        self._params = trainable_parameters(model, "all")
        super().__init__(loss_names=loss_names, update_freq=check_int("update_freq", update_freq),
                         assemble=True, check_every=check_every)

    #: a non-finite gradient is not skipped (there is no weight to keep): the direction is non-finite
    _nonfinite_effect = "the direction of those updates was non-finite, as the plain sum's gradient would be"

    def _update_from_gradients(self, losses, G):
        return None  # no weights to learn: the combination is in `_direction`

    def _direction(self, G, w):
        gram = _gram(G)
        self._record_bad_terms(paddle.diagonal(gram))  # ||g_i||^2: non-finite or 0 exactly when g_i is
        return paddle.matmul(self._coefficients(gram), G)


_CADENCE = """
    ``update_freq``: the combination is applied on calls with ``step % update_freq == 0`` (default 1:
    every step). Between updates the total is the plain sum :math:`\\sum_i L_i` through the graph (no
    per-term gradients are taken); the surgery needs ``G`` on every step it is used. :class:`MConFIG` needs one
    term's gradient per step instead (momenta of the others carried over)."""


@register("pcgrad")
class PCGrad(_Surgery):
    __doc__ = r"""PCGrad (Yu et al., NeurIPS 2020) as a balancer: :func:`pcgrad_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers :math:`d = \sum_i g_i^{PC}`
    (times any factor on the total). At each update every term draws its own order of the others (the
    paper's Algorithm 1), ``K`` permutations from a NumPy generator seeded with ``(seed, draw number)``; the
    draw number is saved in the ``state_dict`` (bit-exact resume).
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

    def __init__(self, model, seed: int = 0, eps: float = 1e-20, update_freq: int = 1,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.seed = check_int("seed", seed, minimum=0)
        self.pc_eps = check_float("eps", eps, 0.0)
        self._draws = 0
        super().__init__(model, update_freq, loss_names, check_every)
        self.register_buffer("pcgrad_draws", paddle.zeros([1], dtype="int64"))

    def _extra_state_shapes(self, k):
        return {"pcgrad_draws": [1]}

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        check_int("state_dict['pcgrad_draws']", int(arrays["pcgrad_draws"][0]), minimum=0)

    def _after_load(self):
        super()._after_load()
        self._draws = int(self.pcgrad_draws.numpy()[0])

    def orders(self, k: int, draw: int) -> np.ndarray:
        """The ``[k, k]`` orders of update number ``draw`` (row ``i``: term ``i``'s order)."""
        rng = np.random.default_rng([self.seed, draw])
        return np.stack([rng.permutation(k) for _ in range(k)])

    def _coefficients(self, gram):
        k = gram.shape[0]
        order = self.orders(k, self._draws)
        self._draws += 1
        paddle.assign(paddle.full([1], self._draws, dtype="int64"), self.pcgrad_draws)
        return pcgrad_coefficients(gram, order, self.pc_eps)


@register("conflict_free")
class ConFIG(_Surgery):
    __doc__ = r"""ConFIG (Liu, Chu, Thuerey, ICLR 2025) as a balancer: :func:`config_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers the conflict-free direction.
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

    def _coefficients(self, gram):
        return config_coefficients(gram, rcond=self.rcond)


@register("upgrad")
class UPGrad(_Surgery):
    __doc__ = r"""UPGrad (Quinton & Rey, Jacobian Descent, TorchJD) as a balancer: :func:`upgrad_direction`.
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

    def _coefficients(self, gram):
        return upgrad_coefficients(gram)


@register("m_conflict_free")
class MConFIG(_Surgery):
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

    A non-finite gradient of the term whose turn it is skips the step: momenta, counts and second moment are
    kept, the delivered direction is zero, and the turn moves on. Data-parallel: the term's gradient is averaged
    over ranks first, and every rank takes the same term, so the state is identical on every rank.

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

    def __init__(self, model, beta_1: float = 0.9, beta_2: float = 0.999, eps: float = 1e-8,
                 second_moment: bool = True, rcond: float = 1e-6, update_freq: int = 1,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.beta_1 = check_float("beta_1", beta_1, 0.0, 1.0, high_open=True)
        self.beta_2 = check_float("beta_2", beta_2, 0.0, 1.0, high_open=True)
        self.m_eps = check_float("eps", eps, 0.0)
        if not isinstance(second_moment, bool):
            raise ValueError(f"`second_moment` must be true or false; got {second_moment!r}")
        self.second_moment = second_moment
        self.rcond = check_float("rcond", rcond, 0.0, 1.0, low_open=True)
        self._turn = 0
        super().__init__(model, update_freq, loss_names, check_every)

    def _n_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self._params)

    def _create_state(self, k):
        super()._create_state(k)
        self._create_momentum_state(k)

    def _create_momentum_state(self, k):
        n, dtype = self._n_params(), self._params[0].dtype
        self.register_buffer("momenta", paddle.zeros([k, n], dtype=dtype))
        self.register_buffer("momentum_counts", paddle.zeros([k], dtype=dtype))
        self.register_buffer("pseudo_momentum", paddle.zeros([n], dtype=dtype))
        self.register_buffer("second_momentum", paddle.zeros([n], dtype=dtype))
        self.register_buffer("direction_count", paddle.zeros([1], dtype=dtype))
        self.register_buffer("mconfig_turn", paddle.zeros([1], dtype="int64"))

    def add_parameters(self, params) -> None:
        if self._turn:
            raise ValueError("MConFIG.add_parameters must be called before the first update step")
        super().add_parameters(params)
        if self._names is not None:  # the state was sized for the model alone
            self._create_momentum_state(len(self._names))

    def _extra_state_shapes(self, k):
        n = self._n_params()
        return {"momenta": [k, n], "momentum_counts": [k], "pseudo_momentum": [n], "second_momentum": [n],
                "direction_count": [1], "mconfig_turn": [1]}

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        for key in ("mconfig_turn", "momentum_counts", "direction_count"):
            if np.any(arrays[key] < 0):
                raise ValueError(f"state_dict[{key!r}] must be >= 0 (a count); got {arrays[key].tolist()}")

    def _after_load(self):
        super()._after_load()
        self._turn = int(self.mconfig_turn.numpy()[0])

    def _total(self, values, update):
        if not update:
            return weighted_sum(ops.stack(values), self.lambdas)
        i = self._turn % len(values)
        self._turn += 1
        ops.increment_(self.mconfig_turn)
        g = ops.reshape(self._term_gradients([values[i]]), [-1])  # this turn's term only
        losses = ops.stack([v.detach() for v in values])
        with paddle.no_grad():
            d = self._step(i, g)
        return assembled_total(losses, self.lambdas, d, self._params)

    _nonfinite_effect = "those steps were skipped (momenta kept, direction zero)"

    def _record_turn(self, i: int, g: paddle.Tensor) -> None:
        """The non-finite / zero bookkeeping of the term whose turn it is (the others count as fine)."""
        masks = self.__dict__.setdefault("_turn_masks", {})
        k = self.momenta.shape[0]
        mask = masks.get((i, k))
        if mask is None:
            mask = masks[(i, k)] = paddle.to_tensor(np.arange(k) == i)
        one = ops.filled(k, 1.0, g)
        self._record_bad_terms(ops.where(mask, ops.expand(ops.total(g * g), [k]), one))

    def _step(self, i: int, g: paddle.Tensor) -> paddle.Tensor:
        """Update term ``i``'s momentum with its gradient ``g``; the direction to deliver (device-side)."""
        b1, b2 = self.beta_1, self.beta_2
        M, counts = self.momenta, self.momentum_counts
        ok = ops.all_finite(g)
        self._record_turn(i, g)
        row = M[i]
        M[i] = ops.where(ok, b1 * row + (1.0 - b1) * g, row)
        counts[i] = counts[i] + ops.cast(ok, counts.dtype)
        seen = counts > 0
        one = ops.filled(None, 1.0, counts)
        bias = ops.where(seen, one - paddle.pow(ops.filled(None, b1, counts), counts), paddle.ones_like(counts))
        M_hat = M / bias.unsqueeze(1)
        m_g = paddle.matmul(config_coefficients(_gram(M_hat), rcond=self.rcond), M_hat)
        go = ok & paddle.all(seen)
        t = self.direction_count + ops.cast(go, counts.dtype)  # [1]
        ops.assign_(t, self.direction_count)
        if not self.second_moment:
            return ops.where(go, m_g, paddle.zeros_like(m_g))
        m_t = m_g * (1.0 - paddle.pow(ops.filled(None, b1, counts), t))
        g_c = (m_t - b1 * self.pseudo_momentum) / (1.0 - b1)
        v = b2 * self.second_momentum + (1.0 - b2) * g_c * g_c
        v_hat = v / (1.0 - paddle.pow(ops.filled(None, b2, counts), t))
        d = m_g / (paddle.sqrt(v_hat) + self.m_eps)
        ops.assign_(ops.where(go, m_t, self.pseudo_momentum), self.pseudo_momentum)
        ops.assign_(ops.where(go, v, self.second_momentum), self.second_momentum)
        return ops.where(go, d, paddle.zeros_like(d))

    def extra_repr(self):
        return (f"{super().extra_repr()}, beta_1={self.beta_1}, beta_2={self.beta_2}, eps={self.m_eps}, "
                f"second_moment={self.second_moment}")
