"""Convection 1D, the failure mode of Krishnapriyan et al. (NeurIPS 2021): a PINN does not learn large ``beta``."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import MLP, Problem
from .recipe import RecipeOptions


def first_derivatives(model, x: paddle.Tensor) -> tuple:
    """``(u, u_x, u_t)`` of ``model`` at the points ``x`` (columns ``(x, t)``; a graph for the backward)."""
    x = x.detach()
    x.stop_gradient = False
    u = model(x)
    du = paddle.grad(u.sum(), x, create_graph=True)[0]
    return u, du[:, 0:1], du[:, 1:2]


class Convection1D(RecipeOptions, Problem):
    r"""One-dimensional convection with periodic boundaries.

    .. math::

        u_t + \beta u_x = 0 \quad \text{on } (x, t) \in [0, 2\pi] \times [0, 1], \qquad u(x, 0) = \sin x, \qquad
        u(0, t) = u(2\pi, t), \\
        u = \sin(x - \beta t) \qquad (\beta = 30).

    Loss terms: ``"res"`` (mean squared residual :math:`u_t + \beta u_x`), ``"ic"`` (mean squared initial error)
    and ``"bc"`` (mean squared periodicity gap :math:`u(0, t) - u(2\pi, t)`), ``batch_size`` fresh uniform points
    each per :meth:`sample`. The network is ``layers`` (default 2-50-50-50-50-1, the paper's 4 hidden layers of
    50), tanh, Xavier-normal, zero biases, inputs standardised by the mean and std of the uniform box.

    Note:
        The paper trains with L-BFGS on a fixed set of points; here Adam (lr ``lr`` decayed 0.9 every 1000 steps)
        on fresh points, the optimizer of the other benchmarks, so that every balancer runs the same loop.

    Args:
        beta: convection speed (paper: 1 to 40; 30 is where plain training fails).
        layers: network widths. batch_size: points per term per iteration. test_n: ``test_n x test_n`` test grid.
        net, causal, n_res, optim: the recipe settings (:class:`~paddle_pinn_balance.problems.recipe.RecipeOptions`):
            network options (periodic embedding of period :math:`2\pi`, Fourier features, modified MLP), the
            causal residual, residual points per iteration.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import Convection1D
        >>> p = Convection1D(layers=(2, 8, 1), batch_size=8)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['bc', 'ic', 'res']

    References:
        A. S. Krishnapriyan, A. Gholami, S. Zhe, R. M. Kirby, M. W. Mahoney. Characterizing possible failure
        modes in physics-informed neural networks. NeurIPS 2021 (arXiv:2109.01050), Sec. 3.1.
    """

    name = "Convection 1D"
    loss_names = ("res", "ic", "bc")
    axis_labels = ("x", "t")
    x_max = 2.0 * math.pi

    def __init__(self, beta: float = 30.0, layers=(2, 50, 50, 50, 50, 1), batch_size: int = 128, test_n: int = 100,
                 net=None, causal=None, n_res=None, optim=None):
        if int(batch_size) < 1 or int(test_n) < 2:
            raise ValueError(f"`batch_size` must be >= 1 and `test_n` >= 2; got {batch_size}, {test_n}")
        self.layers = tuple(int(n) for n in layers)
        if self.layers[0] != 2 or self.layers[-1] != 1:
            raise ValueError(f"`layers` must start with 2 inputs and end with 1 output; got {list(layers)}")
        self.beta, self.batch_size, self.test_n = float(beta), int(batch_size), int(test_n)
        self.grid_shape = (self.test_n, self.test_n)
        self.x_range = (0.0, self.x_max)
        self._recipe_init(net, causal, n_res, optim)

    def exact(self, x: np.ndarray) -> np.ndarray:
        """:math:`u = \\sin(x - \\beta t)` (``[N, 2]`` -> ``[N, 1]``)."""
        x = np.asarray(x, dtype=np.float64)
        return np.sin(x[:, 0:1] - self.beta * x[:, 1:2])

    def build_model(self, seed: int) -> paddle.nn.Layer:
        model = self._recipe_model(seed)
        if model is not None:
            return model
        paddle.seed(int(seed))
        return MLP(self.layers, mean=[math.pi, 0.5], std=[self.x_max / math.sqrt(12.0), 1 / math.sqrt(12.0)])

    def sample(self, rng: np.random.Generator) -> dict:
        """``x_res``, ``x_ic`` (t = 0) with ``u_ic``, ``x_bc`` ``[2n, 2]`` (x = 0 then 2 pi, same t)."""
        n, m = self.batch_size, self.n_res
        x_res = np.stack([rng.uniform(0.0, self.x_max, m), rng.uniform(0.0, 1.0, m)], axis=1)
        x_ic = np.stack([rng.uniform(0.0, self.x_max, n), np.zeros(n)], axis=1)
        t = rng.uniform(0.0, 1.0, n)
        x_bc = np.concatenate([np.stack([np.zeros(n), t], 1), np.stack([np.full(n, self.x_max), t], 1)])
        tensor = lambda a: paddle.to_tensor(a, dtype=paddle.get_default_dtype())  # noqa: E731
        return {"x_res": tensor(x_res), "x_ic": tensor(x_ic), "u_ic": tensor(np.sin(x_ic[:, 0:1])),
                "x_bc": tensor(x_bc)}

    def _residual(self, model, batch):
        _, u_x, u_t = first_derivatives(model, batch["x_res"])
        return u_t + self.beta * u_x

    def _gap(self, model, batch):
        """:math:`u(0, t) - u(2\\pi, t)`, ``[n, 1]``: the model on the first half of ``x_bc`` minus the model on
        the second (two calls of ``n`` rows, so that entry ``p`` depends on row ``p`` of each call only)."""
        x = batch["x_bc"]
        n = x.shape[0] // 2
        return model(x[:n]) - model(x[n:])

    def losses(self, model, batch: dict) -> dict:
        out = {"res": self._res_loss(self._residual(model, batch), batch),
               "ic": ((model(batch["x_ic"]) - batch["u_ic"]) ** 2).mean()}
        if "bc" in self.loss_names:
            out["bc"] = (self._gap(model, batch) ** 2).mean()
        return out

    def kernels(self, batch: dict) -> dict:
        """NTK blocks' per-point quantities: the residual, the initial value and the periodicity gap (pointwise:
        exact on both paths of :func:`~paddle_pinn_balance.per_point.per_point_sq_grad_norms`)."""
        return self._drop_bc({"res": lambda m: self._residual(m, batch), "ic": lambda m: m(batch["x_ic"]),
                              "bc": lambda m: self._gap(m, batch)})

    def test_grid(self) -> np.ndarray:
        xx, tt = np.meshgrid(np.linspace(0.0, self.x_max, self.test_n), np.linspace(0.0, 1.0, self.test_n))
        return np.stack([xx.ravel(), tt.ravel()], axis=1)
