"""Gradient surgery at the cost of a plain step: PCGrad, ConFIG and UPGrad.

Each method replaces the weighted sum ``w^T G`` of the per-term gradients ``G`` (``[K, P]``) by another
combination ``d(G) = c^T G``. The coefficients ``c`` are found from the ``K x K`` Gram matrix
``G G^T`` (one extra matmul), so the direction costs one more ``[K, P]`` matmul than a weighted sum and no
extra backward: the base class already holds ``G`` on update steps.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import paddle

from .balancer import Balancer, check_float, check_int
from .gradients import trainable_parameters

__all__ = ["pcgrad_direction", "config_direction", "upgrad_direction", "PCGrad", "ConFIG", "UPGrad"]


def _gram(G: paddle.Tensor) -> paddle.Tensor:
    return paddle.matmul(G, G, transpose_y=True)


def pcgrad_coefficients(gram: paddle.Tensor, order: Sequence[int], eps: float = 0.0) -> paddle.Tensor:
    """Coefficients ``c`` (``[K]``) with ``pcgrad_direction(G, order) = c^T G``, from ``gram = G G^T``.

    Row ``i`` of ``C`` holds ``g_i^{PC}`` in the basis of the original gradients; projecting out ``g_j``
    changes only column ``j``. No host synchronisation (the conflict test is a ``minimum``)."""
    k = gram.shape[0]
    C = paddle.eye(k, dtype=gram.dtype)
    off = 1.0 - paddle.eye(k, dtype=gram.dtype)
    diag = paddle.diagonal(gram)
    for j in order:
        dots = paddle.matmul(C, gram[:, j])  # g_i^PC . g_j for every i
        coef = paddle.minimum(dots, paddle.zeros_like(dots)) / (diag[j] + eps) * off[:, j]
        C[:, j] = C[:, j] - coef
    return C.sum(axis=0)


def pcgrad_direction(G: paddle.Tensor, order: Sequence[int], eps: float = 0.0) -> paddle.Tensor:
    r"""PCGrad (Yu et al., NeurIPS 2020, Algorithm 1): the sum of the "projected conflicting gradients".

    .. math::

        g_i^{PC} \leftarrow g_i^{PC} - \frac{\min(g_i^{PC}\cdot g_j,\,0)}{\|g_j\|^2}\, g_j
        \quad (j \in \texttt{order},\ j \ne i), \qquad d = \sum_i g_i^{PC},

    starting from :math:`g_i^{PC} = g_i` (Algorithm 1 lines 4-8; the :math:`\min(\cdot, 0)` is the
    "if :math:`g_i \cdot g_j < 0`" test). Every term takes the other terms in the same ``order``
    (a permutation of ``range(K)``; the paper shuffles per term, which is the same in law for K = 2).

    Args:
        G: ``[K, P]`` per-term gradients (rows ``g_i``).
        order: the order in which the other terms are projected out.
        eps: added to :math:`\|g_j\|^2` (a zero gradient then projects nothing).
    """
    return paddle.matmul(pcgrad_coefficients(_gram(G), order, eps), G)


def config_coefficients(gram: paddle.Tensor, eps: float = 1e-12, rcond: float = 1e-6) -> paddle.Tensor:
    """Coefficients ``c`` with ``config_direction(G) = c^T G``, from ``gram = G G^T`` (float64 solve)."""
    A = gram.astype("float64")
    norms = paddle.sqrt(paddle.clip(paddle.diagonal(A), min=0.0)) + eps
    U = A / norms.unsqueeze(1) / norms.unsqueeze(0)  # Gram of the unit gradients
    y = paddle.matmul(paddle.linalg.pinv(U, rcond=rcond, hermitian=True), paddle.ones([A.shape[0]], "float64"))
    a = y / norms  # pinv(U^T) 1 = sum_i a_i g_i  (the minimum-norm solution of U x = 1)
    Ga = paddle.matmul(A, a)
    s = Ga.sum() / (paddle.dot(a, Ga) + eps)  # (sum_i g_i . g_u) / ||sum_i a_i g_i||, g_u = unit(G^T a)
    return (a * s).astype(gram.dtype)


def config_direction(G: paddle.Tensor, eps: float = 1e-12, rcond: float = 1e-6) -> paddle.Tensor:
    r"""ConFIG (Liu, Chu, Thuerey, ICLR 2025, eqs. 2-3; ``conflictfree.grad_operator.ConFIG_update``).

    .. math::

        g_u = \mathcal{U}\big( [\mathcal{U}(g_1), \dots, \mathcal{U}(g_m)]^{+\top} \mathbf{1}_m \big), \qquad
        d = \Big(\sum_i g_i \cdot g_u\Big)\, g_u ,

    :math:`\mathcal{U}(x) = x / \|x\|`, :math:`^{+}` the Moore-Penrose pseudo-inverse: ``d`` has the same
    positive cosine with every :math:`g_i` (when the unit gradients are linearly independent).
    The pseudo-inverse is taken of the ``m x m`` Gram matrix of the unit gradients in float64 with
    relative cutoff ``rcond`` (stable for nearly parallel gradients: their common direction is kept).
    """
    return paddle.matmul(config_coefficients(_gram(G), eps, rcond), G)


def _dual_cone_weights(A: np.ndarray) -> np.ndarray:
    """For each ``i``: ``argmin_{w >= e_i} w^T A w`` (A PSD, ``K x K``), exactly by NNLS. Rows: the ``w``."""
    from scipy.optimize import nnls

    k = A.shape[0]
    s, V = np.linalg.eigh((A + A.T) / 2)
    M = np.sqrt(np.clip(s, 0.0, None))[:, None] * V.T  # A = M^T M
    W = np.eye(k)
    for i in range(k):
        z, _ = nnls(M, -M[:, i])  # min ||M (e_i + z)||, z >= 0
        W[i] += z
    return W


def upgrad_coefficients(gram: paddle.Tensor) -> paddle.Tensor:
    """Coefficients ``c`` with ``upgrad_direction(G) = c^T G`` (the ``K x K`` QPs solved on the host)."""
    A = gram.numpy().astype(np.float64)
    scale = max(float(np.max(np.abs(np.diag(A)))), 1e-300)
    W = _dual_cone_weights(A / scale)
    return paddle.to_tensor(W.mean(axis=0), dtype=gram.dtype)


def upgrad_direction(G: paddle.Tensor) -> paddle.Tensor:
    r"""UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, eq. 5; TorchJD).

    .. math::

        d = \frac1m \sum_i \pi_J(g_i), \qquad
        \pi_J(g_i) = \arg\min_{v:\ J v \ge 0} \|v - g_i\|^2 = J^\top w_i, \quad
        w_i = \arg\min_{w \ge e_i} w^\top J J^\top w ,

    the projection of each row onto the dual cone of the rows (the paper's Proposition 5 gives the dual
    form in ``w``), averaged (TorchJD's default preference ``1/m``). Each ``w_i`` is solved exactly as a
    non-negative least-squares problem on the ``m x m`` Gram matrix with SciPy (Lawson-Hanson).

    Note:
        The QPs run on the host: one device-to-host copy of the ``m x m`` Gram matrix per update step.
    """
    return paddle.matmul(upgrad_coefficients(_gram(G)), G)


class _Surgery(Balancer):
    """Shared base: weights stay 1 (the value is ``sum_i L_i``); the update step's total delivers ``d(G)``."""

    needs_gradients = True

    def __init__(self, model, update_freq: int = 1, loss_names: Optional[Sequence[str]] = None,
                 check_every: int = 100):
        self._params = trainable_parameters(model, "all")
        super().__init__(loss_names=loss_names, update_freq=check_int("update_freq", update_freq),
                         assemble=True, check_every=check_every)

    def _update_from_gradients(self, losses, G):
        return None  # no weights to learn: the combination is in `_direction`

    def _direction(self, G, w):
        return paddle.matmul(self._coefficients(_gram(G)), G)


_CADENCE = """
    ``update_freq``: the combination is applied on calls with ``step % update_freq == 0`` (default 1:
    every step). Between updates the total is the plain sum :math:`\\sum_i L_i` through the graph (no
    per-term gradients are taken); the surgery needs ``G`` on every step it is used."""


class PCGrad(_Surgery):
    __doc__ = r"""PCGrad (Yu et al., NeurIPS 2020) as a balancer: :func:`pcgrad_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers :math:`d = \sum_i g_i^{PC}`
    (times any factor on the total). The order is drawn from a NumPy generator seeded with
    ``(seed, draw number)``; the draw number is saved in the ``state_dict`` (bit-exact resume).
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
        One order for all terms per step (the paper's code shuffles per term; equal in law for 2 terms).
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

    def _after_load(self):
        super()._after_load()
        self._draws = int(self.pcgrad_draws.numpy()[0])

    def _coefficients(self, gram):
        k = gram.shape[0]
        order = np.random.default_rng([self.seed, self._draws]).permutation(k).tolist()
        self._draws += 1
        paddle.assign(paddle.full([1], self._draws, dtype="int64"), self.pcgrad_draws)
        return pcgrad_coefficients(gram, order, self.pc_eps)


class ConFIG(_Surgery):
    __doc__ = r"""ConFIG (Liu, Chu, Thuerey, ICLR 2025) as a balancer: :func:`config_direction` on update steps.

    The total's value is :math:`\sum_i L_i`; its backward delivers the conflict-free direction.
""" + _CADENCE + r"""

    Args:
        model: the ``paddle.nn.Layer`` (or list of parameters) the losses depend on.
        rcond: relative singular-value cutoff of the pseudo-inverse.

    Note:
        The momentum variant (M-ConFIG) is not implemented.

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


class UPGrad(_Surgery):
    __doc__ = r"""UPGrad (Quinton & Rey, Jacobian Descent, TorchJD) as a balancer: :func:`upgrad_direction`.
""" + _CADENCE + r"""

    Note:
        The ``m x m`` dual-cone QPs are solved on the host (one small device-to-host copy per update).

    References:
        P. Quinton, V. Rey. Jacobian descent for multi-objective optimization. arXiv:2406.16232, 2024.
    """

    def _coefficients(self, gram):
        return upgrad_coefficients(gram)
