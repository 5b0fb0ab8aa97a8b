"""Helmholtz 2D, the benchmark of the learning-rate annealing paper (Wang, Teng & Perdikaris, 2021, Sec. 2.2)."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import MLP, Problem


class Helmholtz2D(Problem):
    r"""Helmholtz equation on the square with a Dirichlet boundary.

    .. math::

        u_{xx} + u_{yy} + k^2 u = q \quad \text{on } [-1, 1]^2, \qquad u = 0 \text{ on the boundary},

    .. math::

        u = \sin(a_1 \pi x) \sin(a_2 \pi y), \qquad q = \big(k^2 - (a_1 \pi)^2 - (a_2 \pi)^2\big)\, u .

    Loss terms (the names every balancer sees):

    * ``"res"``: mean squared residual :math:`u_{xx} + u_{yy} + k^2 u - q` on ``batch_size`` interior points;
    * ``"bc"``: the *sum* of the four edges' mean squared errors (``batch_size`` points each), one
      weight for the whole group, as the authors' code.

    Every call to :meth:`sample` draws fresh uniform points. The network is ``layers`` (default
    2-50-50-50-1, tanh, Xavier-normal weights, zero biases); its inputs are standardised with the mean 0 and
    standard deviation :math:`1/\sqrt3` of a uniform sample of the square, as the authors' code does.

    Args:
        k, a1, a2: wave number and the solution's frequencies (paper: 1, 1, 4).
        layers: network widths.
        batch_size: points per edge and interior points per iteration (paper: 128).
        test_n: the test grid is ``test_n x test_n`` (paper: 100).

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import Helmholtz2D
        >>> problem = Helmholtz2D()
        >>> model = problem.build_model(seed=0)
        >>> losses = problem.losses(model, problem.sample(np.random.default_rng(0)))
        >>> sorted(losses)
        ['bc', 'res']

    References:
        S. Wang, Y. Teng, P. Perdikaris. Understanding and mitigating gradient flow pathologies in
        physics-informed neural networks. SIAM J. Sci. Comput. 43(5):A3055-A3081, 2021.
    """

    name = "Helmholtz 2D"
    loss_names = ("res", "bc")
    axis_labels = ("x", "y")
    lower, upper = -1.0, 1.0

    def __init__(self, k: float = 1.0, a1: float = 1.0, a2: float = 4.0, layers=(2, 50, 50, 50, 1),
                 batch_size: int = 128, test_n: int = 100):
        if int(batch_size) < 1 or int(test_n) < 2:
            raise ValueError(f"`batch_size` must be >= 1 and `test_n` >= 2; got {batch_size}, {test_n}")
        self.k, self.a1, self.a2 = float(k), float(a1), float(a2)
        self.layers = tuple(int(n) for n in layers)
        if self.layers[0] != 2 or self.layers[-1] != 1:
            raise ValueError(f"`layers` must start with 2 inputs and end with 1 output; got {list(layers)}")
        self.batch_size = int(batch_size)
        self.test_n = int(test_n)
        self.grid_shape = (self.test_n, self.test_n)

    # ------------------------------------------------------------------ the PDE

    def exact(self, x: np.ndarray) -> np.ndarray:
        """:math:`u = \\sin(a_1 \\pi x) \\sin(a_2 \\pi y)` at points ``x`` (``[N, 2]`` -> ``[N, 1]``)."""
        x = np.asarray(x, dtype=np.float64)
        return (np.sin(self.a1 * math.pi * x[:, 0:1]) * np.sin(self.a2 * math.pi * x[:, 1:2]))

    def forcing(self, x: np.ndarray) -> np.ndarray:
        """Right-hand side :math:`q = (k^2 - (a_1\\pi)^2 - (a_2\\pi)^2)\\, u` (``[N, 2]`` -> ``[N, 1]``)."""
        factor = self.k ** 2 - (self.a1 * math.pi) ** 2 - (self.a2 * math.pi) ** 2
        return factor * self.exact(x)

    def operator(self, model, x: paddle.Tensor) -> paddle.Tensor:
        """:math:`u_{xx} + u_{yy} + k^2 u` of ``model`` at ``x`` (second derivatives with ``paddle.grad``).

        ``x`` must have ``stop_gradient=False``; the graph is kept (``create_graph=True``) so that the
        result can be differentiated with respect to the parameters.
        """
        u = model(x)
        du = paddle.grad(u, x, create_graph=True)[0]
        u_xx = paddle.grad(du[:, 0:1], x, create_graph=True)[0][:, 0:1]
        u_yy = paddle.grad(du[:, 1:2], x, create_graph=True)[0][:, 1:2]
        return u_xx + u_yy + self.k ** 2 * u

    # ------------------------------------------------------------------ training interface

    def build_model(self, seed: int) -> paddle.nn.Layer:
        """A fresh network, initialised from ``paddle.seed(seed)``."""
        paddle.seed(int(seed))
        std = (self.upper - self.lower) / math.sqrt(12.0)  # std of U(lower, upper): 1/sqrt(3) on [-1, 1]
        mean = 0.5 * (self.lower + self.upper)
        return MLP(self.layers, mean=[mean, mean], std=[std, std])

    def sample(self, rng: np.random.Generator) -> dict:
        """Fresh points: ``x_res`` (``[n, 2]``, interior) and ``x_bc`` (``[4n, 2]``, edges y=-1, x=1, y=1, x=-1)."""
        n, lo, hi = self.batch_size, self.lower, self.upper
        x_res = rng.uniform(lo, hi, size=(n, 2))
        t = rng.uniform(lo, hi, size=(4, n))
        edges = [
            np.stack([t[0], np.full(n, lo)], axis=1),  # bottom, y = -1
            np.stack([np.full(n, hi), t[1]], axis=1),  # right,  x = 1
            np.stack([t[2], np.full(n, hi)], axis=1),  # top,    y = 1
            np.stack([np.full(n, lo), t[3]], axis=1),  # left,   x = -1
        ]
        x_bc = np.concatenate(edges, axis=0)
        dtype = paddle.get_default_dtype()
        return {
            "x_res": paddle.to_tensor(x_res, dtype=dtype),
            "q": paddle.to_tensor(self.forcing(x_res), dtype=dtype),
            "x_bc": paddle.to_tensor(x_bc, dtype=dtype),
        }

    def losses(self, model, batch: dict) -> dict:
        """``{"res": mean squared residual, "bc": sum of the four edges' mean squared errors}``."""
        x = batch["x_res"].detach()
        x.stop_gradient = False
        residual = self.operator(model, x) - batch["q"]
        u_bc = model(batch["x_bc"])  # the exact solution is 0 on every edge
        edge_mse = (u_bc ** 2).reshape([4, -1]).mean(axis=1)
        return {"res": (residual ** 2).mean(), "bc": edge_mse.sum()}

    def kernels(self, batch: dict) -> dict:
        """Per-point quantities of the NTK blocks on ``batch``'s points (for ``NTKWeighting``): the residual
        at ``x_res`` and the network output at ``x_bc``."""

        def residual(model):
            x = batch["x_res"].detach()
            x.stop_gradient = False
            return self.operator(model, x) - batch["q"]

        return {"res": residual, "bc": lambda model: model(batch["x_bc"])}

    def test_grid(self) -> np.ndarray:
        """``test_n x test_n`` uniform grid on the square, as ``[test_n**2, 2]`` (x varies fastest)."""
        s = np.linspace(self.lower, self.upper, self.test_n)
        xx, yy = np.meshgrid(s, s)
        return np.stack([xx.ravel(), yy.ravel()], axis=1)
