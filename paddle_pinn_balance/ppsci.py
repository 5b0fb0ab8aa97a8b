"""PaddleScience adapters: balancers inside ``ppsci.solver.Solver`` (optional; imports ``ppsci`` lazily).

Every balancer already has the shape of a PaddleScience loss aggregator: the solver calls
``solver.loss_aggregator(losses_all, solver.global_step)`` and saves / loads ``state_dict()`` as
``<checkpoint>.pdagg`` because ``should_persist`` is True. This module adds what the solver does not know:

* :func:`loss_names`: the names of the solver's loss terms, from its constraints. PaddleScience keys
  ``losses_all`` by *label key*, summed over constraints: two constraints that both constrain ``"u"``
  give ONE term ``"u"`` (one weight on their sum). Rename the key in one of them (recipe in
  ``design/ppsci.md``) to weight them separately.
* :func:`build_for_solver`: ``(model_for_the_solver, balancer)`` from a ``TRAIN.balancer`` config block
  (a dict, an omegaconf ``DictConfig`` or a whole Hydra config), with ``loss_names`` filled in from the
  constraints (so a checkpoint for other terms is refused when the solver loads it) and, for ``ntk``,
  kernels built from the constraints. The model comes back as it went in (the bare network, also for
  ``grad_norm``): the solver's ``.pdparams`` are the network's own, and a checkpoint saved with a balancer
  evaluates, exports and fine-tunes in the example's own code exactly like one saved without.
* :func:`optimizer_layers`: the layers to build the solver's optimizer from (the network plus learned loss
  weights, each once), and :func:`attach_weight_optimizer`: GradNorm's weights on an optimizer of their own,
  for L-BFGS in the Solver.
* :func:`constraint_kernels`: NTK kernels ``kernel(model) -> Tensor[N]`` from the constraints' own output
  expressions and points (no residual written twice), and :func:`ntk_model`, the model to give
  :class:`~paddle_pinn_balance.NTKWeighting` so that the traces take the fast (expanded) path.
* :func:`attach_logging`: the weights (and NTK traces / GradNorm's ``L_grad``) in the solver's training
  log line and its VisualDL / WandB / TensorBoard writer, at the solver's log steps only.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from typing import Mapping, Optional

import numpy as np
import paddle

from . import expanded as _expanded
from .balancer import Balancer, BalanceWarning
from .config import REGISTRY, allowed_keys
from .config import build_balancer as _core_build_balancer
from .fixed import Sum
from .gradnorm import GradNorm, GradNormBalancer
from .per_point import _Unsupported

__all__ = ["to_container", "balancer_config", "loss_names", "build_for_solver", "optimizer_layers",
           "attach_weight_optimizer", "constraint_kernels", "ntk_model", "attach_logging", "attach"]

#: Keys of a ``ntk`` config block read here (not by :class:`~paddle_pinn_balance.NTKWeighting`).
NTK_ADAPTER_KEYS = ("max_points", "fast", "point_weights")


def _ppsci():
    try:
        import ppsci  # absolute import: the real PaddleScience package, not this module
    except ImportError as e:  # pragma: no cover - exercised only without PaddleScience
        raise ImportError("paddle_pinn_balance.ppsci needs PaddleScience: pip install 'paddle_pinn_balance[ppsci]'"
                          ) from e
    return ppsci


# --------------------------------------------------------------------------- configuration


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


def build_for_solver(cfg, model: paddle.nn.Layer, constraints: Optional[Mapping] = None):
    """``(model, balancer)`` for ``ppsci.solver.Solver(model=model, loss_aggregator=balancer, ...)``.

    Args:
        cfg: the ``TRAIN.balancer`` block (``{"name": ..., **hyperparameters}``), or a whole Hydra config
            holding one, as a dict or an omegaconf ``DictConfig``. Keys are those of
            :func:`paddle_pinn_balance.build_balancer`; a ``ntk`` block also takes ``max_points``, ``fast``
            and ``point_weights`` (see :func:`constraint_kernels`).
        model: the PaddleScience network.
        constraints: the solver's constraint dict. When given, ``loss_names`` defaults to
            :func:`loss_names` ``(constraints)`` for every method (so its state, and the parameters of
            ``uncertainty``, exist before the optimizer is built and before a checkpoint loads), and ``ntk``
            (``mode: trace``) gets its kernels from them.

    Returns:
        ``(model, balancer)``: the network to give the solver (``model`` itself; a
        :class:`~paddle_pinn_balance.GradNorm` wrapper given here is unwrapped, its balancer kept) and the
        balancer. Build the solver's optimizer from :func:`optimizer_layers` ``(model, balancer)``:
        ``ppsci.optimizer.Adam(lr)(optimizer_layers(model, balancer))``, so that learned weights (GradNorm's
        ``loss_weights``, uncertainty's ``log_vars``) train. Learned weights are the balancer's parameters,
        saved in the solver's ``<checkpoint>.pdagg`` with the rest of its state; the ``.pdparams`` hold the
        network's parameters under the network's own names (no ``net.`` prefix): the example's
        ``mode=eval`` / ``export`` and ``pretrained_model_path`` load them into the bare network.
    """
    cfg = balancer_config(cfg)
    name = cfg.get("name")
    if constraints is not None and "loss_names" not in cfg and name in REGISTRY and "loss_names" in allowed_keys(name):
        cfg["loss_names"] = loss_names(constraints)  # every method: state (and parameters) exist before training
    if name == "ntk":
        opts = {k: cfg.pop(k) for k in NTK_ADAPTER_KEYS if k in cfg}
        if cfg.get("mode", "trace") == "trace" and "kernels" not in cfg:
            if constraints is None:
                raise ValueError("`ntk` with mode 'trace' needs the constraints (to build its kernels) or `kernels`")
            fast = bool(opts.pop("fast", True))
            if not fast:
                cfg.setdefault("path", "loop")  # asked for: the per-point loop, without the slow-path warning
            cfg["kernels"] = constraint_kernels(constraints, model, **opts)
            return model, _core_build_balancer(cfg, ntk_model(model) if fast else _unwrap(model))
        if opts:
            raise ValueError(f"keys {sorted(opts)} apply to kernels built from constraints (ntk, mode 'trace')")
        return model, _core_build_balancer(cfg, _unwrap(model))
    if name == "grad_norm":  # the balancer, not its wrapper, goes to the solver (the wrapper keeps net.* names)
        agg = _core_build_balancer(cfg, model)
        return agg.wrapper.net, agg
    agg = _core_build_balancer(cfg, _unwrap(model))
    if type(agg) is Sum and not any(v != 1.0 for v in agg._fixed.values()):
        agg.__class__ = SolverSum  # validated and built by the core builder; the same state, ppsci's total
    return _unwrap(model), agg


class SolverSum(Sum):
    """``sum`` in the Solver: ppsci's ``mtl.Sum`` operation for operation, ``L_1 + L_2 + ...`` left to right.

    The same graph gives the same order of gradient accumulation, so a run with ``{name: sum}`` is the run
    without a balancer bit for bit (parameters, optimizer state, losses, metrics); :class:`Sum`'s stacked
    weighted sum has the same value and gradient up to the last bit of the accumulation. State and
    checkpoints are :class:`Sum`'s."""

    def _total(self, values, update):
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total


def _unwrap(model):
    return model.net if isinstance(model, GradNorm) else model


def optimizer_layers(model: paddle.nn.Layer, balancer: Balancer, lbfgs: bool = False) -> tuple:
    """The layers to build the solver's optimizer from: ``ppsci.optimizer.Adam(lr)(optimizer_layers(model, b))``.

    ``model``, ``balancer``: what :func:`build_for_solver` returned. Every trainable tensor comes once
    (ppsci's optimizers concatenate ``parameters()`` of the layers, so ``(wrapper, balancer)`` would list
    GradNorm's weights twice):

    * ``grad_norm``: ``(model, balancer)``: the network and ``loss_weights``. With ``lbfgs=True``:
      ``(model,)`` only; GradNorm's weights follow their own objective :math:`L_\\mathrm{grad}`, not the
      total that L-BFGS minimises, so give them a first-order optimizer of their own with
      :func:`attach_weight_optimizer` (without it they stay at their values).
    * ``uncertainty``: ``(model, balancer)``: the network and ``log_vars`` (the total is one objective of both,
      so L-BFGS takes both too).
    * every other method: ``(model,)`` (no parameters of its own).

    Raises ``ValueError`` for a balancer with learned weights whose names (hence parameters) are not known
    yet: pass the constraints (or ``loss_names``) to :func:`build_for_solver`.
    """
    if not isinstance(balancer, Balancer):
        raise ValueError(f"optimizer_layers needs a paddle_pinn_balance balancer; got {type(balancer).__name__}")
    if balancer.learns_weights and balancer.loss_names is None and not balancer.parameters():
        raise ValueError(f"{type(balancer).__name__} has no parameters yet (its loss names are unknown): build it "
                         "with the constraints (build_for_solver(cfg, model, constraints)) or `loss_names`")
    if isinstance(model, GradNorm):  # a wrapper given to the solver by hand (it holds the weights itself)
        if model.aggregator is not balancer:
            raise ValueError("`model` is a GradNorm wrapper of another balancer")
        return (model.net,) if lbfgs else (model,)
    own = {id(p) for p in model.parameters()}
    extra = [p for p in balancer.parameters() if id(p) not in own]
    if lbfgs and isinstance(balancer, GradNormBalancer):
        return (model,)
    return (model, balancer) if extra else (model,)


class _WeightOptimizer:
    """Steps GradNorm's weights with their own optimizer once per solver step (see attach_weight_optimizer)."""

    def __init__(self, balancer, optimizer):
        self.balancer, self.optimizer = balancer, optimizer
        self.pending = None  # (step, dL_grad/dw) of the last update step, not applied yet
        self.handles = []

    def grad_hook(self, grad):  # runs when a backward delivers the weight gradient (update calls only)
        self.pending = (self.balancer._host.get("last_update_step"), grad.detach().clone())
        return None

    def pre_hook(self, layer, inputs):
        b = self.balancer
        step = inputs[1] if len(inputs) > 1 and inputs[1] is not None else b._host["calls"]
        if self.pending is None or int(step) == self.pending[0]:
            return None  # nothing to apply, or another evaluation of the same step (L-BFGS closure)
        w, grad = b.loss_weights, self.pending[1]
        self.pending = None
        w.clear_gradient(False)
        w.grad = grad.astype(w.dtype)
        self.optimizer.step()
        self.optimizer.clear_grad(set_to_zero=False)
        b._renormalise()  # sum w = T before this step reads them (as after the solver's own optimizer step)
        return None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_weight_optimizer(balancer: Balancer, optimizer) -> _WeightOptimizer:
    """Train GradNorm's ``loss_weights`` with their own optimizer, once per solver step (L-BFGS in the Solver).

    For a solver optimizer that must not hold the weights (L-BFGS, built from ``optimizer_layers(model,
    balancer, lbfgs=True)``): ``optimizer`` is a first-order Paddle optimizer over ``[balancer.loss_weights]``
    only, e.g. ``paddle.optimizer.Adam(0.01, parameters=[balancer.loss_weights])``. The gradient of
    :math:`L_\\mathrm{grad}` that the update call's total delivers (the first closure evaluation of a step)
    is kept, and ``optimizer.step()`` is applied to it at the first aggregator call of the next step,
    followed by GradNorm's renormalisation: every closure evaluation of one L-BFGS step sees the same
    weights, and step ``t + 1`` uses the weights stepped from step ``t``'s :math:`L_\\mathrm{grad}`, as with
    a first-order solver optimizer holding them. The step pending after the last training step is not
    applied (nor saved: a resumed run starts without it; the optimizer's own state is not checkpointed).

    Returns:
        A handle (``handle.remove()`` detaches it).
    """
    w = getattr(balancer, "loss_weights", None)
    if not isinstance(balancer, Balancer) or not isinstance(w, paddle.Tensor) or not hasattr(balancer, "_renormalise"):
        raise ValueError(f"attach_weight_optimizer applies to GradNorm's balancer; got {type(balancer).__name__}")
    params = list(getattr(optimizer, "_parameter_list", None) or [])
    flat = [q for g in params for q in (g["params"] if isinstance(g, dict) else [g])]
    if len(flat) != 1 or flat[0] is not w:
        raise ValueError("`optimizer` must hold exactly `balancer.loss_weights` (parameters=[balancer.loss_weights])")
    hook = _WeightOptimizer(balancer, optimizer)
    hook.handles = [w.register_hook(hook.grad_hook), balancer.register_forward_pre_hook(hook.pre_hook)]
    object.__setattr__(balancer, "_ppsci_weight_optimizer", hook)  # attach() leaves it in place
    return hook


#: learning rate of the Adam that :func:`attach` gives GradNorm's weights in an L-BFGS stage
GRADNORM_LBFGS_WEIGHT_LR = 1e-3


def attach(solver, balancer: Optional[Balancer] = None, every: Optional[int] = None, log: bool = True):
    """Everything a Solver needs besides ``loss_aggregator=balancer``, in one line after each ``Solver(...)``.

    1. The balancer's learned weights (GradNorm's ``loss_weights``, uncertainty's ``log_vars``) join the
       solver's optimizer where it was built from the model alone (as PaddleScience's examples build it):
       what :func:`optimizer_layers` would have given (``lbfgs=True`` for an L-BFGS optimizer).
    2. Under L-BFGS, GradNorm's weights get an Adam of their own (``GRADNORM_LBFGS_WEIGHT_LR``,
       :func:`attach_weight_optimizer`) unless one is attached: held by L-BFGS they would collapse, the
       residual's weight at its floor at the first step (``tests/test_ppsci_lbfgs.py``).
    3. A second Solver with the same balancer (Adam, then L-BFGS) continues it: weights and every state
       (GradNorm's :math:`L_i(0)`, SoftAdapt's previous losses, NTK traces) are kept, and
       :meth:`~paddle_pinn_balance.Balancer.restart_steps` lets the new Solver's ``global_step`` count from 0.
    4. :func:`attach_logging` (``every``; ``log=False``: not): the weights in the ``[Train]`` log line and
       the writers.

    Returns:
        the balancer.
    """
    balancer = solver.loss_aggregator if balancer is None else balancer
    if not isinstance(balancer, Balancer):
        raise ValueError(f"attach needs a paddle_pinn_balance balancer as the solver's loss_aggregator; got "
                         f"{type(balancer).__name__}")
    opt = getattr(solver, "optimizer", None)
    lbfgs = isinstance(opt, paddle.optimizer.LBFGS)
    if opt is not None:
        params = opt._parameter_list
        if params and isinstance(params[0], dict):
            params = params[0]["params"]  # parameter groups: the learned weights join the first
        held = {id(p) for p in params}
        for layer in optimizer_layers(_unwrap(solver.model), balancer, lbfgs=lbfgs):
            params.extend(p for p in layer.parameters() if id(p) not in held)
            held.update(id(p) for p in layer.parameters())
        if lbfgs and isinstance(balancer, GradNormBalancer):
            if id(balancer.loss_weights) in held:
                warnings.warn("GradNorm's loss_weights are in the solver's L-BFGS optimizer: they follow L_grad, "
                              "not the total L-BFGS minimises, and collapse; build it from optimizer_layers(model, "
                              "balancer, lbfgs=True)", BalanceWarning, stacklevel=2)
            elif not getattr(balancer.__dict__.get("_ppsci_weight_optimizer"), "handles", None):
                attach_weight_optimizer(balancer, paddle.optimizer.Adam(GRADNORM_LBFGS_WEIGHT_LR,
                                                                        parameters=[balancer.loss_weights]))
    previous = balancer.__dict__.get("_ppsci_solver")
    if previous is not None and previous() is not None and previous() is not solver:
        balancer.restart_steps()  # a second stage: its steps count from 0 again
        _renew_kernels(balancer, solver)
    object.__setattr__(balancer, "_ppsci_solver", weakref.ref(solver))
    if log:
        attach_logging(solver, balancer, every=every)
    else:
        _check_optimizer(solver, balancer)
    return balancer


def _renew_kernels(balancer, solver) -> None:
    """NTK kernels built from the first stage's constraints, rebuilt on the second stage's (new objects)."""
    kernels = getattr(balancer, "_kernels", None)
    if not kernels or not all(isinstance(k, _TermKernel) for k in kernels.values()):
        return
    old = {id(p.constraint) for k in kernels.values() for p in k.pieces}
    if all(id(c) in old for c in solver.constraint.values()):
        return
    first = next(iter(kernels.values())).pieces[0]
    model = getattr(solver.model, "_layers", solver.model)  # under paddle.DataParallel: the network
    balancer._kernels = dict(constraint_kernels(solver.constraint, model, max_points=first.max_points,
                                                point_weights=first.point_weights))


# --------------------------------------------------------------------------- NTK kernels


_FAST_ACTS = None


def _fast_layers(model):
    """The layer list of a plain ``ppsci.arch.MLP`` (Linear + parameter-free elementwise activations), or None."""
    global _FAST_ACTS
    ppsci = _ppsci()
    from .per_point import ELEMENTWISE, register_elementwise

    if _FAST_ACTS is None:
        act = ppsci.arch.activation
        _FAST_ACTS = tuple(getattr(act, n) for n in ("Sin", "Cos", "Siren") if hasattr(act, n))
        for cls in _FAST_ACTS:  # ppsci's parameter-free elementwise activations
            register_elementwise(cls)
    if type(model) is not ppsci.arch.MLP:
        return None
    if (model.skip_connection or model.periods or model.fourier or model._input_transform is not None
            or model._output_transform is not None):
        return None
    layers = []
    for lin, act in zip(model.linears, model.acts):
        if type(lin) is not paddle.nn.Linear or type(act) not in ELEMENTWISE or act.parameters():
            return None
        layers += [lin, act]
    if type(model.last_fc) is not paddle.nn.Linear:
        return None
    return layers + [model.last_fc]


def ntk_model(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The model to give :class:`~paddle_pinn_balance.NTKWeighting` together with :func:`constraint_kernels`.

    For a plain ``ppsci.arch.MLP`` (``nn.Linear`` layers, parameter-free elementwise activations, no skip
    connections, embeddings or transforms) this is a ``paddle.nn.Sequential`` sharing its layers, so the
    traces take the exact fast path (one backward per chunk of points); its ``parameters()`` are the MLP's.
    Any other model is returned unchanged (exact per-point loop).
    """
    model = _unwrap(model)
    layers = _fast_layers(model)
    if layers is None:
        return model
    return paddle.nn.Sequential(*layers)  # the SAME layers, hence the same parameters


def _dataset_points(constraint) -> dict:
    loader = constraint.data_loader
    ds = getattr(loader, "dataset", loader)
    if isinstance(getattr(ds, "input", None), Mapping):
        return dict(input=dict(ds.input), weight=dict(getattr(ds, "weight", None) or {}))
    if callable(getattr(ds, "input_fn", None)):
        return dict(input_fn=ds.input_fn, weight_fn=getattr(ds, "weight_fn", None), label_fn=ds.label_fn)
    raise ValueError(f"constraint {constraint.name!r}: cannot read points from {type(ds).__name__}; "
                     "pass `points={constraint_name: {input_key: array}}`")


def _as_tensor(v, dtype):
    t = v if isinstance(v, paddle.Tensor) else paddle.to_tensor(np.asarray(v))
    return t.astype(dtype) if t.dtype != dtype and t.dtype in (paddle.float32, paddle.float64, paddle.float16) else t


class _ConstraintPiece:
    """One constraint's contribution to one loss term: ``f(x_p)`` for its label key on its points."""

    def __init__(self, cname, constraint, key, points, max_points, point_weights, dtype):
        self.cname, self.constraint, self.key = cname, constraint, key
        self.max_points, self.point_weights, self.dtype = max_points, point_weights, dtype
        src = _dataset_points(constraint) if points is None else dict(input=dict(points), weight={})
        self.input_fn = src.get("input_fn")
        self.weight_fn = src.get("weight_fn")
        self.label_fn = src.get("label_fn")
        self.fixed = None
        if self.input_fn is None:
            self.fixed = {k: self._cut(_as_tensor(v, dtype)) for k, v in src["input"].items()}
            w = src["weight"].get(key)
            self.fixed_weight = None if w is None else self._cut(_as_tensor(w, dtype))

    def _cut(self, t):
        return t if self.max_points is None or int(t.shape[0]) <= self.max_points else t[: self.max_points]

    def _inputs(self):
        if self.fixed is not None:
            return self.fixed, self.fixed_weight
        raw = self.input_fn()  # a fresh sample (global numpy RNG; reset between chunks by per_point)
        inputs = {k: self._cut(_as_tensor(v, self.dtype)) for k, v in raw.items()}
        weight = None
        if self.point_weights and self.weight_fn is not None:
            w = self.weight_fn(raw).get(self.key)
            weight = None if w is None else self._cut(_as_tensor(w, self.dtype))
        return inputs, weight

    def expression(self):
        expr = self.constraint.output_expr.get(self.key)
        if expr is None:
            return None
        try:
            import sympy
        except ImportError:  # pragma: no cover
            return expr
        if isinstance(expr, sympy.Basic):  # not yet converted (the solver converts at construction)
            raise ValueError(f"constraint {self.cname!r}: output expression {self.key!r} is still a sympy "
                             "expression; build the ppsci.solver.Solver (which converts it) before the first update")
        return expr

    def __call__(self, m, mlp, tensor_io):
        inputs, weight = self._inputs()
        data = {}
        for k, v in inputs.items():
            v = v.detach()
            v.stop_gradient = False
            data[k] = v
        if tensor_io:
            x = paddle.concat([data[k] for k in mlp.input_keys], axis=-1)
            y = m(x)
            k = y.shape[-1] // len(mlp.output_keys)  # equal column slices (paddle.split warns on Paddle 3.2)
            outs = [y[..., i * k:(i + 1) * k] for i in range(len(mlp.output_keys))]
            out = dict(zip(mlp.output_keys, outs))
        else:
            out = m(data)
        data.update(out)
        try:
            if self.expression() is None:
                f = out[self.key]
            else:  # as the Solver's forward: every expression of the constraint in order, on one shared dict
                # (fused derivative nodes of a later expression read what an earlier one stored in it)
                for name, expr in self.constraint.output_expr.items():
                    f = expr(data)
                    if name == self.key:
                        break
        finally:
            _ppsci().autodiff.clear()
        if self.point_weights and weight is not None:
            f = f * paddle.sqrt(weight.reshape(f.shape))
        return f.reshape([-1])


class _TermKernel:
    """``kernel(model) -> Tensor[N]``: the per-point quantity of one loss term (all its constraints' points)."""

    def __init__(self, name, pieces, mlp):
        self.name, self.pieces, self.mlp = name, pieces, mlp

    def __call__(self, m):
        if len(self.pieces) > 1 and _expanded._ACTIVE is not None:  # the fast path needs one model call
            names = [p.cname for p in self.pieces]
            raise _Unsupported(f"term {self.name!r} is merged from {len(names)} constraints {names} (one model call "
                               "each); give each constraint its own label key for the fast path (design/ppsci.md)")
        tensor_io = not isinstance(m, _ppsci().arch.Arch) and not isinstance(m, GradNorm)
        if tensor_io and self.mlp is None:
            raise ValueError(f"kernel {self.name!r}: the model is not a plain ppsci.arch.MLP; give NTKWeighting "
                             "the ppsci model itself (or ntk_model(model))")
        guard = []
        if tensor_io and not isinstance(m, paddle.nn.Layer):
            # the fast path's stand-in: an expression that evaluates the network itself (not through its
            # data dict) would bypass the per-point copies; detect it and let the exact loop run instead
            def hook(layer, inputs):
                raise _Unsupported(f"an output expression of term {self.name!r} evaluates the network itself")
            guard = [lay.register_forward_pre_hook(hook) for lay in self.mlp.sublayers() if lay.parameters()]
        try:
            parts = [p(m, self.mlp, tensor_io) for p in self.pieces]
        finally:
            for h in guard:
                h.remove()
        return parts[0] if len(parts) == 1 else paddle.concat(parts)


def constraint_kernels(
    constraints: Mapping,
    model: paddle.nn.Layer,
    points: Optional[Mapping[str, Mapping]] = None,
    max_points: Optional[int] = None,
    point_weights: bool = False,
) -> dict:
    r"""NTK kernels ``{term: kernel(model) -> Tensor[N]}`` built from the solver's constraints.

    For loss term ``k`` (a label key) the kernel evaluates, on the points of every constraint whose labels
    contain ``k``, exactly what the solver's ``train_forward`` feeds the loss: the model's output dict,
    merged with the inputs, then ``constraint.output_expr[k](data_dict)`` (or the raw output ``k`` when the
    constraint has no expression for it). The label is left out: it does not depend on the parameters, so
    :math:`\partial f(x_p)/\partial\theta` and the trace are those of the residual ``f - label``.

    * Several output keys in one constraint (e.g. labels ``{"u": 0, "v": 0}``): PaddleScience gives one loss
      term per key, so there is one kernel per key, each over the constraint's points.
    * One key in several constraints (merged into one term by PaddleScience): one kernel over the union
      (concatenation) of their points, so the trace is the trace of the merged term. Such a kernel calls the
      model once per constraint and takes the exact per-point loop, not the fast path; rename the key per
      constraint to get separate terms (and the fast path).

    Points: the constraint's dataset arrays (all of them, or the first ``max_points``), fixed for the run and
    independent of the training iterator (no batch is consumed, no random state is touched). A dataset that
    samples on the fly (``ContinuousNamedArrayDataset``) draws a fresh sample at each update. ``points=
    {constraint name: {input key: array}}`` overrides the points of the named constraints.

    Args:
        constraints: the solver's ``{name: Constraint}``.
        model: the PaddleScience network (a :class:`~paddle_pinn_balance.GradNorm` wrapper is unwrapped).
        points: optional per-constraint input points.
        max_points: at most this many points per constraint.
        point_weights: multiply by :math:`\sqrt{w_p}` (the constraint's ``weight_dict``), the NTK of the
            weighted residual that the loss actually sees (the paper has no point weights: default False).

    The kernels accept either the PaddleScience model (dict in, dict out) or :func:`ntk_model` of it (and the
    fast path's stand-in). Output expressions must read the network output from their data dict, as
    sympy-converted and ``lambda out: ...`` expressions do; one that calls the network itself (e.g.
    ``ppsci.equation.Helmholtz``, which calls ``model.forward_tensor``) is detected on the fast path and sent
    to the exact loop.
    """
    _ppsci()
    if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int)
                                   or max_points < 1):
        raise ValueError(f"`max_points` must be a positive integer or None; got {max_points!r}")
    points = dict(points or {})
    unknown = sorted(set(points) - set(constraints))
    if unknown:
        raise ValueError(f"`points` names {unknown} are not constraint names {list(constraints)}")
    net = _unwrap(model)
    params = [p for p in net.parameters()]
    dtype = params[0].dtype if params else paddle.get_default_dtype()
    mlp = net if _fast_layers(net) is not None else None
    kernels = {}
    for term, sources in _term_sources(constraints).items():
        pieces = [_ConstraintPiece(cname, c, term, points.get(cname), max_points, point_weights, dtype)
                  for cname, c in sources]
        kernels[term] = _TermKernel(term, pieces, mlp)
    return kernels


