"""Wave 1D, the second benchmark of the NTK paper (Wang, Yu & Perdikaris, 2022, Sec. 7.3)."""

from __future__ import annotations

import math

import numpy as np
import paddle

from . import SpaceTimeSquare
from .nets import sequential_mlp


class Wave1D(SpaceTimeSquare):
    r"""One-dimensional wave equation with a multi-scale exact solution.

    .. math::

        u_{tt} = c^2 u_{xx} \quad \text{on } (x, t) \in (0, 1)^2, \qquad u(0, t) = u(1, t) = 0, \\
        u(x, 0) = \sin(\pi x) + \tfrac12 \sin(a \pi x), \quad u_t(x, 0) = 0, \\
        u = \sin(\pi x)\cos(c \pi t) + \tfrac12 \sin(a\pi x) \cos(a c \pi t) \qquad (c = 2, a = 4).

    Loss terms (as the paper's Algorithm: :math:`\lambda_u, \lambda_{u_t}, \lambda_r`):

    * ``"u"``: initial value plus the two edges, the sum of the three mean squared errors;
    * ``"ut"``: mean squared initial velocity :math:`u_t(x, 0)`;
    * ``"res"``: mean squared residual :math:`u_{tt} - c^2 u_{xx}`.

    ``batch_size`` fresh uniform points per term (and per edge) at each :meth:`sample`. Inputs are columns
    ``(x, t)``, standardised as the authors' code (mean 1/2, std :math:`1/\sqrt{12}`). The network is a
    ``paddle.nn.Sequential`` (tanh, Xavier-normal, zero biases) so that the exact NTK traces take the fast path.
    :meth:`kernels` gives the NTK blocks' per-point quantities (``u`` on the initial and edge points stacked,
    ``u_t`` on the initial points, the residual on the collocation points).

    Args:
        c, a: wave speed and the second mode's frequency (paper: 2, 4).
        layers: network widths (authors' code: ``(2, 500, 500, 500, 1)``).
        batch_size: points per term per iteration (paper: 300).
        test_n: test grid ``test_n x test_n``.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import Wave1D
        >>> p = Wave1D(layers=(2, 8, 1), batch_size=8)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['res', 'u', 'ut']

    References:
        S. Wang, X. Yu, P. Perdikaris. When and why PINNs fail to train: a neural tangent kernel perspective.
        J. Comput. Phys. 449:110768, 2022.
    """

    name = "Wave 1D"
    loss_names = ("u", "ut", "res")
    def __init__(self, c: float = 2.0, a: float = 4.0, layers=(2, 500, 500, 500, 1), batch_size: int = 300,
                 test_n: int = 100):
        super().__init__(layers, batch_size, test_n)
        self.c, self.a = float(c), float(a)

    def exact(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        s, t, pi = x[:, 0:1], x[:, 1:2], math.pi
        return (np.sin(pi * s) * np.cos(self.c * pi * t)
                + 0.5 * np.sin(self.a * pi * s) * np.cos(self.a * self.c * pi * t))

    def build_model(self, seed: int) -> paddle.nn.Layer:
        paddle.seed(int(seed))
        return sequential_mlp(self.layers, mean=[0.5, 0.5], std=[1 / math.sqrt(12.0)] * 2)

    def sample(self, rng: np.random.Generator) -> dict:
        """``x_res`` ``[n, 2]``; ``x_u`` ``[3n, 2]`` (t = 0, x = 0, x = 1) with data ``u_u``; ``x_ic`` ``[n, 2]``."""
        x_res, x_ic, x_edges = self.draw(rng)
        x_u = np.concatenate([x_ic, x_edges])
        tensor = lambda a: paddle.to_tensor(a, dtype=paddle.get_default_dtype())  # noqa: E731
        return {"x_res": tensor(x_res), "x_u": tensor(x_u), "u_u": tensor(self.exact(x_u)), "x_ic": tensor(x_ic)}

    def _values(self, model, batch):
        return model(batch["x_u"]) - batch["u_u"]

    def _velocity(self, model, batch):
        x = batch["x_ic"].detach()
        x.stop_gradient = False
        return paddle.grad(model(x).sum(), x, create_graph=True)[0][:, 1:2]

    def _residual(self, model, batch):
        _, u_xx, u_tt = self.second_derivatives(model, batch["x_res"])
        return u_tt - self.c ** 2 * u_xx

    def losses(self, model, batch: dict) -> dict:
        err = self._values(model, batch)
        return {"u": (err ** 2).reshape([3, -1]).mean(axis=1).sum(), "ut": (self._velocity(model, batch) ** 2).mean(),
                "res": (self._residual(model, batch) ** 2).mean()}

    def kernels(self, batch: dict) -> dict:
        """NTK blocks' per-point quantities on ``batch``'s points (``u``: initial and edge points stacked)."""
        return {"u": lambda m: m(batch["x_u"]), "ut": lambda m: self._velocity(m, batch),
                "res": lambda m: self._residual(m, batch)}

