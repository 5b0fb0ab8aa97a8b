r"""The method contract: how a balancing method plugs into the core, as code (registry, state slots, helpers).

A method is one class, in one module, registered with :func:`register`::

    @register("dwa")
    class DWA(Balancer):
        history = 2                                   # earlier losses the update reads (0: none)

        def state_spec(self, k):                      # its state, declared once
            return {"prev_losses": Slot([2, k], 1.0)}

        def update(self, losses, G, state):           # pure: no attribute is written
            ...
            return raw_weights, {"prev_losses": new_prev}

The pure update maps ``(losses, G or None, state) -> (raw weights, new state)``:

* ``losses``: this update call's losses, one detached vector in the state's dtype, averaged over the
  data-parallel ranks;
* ``G``: ``None`` for a method that reads the losses only; with ``needs_gradients = True`` (and ``self._params``
  set before the base constructor) the per-term gradients ``[k, P]``, taken once, rank-averaged; the update step's
  total then delivers ``w^T G`` without a second backward;
* ``state``: ``{name: tensor}`` for every declared slot, plus ``"taken"`` when ``history > 0``: the per-term
  number of earlier accepted updates (saturating at ``history``; int64), or ``None`` once every term has
  ``history`` of them (the host knows it: the method skips its first-call arithmetic; see :func:`pick`);
* returns the raw weights (shape ``[k]``; smoothing, bounds and the guard are the base's) and the slots it
  changes (a slot left out, or returned as the very tensor it received, costs nothing); a gradient-reading
  method returns a third element, the per-term gradient statistic (non-finite exactly when the term's gradient
  is, 0 when it is zero: the guard and the warnings read it).

The base (:class:`~paddle_pinn_balance.balancer.Balancer`) owns the rest, once for every method: registering
the slots as buffers and checkpointing them (shapes checked from the declaration), momentum, bounds, the
non-finite guard (an update whose weights or losses are non-finite is rejected whole: the weights *and every
slot* keep their old values, ``where(ok, new, old)``), the ``"taken"`` counters (buffer ``initialised``), the
warnings, the update cadence and the data-parallel averaging. :meth:`Balancer.__init_subclass__
<paddle_pinn_balance.balancer.Balancer.__init_subclass__>` checks the contract when the class is created.

Four kinds of method use it:

* **weights from an update** (SoftAdapt, ReLoBRaLo, DWA from the losses; LRA, the grad-norm ratio, NTK from
  ``G`` or, ``mode="trace"``, from its kernels' traces computed inside ``update``): as above;
* **learned weights** (GradNorm: ``learns_weights = True``, the weights a parameter the optimizer trains): the
  update returns the weights' *gradient* instead of raw weights (:math:`\partial L_\mathrm{grad}/\partial w`);
  the update step's total delivers it to the weights beside the network's ``w^T G``; nothing is smoothed, bounded
  or rejected, the slots are kept as returned; a method that decides per term when a first loss is taken names
  its bool slot in ``taken_slot`` (``state["taken"]`` is then that slot, ``None`` once all are set);
* **a fixed total, no update** (``Sum``; uncertainty weighting, whose total
  :math:`\sum_j \tfrac12 e^{-s_j} L_j + \tfrac12 s_j` is a differentiable expression of a parameter the
  optimizer trains): the class overrides ``_total`` and declares its state in ``state_spec`` all the same
  (uncertainty's ``log_vars`` is a ``Slot(..., learned=True)``: a parameter, not a buffer);
* **a direction** (gradient surgery): below.

Direction methods (gradient surgery: PCGrad, ConFIG, M-ConFIG, UPGrad) deliver a direction instead of
weights, composed as TorchJD composes an aggregator: a *weighting* maps the per-term gradients' Gram matrix
``G G^T`` to coefficients ``c``, and one *combiner*, :func:`combine`, forms ``c^T G`` (a weighting method's
gradient is the same combiner applied to its weights, ``w^T G``). Such a method subclasses
:class:`~paddle_pinn_balance.surgery.Surgery` (the direction machinery, marked ``_machinery = True``), declares
its state in ``state_spec`` as above, and defines ``weighting(self, gram, state) -> (c, new slots)``, or, when
its direction is not a combination of this call's ``G`` (M-ConFIG combines momenta), its own pure ``update``
returning ``(direction, new slots, statistic)``. ``Surgery`` keeps the weights at 1, guards the slots with the
statistic, counts update steps in the slot named by ``counter`` (a host int in ``state``: PCGrad's draw number,
M-ConFIG's turn) and delivers the direction through the update step's total. :func:`check_contract` refuses, at
class creation, a direction method that overrides the machinery, reads no gradients, defines neither
``weighting`` nor ``update``, or has a malformed signature.

Every method is on the contract; ``docs/adding-a-method.md`` shows it with worked examples.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from typing import Callable, NamedTuple, Optional, Sequence, Union

__all__ = ["REGISTRY", "Slot", "register", "discover", "method_names", "pick", "ready", "combine", "check_contract"]

#: balancer name -> (builder ``(model, **kw) -> Balancer``, the constructor whose keyword arguments a config may use);
#: filled by :func:`register` when a method's module is imported (:func:`discover` imports them all)
REGISTRY: dict = {}


class Slot(NamedTuple):
    """One piece of a method's state, declared in ``state_spec(k)``: a buffer of ``shape`` (a list of ints;
    the number of terms ``k`` written as an int) filled with ``init``; ``dtype`` ``None`` is the balancer's state
    dtype (float32, or float64 for a float64 model), else a Paddle dtype name (``"int64"``, ``"bool"``).

    ``learned=True``: a parameter instead of a buffer, trained by the user's optimizer with the network (build
    the optimizer from ``balancer.parameters()`` too), checkpointed like any slot but neither passed in ``state`` nor
    written by an update (uncertainty's ``log_vars``, a method with no update)."""

    shape: Sequence[int]
    init: Union[float, int, Sequence] = 0.0
    dtype: Optional[str] = None
    learned: bool = False


def _default_builder(cls) -> Callable:
    params = list(inspect.signature(cls.__init__).parameters)
    takes_model = len(params) > 1 and params[1] in ("model", "net")

    def build(model, **kw):
        return cls(model, **kw) if takes_model else cls(**kw)

    return build


def register(name: str, build: Optional[Callable] = None) -> Callable:
    """Class decorator: make a balancer class buildable as ``build_balancer({"name": name, ...})``.

    ``build(model, **kw)`` builds it (default: ``cls(model, **kw)`` when the constructor's first argument is
    ``model`` or ``net``, else ``cls(**kw)``); the config keys allowed are the constructor's keyword arguments.
    A name registered twice by different classes is an error."""
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"a balancer name must be a lower-case identifier; got {name!r}")

    def deco(cls):
        old = REGISTRY.get(name)
        other = None if old is None else old[0].method_class
        if other is not None and (other.__module__, other.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"balancer name {name!r} is registered twice ({other.__name__}, {cls.__name__})")
        builder = build or _default_builder(cls)
        builder.method_class = cls
        REGISTRY[name] = (builder, cls.__init__)
        cls.registry_name = name
        return cls

    return deco


