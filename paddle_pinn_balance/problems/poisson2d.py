"""A multi-scale Poisson problem on the unit square with four boundary pieces: five loss terms compete."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import MLP, Problem


class Poisson2DPieces(Problem):
    r"""Poisson equation with a two-scale analytic solution and a different condition on each edge.

    .. math::

        u_{xx} + u_{yy} = f \quad \text{on } [0, 1]^2, \qquad
        u = \sin(2\pi x)\cos(2\pi y) + c \sin(a\pi x)\sin(a\pi y) \quad (a = 8,\ c = 0.1), \\
        f = -8\pi^2 \sin(2\pi x)\cos(2\pi y) - 2 c (a\pi)^2 \sin(a\pi x)\sin(a\pi y),

    with Dirichlet data :math:`u = \sin 2\pi x` on :math:`y = 0` (``"bottom"``) and :math:`y = 1` (``"top"``),
    :math:`u = 0` on :math:`x = 1` (``"right"``), and Neumann data
    :math:`u_x = 2\pi\cos 2\pi y + c a \pi \sin a\pi y` on :math:`x = 0` (``"left"``).

    Five loss terms: ``"res"``, ``"bottom"``, ``"top"``, ``"right"``, ``"left"`` (mean squared errors,
    ``batch_size`` fresh uniform points each per :meth:`sample`), of very different scales: the residual's data are
    :math:`O(10^2)`, the Neumann data :math:`O(10)`, the Dirichlet data :math:`O(1)` or zero. A test problem of
    this library (an analytic multi-scale solution, chosen so that more than two terms compete), not a published
    benchmark. Network ``layers`` (default 2-50-50-50-1) tanh, Xavier-normal, inputs standardised.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import Poisson2DPieces
        >>> p = Poisson2DPieces(layers=(2, 8, 1), batch_size=8)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['bottom', 'left', 'res', 'right', 'top']

    References:
        The same construction (an analytic multi-scale solution, the forcing and boundary data derived from it) as
        the Helmholtz test of S. Wang, Y. Teng, P. Perdikaris, Understanding and mitigating gradient flow
        pathologies in physics-informed neural networks, SIAM J. Sci. Comput. 43(5):A3055-A3081, 2021 (Sec. 2.2)
        and the 1-D Poisson test of S. Wang, X. Yu, P. Perdikaris, When and why PINNs fail to train: a neural
        tangent kernel perspective, J. Comput. Phys. 449:110768, 2022 (Sec. 7.2).
    """

    name = "Poisson 2D, 4 boundary pieces"
    loss_names = ("res", "bottom", "top", "right", "left")
    axis_labels = ("x", "y")

    def __init__(self, a: float = 8.0, c: float = 0.1, layers=(2, 50, 50, 50, 1), batch_size: int = 128,
                 test_n: int = 100):
        if int(batch_size) < 1 or int(test_n) < 2:
            raise ValueError(f"`batch_size` must be >= 1 and `test_n` >= 2; got {batch_size}, {test_n}")
        self.layers = tuple(int(n) for n in layers)
        if self.layers[0] != 2 or self.layers[-1] != 1:
            raise ValueError(f"`layers` must start with 2 inputs and end with 1 output; got {list(layers)}")
        if float(a) != int(a):
            raise ValueError(f"`a` must be an integer (the fine mode vanishes on the edges); got {a}")
        self.a, self.c, self.batch_size, self.test_n = float(a), float(c), int(batch_size), int(test_n)
        self.grid_shape = (self.test_n, self.test_n)

    def exact(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        s, y, pi = x[:, 0:1], x[:, 1:2], math.pi
        return np.sin(2 * pi * s) * np.cos(2 * pi * y) + self.c * np.sin(self.a * pi * s) * np.sin(self.a * pi * y)

    def forcing(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        s, y, pi = x[:, 0:1], x[:, 1:2], math.pi
        return (-8 * pi ** 2 * np.sin(2 * pi * s) * np.cos(2 * pi * y)
                - 2 * self.c * (self.a * pi) ** 2 * np.sin(self.a * pi * s) * np.sin(self.a * pi * y))

    def neumann(self, y: np.ndarray) -> np.ndarray:
        """:math:`u_x(0, y)`."""
        return 2 * math.pi * np.cos(2 * math.pi * y) + self.c * self.a * math.pi * np.sin(self.a * math.pi * y)

    def build_model(self, seed: int) -> paddle.nn.Layer:
        paddle.seed(int(seed))
        return MLP(self.layers, mean=[0.5, 0.5], std=[1 / math.sqrt(12.0)] * 2)

    def sample(self, rng: np.random.Generator) -> dict:
        n = self.batch_size
        x_res = rng.uniform(0.0, 1.0, size=(n, 2))
        s = rng.uniform(0.0, 1.0, size=(4, n))
        edges = {"bottom": np.stack([s[0], np.zeros(n)], 1), "top": np.stack([s[1], np.ones(n)], 1),
                 "right": np.stack([np.ones(n), s[2]], 1), "left": np.stack([np.zeros(n), s[3]], 1)}
        tensor = lambda v: paddle.to_tensor(v, dtype=paddle.get_default_dtype())  # noqa: E731
        batch = {"x_res": tensor(x_res), "f": tensor(self.forcing(x_res)),
                 "g_left": tensor(self.neumann(s[3])[:, None])}
        for name, pts in edges.items():
            batch[f"x_{name}"] = tensor(pts)
            if name != "left":
                batch[f"u_{name}"] = tensor(self.exact(pts))
        return batch

    def _residual(self, model, batch):
        x = batch["x_res"].detach()
        x.stop_gradient = False
        u = model(x)
        du = paddle.grad(u.sum(), x, create_graph=True)[0]
        u_xx = paddle.grad(du[:, 0:1].sum(), x, create_graph=True)[0][:, 0:1]
        u_yy = paddle.grad(du[:, 1:2].sum(), x, create_graph=True)[0][:, 1:2]
        return u_xx + u_yy - batch["f"]

    def _left(self, model, batch):
        x = batch["x_left"].detach()
        x.stop_gradient = False
        return paddle.grad(model(x).sum(), x, create_graph=True)[0][:, 0:1] - batch["g_left"]

    def _pieces(self, batch):
        res = {"res": lambda m: self._residual(m, batch), "left": lambda m: self._left(m, batch)}
        for name in ("bottom", "top", "right"):
            res[name] = (lambda key: lambda m: m(batch[f"x_{key}"]) - batch[f"u_{key}"])(name)
        return res

    def losses(self, model, batch: dict) -> dict:
        pieces = self._pieces(batch)
        return {name: (pieces[name](model) ** 2).mean() for name in self.loss_names}

    def kernels(self, batch: dict) -> dict:
        """NTK blocks' per-point quantities of every term (residual, edge errors, Neumann error)."""
        return self._pieces(batch)

    def test_grid(self) -> np.ndarray:
        s = np.linspace(0.0, 1.0, self.test_n)
        xx, yy = np.meshgrid(s, s)
        return np.stack([xx.ravel(), yy.ravel()], axis=1)
