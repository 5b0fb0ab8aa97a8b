"""The package's warnings: :class:`BalanceWarning`, and the device-side record of terms whose gradient (or loss)
was non-finite or zero, read every ``check_every`` updates (:class:`TermWarnings`, a mixin of
:class:`~paddle_pinn_balance.balancer.Balancer`)."""

from __future__ import annotations

import warnings

import numpy as np
import paddle

from . import ops

__all__ = ["BalanceWarning", "TermWarnings"]


class BalanceWarning(RuntimeWarning, UserWarning):
    """The category of every warning this package gives (skipped updates, slow paths): filter it with
    ``warnings.simplefilter("ignore", BalanceWarning)``; the test suite turns it into an error (a test that
    expects one says so with ``pytest.warns``)."""


class TermWarnings:
    """The warnings half of :class:`~paddle_pinn_balance.balancer.Balancer`: per-term non-finite / zero
    statistics counted on the device (buffers ``scale_min``, ``scale_nonfinite``, not saved), one warning naming
    the terms every ``check_every`` updates, and the one warning of steps going backwards."""

    def _record_bad_terms(self, scale: paddle.Tensor, zeros: bool = True) -> None:
        """Track, on the device, the per-term gradient statistic ``scale`` (non-finite exactly when the
        term's gradient is, 0 exactly when it is zero): its running minimum (zero seen?) and a running sum
        of ``scale - scale`` (0, or NaN once a non-finite value was seen: IEEE addition keeps NaN, where
        Paddle's ``minimum`` / ``maximum`` drop a NaN in one argument in some versions). Every
        ``check_every`` updates they are read (one synchronisation) and a warning names the terms whose
        gradient was non-finite or zero since the last check (their weights were kept).

        ``zeros=False``: only the non-finite count (``scale`` the detached losses of a method without gradients:
        a loss of 0 is no fault)."""
        b = self._buffers
        low, bad = b["scale_min"], b["scale_nonfinite"]
        if zeros:
            scale = ops.cast(scale.detach(), low.dtype)
            b["scale_min"] = ops.minimum(low, scale)
            ops.add_(bad, scale - scale)
        else:  # `scale` detached already (the losses): 0 * x is 0, or NaN where x is non-finite
            ops.add_(bad, ops.scale(ops.cast(scale, bad.dtype), 0.0))
        self._host["since_check"] += 1
        if self.check_every and self._host["since_check"] >= self.check_every:
            self.check_terms()

    #: what the warning of :meth:`check_terms` says happened at an update with a non-finite value
    _nonfinite_effect = "those updates were skipped and the previous weights kept"

    def check_terms(self) -> dict:
        """Warn about terms whose gradient (methods without gradients: loss) was non-finite, or whose gradient
        was zero, at some update since the last check; returns ``{name: (non-finite, zero)}`` flags and
        resets them (synchronises)."""
        self._host["since_check"] = 0
        if self._names is None or not hasattr(self, "scale_min"):
            return {}
        low, bad = self.scale_min.numpy().copy(), self.scale_nonfinite.numpy().copy()  # numpy() may share memory
        self.scale_min.set_value(paddle.full_like(self.scale_min, np.inf))
        self.scale_nonfinite.set_value(paddle.zeros_like(self.scale_nonfinite))
        out = {n: (bool(np.isnan(lo) or not np.isfinite(b)), bool(lo == 0.0))
               for n, lo, b in zip(self._names, low, bad)}
        nonfinite = [n for n, c in out.items() if c[0]]
        zero = [n for n, c in out.items() if c[1]]
        if nonfinite:
            what = "gradient" if self.needs_gradients else "loss"
            warnings.warn(f"{type(self).__name__}: non-finite {what} for term(s) {nonfinite} in the last "
                          f"{self.check_every or 'few'} update(s); {self._nonfinite_effect}",
                          BalanceWarning, stacklevel=3)
        if zero:
            self._warn_zero_gradient(zero)
        return out

    def _warn_zero_gradient(self, zero: list) -> None:
        warnings.warn(f"{type(self).__name__}: term(s) {zero} have an identically zero gradient (not "
                      "connected to the parameters?); their weights were kept", BalanceWarning, stacklevel=4)

    def _steps_went_backwards(self, step: int, last: int) -> None:
        if self._host.get("warned_backwards"):
            return
        self._host["warned_backwards"] = True
        warnings.warn(f"{type(self).__name__}: steps went backwards (step {step} after an update at step {last}): "
                      f"no update until a step past {last}; call `restart_steps()` when a new stage counts from 0",
                      BalanceWarning, stacklevel=3)