# --------------------------------------------------------------------------- logging


class _LogHook:
    def __init__(self, solver, balancer, every, prefix):
        self.solver, self.balancer, self.every, self.prefix = solver, balancer, every, prefix

    def _is_log_step(self, step: int) -> bool:
        s = self.solver
        nxt = step + 1  # the solver increments global_step after the aggregator call, then logs
        every = self.every if self.every is not None else s.log_freq
        return nxt % every == 0 or nxt == 1 or nxt == getattr(s, "max_steps", -1)

    def scalars(self) -> dict:
        b = self.balancer
        out = {f"{self.prefix}/{k}": v for k, v in b.weights.items()}
        if callable(getattr(b, "traces", None)):
            stat = "ntk_trace" if getattr(b, "mode", "trace") == "trace" else "grad_norm"
            out.update({f"{stat}/{k}": v for k, v in b.traces().items()})
        if hasattr(b, "last_grad_norm_loss"):
            out["gradnorm_loss"] = float(b.last_grad_norm_loss.numpy())
        return out

    def __call__(self, layer, inputs, output):
        step = inputs[1] if len(inputs) > 1 and inputs[1] is not None else getattr(self.solver, "global_step", 0)
        if not self._is_log_step(int(step)):
            return None
        misc = _ppsci().utils.misc
        info = self.solver.train_output_info
        for key, value in self.scalars().items():
            meter = misc.AverageMeter(key, ".5g")
            meter.update(float(value))
            info[key] = meter  # printed in the log line and written as train/<key> by the solver's writers
        return None