def discover() -> dict:
    """Import every module of the package that registers a method (its source holds ``@register(``) and return
    :data:`REGISTRY`: a new method's module is found without being listed anywhere."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg or info.name.startswith("_") or info.name == "contract":
            continue
        spec = importlib.util.find_spec(f"{__package__}.{info.name}")
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py"):
            with open(origin, encoding="utf-8") as f:
                if "\n@register(" not in f.read():
                    continue
        importlib.import_module(f"{__package__}.{info.name}")
    return REGISTRY


def method_names() -> list:
    """The registered balancer names, sorted (every list of methods in the docs and tests is checked against it)."""
    return sorted(discover())


def ready(taken, n: int = 1):
    """Which terms have ``n`` earlier losses: ``None`` (all of them, known on the host) or a bool vector."""
    return None if taken is None else taken >= n


def pick(flags, yes, no):
    """``where(flags, yes, no)``, or ``yes`` when ``flags`` is ``None`` (every term ready: no device operation)."""
    if flags is None:
        return yes
    from . import ops

    return ops.where(flags, yes, no)


def combine(c, rows):
    """The one combiner: ``c^T rows`` (``c`` ``[K]`` coefficients, ``rows`` ``[K, P]``), in the rows' dtype.

    The gradient a weighting delivers is ``w^T G``; a direction method's (gradient surgery) is ``c^T G`` with
    its coefficients ``c`` (TorchJD's weighted aggregator ``w^T J``)."""
    from . import ops

    return ops.matmul(ops.cast(c, rows.dtype), rows)


#: state names a method may not declare: the base's own, and the extra keys of ``state``
_RESERVED = frozenset({"taken", "weights", "step", "lambdas", "initialised", "num_calls", "num_updates",
                       "last_update_step", "names_utf8", "method_utf8", "scale_min", "scale_nonfinite"})
_LEGACY = ("_update", "_update_from_gradients", "_create_state", "_extra_state_shapes", "_total", "_direction")


def _machinery(cls, base):
    """The class whose machinery ``cls`` plugs into: the nearest class of its MRO with ``_machinery = True`` in its
    own body (:class:`~paddle_pinn_balance.surgery.Surgery` for the direction methods), else ``base``."""
    return next((c for c in cls.__mro__ if c.__dict__.get("_machinery")), base)


#: what the direction machinery owns: a direction method that overrides one is refused
_DIRECTION_MACHINERY = ("_apply_update", "_direction", "_term_gradients", "_total", "_set_weights")


def check_contract(cls, base) -> None:
    """Raise ``TypeError`` unless ``cls`` (a subclass of ``base``, the :class:`~paddle_pinn_balance.balancer.Balancer`)
    follows the contract (called by ``Balancer.__init_subclass__``): it defines ``update(self, losses, G, state)``,
    ``history`` a non-negative int, the state only in ``state_spec``, none of the older hooks; or, defining no
    ``update``, it overrides ``_total`` (a total that is not ``sum_i lambda_i L_i`` of weights from an update:
    ``Sum``'s fixed weights, uncertainty's learned expression).

    A direction method (a subclass of the machinery class, :class:`~paddle_pinn_balance.surgery.Surgery`) also:
    reads gradients (``needs_gradients``), defines ``weighting(self, gram, state)`` or its own ``update``,
    declares ``counter`` as ``None`` or the name of one of its slots, and leaves the machinery's methods alone."""
    if cls.update is None:
        legacy = [h for h in _LEGACY if h != "_total" and getattr(cls, h, None) is not getattr(base, h, None)]
        if legacy:
            raise TypeError(f"{cls.__name__} defines the older hook(s) {legacy}: declare the state in `state_spec` "
                            "and do the update in `update(self, losses, G, state)` (docs/adding-a-method.md)")
        if cls._total is base._total:
            raise TypeError(f"{cls.__name__} must define `update(self, losses, G, state)` (the method contract, "
                            "docs/adding-a-method.md) or, for a total that is not a weighted sum, override `_total`")
        return
    root = _machinery(cls, base)
    params = list(inspect.signature(cls.update).parameters)
    if params != ["self", "losses", "G", "state"]:
        raise TypeError(f"{cls.__name__}.update must be `update(self, losses, G, state)`; got ({', '.join(params)})")
    if isinstance(cls.history, bool) or not isinstance(cls.history, int) or cls.history < 0:
        raise TypeError(f"{cls.__name__}.history must be a non-negative int; got {cls.history!r}")
    if root is cls:
        return  # the machinery itself: it overrides the base's hooks by design
    if root is not base:
        _check_direction(cls, root)
    legacy = [h for h in _LEGACY if getattr(cls, h, None) is not getattr(root, h, None)]
    if legacy:
        raise TypeError(f"{cls.__name__} defines `update` and the older hook(s) {legacy}: declare the state in "
                        "`state_spec` and do all of the update in `update`")


def _check_direction(cls, root) -> None:
    name = cls.__name__
    own = [h for h in _DIRECTION_MACHINERY if getattr(cls, h, None) is not getattr(root, h, None)]
    if own:
        raise TypeError(f"{name} overrides {own} of the direction machinery ({root.__name__}): return the "
                        "coefficients from `weighting(self, gram, state)` (or the direction from `update`)")
    if cls.needs_gradients is not True:
        raise TypeError(f"{name} is a direction method (a {root.__name__}): it reads the gradients, "
                        "`needs_gradients` must stay True")
    if cls.weighting is root.weighting and cls.update is root.update:
        raise TypeError(f"{name} must define `weighting(self, gram, state) -> (coefficients, new slots)` "
                        "(or its own `update(self, losses, G, state) -> (direction, new slots, statistic)`)")
    params = list(inspect.signature(cls.weighting).parameters)
    if params != ["self", "gram", "state"]:
        raise TypeError(f"{name}.weighting must be `weighting(self, gram, state)`; got ({', '.join(params)})")
    if cls.counter is not None and not isinstance(cls.counter, str):
        raise TypeError(f"{name}.counter must be None or the name of an int64 [1] slot; got {cls.counter!r}")
