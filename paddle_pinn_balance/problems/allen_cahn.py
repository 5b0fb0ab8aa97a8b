"""Allen-Cahn 1D (the PINN benchmark of Raissi et al. 2019 and the Expert's Guide) with its own ETDRK4 reference."""

from __future__ import annotations

import functools
import math

import numpy as np
import paddle

from . import MLP, Problem
from .recipe import RecipeOptions


def etdrk4_allen_cahn(n: int = 512, dt: float = 1e-4, t_end: float = 1.0, save_dt: float = 5e-3, eps: float = 1e-4,
                      a: float = 5.0, contour: int = 32) -> tuple:
    r"""Reference solution of :math:`u_t = \varepsilon u_{xx} + a u - a u^3`, :math:`u(x, 0) = x^2 \cos(\pi x)`,
    periodic on :math:`[-1, 1)`, by Fourier collocation in space and ETDRK4 in time.

    ETDRK4 is Cox & Matthews (2002) with the coefficients computed by the contour integral of Kassam & Trefethen
    (2005) (their ``kursiv.m``: ``contour`` points on a circle of radius 1 around each :math:`h L_k`, the upper
    half only since :math:`L` is real): linear part :math:`L_k = -\varepsilon k^2`, :math:`k = \pi m`,
    nonlinear part :math:`N(u) = a(u - u^3)` in physical space.

    Returns ``(x [n], t [m], u [m, n], coefficients [m, n])``: the grid :math:`x_j = -1 + 2j/n`, the saved times
    (every ``save_dt``; ``save_dt`` must be a multiple of ``dt`` and ``t_end`` of ``save_dt``), the solution and its
    FFT at those times.
    """
    steps, every = round(t_end / dt), round(save_dt / dt)
    if steps < 1 or every < 1 or abs(steps * dt - t_end) > 1e-9 * t_end or abs(every * dt - save_dt) > 1e-9:
        raise ValueError(f"`t_end` and `save_dt` must be multiples of `dt`; got {t_end}, {save_dt}, {dt}")
    if steps % every:
        raise ValueError(f"`t_end` must be a multiple of `save_dt` (the last time is saved); got {t_end}, {save_dt}")
    x = -1.0 + 2.0 * np.arange(n) / n
    k = math.pi * np.fft.fftfreq(n, d=1.0 / n)
    lin = -eps * k ** 2
    e, e2 = np.exp(dt * lin), np.exp(dt * lin / 2)
    r = np.exp(1j * math.pi * (np.arange(1, contour + 1) - 0.5) / contour)
    lr = dt * lin[:, None] + r[None, :]
    q = dt * np.real(np.mean((np.exp(lr / 2) - 1) / lr, axis=1))
    f1 = dt * np.real(np.mean((-4 - lr + np.exp(lr) * (4 - 3 * lr + lr ** 2)) / lr ** 3, axis=1))
    f2 = dt * np.real(np.mean((2 + lr + np.exp(lr) * (-2 + lr)) / lr ** 3, axis=1))
    f3 = dt * np.real(np.mean((-4 - 3 * lr - lr ** 2 + np.exp(lr) * (4 - lr)) / lr ** 3, axis=1))

    def nonlinear(v):
        u = np.real(np.fft.ifft(v))
        return np.fft.fft(a * (u - u ** 3))

    v = np.fft.fft(x ** 2 * np.cos(math.pi * x))
    saved = [v]
    for step in range(1, steps + 1):
        nv = nonlinear(v)
        va = e2 * v + q * nv
        na = nonlinear(va)
        vb = e2 * v + q * na
        nb = nonlinear(vb)
        vc = e2 * va + q * (2 * nb - nv)
        nc = nonlinear(vc)
        v = e * v + nv * f1 + 2 * (na + nb) * f2 + nc * f3
        if step % every == 0:
            saved.append(v)
    coef = np.array(saved)
    return x, save_dt * np.arange(len(saved)), np.real(np.fft.ifft(coef, axis=1)), coef


@functools.lru_cache(maxsize=4)
def _reference(n: int, dt: float, save_dt: float, eps: float, a: float) -> tuple:
    return etdrk4_allen_cahn(n=n, dt=dt, save_dt=save_dt, eps=eps, a=a)


