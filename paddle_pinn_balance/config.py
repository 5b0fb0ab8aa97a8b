"""``build_balancer``: a balancer from a dict or a YAML file (``yaml.safe_load``, registry lookup, validation)."""

from __future__ import annotations

import inspect
import os
from typing import Mapping, Optional

import paddle
import yaml

from .balancer import Balancer
from .causal import CausalResidual
from .checks import NOT_CONFIG as _NOT_CONFIG
from .checks import build_from_keywords
from .contract import REGISTRY, discover
from .self_adaptive import SelfAdaptive


def _loss_layers() -> dict:
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
    return build_from_keywords(layers[name], cfg, f"loss layer {name!r}")


discover()  # every method's module registers it (`@register(name)`): REGISTRY maps name -> (builder, constructor)


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

    ``name`` is a key of :data:`~paddle_pinn_balance.contract.REGISTRY`, the names the methods register with
    ``@register(name)`` (:func:`~paddle_pinn_balance.contract.method_names` lists them).
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
