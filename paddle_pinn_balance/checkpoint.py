"""A balancer's state: created from the method's declared slots, and its ``state_dict`` validated before anything
is loaded (:class:`Checkpointed`).

A checkpoint of another method, with other names, another number of terms, other shapes, non-finite values or
values outside their range is refused and nothing changes; a checkpoint of an older version without
``method_utf8`` / ``last_update_step`` loads, and an older boolean ``initialised`` loads as the count 0 / 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import paddle

from . import ops
from .contract import _RESERVED, Slot

__all__ = ["Checkpointed"]


def _encode_names(names: Sequence[str]) -> paddle.Tensor:
    data = np.frombuffer("\n".join(names).encode("utf-8"), dtype=np.uint8).copy()
    return paddle.to_tensor(data, dtype="uint8")


def _decode_names(tensor) -> tuple:
    arr = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor, dtype=np.uint8)
    return tuple(arr.tobytes().decode("utf-8").split("\n"))


def _check_at_least(arrays: dict, key: str, minimum: int) -> None:
    if key in arrays and np.any(arrays[key] < minimum):
        raise ValueError(f"state_dict[{key!r}] must be >= {minimum}; got {arrays[key].tolist()}")


class Checkpointed:
    """The state half of :class:`~paddle_pinn_balance.balancer.Balancer` (a mixin before ``paddle.nn.Layer``): the
    per-term state created from the method's declaration (:meth:`_create_state`, once the number of terms is
    known), ``set_state_dict`` validates, ``state_dict`` writes the host's last update step first, a load restores
    the host-side mirrors (calls, last update step, the ``initialised`` counters)."""

    def _state_dtype(self) -> str:
        """The dtype of the weights and the per-term state: float64 when the parameters the method reads are
        float64 (without parameters: when Paddle's default dtype is), else float32 (a float16 model keeps
        float32 weights). A checkpoint in the other dtype loads (cast)."""
        params = self._params
        if params:
            return "float64" if any(p.dtype == paddle.float64 for p in params) else "float32"
        return "float64" if paddle.get_default_dtype() == "float64" else "float32"

    def _create_state(self, k: int) -> None:
        """Create the per-term state once the number of terms ``k`` is known: the weights, the bookkeeping and
        (methods of the contract) the declared slots and the ``initialised`` counters."""
        dtype = self._state_dtype()
        if not self.learns_weights:
            self.register_buffer("lambdas", paddle.ones([k], dtype=dtype))
        self.register_buffer("scale_min", paddle.full([k], np.inf, dtype=dtype), persistable=False)
        self.register_buffer("scale_nonfinite", paddle.zeros([k], dtype=dtype), persistable=False)
        for name, slot in self._slots(k, creating=True).items():
            shape = [int(n) for n in slot.shape]
            if slot.learned:  # a parameter the user's optimizer trains (uncertainty's log-variances)
                setattr(self, name, self.create_parameter(shape, dtype=slot.dtype or dtype, default_initializer=(
                    paddle.nn.initializer.Constant(float(np.asarray(slot.init).reshape(-1)[0]))
                    if np.ndim(slot.init) == 0 else paddle.nn.initializer.Assign(np.broadcast_to(slot.init, shape)))))
                continue
            value = np.broadcast_to(np.asarray(slot.init), shape).copy()
            self.register_buffer(name, paddle.to_tensor(value, dtype=slot.dtype or dtype))
        if self.history:  # per term: how many earlier losses an accepted update has taken (at most `history`)
            self.register_buffer("initialised", paddle.zeros([k], dtype="int64"))

    def _slots(self, k: int, creating: bool = False) -> dict:
        """The method's declared state (:meth:`~paddle_pinn_balance.balancer.Balancer.state_spec`), checked:
        ``{name: Slot}``."""
        spec = self.state_spec(k)
        for name, slot in spec.items():
            if not isinstance(slot, Slot):
                raise TypeError(f"{type(self).__name__}.state_spec: {name!r} must be a Slot; got {slot!r}")
            if name in _RESERVED or (creating and (name in self._buffers or name in self._parameters)):
                raise TypeError(f"{type(self).__name__}.state_spec: the name {name!r} is taken by the base")
        return spec

    def _state_dict_impl(self, *args, **kwargs):
        """Paddle's state-dict builder (``state_dict()``, and a parent layer's for its sublayers): the host's
        last update step is written into its buffer first."""
        last = self._host.get("last_update_step")
        self._buffers["last_update_step"] = paddle.full([1], -1 if last is None else last, dtype="int64")
        return super()._state_dict_impl(*args, **kwargs)

    #: keys a checkpoint of an older version may lack: (what they mean then)
    _OPTIONAL_STATE = ("last_update_step", "method_utf8")

    def set_state_dict(self, state_dict, use_structured_name: bool = True):
        """Load a checkpoint; refuse (and change nothing) on another method's state, other names, shapes,
        non-finite values or values outside their range (negative counters, weights outside
        ``[min_weight, max_weight]`` or negative). A checkpoint of an older version without ``method_utf8`` /
        ``last_update_step`` loads (its method cannot be checked; no update step is known)."""
        state = dict(state_dict)
        if "names_utf8" not in state:
            raise ValueError("state_dict has no `names_utf8`: not a paddle_pinn_balance checkpoint")
        own_method = _decode_names(self._buffers["method_utf8"])[0]  # the class this balancer was built as
        if "method_utf8" in state:
            method = _decode_names(state["method_utf8"])[0]
            if method != own_method:
                raise ValueError(f"checkpoint is the state of a {method}, not of a {own_method}")
        names = _decode_names(state["names_utf8"])
        if self._names is not None and names != self._names:
            raise ValueError(
                f"checkpoint was saved for loss names {list(names)}, this balancer has {list(self._names)}"
            )
        own = self._expected_state(len(names))
        missing = sorted(set(own) - set(state) - set(self._OPTIONAL_STATE))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unexpected}")
        arrays = {"last_update_step": np.full([1], -1, dtype=np.int64),
                  "method_utf8": _encode_names([own_method]).numpy()}
        for key, shape in own.items():
            if key not in state:
                continue
            value = np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key])
            if value.dtype.kind not in "biuf":
                raise ValueError(f"state_dict[{key!r}] is not numeric (dtype {value.dtype})")
            if shape is not None and list(value.shape) != list(shape):
                raise ValueError(f"state_dict[{key!r}] has shape {list(value.shape)}, expected {list(shape)}")
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise ValueError(f"state_dict[{key!r}] holds non-finite values: {value.tolist()}")
            arrays[key] = value
        self._check_state(arrays, names)
        if self._names is None:
            self._set_names(names)
        current = super().state_dict()  # same keys: cast each value to the dtype it is loaded into
        state = {k: arrays[k].astype(current[k].numpy().dtype) for k in arrays}
        result = super().set_state_dict(state, use_structured_name=use_structured_name)
        self._after_load()
        return result

    def _keep_slots(self, new: dict, slots: dict, ok: Optional[paddle.Tensor]) -> None:
        """Store the slots an update returned: where the guard's verdict ``ok`` accepted it (``None``: as
        returned), as new tensors without graph, in the declared dtype."""
        b = self._buffers
        for n, value in new.items():
            meta = slots.get(n)
            if meta is None:
                raise KeyError(f"{type(self).__name__}.update returned {n!r}, not a slot of its state_spec "
                               f"({sorted(slots)})")
            old = b[n]
            if value is old:
                continue
            if value.dtype is not meta[1]:
                value = ops.cast(value, meta[1])
            value = value if value.stop_gradient else value.detach()
            if ok is not None:
                cond = ok if meta[0] else ops.expand(ops.reshape(ok[:1], [1] * old.ndim), old.shape)
                value = ops.where(cond, value, old)
            b[n] = value  # a new tensor, no graph

    def _check_state(self, arrays: dict, names: tuple) -> None:
        """Raise ``ValueError`` naming the key if a value of a checkpoint (``arrays``, for terms ``names``) is
        outside its valid range."""
        for key in ("num_calls", "num_updates"):
            _check_at_least(arrays, key, 0)
        _check_at_least(arrays, "last_update_step", -1)
        if self.history and "initialised" in arrays:  # an older checkpoint's flags (bool) read as 0 / 1
            taken = arrays["initialised"].astype(np.int64)
            if np.any(taken < 0) or np.any(taken > self.history):
                raise ValueError(f"state_dict['initialised'] must count 0 to {self.history} earlier losses; got "
                                 f"{taken.tolist()}")
        if int(arrays["num_updates"][0]) > int(arrays["num_calls"][0]):
            raise ValueError(f"state_dict['num_updates'] ({int(arrays['num_updates'][0])}) exceeds "
                             f"state_dict['num_calls'] ({int(arrays['num_calls'][0])})")
        key = self._weight_key()
        if key is not None:
            w = arrays[key].astype(np.float64)
            bounded = self._bounded_terms(names)
            # the bounds as the weights' dtype rounds them (clipping to 0.1 in float32 stores 0.100000001)
            low = 0.0 if self.min_weight is None else float(np.asarray(self.min_weight, arrays[key].dtype))
            high = np.inf if self.max_weight is None else float(np.asarray(self.max_weight, arrays[key].dtype))
            bad = [float(v) for v, b in zip(w, bounded) if b and not low <= v <= high] + [float(v) for v in w if v < 0]
            if bad:
                raise ValueError(f"state_dict[{key!r}] holds weights {bad} outside [{self.min_weight or 0.0}, "
                                 f"{self.max_weight or np.inf}] (`min_weight`, `max_weight`; weights are never "
                                 "negative)")

    def _weight_key(self) -> Optional[str]:
        """The state key of the weights whose range :meth:`_check_state` checks (``None``: none)."""
        return None if self.learns_weights else "lambdas"

    def _bounded_terms(self, names: tuple) -> list:
        """Which terms' weights ``[min_weight, max_weight]`` applies to (all but LR annealing's references)."""
        return [True] * len(names)

    def _expected_state(self, k: int) -> dict:
        """Keys and shapes this balancer's ``state_dict`` holds for ``k`` terms (``None``: any length)."""
        shapes = {"num_calls": [1], "num_updates": [1], "last_update_step": [1], "names_utf8": None,
                  "method_utf8": None}
        for name, p in self.named_parameters():
            shapes[name] = [k] if name == "loss_weights" else list(p.shape)
        if not self.learns_weights:
            shapes["lambdas"] = [k]
        shapes.update({name: [int(n) for n in slot.shape] for name, slot in self._slots(k).items()})
        if self.history:
            shapes["initialised"] = [k]
        return shapes

    def _after_load(self) -> None:
        self._host["calls"] = int(self.num_calls.numpy()[0])
        last = int(self.last_update_step.numpy()[0])
        self._host.pop("last_update_step", None)
        if last >= 0:
            self._host["last_update_step"] = last
        if "initialised" in self._buffers:
            self._learn_initialised(self._buffers["initialised"] >= self.history, now=True)

    def _learn_initialised(self, flags: paddle.Tensor, now: bool = False) -> None:
        """Methods whose first update takes reference losses keep per-term flags on the device (``initialised``,
        GradNorm's ``has_initial_losses``). Once every flag is set the host knows it (``_host["initialised"]``)
        and later updates skip the flag arithmetic. Called at the end of each update while the host does not
        know it yet; the flags are read (one synchronisation) at the first such update, then every
        ``check_every`` updates (never with ``check_every=0``), and with ``now`` (after a load): in practice
        once per run, at its first update."""
        h = self._host
        n = h["unknown_updates"] = h.get("unknown_updates", 0) + 1
        if now or n == 1 or (self.check_every and n % self.check_every == 0):
            h["initialised"] = bool(flags.numpy().all())
