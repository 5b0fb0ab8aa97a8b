"""The ``TRAIN.balancer`` block and the Solver's loss terms: what the adapter reads from a config and constraints.

PaddleScience keys ``losses_all`` by *label key*, summed over constraints: two constraints that both constrain
``"u"`` give ONE term ``"u"`` (one weight on their sum). :func:`loss_names` lists the terms in the Solver's
order; renaming the key in one of them (recipe in ``design/ppsci.md``) weights them separately.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

from ..gradnorm import GradNorm


def _ppsci():
    """The PaddleScience package, imported on first use (the core package never needs it)."""
    try:
        import ppsci  # absolute import: the real PaddleScience package, not this one
    except ImportError as e:  # pragma: no cover - exercised only without PaddleScience
        raise ImportError("paddle_pinn_balance.ppsci needs PaddleScience: pip install 'paddle_pinn_balance[ppsci]'"
                          ) from e
    return ppsci


def _unwrap(model):
    """The network of a :class:`~paddle_pinn_balance.GradNorm` wrapper; any other model as it is."""
    return model.net if isinstance(model, GradNorm) else model


def to_container(cfg):
    """A plain ``dict`` / ``list`` from an omegaconf ``DictConfig`` / ``ListConfig`` (resolved); else ``cfg``."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def balancer_config(cfg) -> dict:
    """The balancer block of ``cfg``: ``cfg.TRAIN.balancer`` of a whole Hydra config, ``cfg.balancer``, or ``cfg``.

    ``cfg`` may be a dict or an omegaconf ``DictConfig``; the result is a plain ``dict`` (a copy). A whole
    config (with ``TRAIN``) that has no ``TRAIN.balancer`` gives ``{"name": "sum"}``: an edited example run
    without a balancer trains as the unedited one (our ``sum`` is ppsci's default ``mtl.Sum``, bit for bit).

    Example:
        >>> from paddle_pinn_balance.ppsci import balancer_config
        >>> balancer_config({"TRAIN": {"epochs": 10, "balancer": {"name": "ntk", "update_freq": 10}}})
        {'name': 'ntk', 'update_freq': 10}
        >>> balancer_config({"TRAIN": {"epochs": 10}})  # no block: the unedited example's plain sum
        {'name': 'sum'}
        >>> balancer_config({"name": "lr_annealing", "ref": "pde"})  # the block itself
        {'name': 'lr_annealing', 'ref': 'pde'}
    """
    if not isinstance(cfg, Mapping):  # omegaconf's DictConfig is a Mapping: only the block is resolved
        raise ValueError(f"a balancer config must be a mapping; got {type(cfg).__name__}")
    if "name" not in cfg:
        train = cfg.get("TRAIN")
        if isinstance(train, Mapping) and "balancer" in train:
            cfg = train["balancer"]
        elif "balancer" in cfg:
            cfg = cfg["balancer"]
        elif isinstance(train, Mapping):
            cfg = {"name": "sum"}
        else:
            raise ValueError("no balancer config: expected a mapping with `name`, a `balancer:` block, or "
                             f"`TRAIN.balancer`; got keys {sorted(cfg)}")
    cfg = to_container(cfg)
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise ValueError(f"`TRAIN.balancer` must be a mapping with a `name`; got {cfg!r}")
    return dict(cfg)


def _label_keys(constraint) -> tuple:
    loader = constraint.data_loader
    dataset = getattr(loader, "dataset", loader)
    keys = getattr(dataset, "label_keys", None)
    if keys is None:
        keys = getattr(constraint, "output_keys", None)
    if keys is None:
        raise ValueError(f"constraint {getattr(constraint, 'name', constraint)!r} exposes no label keys; "
                         "pass `loss_names` explicitly")
    return tuple(keys)


def loss_names(constraints: Mapping) -> list:
    """Names of the loss terms the solver passes to its aggregator, in its order.

    PaddleScience's ``train_forward`` builds ``losses_all`` by iterating over the constraints and, inside
    each, over its loss's output (the label keys for ``MSELoss`` and the other pointwise losses), adding
    terms with the same key: the names are the label keys in first-seen order, merged across constraints.
    A custom loss returning other keys needs ``loss_names`` given explicitly.
    """
    if not isinstance(constraints, Mapping) or not constraints:
        raise ValueError("`constraints` must be the solver's non-empty {name: Constraint} dict")
    return list(OrderedDict.fromkeys(k for c in constraints.values() for k in _label_keys(c)))


def _term_sources(constraints: Mapping) -> "OrderedDict[str, list]":
    """term name -> [(constraint name, constraint), ...] of the constraints that contribute to it."""
    out: OrderedDict = OrderedDict()
    for cname, c in constraints.items():
        for key in _label_keys(c):
            out.setdefault(key, []).append((cname, c))
    return out
