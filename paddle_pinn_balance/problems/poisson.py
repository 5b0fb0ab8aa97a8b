"""Poisson 1D, the first benchmark of the NTK paper (Wang, Yu & Perdikaris, 2022, Sec. 7.2)."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import Problem
from .nets import sequential_mlp


class Poisson1D(Problem):
    r"""One-dimensional Poisson equation with a Dirichlet boundary, trained full batch.

    .. math::

        u_{xx} = f \quad \text{on } [0, 1], \qquad u(0) = u(1) = 0, \qquad
        u = \sin(a \pi x), \quad f = -(a\pi)^2 \sin(a \pi x) \quad (a = 4).

    Loss terms: ``"res"`` (mean squared residual on ``n_res`` equispaced collocation points) and ``"bc"``
    (mean squared boundary value on ``n_bc`` points, half at each end). The points are fixed: every
    :meth:`sample` returns the same full batch, as in the paper. :meth:`kernels` gives the per-point
    quantities of the NTK blocks (the residual and the boundary value) on the same points.

    The network is one hidden layer of ``width`` tanh units in the NTK parameterisation (weights and biases
    :math:`\mathcal N(0,1)`, hidden output scaled by :math:`1/\sqrt{\text{width}}`); no input scaling.

    Args:
        a: frequency of the solution (paper: 4).
        width: hidden width (paper: 100).
        n_res, n_bc: collocation and boundary points (paper: 100 each).
        optimizer: ``"gd"`` (plain full-batch gradient descent, the paper's setting) or ``"adam"``.
        lr: learning rate (paper, GD: 1e-5).
        decay_rate, decay_steps: smooth exponential decay of ``lr`` (``decay_rate=1``: constant).
        test_n: test points (equispaced on [0, 1]).

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import Poisson1D
        >>> p = Poisson1D()
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['bc', 'res']

    References:
        S. Wang, X. Yu, P. Perdikaris. When and why PINNs fail to train: a neural tangent kernel perspective.
        J. Comput. Phys. 449:110768, 2022.
    """

    name = "Poisson 1D"
    loss_names = ("res", "bc")
    axis_labels = ("x",)

    def __init__(self, a: float = 4.0, width: int = 100, n_res: int = 100, n_bc: int = 100, optimizer: str = "gd",
                 lr: float = 1e-5, decay_rate: float = 1.0, decay_steps: int = 1000, test_n: int = 1000):
        if min(int(width), int(n_res), int(test_n)) < 1 or int(n_bc) < 2:
            raise ValueError("`width`, `n_res`, `test_n` must be >= 1 and `n_bc` >= 2")
        if optimizer not in ("gd", "adam"):
            raise ValueError(f"`optimizer` must be 'gd' or 'adam'; got {optimizer!r}")
        if not float(lr) > 0 or not 0 < float(decay_rate) <= 1:
            raise ValueError(f"`lr` must be > 0 and `decay_rate` in (0, 1]; got {lr}, {decay_rate}")
        self.a, self.width = float(a), int(width)
        self.n_res, self.n_bc, self.test_n = int(n_res), int(n_bc), int(test_n)
        self.optimizer_name, self.lr = optimizer, float(lr)
        self.decay_rate, self.decay_steps = float(decay_rate), int(decay_steps)
        self.grid_shape = (self.test_n,)
        x_res = np.linspace(0.0, 1.0, self.n_res)[:, None]
        half = self.n_bc // 2
        x_bc = np.concatenate([np.zeros((half, 1)), np.ones((self.n_bc - half, 1))])
        dtype = paddle.get_default_dtype()
        self._batch = {"x_res": paddle.to_tensor(x_res, dtype=dtype),
                       "f": paddle.to_tensor(self.forcing(x_res), dtype=dtype),
                       "x_bc": paddle.to_tensor(x_bc, dtype=dtype)}

    def exact(self, x: np.ndarray) -> np.ndarray:
        """:math:`u = \\sin(a\\pi x)` (``[N, 1]`` -> ``[N, 1]``)."""
        return np.sin(self.a * math.pi * np.asarray(x, dtype=np.float64)[:, 0:1])

    def forcing(self, x: np.ndarray) -> np.ndarray:
        """:math:`f = -(a\\pi)^2 \\sin(a\\pi x)`."""
        return -((self.a * math.pi) ** 2) * self.exact(x)

    def build_model(self, seed: int) -> paddle.nn.Layer:
        """1-``width``-1 tanh network, NTK parameterisation, initialised from ``paddle.seed(seed)``."""
        paddle.seed(int(seed))
        return sequential_mlp((1, self.width, 1), parameterisation="ntk")

    def sample(self, rng: np.random.Generator) -> dict:
        """The fixed full batch (``x_res``, ``f``, ``x_bc``); ``rng`` is not used."""
        return dict(self._batch)

    def residual(self, model, batch: dict) -> paddle.Tensor:
        """:math:`u_{xx} - f` at ``batch["x_res"]``."""
        x = batch["x_res"].detach()
        x.stop_gradient = False
        u = model(x)
        u_x = paddle.grad(u.sum(), x, create_graph=True)[0]
        u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0]
        return u_xx - batch["f"]

    def losses(self, model, batch: dict) -> dict:
        """``{"res": mean squared residual, "bc": mean squared boundary value}``."""
        return {"res": (self.residual(model, batch) ** 2).mean(), "bc": (model(batch["x_bc"]) ** 2).mean()}

    def kernels(self, batch: dict) -> dict:
        """Per-point quantities of the NTK blocks on ``batch``'s points: residual and boundary value."""
        return {"res": lambda model: self.residual(model, batch), "bc": lambda model: model(batch["x_bc"])}

    def test_grid(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.test_n)[:, None]

    def optimizer(self, parameters):
        """Plain gradient descent (``"gd"``) or Adam, with the optional smooth exponential decay."""
        cls = paddle.optimizer.SGD if self.optimizer_name == "gd" else paddle.optimizer.Adam
        if self.decay_rate == 1.0:
            return cls(learning_rate=self.lr, parameters=parameters), None
        sched = paddle.optimizer.lr.ExponentialDecay(learning_rate=self.lr,
                                                     gamma=self.decay_rate ** (1.0 / self.decay_steps))
        return cls(learning_rate=sched, parameters=parameters), sched
