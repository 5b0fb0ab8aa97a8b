"""Klein-Gordon 1D, a benchmark of the learning-rate annealing paper (Wang, Teng & Perdikaris, 2021, Sec. 3.2)."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import MLP, SpaceTimeSquare


class KleinGordon1D(SpaceTimeSquare):
    r"""Nonlinear Klein-Gordon equation in one space dimension.

    .. math::

        u_{tt} - u_{xx} + u^3 = f \quad \text{on } (x, t) \in [0, 1]^2, \qquad
        u = x \cos(5\pi t) + (x t)^3,

    with :math:`u(x, 0) = x`, :math:`u_t(x, 0) = 0` and Dirichlet data from the exact solution at
    :math:`x = 0, 1`; :math:`f` follows from the exact solution.

    Loss terms (the names every balancer sees; groups as the authors' code):

    * ``"res"``: mean squared residual on ``batch_size`` interior points;
    * ``"ics"``: :math:`L_{u_0} + L_{u_t 0}`, the initial value and velocity (``batch_size`` points each);
    * ``"bcs"``: the sum of the two edges' mean squared errors (``batch_size`` points each).

    Points are fresh uniform draws at every :meth:`sample`. Inputs are columns ``(x, t)``, standardised with
    the mean 1/2 and standard deviation :math:`1/\sqrt{12}` of the unit square. Network 2-(50 x 5)-1, tanh,
    Xavier-normal weights, zero biases.

    Args:
        layers: network widths (paper: ``(2, 50, 50, 50, 50, 50, 1)``).
        batch_size: points per term (and per edge) per iteration (paper: 128).
        test_n: test grid ``test_n x test_n``.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import KleinGordon1D
        >>> p = KleinGordon1D(layers=(2, 8, 1), batch_size=8)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['bcs', 'ics', 'res']

    References:
        S. Wang, Y. Teng, P. Perdikaris. Understanding and mitigating gradient flow pathologies in
        physics-informed neural networks. SIAM J. Sci. Comput. 43(5):A3055-A3081, 2021.
    """

    name = "Klein-Gordon 1D"
    loss_names = ("res", "ics", "bcs")
    def __init__(self, layers=(2, 50, 50, 50, 50, 50, 1), batch_size: int = 128, test_n: int = 100):
        super().__init__(layers, batch_size, test_n)

    def exact(self, x: np.ndarray) -> np.ndarray:
        """:math:`u = x\\cos(5\\pi t) + (xt)^3` at ``(x, t)`` rows."""
        x = np.asarray(x, dtype=np.float64)
        s, t = x[:, 0:1], x[:, 1:2]
        return s * np.cos(5 * math.pi * t) + (s * t) ** 3

    def forcing(self, x: np.ndarray) -> np.ndarray:
        """:math:`f = u_{tt} - u_{xx} + u^3` of the exact solution."""
        x = np.asarray(x, dtype=np.float64)
        s, t = x[:, 0:1], x[:, 1:2]
        u_tt = -25 * math.pi ** 2 * s * np.cos(5 * math.pi * t) + 6 * s ** 3 * t
        u_xx = 6 * s * t ** 3
        return u_tt - u_xx + self.exact(x) ** 3

    def build_model(self, seed: int) -> paddle.nn.Layer:
        paddle.seed(int(seed))
        return MLP(self.layers, mean=[0.5, 0.5], std=[1 / math.sqrt(12.0)] * 2)

    def sample(self, rng: np.random.Generator) -> dict:
        """``x_res`` ``[n, 2]``, ``x_ic`` ``[n, 2]`` (t = 0), ``x_bc`` ``[2n, 2]`` (x = 0 then x = 1), data."""
        x_res, x_ic, x_bc = self.draw(rng)
        tensor = lambda a: paddle.to_tensor(a, dtype=paddle.get_default_dtype())  # noqa: E731
        return {"x_res": tensor(x_res), "f": tensor(self.forcing(x_res)), "x_ic": tensor(x_ic),
                "u_ic": tensor(x_ic[:, 0:1]), "x_bc": tensor(x_bc), "u_bc": tensor(self.exact(x_bc))}

    def losses(self, model, batch: dict) -> dict:
        u, u_xx, u_tt = self.second_derivatives(model, batch["x_res"])
        residual = u_tt - u_xx + u ** 3 - batch["f"]
        xi = batch["x_ic"].detach()
        xi.stop_gradient = False
        u0 = model(xi)
        u0_t = paddle.grad(u0.sum(), xi, create_graph=True)[0][:, 1:2]
        ics = ((u0 - batch["u_ic"]) ** 2).mean() + (u0_t ** 2).mean()
        bcs = ((model(batch["x_bc"]) - batch["u_bc"]) ** 2).reshape([2, -1]).mean(axis=1).sum()
        return {"res": (residual ** 2).mean(), "ics": ics, "bcs": bcs}
