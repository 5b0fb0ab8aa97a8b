"""Argument checks shared by every module: a clear ``ValueError`` naming the argument (``check_int``,
``check_float``, ``check_choice``; a balancer's loss names and losses: ``check_loss_names``, ``check_losses``),
the one integer test of the command-line configs (:func:`is_int`) and the keyword-config builder of the per-point
loss layers (:func:`build_from_keywords`)."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Mapping, Optional, Sequence

import numpy as np
import paddle

from . import ops

__all__ = ["check_int", "check_float", "check_choice", "check_loss_names", "check_losses", "is_int",
           "build_from_keywords"]


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` as int, or raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_float(name, value, low=None, high=None, low_open=False, high_open=False, optional=False):
    """Return ``value`` as a finite float inside the given interval, or raise ``ValueError``."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        hint = ""
        with contextlib.suppress(ValueError):
            mantissa, exponent = f"{float(value):.1e}".split("e")
            hint = f" (YAML reads {value} as a string: write {mantissa}e{int(exponent)})"
        raise ValueError(f"`{name}` must be a finite number; got the string {value!r}{hint}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number; got {value!r}")
    value = float(value)
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        raise ValueError(
            f"`{name}` must be in {lb}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}{hb}; got {value!r}"
        )
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, or raise ``ValueError`` naming ``name`` and listing them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}; got {value!r}")
    return value


def is_int(value, minimum: int = 1) -> bool:
    """Whether :func:`check_int` accepts ``value`` (an integer, not a bool, at least ``minimum``)."""
    try:
        check_int("value", value, minimum)
    except ValueError:
        return False
    return True


#: constructor arguments that are never configuration keys
NOT_CONFIG = frozenset({"self", "model", "net", "kwargs", "args"})


def build_from_keywords(cls, config: Mapping, what: str):
    """``cls(**config)`` after checking that every key is a keyword argument of ``cls.__init__`` (``ValueError``
    naming the unknown keys and listing the allowed ones; ``what`` names the thing built in the message)."""
    allowed = [k for k in inspect.signature(cls.__init__).parameters if k not in NOT_CONFIG]
    unknown = sorted(str(k) for k in config if k not in allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for {what}; allowed: {allowed}")
    return cls(**config)


def check_loss_names(names) -> tuple:
    """``names`` as a tuple of distinct, non-empty strings without newlines, or ``ValueError``."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"`loss_names` must be a list of strings; got {names!r}")
    names = tuple(names)
    if not names:
        raise ValueError("`loss_names` must not be empty")
    for n in names:
        if not isinstance(n, str) or not n or "\n" in n:
            raise ValueError(f"loss name {n!r} must be a non-empty string without newlines")
    if len(set(names)) != len(names):
        raise ValueError(f"`loss_names` has duplicates: {list(names)}")
    return names


_FLOATS = (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)
_FLOAT_IDS = {id(d) for d in _FLOATS}


def check_losses(losses, names: Optional[tuple]) -> tuple:
    """``(values, mixed)``: the losses of a balancer call (a mapping with exactly the keys ``names``, scalar
    tensors of a floating dtype; ``ValueError`` naming the offending key otherwise) as 0-d tensors in the order
    of ``names``, and whether their floating dtypes differ. Runs on every call: no host synchronisation."""
    if not isinstance(losses, Mapping):
        raise ValueError(f"losses must be a mapping of name to scalar Tensor; got {type(losses).__name__}")
    if not losses:
        raise ValueError("losses must not be empty")
    if len(losses) != len(names) or any(n not in losses for n in names):
        missing = [n for n in names if n not in losses]
        extra = [n for n in losses if n not in names]
        raise ValueError(f"loss names changed: missing {missing}, unexpected {extra}; expected {list(names)}")
    values = []
    first = None
    mixed = False
    for n in names:
        v = losses[n]
        if not isinstance(v, paddle.Tensor):
            raise ValueError(f"loss {n!r} must be a paddle.Tensor; got {type(v).__name__}")
        dtype = v.dtype
        if dtype is not first and (first is None or dtype != first):  # `is`: dtypes are singletons, 10x faster
            if id(dtype) not in _FLOAT_IDS and dtype not in _FLOATS:
                raise ValueError(f"loss {n!r} must be a floating-point tensor; got dtype {dtype} (a loss of an "
                                 "integer or bool dtype has no gradient)")
            if first is None:
                first = dtype
            else:
                mixed = True
        shape = v.shape
        if shape:
            if int(np.prod(shape)) != 1:
                raise ValueError(f"loss {n!r} must be a scalar; got shape {list(shape)}")
            v = ops.reshape(v, [])
        values.append(v)
    return values, mixed