def attach_logging(solver, balancer: Optional[Balancer] = None, every: Optional[int] = None,
                   prefix: str = "weight"):
    """Put the balancer's weights in the solver's training log and writers, named by loss term.

    At the solver's log steps (``global_step % log_freq == 0``, the first and the last step; or every
    ``every`` steps) the entries ``<prefix>/<term>`` (the weights applied at that step), plus
    ``ntk_trace/<term>`` for :class:`~paddle_pinn_balance.NTKWeighting` and ``gradnorm_loss`` for GradNorm,
    are added to ``solver.train_output_info``: the solver prints them in its ``[Train]`` line and writes them
    as ``train/<key>`` to its VisualDL / WandB / TensorBoard writer. Nothing is patched: it is a forward
    post-hook on the balancer, and it reads (synchronises) only at those steps.

    A second call for the same balancer (a second Solver: Adam, then L-BFGS) replaces the first one's hook.
    It also checks, once, that the solver's optimizer holds the balancer's learned weights (GradNorm's
    ``loss_weights``, uncertainty's ``log_vars``): a ``BalanceWarning`` names them where it does not (the
    optimizer was built from the model instead of :func:`optimizer_layers`), since they would silently stay
    at their initial values. GradNorm's weights under L-BFGS are the exception (:func:`attach_weight_optimizer`).

    Returns:
        The hook handle (``handle.remove()`` detaches it).
    """
    balancer = solver.loss_aggregator if balancer is None else balancer
    if not isinstance(balancer, Balancer):
        raise ValueError(f"attach_logging needs a paddle_pinn_balance balancer; got {type(balancer).__name__}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"`every` must be a positive integer or None; got {every!r}")
    _check_optimizer(solver, balancer)
    old = balancer.__dict__.get("_ppsci_log_handle")
    if old is not None:
        old.remove()
    handle = balancer.register_forward_post_hook(_LogHook(solver, balancer, every, prefix))
    object.__setattr__(balancer, "_ppsci_log_handle", handle)
    return handle


def _check_optimizer(solver, balancer) -> None:
    opt = getattr(solver, "optimizer", None)
    if opt is None:
        return
    if isinstance(balancer, GradNormBalancer) and isinstance(opt, paddle.optimizer.LBFGS):
        return  # by design: GradNorm's weights take attach_weight_optimizer under L-BFGS
    held = {id(q) for g in (opt._parameter_list or []) for q in (g["params"] if isinstance(g, dict) else [g])}
    missing = [p.name for p in balancer.parameters() if not p.stop_gradient and id(p) not in held]
    if missing:
        warnings.warn(f"{type(balancer).__name__}'s learned weights {missing} are not in the solver's optimizer: "
                      "they stay at their initial values. Build it from optimizer_layers(model, balancer), e.g. "
                      "ppsci.optimizer.Adam(lr)(balance.optimizer_layers(model, balancer))", BalanceWarning,
                      stacklevel=3)
