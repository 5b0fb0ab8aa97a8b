"""The directions of gradient surgery as pure functions of the per-term gradients ``G`` (``[K, P]``) or their
Gram matrix: PCGrad (Yu et al., NeurIPS 2020), ConFIG (Liu, Chu & Thuerey, ICLR 2025) and UPGrad (Quinton & Rey,
arXiv 2406.16232). The classes that apply them in training are in :mod:`paddle_pinn_balance.surgery`."""

from __future__ import annotations

import numpy as np
import paddle

__all__ = ["pcgrad_direction", "config_direction", "upgrad_direction", "pcgrad_coefficients", "config_coefficients",
           "upgrad_coefficients"]


def _gram(G: paddle.Tensor) -> paddle.Tensor:
    return paddle.matmul(G, G, transpose_y=True)


def _orders(order, k: int) -> np.ndarray:
    """``order`` as a ``[K, K]`` integer array, row ``i`` the order term ``i`` takes the others in."""
    a = np.asarray(order, dtype=np.int64)
    if a.ndim == 1:
        a = np.tile(a, (k, 1))
    if a.shape != (k, k) or any(sorted(row) != list(range(k)) for row in a.tolist()):
        raise ValueError(f"`order` must be a permutation of range({k}) or {k} of them (one per term); got {order!r}")
    return a


def pcgrad_coefficients(gram: paddle.Tensor, order, eps: float = 0.0) -> paddle.Tensor:
    """Coefficients ``c`` (``[K]``) with ``pcgrad_direction(G, order) = c^T G``, from ``gram = G G^T``.

    Row ``i`` of ``C`` holds ``g_i^{PC}`` in the basis of the original gradients; at position ``t`` every
    row ``i`` projects out its own ``j = order[i][t]`` (``E_t``: the one-hot matrix of those ``j``), which
    changes only ``C[i, j]``. No host synchronisation (the conflict test is a ``minimum``)."""
    k = gram.shape[0]
    orders = _orders(order, k)
    C = paddle.eye(k, dtype=gram.dtype)
    diag = paddle.diagonal(gram)
    eye = np.eye(k)
    for t in range(k):
        js = orders[:, t]
        own = js == np.arange(k)  # j == i: a zero row of E, nothing projected (1 keeps 0 / den finite)
        E = paddle.to_tensor(eye[js] * ~own[:, None], dtype=gram.dtype)
        dots = (paddle.matmul(C, gram) * E).sum(axis=1)  # g_i^PC . g_j for every i, j = order[i][t]
        den = paddle.matmul(E, diag) + paddle.to_tensor(own + eps, dtype=gram.dtype)
        coef = paddle.minimum(dots, paddle.zeros_like(dots)) / den
        C = C - coef.unsqueeze(1) * E
    return C.sum(axis=0)


def pcgrad_direction(G: paddle.Tensor, order, eps: float = 0.0) -> paddle.Tensor:
    r"""PCGrad (Yu et al., NeurIPS 2020, Algorithm 1): the sum of the "projected conflicting gradients".

    .. math::

        g_i^{PC} \leftarrow g_i^{PC} - \frac{\min(g_i^{PC}\cdot g_j,\,0)}{\|g_j\|^2}\, g_j
        \quad (j \in \texttt{order}_i,\ j \ne i), \qquad d = \sum_i g_i^{PC},

    starting from :math:`g_i^{PC} = g_i` (Algorithm 1 lines 4-8; the :math:`\min(\cdot, 0)` is the
    "if :math:`g_i \cdot g_j < 0`" test). Term ``i`` takes the other terms in its own order
    ``order[i]`` (the paper draws a random order per term, as does TorchJD's ``PCGrad``).

    Args:
        G: ``[K, P]`` per-term gradients (rows ``g_i``).
        order: ``K`` permutations of ``range(K)``, one per term (``[K, K]``), or one permutation that every
            term takes.
        eps: added to :math:`\|g_j\|^2` (a zero gradient then projects nothing).
    """
    return paddle.matmul(pcgrad_coefficients(_gram(G), order, eps), G)


def config_coefficients(gram: paddle.Tensor, eps: float = 1e-12, rcond: float = 1e-6) -> paddle.Tensor:
    r"""Coefficients ``c`` with ``config_direction(G) = c^T G``, from ``gram = G G^T`` (float64 solve).

    ``rcond`` cuts the singular values :math:`\sigma` of the unit-row matrix relative to the largest; the
    eigenvalues of its Gram matrix ``U`` are :math:`\sigma^2`, so the pseudo-inverse of ``U`` cuts at
    ``rcond ** 2``."""
    A = gram.astype("float64")
    # a non-finite gradient: solve with 0 in its place (an eigensolver raises on NaN); the direction c^T G is
    # non-finite anyway, as the plain sum's gradient
    A = paddle.where(paddle.isfinite(A), A, paddle.zeros_like(A))
    norms = paddle.sqrt(paddle.clip(paddle.diagonal(A), min=0.0)) + eps
    U = A / norms.unsqueeze(1) / norms.unsqueeze(0)  # Gram of the unit gradients
    y = paddle.matmul(paddle.linalg.pinv(U, rcond=rcond * rcond, hermitian=True),
                      paddle.ones([A.shape[0]], "float64"))
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
    The pseudo-inverse is taken of the ``m x m`` Gram matrix of the unit gradients in float64, dropping the
    singular values of the unit-gradient matrix below ``rcond`` times the largest (eigenvalues of the Gram
    matrix below ``rcond**2`` times the largest), as ``conflictfree``'s least-squares solve does for all but
    numerically dependent rows: nearly parallel gradients keep every direction and equal cosines.
    """
    return paddle.matmul(config_coefficients(_gram(G), eps, rcond), G)


def _nnls():
    """SciPy's ``nnls`` (UPGrad's QP solver), or an ImportError that names the extra to install."""
    try:
        from scipy.optimize import nnls
    except ImportError as e:
        raise ImportError("UPGrad needs SciPy (scipy.optimize.nnls): pip install 'paddle_pinn_balance[upgrad]' "
                          f"(or pip install scipy); {e}") from None
    return nnls


def _dual_cone_weights(A: np.ndarray) -> np.ndarray:
    """For each ``i``: ``argmin_{w >= e_i} w^T A w`` (A PSD, ``K x K``), exactly by NNLS. Rows: the ``w``."""
    nnls = _nnls()

    k = A.shape[0]
    s, V = np.linalg.eigh((A + A.T) / 2)
    M = np.sqrt(np.clip(s, 0.0, None))[:, None] * V.T  # A = M^T M
    W = np.eye(k)
    for i in range(k):
        z, _ = nnls(M, -M[:, i])  # min ||M (e_i + z)||, z >= 0
        W[i] += z
    return W


def upgrad_coefficients(gram: paddle.Tensor) -> paddle.Tensor:
    """Coefficients ``c`` with ``upgrad_direction(G) = c^T G`` (the ``K x K`` QPs solved on the host). A
    non-finite ``gram`` (a NaN or Inf gradient) has no projection: the coefficients are all 1, the plain
    sum's (whose gradient is then non-finite too), as every other method delivers."""
    A = gram.numpy().astype(np.float64)
    if not np.all(np.isfinite(A)):
        return paddle.ones([A.shape[0]], dtype=gram.dtype)
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
