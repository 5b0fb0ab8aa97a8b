"""Benchmark problems: a PDE, its exact solution, a sampler, loss terms and a network, in one object.

Every problem follows the same small interface (:class:`Problem`), so one training loop
(:func:`paddle_pinn_balance.train.train`) runs any of them with any balancer:

* ``build_model(seed)`` -> a fresh ``paddle.nn.Layer`` (seeded initialisation);
* ``sample(rng)`` -> a batch (``{name: Tensor}``) of fresh points drawn with a ``numpy.random.Generator``;
* ``losses(model, batch)`` -> ``{term name: scalar loss}``, the mapping every balancer takes;
* ``exact(x)`` -> the exact solution at points ``x`` (``numpy``, shape ``[N, d]`` -> ``[N, 1]``);
* ``test_grid()`` -> test points ``[N, d]``, reshaped to ``grid_shape`` for plots;
* ``optimizer(parameters)`` -> ``(optimizer, lr_scheduler or None)``, the paper's optimizer.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import paddle

__all__ = ["MLP", "PROBLEMS", "AllenCahn1D", "Convection1D", "GradNormToy", "Helmholtz2D", "KleinGordon1D", "Poisson1D",
           "Poisson2DPieces", "Problem", "Wave1D", "get_problem", "relative_l2"]


class MLP(paddle.nn.Layer):
    """Fully connected tanh network with fixed input standardisation ``(x - mean) / std``.

    Weights are Xavier-normal (:math:`\\mathcal N(0, 2/(n_{in}+n_{out}))`), biases zero, as the
    authors' code of the learning-rate annealing paper (``xavier_init``).

    Args:
        layers: widths, input first, output last (e.g. ``(2, 50, 50, 50, 1)``).
        mean, std: per-coordinate standardisation of the inputs (buffers, not trained).
    """

    def __init__(self, layers: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(layers) < 2 or any(int(n) < 1 for n in layers):
            raise ValueError(f"`layers` must list at least two positive widths; got {list(layers)}")
        if len(mean) != layers[0] or len(std) != layers[0]:
            raise ValueError(f"`mean` and `std` need {layers[0]} entries (the input width)")
        dtype = paddle.get_default_dtype()  # the Linear layers' dtype
        self.register_buffer("mean", paddle.to_tensor([list(mean)], dtype=dtype))
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"`std` entries must be positive; got {list(std)}")
        # stored as 1/std: a product keeps third derivatives available (Paddle has no divide_double_grad grad)
        self.register_buffer("inv_std", paddle.to_tensor([[1.0 / float(s) for s in std]], dtype=dtype))
        init = {
            "weight_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.XavierNormal()),
            "bias_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0)),
        }
        self.linears = paddle.nn.LayerList(
            [paddle.nn.Linear(int(layers[i]), int(layers[i + 1]), **init) for i in range(len(layers) - 1)]
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        h = (x - self.mean) * self.inv_std
        for layer in self.linears[:-1]:
            h = paddle.tanh(layer(h))
        return self.linears[-1](h)


class Problem(abc.ABC):
    """Base of the benchmark problems (see the module docstring for the interface).

    Subclasses set ``name``, ``loss_names``, ``axis_labels``, ``grid_shape`` and implement
    ``build_model``, ``sample``, ``losses``, ``exact`` and ``test_grid``. The default optimizer is the
    one of the learning-rate annealing paper: Adam, lr ``lr``, smooth exponential decay by
    ``decay_rate`` every ``decay_steps`` iterations (the scheduler is stepped every iteration).
    """

    name = "problem"
    loss_names: tuple = ()
    axis_labels: tuple = ("x", "y")
    grid_shape: tuple = ()
    error_name = "relative $L_2$ error"  # what :meth:`error` measures (plots and reports)
    lr = 1e-3
    decay_rate = 0.9
    decay_steps = 1000

    @abc.abstractmethod
    def build_model(self, seed: int) -> paddle.nn.Layer:
        """Implemented by every problem."""

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> dict:
        """Implemented by every problem."""

    @abc.abstractmethod
    def losses(self, model, batch: dict) -> dict:
        """Implemented by every problem."""

    @abc.abstractmethod
    def exact(self, x: np.ndarray) -> np.ndarray:
        """Implemented by every problem."""

    @abc.abstractmethod
    def test_grid(self) -> np.ndarray:
        """Implemented by every problem."""

    def optimizer(self, parameters):
        """``(Adam, ExponentialDecay)`` with ``gamma = decay_rate ** (1 / decay_steps)``."""
        sched = paddle.optimizer.lr.ExponentialDecay(
            learning_rate=self.lr, gamma=self.decay_rate ** (1.0 / self.decay_steps)
        )
        return paddle.optimizer.Adam(learning_rate=sched, parameters=parameters), sched

    @paddle.no_grad()
    def predict(self, model, x: np.ndarray) -> np.ndarray:
        """The model at points ``x`` (``numpy`` in, ``numpy`` out)."""
        return model(paddle.to_tensor(np.asarray(x, dtype=paddle.get_default_dtype()))).numpy()

    def error(self, model) -> float:
        """Relative L2 error of ``model`` on :meth:`test_grid`."""
        x = self.test_grid()
        return relative_l2(self.exact(x), self.predict(model, x))


class SpaceTimeSquare(Problem):
    """What the 1-D space-time problems on :math:`(x, t) \\in [0, 1]^2` share: a network ``layers`` of two
    inputs and one output, ``batch_size`` fresh points per term, a ``test_n x test_n`` test grid, the
    collocation / initial / edge draws and the second derivatives of the residual."""

    axis_labels = ("x", "t")

    def __init__(self, layers, batch_size: int, test_n: int):
        if int(batch_size) < 1 or int(test_n) < 2:
            raise ValueError(f"`batch_size` must be >= 1 and `test_n` >= 2; got {batch_size}, {test_n}")
        self.layers = tuple(int(n) for n in layers)
        if self.layers[0] != 2 or self.layers[-1] != 1:
            raise ValueError(f"`layers` must start with 2 inputs and end with 1 output; got {list(layers)}")
        self.batch_size, self.test_n = int(batch_size), int(test_n)
        self.grid_shape = (self.test_n, self.test_n)

    def draw(self, rng: np.random.Generator) -> tuple:
        """``(x_res [n, 2], x_ic [n, 2] at t = 0, x_edges [2n, 2] at x = 0 then x = 1)``, uniform."""
        n = self.batch_size
        x_res = rng.uniform(0.0, 1.0, size=(n, 2))
        x_ic = np.stack([rng.uniform(0.0, 1.0, n), np.zeros(n)], axis=1)
        t = rng.uniform(0.0, 1.0, size=(2, n))
        x_edges = np.concatenate([np.stack([np.zeros(n), t[0]], axis=1), np.stack([np.ones(n), t[1]], axis=1)])
        return x_res, x_ic, x_edges

    @staticmethod
    def second_derivatives(model, x: paddle.Tensor) -> tuple:
        """``(u, u_xx, u_tt)`` of ``model`` at the points ``x`` (a graph for the backward through them)."""
        x = x.detach()
        x.stop_gradient = False
        u = model(x)
        du = paddle.grad(u.sum(), x, create_graph=True)[0]
        u_xx = paddle.grad(du[:, 0:1].sum(), x, create_graph=True)[0][:, 0:1]
        u_tt = paddle.grad(du[:, 1:2].sum(), x, create_graph=True)[0][:, 1:2]
        return u, u_xx, u_tt

    def test_grid(self) -> np.ndarray:
        s = np.linspace(0.0, 1.0, self.test_n)
        xx, tt = np.meshgrid(s, s)
        return np.stack([xx.ravel(), tt.ravel()], axis=1)


def relative_l2(u: np.ndarray, u_hat: np.ndarray) -> float:
    """:math:`\\|u - \\hat u\\|_2 / \\|u\\|_2`."""
    u = np.asarray(u, dtype=np.float64).ravel()
    u_hat = np.asarray(u_hat, dtype=np.float64).ravel()
    return float(np.linalg.norm(u - u_hat) / np.linalg.norm(u))


from .allen_cahn import AllenCahn1D  # noqa: E402
from .convection import Convection1D  # noqa: E402
from .gradnorm_toy import GradNormToy  # noqa: E402
from .helmholtz import Helmholtz2D  # noqa: E402  (imported last: they build on Problem and MLP above)
from .klein_gordon import KleinGordon1D  # noqa: E402
from .poisson import Poisson1D  # noqa: E402
from .poisson2d import Poisson2DPieces  # noqa: E402
from .wave import Wave1D  # noqa: E402

#: name -> problem class (the CLI's and configs' names)
PROBLEMS = {"helmholtz": Helmholtz2D, "klein_gordon": KleinGordon1D, "poisson1d": Poisson1D, "wave1d": Wave1D,
            "gradnorm_toy": GradNormToy, "convection1d": Convection1D, "allen_cahn1d": AllenCahn1D,
            "poisson2d_pieces": Poisson2DPieces}


def get_problem(name: str, **kwargs) -> Problem:
    """A problem by name (a key of :data:`PROBLEMS`), with keyword arguments for its constructor."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; allowed: {sorted(PROBLEMS)}")
    return PROBLEMS[name](**kwargs)