class AllenCahn1D(RecipeOptions, Problem):
    r"""One-dimensional Allen-Cahn equation, periodic, with a reference from :func:`etdrk4_allen_cahn`.

    .. math::

        u_t - \varepsilon u_{xx} + a u^3 - a u = 0 \quad \text{on } (x, t) \in [-1, 1] \times [0, 1], \qquad
        u(x, 0) = x^2 \cos(\pi x), \\
        u(-1, t) = u(1, t), \quad u_x(-1, t) = u_x(1, t) \qquad (\varepsilon = 10^{-4},\ a = 5).

    Loss terms: ``"res"`` (mean squared residual), ``"ic"`` (mean squared initial error) and ``"bc"`` (mean
    squared periodicity gaps of :math:`u` and :math:`u_x`, summed), ``batch_size`` fresh uniform points each.
    The initial condition is continuous but not :math:`C^1`-periodic (:math:`u_x(\mp 1, 0) = \pm 2`): the
    :math:`u_x` gap cannot vanish at :math:`t = 0`, and the Fourier reference is least accurate near
    :math:`x = \pm 1` at early times (the benchmark as published).
    Network ``layers`` (default 2-(128 x 4)-1) tanh, Xavier-normal, inputs standardised.

    The reference is spectral in space (``ref_n`` Fourier modes) and ETDRK4 in time (step ``ref_dt``), saved
    every ``save_dt``; :meth:`exact` sums the Fourier series at ``x`` and interpolates linearly in ``t`` between
    saved times. The test grid is the saved grid itself (``ref_n`` points x the saved times, thinned by
    ``test_stride``), where no interpolation in time happens.

    Args:
        eps, a: diffusion and reaction coefficients (benchmark: 1e-4, 5).
        layers, batch_size: network and points per term per iteration.
        ref_n, ref_dt, save_dt: the reference solver's modes, time step and output interval.
        test_stride: keep every ``test_stride``-th grid point in x and in t for the test grid.
        net, causal, n_res, optim: the recipe settings (:class:`~paddle_pinn_balance.problems.recipe.RecipeOptions`):
            network options (periodic embedding of period 2, Fourier features, modified MLP), the causal
            residual, residual points per iteration.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import AllenCahn1D
        >>> p = AllenCahn1D(layers=(2, 8, 1), batch_size=8, ref_n=128, ref_dt=1e-3, save_dt=1e-2)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['bc', 'ic', 'res']
        >>> float(np.abs(p.reference[2]).max()) <= 1.0  # the maximum principle (64 modes overshoot by 4e-6)
        True

    References:
        M. Raissi, P. Perdikaris, G. E. Karniadakis. Physics-informed neural networks: a deep learning framework
        for solving forward and inverse problems involving nonlinear partial differential equations. J. Comput.
        Phys. 378:686-707, 2019 (Sec. 3.2.1, Example (Allen-Cahn equation); reference there by Chebfun, 512
        Fourier modes, RK4 with step 1e-5). S. Wang, S. Sankaran, H. Wang, P. Perdikaris. An expert's guide to
        training physics-informed neural networks. arXiv:2308.08468, 2023. A.-K. Kassam, L. N. Trefethen.
        Fourth-order time-stepping for stiff PDEs. SIAM J. Sci. Comput. 26(4):1214-1233, 2005.
    """

    name = "Allen-Cahn 1D"
    loss_names = ("res", "ic", "bc")
    axis_labels = ("x", "t")

    def __init__(self, eps: float = 1e-4, a: float = 5.0, layers=(2, 128, 128, 128, 128, 1), batch_size: int = 128,
                 ref_n: int = 512, ref_dt: float = 1e-3, save_dt: float = 5e-3, test_stride: int = 2, net=None,
                 causal=None, n_res=None, optim=None):
        if int(batch_size) < 1 or int(ref_n) < 8 or int(test_stride) < 1:
            raise ValueError(f"`batch_size`, `test_stride` must be >= 1 and `ref_n` >= 8; got {batch_size}, "
                             f"{test_stride}, {ref_n}")
        if not float(ref_dt) > 0 or not float(save_dt) >= float(ref_dt):
            raise ValueError(f"`ref_dt` must be > 0 and `save_dt` >= `ref_dt`; got {ref_dt}, {save_dt}")
        self.layers = tuple(int(n) for n in layers)
        if self.layers[0] != 2 or self.layers[-1] != 1:
            raise ValueError(f"`layers` must start with 2 inputs and end with 1 output; got {list(layers)}")
        self.eps, self.a, self.batch_size = float(eps), float(a), int(batch_size)
        self.ref_n, self.ref_dt, self.save_dt, self.test_stride = int(ref_n), float(ref_dt), float(save_dt), \
            int(test_stride)
        steps, every = round(1.0 / self.ref_dt), round(self.save_dt / self.ref_dt)
        if abs(steps * self.ref_dt - 1.0) > 1e-9 or abs(every * self.ref_dt - self.save_dt) > 1e-9 or steps % every:
            raise ValueError(f"`ref_dt` must divide `save_dt` and `save_dt` divide 1; got {ref_dt}, {save_dt}")
        self._ref = None
        xs, ts = np.arange(0, self.ref_n, self.test_stride), np.arange(0, round(1.0 / self.save_dt) + 1,
                                                                       self.test_stride)
        self.grid_shape = (len(ts), len(xs))
        self.x_range = (-1.0, 1.0)
        self._recipe_init(net, causal, n_res, optim)

    @property
    def reference(self) -> tuple:
        """``(x, t, u, coefficients)`` of :func:`etdrk4_allen_cahn` (computed once per setting, cached)."""
        if self._ref is None:
            self._ref = _reference(self.ref_n, self.ref_dt, self.save_dt, self.eps, self.a)
        return self._ref

    def exact(self, x: np.ndarray) -> np.ndarray:
        """The reference at points ``x`` (``[N, 2]``, columns ``(x, t)``): Fourier series in x, linear in t."""
        x = np.asarray(x, dtype=np.float64)
        _, ts, _, coef = self.reference
        k = math.pi * np.fft.fftfreq(self.ref_n, d=1.0 / self.ref_n)
        pos = np.clip(x[:, 1] / self.save_dt, 0, len(ts) - 1)
        j0 = np.minimum(np.floor(pos).astype(int), len(ts) - 2)
        w = (pos - j0)[:, None]
        out = np.empty((len(x), 1))
        for s in range(0, len(x), 2048):
            sl = slice(s, s + 2048)
            phase = np.exp(1j * (x[sl, 0:1] + 1.0) * k[None, :])
            u0 = np.real((coef[j0[sl]] * phase).sum(1)) / self.ref_n
            u1 = np.real((coef[j0[sl] + 1] * phase).sum(1)) / self.ref_n
            out[sl, 0] = (1 - w[sl, 0]) * u0 + w[sl, 0] * u1
        return out

    def test_grid(self) -> np.ndarray:
        xs, ts, _, _ = self.reference
        xx, tt = np.meshgrid(xs[::self.test_stride], ts[::self.test_stride])
        return np.stack([xx.ravel(), tt.ravel()], axis=1)

    def error(self, model) -> float:
        from . import relative_l2

        _, _, u, _ = self.reference
        return relative_l2(u[::self.test_stride, ::self.test_stride], self.predict(model, self.test_grid()))

    def build_model(self, seed: int) -> paddle.nn.Layer:
        model = self._recipe_model(seed)
        if model is not None:
            return model
        paddle.seed(int(seed))
        return MLP(self.layers, mean=[0.0, 0.5], std=[2 / math.sqrt(12.0), 1 / math.sqrt(12.0)])

    def sample(self, rng: np.random.Generator) -> dict:
        """``x_res`` ``[n, 2]``; ``x_ic`` ``[n, 2]`` with ``u_ic``; ``x_bc`` ``[2n, 2]`` (x = -1 then 1, same t)."""
        n, m = self.batch_size, self.n_res
        x_res = np.stack([rng.uniform(-1.0, 1.0, m), rng.uniform(0.0, 1.0, m)], axis=1)
        s = rng.uniform(-1.0, 1.0, n)
        x_ic = np.stack([s, np.zeros(n)], axis=1)
        t = rng.uniform(0.0, 1.0, n)
        x_bc = np.concatenate([np.stack([-np.ones(n), t], 1), np.stack([np.ones(n), t], 1)])
        tensor = lambda v: paddle.to_tensor(v, dtype=paddle.get_default_dtype())  # noqa: E731
        return {"x_res": tensor(x_res), "x_ic": tensor(x_ic), "u_ic": tensor((s ** 2 * np.cos(math.pi * s))[:, None]),
                "x_bc": tensor(x_bc)}

    def _residual(self, model, batch):
        x = batch["x_res"].detach()
        x.stop_gradient = False
        u = model(x)
        du = paddle.grad(u.sum(), x, create_graph=True)[0]
        u_xx = paddle.grad(du[:, 0:1].sum(), x, create_graph=True)[0][:, 0:1]
        return du[:, 1:2] - self.eps * u_xx + self.a * u ** 3 - self.a * u

    def _gaps(self, model, batch):
        """``(u(-1, t) - u(1, t), u_x(-1, t) - u_x(1, t))``, ``[n, 1]`` each: the model is called on each half of
        ``x_bc`` separately (``n`` rows each), so entry ``p`` depends on row ``p`` of each call only."""
        x_bc = batch["x_bc"]
        n = x_bc.shape[0] // 2
        u, u_x = [], []
        for x in (x_bc[:n], x_bc[n:]):
            x = x.detach()
            x.stop_gradient = False
            v = model(x)
            u.append(v)
            u_x.append(paddle.grad(v.sum(), x, create_graph=True)[0][:, 0:1])
        return u[0] - u[1], u_x[0] - u_x[1]

    def losses(self, model, batch: dict) -> dict:
        out = {"res": self._res_loss(self._residual(model, batch), batch),
               "ic": ((model(batch["x_ic"]) - batch["u_ic"]) ** 2).mean()}
        if "bc" in self.loss_names:
            gap, gap_x = self._gaps(model, batch)
            out["bc"] = (gap ** 2).mean() + (gap_x ** 2).mean()
        return out

    def kernels(self, batch: dict) -> dict:
        """NTK blocks' per-point quantities: the residual, the initial value, the two periodicity gaps stacked
        (``[2n, 1]``: two values per boundary time, so the fast expanded path of
        :func:`~paddle_pinn_balance.per_point.per_point_sq_grad_norms` sees ``2n`` values from ``n``-row model
        calls and takes the exact per-point loop)."""
        return self._drop_bc({"res": lambda m: self._residual(m, batch), "ic": lambda m: m(batch["x_ic"]),
                              "bc": lambda m: paddle.concat(self._gaps(m, batch))})
