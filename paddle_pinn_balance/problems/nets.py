"""Networks of the NTK-paper problems as ``paddle.nn.Sequential`` (the NTK traces' fast path applies).

:class:`~paddle_pinn_balance.ntk.NTKWeighting` computes exact per-point gradients fast for a ``Sequential`` of
``Linear`` layers and parameter-free elementwise layers; the two layers here (a fixed input standardisation
and a constant scale) are registered as elementwise so that the Wave and Poisson networks qualify.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle

from ..per_point import register_elementwise

__all__ = ["Scale", "Standardise", "sequential_mlp"]


@register_elementwise
class Standardise(paddle.nn.Layer):
    """``(x - mean) * (1 / std)`` per input coordinate (buffers, not trained)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(float(s) <= 0 for s in std):
            raise ValueError(f"`mean` and `std` need the same length and positive `std`; got {mean}, {std}")
        dtype = paddle.get_default_dtype()  # the Linear layers' dtype
        self.register_buffer("mean", paddle.to_tensor([[float(m) for m in mean]], dtype=dtype))
        self.register_buffer("inv_std", paddle.to_tensor([[1.0 / float(s) for s in std]], dtype=dtype))

    def forward(self, x):
        return (x - self.mean) * self.inv_std


@register_elementwise
class Scale(paddle.nn.Layer):
    """Multiplication by a constant (the :math:`1/\\sqrt{\\text{width}}` of the NTK parameterisation)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def sequential_mlp(layers: Sequence[int], mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   parameterisation: str = "standard") -> paddle.nn.Sequential:
    """A tanh MLP as a ``paddle.nn.Sequential``.

    Args:
        layers: widths, input first, output last.
        mean, std: optional input standardisation (a :class:`Standardise` first layer).
        parameterisation: ``"standard"``: Xavier-normal weights, zero biases (the authors' ``xavier_init``);
            ``"ntk"``: weights and biases :math:`\\mathcal N(0, 1)` and each hidden layer's output scaled by
            :math:`1/\\sqrt{\\text{its input width}}` before the next ``Linear`` (NTK paper, Sec. 7.2).
    """
    layers = [int(n) for n in layers]
    if len(layers) < 2 or min(layers) < 1:
        raise ValueError(f"`layers` must list at least two positive widths; got {layers}")
    if parameterisation not in ("standard", "ntk"):
        raise ValueError(f"`parameterisation` must be 'standard' or 'ntk'; got {parameterisation!r}")
    if parameterisation == "ntk":
        init = {"weight_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.Normal(0.0, 1.0)),
                "bias_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.Normal(0.0, 1.0))}
    else:
        init = {"weight_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.XavierNormal()),
                "bias_attr": paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0))}
    seq = []
    if mean is not None or std is not None:
        seq.append(Standardise(mean, std))
    for i in range(len(layers) - 1):
        if parameterisation == "ntk" and layers[i] > 1:
            seq.append(Scale(1.0 / math.sqrt(layers[i])))
        seq.append(paddle.nn.Linear(layers[i], layers[i + 1], **init))
        if i < len(layers) - 2:
            seq.append(paddle.nn.Tanh())
    return paddle.nn.Sequential(*seq)
