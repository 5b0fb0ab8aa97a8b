"""``build_balancer``: a balancer from a dict or a YAML file (``yaml.safe_load``, registry lookup, validation)."""

from __future__ import annotations

import inspect
import os
from typing import Mapping, Optional

import paddle
import yaml

from .balancer import Balancer, Sum
from .grad_norm_ratio import GradNormRatio
from .gradnorm import GradNorm
from .lr_annealing import LRAnnealing
from .ntk import NTKWeighting
from .relobralo import ReLoBRaLo
from .softadapt import SoftAdapt
from .surgery import ConFIG, MConFIG, PCGrad, UPGrad
from .uncertainty import UncertaintyWeighting


def _build_sum(model, **kw):
    return Sum(**kw)


def _build_lr_annealing(model, **kw):
    return LRAnnealing(model, **kw)


def _build_grad_norm(model, **kw):
    wrapper = model if isinstance(model, GradNorm) else GradNorm(model, **kw)
    if wrapper is model and kw:
        raise ValueError(f"the model is already a GradNorm wrapper; remove keys {sorted(kw)} from the config")
    return wrapper.aggregator


def _build_ntk(model, **kw):
    # `kernels` (callables) cannot come from YAML: pass them in a Python dict config, or use `mode: grad_norm`.
    return NTKWeighting(model, **kw)


#: name -> (builder, the constructor whose keyword arguments the config may use)
REGISTRY = {
    "sum": (_build_sum, Sum.__init__),
    "lr_annealing": (_build_lr_annealing, LRAnnealing.__init__),
    "grad_norm": (_build_grad_norm, GradNorm.__init__),
    "ntk": (_build_ntk, NTKWeighting.__init__),
    "grad_norm_ratio": (lambda model, **kw: GradNormRatio(model, **kw), GradNormRatio.__init__),
    "relobralo": (lambda model, **kw: ReLoBRaLo(**kw), ReLoBRaLo.__init__),
    "softadapt": (lambda model, **kw: SoftAdapt(**kw), SoftAdapt.__init__),
    "uncertainty": (lambda model, **kw: UncertaintyWeighting(**kw), UncertaintyWeighting.__init__),
    "pcgrad": (lambda model, **kw: PCGrad(model, **kw), PCGrad.__init__),
    "conflict_free": (lambda model, **kw: ConFIG(model, **kw), ConFIG.__init__),
    "m_conflict_free": (lambda model, **kw: MConFIG(model, **kw), MConFIG.__init__),
    "upgrad": (lambda model, **kw: UPGrad(model, **kw), UPGrad.__init__),
}

_NOT_CONFIG = {"self", "model", "net", "kwargs", "args"}


def _loss_layers() -> dict:
    from .causal import CausalResidual
    from .self_adaptive import SelfAdaptive

    return {"causal": CausalResidual, "self_adaptive": SelfAdaptive}


#: the per-point loss layers (residuals in, scalar terms out, to feed any balancer): not balancers themselves
LOSS_LAYERS = ("causal", "self_adaptive")


def build_loss_layer(config) -> paddle.nn.Layer:
    """A per-point loss layer from ``{"name": "causal" | "self_adaptive", **constructor keyword arguments}``
    or a YAML file (``yaml.safe_load``, validated like :func:`build_balancer`): :class:`~paddle_pinn_balance.
    CausalResidual` (time-chunked residual, one term) or :class:`~paddle_pinn_balance.SelfAdaptive` (per-point
    learnable weights, ``points: {term: count}``). Their outputs are the terms of any balancer.

    Example:
        >>> from paddle_pinn_balance.config import build_loss_layer
        >>> sa = build_loss_layer({"name": "self_adaptive", "points": {"res": 4, "bc": 2}, "mask": "sigmoid"})
        >>> sa.mask, sa.names
        ('sigmoid', ('res', 'bc'))
    """
    cfg = load_config(config)
    layers = _loss_layers()
    name = cfg.pop("name", None)
    if name not in layers:
        raise ValueError(f"unknown loss layer name {name!r}; allowed: {sorted(layers)}")
    cls = layers[name]
    allowed = [k for k in inspect.signature(cls.__init__).parameters if k not in _NOT_CONFIG]
    unknown = sorted(str(k) for k in cfg if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for loss layer {name!r}; allowed: {allowed}")
    return cls(**cfg)


def allowed_keys(name: str) -> list:
    """Configuration keys accepted for balancer ``name`` (besides ``name``)."""
    ctor = REGISTRY[name][1]
    if ctor is None:
        return []
    keys = [k for k in inspect.signature(ctor).parameters if k not in _NOT_CONFIG]
    if name == "grad_norm":  # GradNorm forwards the balancer's own options
        from .gradnorm import GradNormBalancer

        keys += [k for k in inspect.signature(GradNormBalancer.__init__).parameters
                 if k not in _NOT_CONFIG and k not in keys]
    return keys


def load_config(config) -> dict:
    """A config dict from a mapping or a YAML file path (either at top level or under a ``balancer:`` key).
    YAML is read with ``yaml.safe_load``."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ValueError(f"balancer config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"malformed YAML in {path}: {e}") from None
    if isinstance(config, Mapping) and "balancer" in config and "name" not in config:
        config = config["balancer"]  # a file's or a dict's `balancer:` section
    if not isinstance(config, Mapping):
        raise ValueError(f"a balancer config must be a mapping with a `name` key; got {type(config).__name__}")
    return dict(config)


def build_balancer(config, model: Optional[paddle.nn.Layer] = None) -> Balancer:
    """Build a balancer from ``{"name": ..., **constructor keyword arguments}`` or a YAML file.

    ``name`` is a key of :data:`REGISTRY` (``sum``, ``lr_annealing``, ``grad_norm``, ``ntk``, ``grad_norm_ratio``,
    ``relobralo``, ``softadapt``, ``uncertainty``, ``pcgrad``, ``conflict_free``, ``m_conflict_free``, ``upgrad``).
    A YAML file or a dict may hold the mapping at top level or under a ``balancer:`` key. Unknown names or keys raise
    ``ValueError`` listing the allowed ones; values are checked by the constructors. Nothing is evaluated.

    For ``grad_norm`` the model is wrapped in :class:`~paddle_pinn_balance.GradNorm` (unless it is one
    already) and the wrapper's aggregator is returned; ``balancer.wrapper`` is the wrapper, the model to
    train (its ``parameters()`` include the loss weights).

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import build_balancer
        >>> net = paddle.nn.Linear(2, 1)
        >>> lra = build_balancer({"name": "lr_annealing", "ref": "res", "variant": "arxiv"}, net)
        >>> lra.variant
        'arxiv'
    """
    cfg = load_config(config)
    if "name" not in cfg:
        raise ValueError(f"balancer config needs a `name`, one of {sorted(REGISTRY)}; got keys {sorted(cfg)}")
    name = cfg.pop("name")
    if name in LOSS_LAYERS:
        raise ValueError(f"{name!r} is a per-point loss layer, not a balancer: build it with build_loss_layer and "
                         f"give its outputs (scalar terms) to a balancer; balancers: {sorted(REGISTRY)}")
    if name not in REGISTRY:
        raise ValueError(f"unknown balancer name {name!r}; allowed: {sorted(REGISTRY)}")
    allowed = allowed_keys(name)
    unknown = sorted(str(k) for k in cfg if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for balancer {name!r}; allowed: {allowed}")
    if name != "sum" and not isinstance(model, paddle.nn.Layer):
        raise ValueError(f"balancer {name!r} needs the model (a paddle.nn.Layer); got {type(model).__name__}")
    return REGISTRY[name][0](model, **cfg)
