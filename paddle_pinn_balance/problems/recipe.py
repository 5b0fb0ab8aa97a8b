"""What the published recipes for the hard time-dependent PINNs add to a plain MLP: the network options and the
causal residual, as problem settings (``net``, ``causal``) of :class:`~paddle_pinn_balance.problems.Convection1D`
and :class:`~paddle_pinn_balance.problems.AllenCahn1D`.

The recipe is that of the Expert's Guide (S. Wang, S. Sankaran, H. Wang, P. Perdikaris, "An expert's guide to
training physics-informed neural networks", arXiv:2308.08468, 2023, Secs. 5-6 and its code ``jaxpi``) and of
PaddleScience's ``examples/allen_cahn`` (``allen_cahn_defalut_ntk.yaml``):

* a periodic embedding of ``x`` (Sec. 5.2): :math:`x \\mapsto (\\cos \\omega x, \\sin \\omega x)`,
  :math:`\\omega = 2\\pi / P` with ``P`` the period of the domain, so that the periodic boundary condition holds
  exactly (the ``bc`` term is dropped);
* random Fourier features (Sec. 5.1; Tancik et al. 2020): :math:`z \\mapsto (\\cos zB, \\sin zB)`, :math:`B_{ij}
  \\sim \\mathcal N(0, s^2)` fixed;
* the modified MLP (Sec. 5.4; Wang, Teng, Perdikaris, SIAM J. Sci. Comput. 43, 2021, eq. 2.33):
  :math:`U = \\sigma(z W_u + b_u)`, :math:`V = \\sigma(z W_v + b_v)`, then per hidden layer
  :math:`h \\leftarrow \\sigma(h W + b)`, :math:`h \\leftarrow h \\odot U + (1 - h) \\odot V`;
* the causal residual (Sec. 6.3; :class:`~paddle_pinn_balance.CausalResidual`) with its :math:`\\epsilon` schedule.

Random weight factorisation (Sec. 5.3) is not offered here: its :math:`W = \\mathrm{diag}(e^s) V` takes ``exp`` of a
parameter, which the exact NTK traces' fast path does not record (``ppsci.arch.MLP(random_weight=...)`` has it; the
PaddleScience comparison, ``examples/ppsci/allen_cahn_compare.py``, uses that network).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import paddle

from ..balancer import check_float, check_int

__all__ = ["NET_KEYS", "OPTIM_KEYS", "RecipeNet", "check_causal", "check_net", "check_optim"]

#: Keys of the ``net`` setting and their defaults.
NET_KEYS = {"width": 128, "depth": 4, "periodic": True, "fourier_dim": 128, "fourier_scale": 1.0, "modified": True,
            "t_scale": 1.0}
_CAUSAL_KEYS = ("n_chunks", "eps", "eps_schedule", "delta", "reduction")
#: Keys of the ``optim`` setting (Adam's learning rate and its smooth exponential decay, by ``decay_rate`` every
#: ``decay_steps`` iterations); a missing key keeps the problem's default.
OPTIM_KEYS = ("lr", "decay_rate", "decay_steps")


def _check_keys(setting: str, value, allowed: list) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"`{setting}` must be a mapping of {allowed}; got {value!r}")
    bad = sorted(str(k) for k in value if k not in allowed)
    if bad:
        raise ValueError(f"`{setting}`: unknown key(s) {bad}; allowed: {allowed}")


def check_net(net) -> dict | None:
    """The ``net`` setting completed with :data:`NET_KEYS`' defaults (``None``: the problem's plain MLP);
    a bad key or value raises ``ValueError`` naming it."""
    if net is None:
        return None
    _check_keys("net", net, sorted(NET_KEYS))
    out = dict(NET_KEYS, **net)
    out["width"], out["depth"] = check_int("net.width", out["width"]), check_int("net.depth", out["depth"])
    out["fourier_dim"] = check_int("net.fourier_dim", out["fourier_dim"], 0)
    if out["fourier_dim"] % 2:
        raise ValueError(f"`net.fourier_dim` must be even (cos and sin halves); got {out['fourier_dim']}")
    out["fourier_scale"] = check_float("net.fourier_scale", out["fourier_scale"], 0.0, low_open=True)
    out["t_scale"] = check_float("net.t_scale", out["t_scale"], 0.0, low_open=True)
    for key in ("periodic", "modified"):
        if not isinstance(out[key], bool):
            raise ValueError(f"`net.{key}` must be true or false; got {out[key]!r}")
    return out


def check_causal(causal) -> dict | None:
    """The ``causal`` setting (keyword arguments of :class:`~paddle_pinn_balance.CausalResidual` but
    ``t_range``), checked by building one; ``None``: the plain mean squared residual."""
    if causal is None:
        return None
    _check_keys("causal", causal, list(_CAUSAL_KEYS))
    out = dict(causal)
    if "n_chunks" not in out:
        raise ValueError("`causal` needs `n_chunks`")
    build_causal_residual(out)  # values checked by the constructor
    return out


def check_optim(optim) -> dict:
    """The ``optim`` setting checked (``{}`` for ``None``): ``lr`` > 0, ``0 < decay_rate <= 1``,
    ``decay_steps`` >= 1; a bad key or value raises ``ValueError`` naming it."""
    if optim is None:
        return {}
    _check_keys("optim", optim, list(OPTIM_KEYS))
    out = {}
    if "lr" in optim:
        out["lr"] = check_float("optim.lr", optim["lr"], 0.0, low_open=True)
    if "decay_rate" in optim:
        out["decay_rate"] = check_float("optim.decay_rate", optim["decay_rate"], 0.0, 1.0, low_open=True)
    if "decay_steps" in optim:
        out["decay_steps"] = check_int("optim.decay_steps", optim["decay_steps"], 1)
    return out


def build_causal_residual(causal: Mapping, t_range=(0.0, 1.0)):
    from ..causal import CausalResidual

    return CausalResidual(t_range=t_range, **causal)


class RecipeNet(paddle.nn.Layer):
    """Network of two inputs ``(x, t)`` (one ``[N, 2]`` tensor) and one output: periodic embedding of ``x``,
    Fourier features, (modified) tanh MLP (module docstring). Linear layers Xavier-normal, biases zero.

    Args:
        width, depth: hidden width and number of hidden layers.
        x_range: ``(x0, x1)``: the period ``x1 - x0`` of the embedding, or the standardisation of ``x`` to
            ``[-1, 1]`` when ``periodic`` is false.
        periodic: embed ``x`` periodically. fourier_dim: number of Fourier features (0: none; even).
        fourier_scale: :math:`s`, the standard deviation of :math:`B`. modified: the modified (gated) MLP.
        t_scale: :math:`T`, the network sees :math:`\\tau = T t` (a time unit of its own: the Expert's Guide's
            non-dimensionalisation, Sec. 3; for convection :math:`T = \\beta` makes the solution
            :math:`\\sin(x - \\tau)`, of unit frequency in both inputs).

    :math:`B` is drawn from ``paddle``'s generator (seed it first) and is a
    buffer, not trained.
    """

    def __init__(self, width: int, depth: int, x_range, periodic: bool = True, fourier_dim: int = 128,
                 fourier_scale: float = 1.0, modified: bool = True, t_scale: float = 1.0):
        super().__init__()
        x0, x1 = (float(v) for v in x_range)
        self.periodic, self.modified, self.t_scale = bool(periodic), bool(modified), float(t_scale)
        self.omega = 2.0 * math.pi / (x1 - x0)
        self.x_mid, self.x_half = 0.5 * (x0 + x1), 0.5 * (x1 - x0)
        d = 3 if self.periodic else 2
        if fourier_dim:
            self.register_buffer("B", float(fourier_scale) * paddle.randn([d, fourier_dim // 2]))
            d = int(fourier_dim)
        else:
            self.B = None
        init = {"weight_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.XavierNormal()),
                "bias_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0))}
        self.hidden = paddle.nn.LayerList([paddle.nn.Linear(d if i == 0 else width, width, **init)
                                           for i in range(depth)])
        if self.modified:
            self.gate_u, self.gate_v = paddle.nn.Linear(d, width, **init), paddle.nn.Linear(d, width, **init)
        self.out = paddle.nn.Linear(width, 1, **init)

    def embed(self, xt):
        x, t = xt[:, 0:1], xt[:, 1:2] * self.t_scale
        if self.periodic:
            z = paddle.concat([t, paddle.cos(self.omega * x), paddle.sin(self.omega * x)], axis=1)
        else:
            z = paddle.concat([t, (x - self.x_mid) / self.x_half], axis=1)
        if self.B is not None:
            zb = paddle.matmul(z, self.B)
            z = paddle.concat([paddle.cos(zb), paddle.sin(zb)], axis=1)
        return z

    def forward(self, xt):
        z = self.embed(xt)
        h = z
        if self.modified:
            u, v = paddle.tanh(self.gate_u(z)), paddle.tanh(self.gate_v(z))
        for layer in self.hidden:
            h = paddle.tanh(layer(h))
            if self.modified:
                h = h * u + (1.0 - h) * v
        return self.out(h)


def build_net(net: Mapping, x_range, seed: int) -> RecipeNet:
    """A seeded :class:`RecipeNet` from a checked ``net`` setting."""
    paddle.seed(int(seed))
    return RecipeNet(x_range=x_range, **net)


class RecipeOptions:
    """What :class:`~paddle_pinn_balance.problems.Convection1D` and :class:`~paddle_pinn_balance.problems.AllenCahn1D`
    share for the recipe settings: ``net`` (a :class:`RecipeNet` instead of the plain MLP; with ``periodic`` the
    ``bc`` term is dropped, the embedding satisfies it exactly), ``causal`` (the ``res`` term is the causal
    residual over the residual points' times), ``n_res`` (residual points per iteration; default
    ``batch_size``) and ``optim`` (:data:`OPTIM_KEYS`: Adam's learning rate and decay, for runs longer than the
    table's). The causal state starts afresh with every ``build_model()`` (one training run)."""

    x_range = (0.0, 1.0)

    def _recipe_init(self, net, causal, n_res, optim=None):
        self.net, self.causal = check_net(net), check_causal(causal)
        for key, value in check_optim(optim).items():
            setattr(self, key, value)  # instance attributes over the class defaults read by optimizer()
        self.n_res = self.batch_size if n_res is None else check_int("n_res", n_res)
        if self.net is not None and self.net["periodic"]:
            self.loss_names = ("res", "ic")
        self._causal = build_causal_residual(self.causal) if self.causal is not None else None

    def _recipe_model(self, seed: int):
        """The recipe's network (``None`` without ``net``); resets the causal state."""
        if self.causal is not None:
            self._causal = build_causal_residual(self.causal)
        return build_net(self.net, self.x_range, seed) if self.net is not None else None

    def _res_loss(self, residual, batch):
        if self._causal is None:
            return (residual ** 2).mean()
        return self._causal(residual, batch["x_res"][:, 1])

    def _drop_bc(self, terms: dict) -> dict:
        return {k: v for k, v in terms.items() if k in self.loss_names}

    def monitor(self) -> dict:
        """The causal :math:`\\epsilon`, :math:`\\min_i w_i` and :math:`\\frac1M \\sum_i w_i` (how far in time
        the training has opened) of the last step (empty without ``causal``); synchronises: log points only."""
        if self._causal is None:
            return {}
        return {"causal_eps": float(self._causal.current_eps().numpy()),
                "causal_min_weight": float(self._causal.min_weight.numpy()[0]),
                "causal_mean_weight": float(self._causal.last_weights.numpy().mean())}
