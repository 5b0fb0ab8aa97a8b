"""Causal weighting of a time-dependent residual (Wang, Sankaran, Perdikaris, CMAME 421, 116813, 2024)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import paddle

from .checks import build_from_keywords, check_choice, check_float, check_int

#: Causal weights below this count as 0 in the loss (no subnormal floats in the backward; the terms they drop are
#: below 1e-20 of their chunk's loss).
FLUSH = 1e-20


def causal_weights(chunk_losses, eps, initial_loss=None):
    r"""Causal weights (arXiv 2203.07404v1 eq. 3.2; CMAME 2024), detached:

    .. math:: w_i = \exp\Big(-\epsilon \sum_{k=1}^{i-1} L_r^k\Big), \quad i = 1..M \;(w_1 = 1).

    ``chunk_losses``: ``[M]``; ``eps``: a number or a 0-d tensor. ``initial_loss`` (optional, 0-d): the
    initial-condition loss :math:`L_0` added inside every exponent,
    :math:`w_i = \exp(-\epsilon (L_0 + \sum_{k<i} L_r^k))` (so :math:`w_1 = e^{-\epsilon L_0}`), as the
    authors' Kuramoto-Sivashinsky and Navier-Stokes code does (their Allen-Cahn and Lorenz code has no
    :math:`L_0`). The paper is of two minds: its text treats :math:`L_{ic}` as "a special temporal residual
    at t = 0" incorporated "in the same manner", while Algorithm 1 as printed (eqs. 3.4-3.5) puts
    :math:`\lambda_{ic} L_{ic}` in the loss and starts the exponent's sum at :math:`k = 1` (no :math:`L_0`,
    the default here).
    """
    c = chunk_losses.detach()
    exclusive = paddle.cumsum(c, axis=0) - c
    if initial_loss is not None:
        exclusive = exclusive + initial_loss.detach().astype(c.dtype).reshape([])
    return paddle.exp(-eps * exclusive).detach()


class CausalResidual(paddle.nn.Layer):
    r"""The causal residual loss :math:`L_r = \frac1M \sum_{i=1}^M w_i L_r^i` (arXiv 2203.07404v1 eq. 3.1
    with the weights of eq. 3.2; the :math:`\epsilon` annealing and stopping rule are its Algorithm 1).

    :math:`L_r^i` is the mean squared residual on time chunk ``i`` and :math:`w_i` are the detached
    :func:`causal_weights`. The result is one scalar: give it to any balancer as the term ``"res"``.

    Args:
        n_chunks: :math:`M`, the number of time chunks.
        eps: :math:`\epsilon`, the causality parameter (default 1.0, as ``ppsci.loss.CausalMSELoss(tol=1.0)``).
        eps_schedule: optional increasing list of :math:`\epsilon` values (the paper's annealing, e.g.
            ``[1e-2, 1e-1, 1, 10, 100]``): start at the first and move to the next once
            :math:`\min_i w_i > \delta` (``delta``); replaces ``eps``.
        delta: the paper's stopping threshold :math:`\delta` (default 0.99); ``converged`` reports
            :math:`\min_i w_i > \delta` at the last ``eps``.
        reduction: ``"mean"`` (the paper's :math:`1/M`) or ``"sum"``.
        t_range: ``(t0, t1)`` for the chunks of equal width; else taken from each call's ``t``.

    Call: ``causal(residual, t=None)``. ``residual``: per-point residuals ``[N]`` or ``[N, 1]``. With ``t``
    (the points' times, same length) a point goes into chunk ``floor(M (t - t0) / (t1 - t0))``; without
    ``t`` the residual is reshaped to ``[M, N / M]`` in time-major order (as ``CausalMSELoss``).
    ``causal.from_chunk_losses(L)`` takes precomputed chunk losses ``[M]``. ``initial_loss=L_0`` (either
    call) puts the initial-condition loss inside the exponents (:func:`causal_weights`); :math:`L_0` stays
    a term of its own for the balancer, the causal residual only reads its value.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import CausalResidual
        >>> causal = CausalResidual(n_chunks=4, eps=1.0)
        >>> r = paddle.ones([8]); t = paddle.linspace(0, 1, 8)
        >>> round(float(causal(r, t)), 4)
        0.3883

    Note:
        * ``ppsci.loss.CausalMSELoss(n_chunks, reduction, weight, tol)`` is a ppsci loss on output / label
          dicts, reshaping each point's squared error to ``[M, -1]`` (points must be ordered by time in equal
          chunks); it has no annealing and no stopping criterion. Here: chunks from the times (any order,
          unequal counts, an empty chunk counts 0), the schedule, and state buffers for checkpoints.
        * All state (``eps_index``, ``min_weight``) is in buffers; the update runs on the device.
    """

    def __init__(self, n_chunks: int, eps: float = 1.0, eps_schedule: Optional[Sequence[float]] = None,
                 delta: float = 0.99, reduction: str = "mean", t_range: Optional[Sequence[float]] = None):
        super().__init__()
        self.n_chunks = check_int("n_chunks", n_chunks)
        self.eps = check_float("eps", eps, 0.0)
        self.delta = check_float("delta", delta, 0.0, 1.0, low_open=True)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        if eps_schedule is None:
            sched = [self.eps]
        else:
            if isinstance(eps_schedule, str) or not isinstance(eps_schedule, Sequence) or not eps_schedule:
                raise ValueError(f"`eps_schedule` must be a non-empty list of numbers; got {eps_schedule!r}")
            sched = [check_float(f"eps_schedule[{i}]", v, 0.0) for i, v in enumerate(eps_schedule)]
            if any(b < a for a, b in zip(sched, sched[1:])):
                raise ValueError(f"`eps_schedule` must be non-decreasing; got {sched}")
        self.eps_schedule = sched
        if t_range is not None:
            if len(t_range) != 2:
                raise ValueError(f"`t_range` must be (t0, t1); got {t_range!r}")
            t0, t1 = (check_float(f"t_range[{i}]", v) for i, v in enumerate(t_range))
            if not t1 > t0:
                raise ValueError(f"`t_range` must have t1 > t0; got {t_range!r}")
            t_range = (t0, t1)
        self.t_range = t_range
        self.register_buffer("schedule", paddle.to_tensor(sched, dtype="float32"))
        self.register_buffer("eps_index", paddle.zeros([1], dtype="int64"))
        self.register_buffer("min_weight", paddle.ones([1], dtype="float32"))
        self.register_buffer("last_weights", paddle.ones([self.n_chunks], dtype="float32"))

    def current_eps(self) -> paddle.Tensor:
        return paddle.gather(self.schedule, self.eps_index).reshape([])

    def chunk_losses(self, residual, t=None):
        r2 = residual.reshape([-1]) ** 2
        M = self.n_chunks
        if t is None:
            if r2.shape[0] % M:
                raise ValueError(f"{r2.shape[0]} residuals do not split into n_chunks={M} equal chunks; pass `t`")
            return r2.reshape([M, -1]).mean(axis=1)
        t = t.reshape([-1]).astype(r2.dtype).detach()
        if t.shape[0] != r2.shape[0]:
            raise ValueError(f"`t` has {t.shape[0]} entries, the residual {r2.shape[0]}")
        t0, t1 = self.t_range if self.t_range is not None else (t.amin(), t.amax())
        idx = paddle.clip(paddle.floor((t - t0) / (t1 - t0) * M), 0, M - 1).astype("int64")
        onehot = paddle.nn.functional.one_hot(idx, M).astype(r2.dtype)  # [N, M]
        counts = onehot.sum(axis=0)
        sums = paddle.matmul(r2.reshape([1, -1]), onehot).reshape([M])
        return sums / paddle.clip(counts, min=1.0)

    def from_chunk_losses(self, chunk_losses, initial_loss=None):
        eps = self.current_eps().astype(chunk_losses.dtype)
        w = causal_weights(chunk_losses, eps, initial_loss)
        with paddle.no_grad():
            wmin = w.amin().astype("float32").reshape([1])
            paddle.assign(wmin, output=self.min_weight)
            paddle.assign(w.astype("float32"), output=self.last_weights)
            last = len(self.eps_schedule) - 1
            advance = (wmin > self.delta) & (self.eps_index < last)
            paddle.assign(paddle.where(advance, self.eps_index + 1, self.eps_index), output=self.eps_index)
        # weights below FLUSH count as 0 in the loss: exp(-eps * large) underflows to float32 subnormals, and a
        # backward through subnormal products runs ~20x slower on CPUs (min_weight keeps the true value)
        w = paddle.where(w < FLUSH, paddle.zeros_like(w), w)
        out = (w * chunk_losses).sum()
        return out / self.n_chunks if self.reduction == "mean" else out

    def forward(self, residual, t=None, initial_loss=None):
        return self.from_chunk_losses(self.chunk_losses(residual, t), initial_loss)

    @property
    def converged(self) -> bool:
        """The paper's stopping criterion: last ``eps`` reached and :math:`\\min_i w_i > \\delta` (synchronises)."""
        return bool(int(self.eps_index.numpy()[0]) == len(self.eps_schedule) - 1
                    and float(self.min_weight.numpy()[0]) > self.delta)


def build_causal(config: Mapping) -> CausalResidual:
    """A :class:`CausalResidual` from ``{"name": "causal", n_chunks, eps, ...}`` (a residual loss, not a
    term balancer: use its output as one term of any balancer); :func:`~paddle_pinn_balance.config.
    build_loss_layer` with the name checked."""
    cfg = dict(config)
    name = cfg.pop("name", "causal")
    if name != "causal":
        raise ValueError(f"build_causal needs name 'causal'; got {name!r}")
    return build_from_keywords(CausalResidual, cfg, "loss layer 'causal'")
