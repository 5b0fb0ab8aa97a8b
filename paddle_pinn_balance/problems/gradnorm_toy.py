"""The toy multi-task regression of the GradNorm paper (Chen et al., ICML 2018, Sec. 4); not a PINN."""

from __future__ import annotations

import numpy as np
import paddle

from . import Problem


class ToyNet(paddle.nn.Layer):
    """Shared ReLU trunk and one linear head per task; ``forward`` returns the heads side by side ``[N, T*out]``."""

    def __init__(self, dim_in: int, dim_out: int, width: int, depth: int, n_tasks: int):
        super().__init__()
        trunk, n = [], dim_in
        for _ in range(depth):
            trunk += [paddle.nn.Linear(n, width), paddle.nn.ReLU()]
            n = width
        self.trunk = paddle.nn.Sequential(*trunk)
        self.heads = paddle.nn.LayerList([paddle.nn.Linear(width, dim_out) for _ in range(n_tasks)])

    def forward(self, x):
        h = self.trunk(x)
        return paddle.concat([head(h) for head in self.heads], axis=1)

    def get_last_shared_layer(self) -> paddle.nn.Layer:
        """The trunk's last ``Linear`` (GradNorm's :math:`W`)."""
        return self.trunk[-2]


class GradNormToy(Problem):
    r"""``T`` regression tasks of very different scales sharing one trunk (GradNorm paper, Sec. 4).

    .. math::

        f_i(x) = \sigma_i \tanh\big((B + \varepsilon_i)\, x\big), \qquad x \in \mathbb R^{d_{in}},\
        f_i \in \mathbb R^{d_{out}},

    with fixed matrices :math:`B` (entries :math:`\mathcal N(0, 10^2)`) and :math:`\varepsilon_i`
    (:math:`\mathcal N(0, 3.5^2)`), drawn from ``data_seed`` (the public PyTorch port reads the paper's 10 and
    3.5 as standard deviations and normalises ``x`` to unit length; so do we). Loss terms ``"task1"``, ...:
    each task's mean squared error. Every :meth:`sample` draws ``batch_size`` fresh inputs.

    The error metric (:meth:`error`) is the paper's normalised loss :math:`\sum_i L_i(t)/L_i(0)` on a fixed
    test set of ``test_n`` inputs, :math:`L_i(0)` being the freshly built network's test loss (so runs from
    the same seed share the normaliser).

    Args:
        sigmas: task scales (paper, ``T = 2``: ``(1, 100)``).
        dim_in, dim_out, width, depth: 250, 100, 100, 4 as the paper.
        batch_size, test_n: inputs per iteration and in the test set.
        lr: Adam learning rate, constant (port: 1e-4).
        data_seed: seed of ``B``, ``eps_i`` and the test set.

    Example:
        >>> import numpy as np
        >>> from paddle_pinn_balance.problems import GradNormToy
        >>> p = GradNormToy(dim_in=8, dim_out=4, width=8)
        >>> sorted(p.losses(p.build_model(0), p.sample(np.random.default_rng(0))))
        ['task1', 'task2']

    References:
        Z. Chen, V. Badrinarayanan, C.-Y. Lee, A. Rabinovich. GradNorm: gradient normalization for adaptive
        loss balancing in deep multitask networks. ICML 2018 (arXiv:1711.02257).
    """

    name = "GradNorm toy regression"
    error_name = "normalised loss $\\sum_i L_i(t)/L_i(0)$"
    axis_labels = ("sample",)

    def __init__(self, sigmas=(1.0, 100.0), dim_in: int = 250, dim_out: int = 100, width: int = 100,
                 depth: int = 4, batch_size: int = 100, test_n: int = 1000, lr: float = 1e-4, data_seed: int = 0):
        sigmas = [float(s) for s in sigmas]
        if len(sigmas) < 1 or min(sigmas) <= 0:
            raise ValueError(f"`sigmas` must list positive task scales; got {sigmas}")
        if min(int(dim_in), int(dim_out), int(width), int(depth), int(batch_size), int(test_n)) < 1:
            raise ValueError("sizes must be >= 1")
        self.sigmas = sigmas
        self.loss_names = tuple(f"task{i + 1}" for i in range(len(sigmas)))
        self.dim_in, self.dim_out, self.width, self.depth = int(dim_in), int(dim_out), int(width), int(depth)
        self.batch_size, self.test_n, self.lr = int(batch_size), int(test_n), float(lr)
        self.decay_rate = 1.0
        self.grid_shape = (self.test_n,)
        rng = np.random.default_rng(int(data_seed))
        self.B = rng.normal(0.0, 10.0, size=(self.dim_out, self.dim_in))
        self.eps = [rng.normal(0.0, 3.5, size=(self.dim_out, self.dim_in)) for _ in sigmas]
        self._test_x = self._inputs(rng, self.test_n)
        self._test_y = self.exact(self._test_x)
        self._initial = None

    def _inputs(self, rng, n):
        x = rng.normal(size=(n, self.dim_in))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def exact(self, x: np.ndarray) -> np.ndarray:
        """All targets side by side, ``[N, T * dim_out]``."""
        x = np.asarray(x, dtype=np.float64)
        return np.concatenate([s * np.tanh(x @ (self.B + e).T) for s, e in zip(self.sigmas, self.eps)], axis=1)

    def build_model(self, seed: int) -> paddle.nn.Layer:
        paddle.seed(int(seed))
        model = ToyNet(self.dim_in, self.dim_out, self.width, self.depth, len(self.sigmas))
        self._initial = self.task_losses(model)
        return model

    def sample(self, rng: np.random.Generator) -> dict:
        x = self._inputs(rng, self.batch_size)
        dtype = paddle.get_default_dtype()
        return {"x": paddle.to_tensor(x, dtype=dtype), "y": paddle.to_tensor(self.exact(x), dtype=dtype)}

    def losses(self, model, batch: dict) -> dict:
        err = (model(batch["x"]) - batch["y"]) ** 2
        k = self.dim_out
        return {n: err[:, i * k:(i + 1) * k].mean() for i, n in enumerate(self.loss_names)}

    def task_losses(self, model) -> np.ndarray:
        """Per-task mean squared errors on the fixed test set."""
        err = (self.predict(model, self._test_x) - self._test_y) ** 2
        return err.reshape(self.test_n, len(self.sigmas), self.dim_out).mean(axis=(0, 2))

    def error(self, model) -> float:
        """Normalised test loss :math:`\\sum_i L_i/L_i(0)` (``L_i(0)``: the last built network's)."""
        if self._initial is None:
            raise ValueError("build a model first (`build_model(seed)` fixes the normaliser L_i(0))")
        return float((self.task_losses(model) / self._initial).sum())

    def test_grid(self) -> np.ndarray:
        return self._test_x

    def optimizer(self, parameters):
        """Adam with a constant learning rate (the PyTorch port)."""
        return paddle.optimizer.Adam(learning_rate=self.lr, parameters=parameters), None
