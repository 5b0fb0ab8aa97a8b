"""A generic PINN training loop: any :class:`~paddle_pinn_balance.problems.Problem` with any balancer.

Runs with the same ``seed`` start from identical network weights (``paddle.seed``) and see identical
point samples (a ``numpy`` generator of their own), so a plain and a balanced run differ only in the
weighting.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .balancer import check_int
from .config import REGISTRY, allowed_keys, build_balancer, load_config

__all__ = ["problem_balancer", "setup_run", "train", "train_step", "trainable_parameters"]


def train(problem, balancer_config, iters: int, seed: int = 0, log_every: int | None = None,
          progress: bool = True, desc: str | None = None, on_log=None) -> dict:
    """Train ``problem``'s network for ``iters`` iterations with the balancer ``balancer_config``.

    Each iteration: fresh points ``problem.sample(rng)``, loss terms ``problem.losses(net, batch)``,
    ``total = balancer(losses, step)``, ``total.backward()``, optimizer and learning-rate scheduler step.

    The balancer comes from :func:`problem_balancer` (loss names and, for ``ntk``, kernels filled in).

    Args:
        problem: a :class:`~paddle_pinn_balance.problems.Problem`.
        balancer_config: what :func:`~paddle_pinn_balance.build_balancer` takes (dict or YAML path).
        iters: number of iterations (>= 1).
        seed: seeds the initialisation (``paddle.seed``) and the point sampler (``numpy``).
        log_every: record history every ``log_every`` steps (and at the last step); default ``iters // 100``.
        progress: show a progress bar on stderr (``tqdm`` if installed, else a plain text bar).
        desc: label of the progress bar (default: the balancer's name).
        on_log: optional ``on_log(history, net)``, called after each log point (e.g. to save progress).

    Returns:
        ``dict`` with ``problem``, ``balancer`` (the config), ``iters``, ``seed``, ``rel_l2`` (final
        ``problem.error(net)``: the relative L2 error on the test grid for the PDE problems, the normalised loss
        for the GradNorm toy), ``error_name`` (what that is, in words), ``weights`` (final, ``{name: float}``),
        ``wall_time_s`` (the training loop), ``time_per_step_ms``, ``history`` (``step``, ``loss`` and
        ``weight`` per term, ``rel_l2``, ``lr``, ``wall_s`` (training seconds so far, log points excluded)
        and, where the problem has a ``monitor()`` (the causal residual's :math:`\\epsilon` and minimum
        weight), ``monitor``, at the log points) and ``model`` (the trained network; not
        JSON-serialisable, drop it before saving).
    """
    check_int("iters", iters, 1)
    check_int("seed", seed, 0)
    if log_every is None:
        log_every = max(1, iters // 100)
    check_int("log_every", log_every, 1)
    config = load_config(balancer_config)

    model, rng, balancer, net, optimizer, scheduler = setup_run(problem, config, seed)

    names = tuple(problem.loss_names)
    history = {"step": [], "loss": {n: [] for n in names}, "weight": {n: [] for n in names}, "rel_l2": [], "lr": [],
               "wall_s": []}
    monitor = getattr(problem, "monitor", None)
    bar = _progress(iters, desc or config["name"], enabled=progress)
    start, evaluating = time.perf_counter(), 0.0  # evaluating: seconds spent at log points (not in wall_s)
    for step in range(iters):
        losses = train_step(problem, net, rng, balancer, step, optimizer, scheduler)
        if step % log_every == 0 or step == iters - 1:
            paused = time.perf_counter()
            values = {n: float(losses[n]) for n in names}
            history["step"].append(step)
            for n in names:
                history["loss"][n].append(values[n])
            for n, w in balancer.weights.items():
                history["weight"][n].append(w)
            history["rel_l2"].append(problem.error(net))
            history["lr"].append(float(optimizer.get_lr()))
            history["wall_s"].append(paused - start - evaluating)
            for key, value in (monitor() if callable(monitor) else {}).items():
                history.setdefault("monitor", {}).setdefault(key, []).append(value)
            if on_log is not None:
                on_log(history, net)
            evaluating += time.perf_counter() - paused
            bar.set_postfix({n: f"{v:.2e}" for n, v in values.items()}, refresh=False)
        bar.update(1)
    wall = time.perf_counter() - start
    bar.close()
    return {
        "problem": problem.name,
        "balancer": dict(config),
        "iters": int(iters),
        "seed": int(seed),
        "rel_l2": problem.error(net),
        "error_name": getattr(problem, "error_name", "relative $L_2$ error"),
        "weights": balancer.weights,
        "wall_time_s": wall,
        "time_per_step_ms": 1e3 * wall / iters,
        "history": history,
        "model": net,
    }


def train_step(problem, net, rng, balancer, step: int, optimizer, scheduler) -> dict:
    """One iteration: fresh points, the loss terms, ``balancer(losses, step).backward()``, the optimizer's and the
    scheduler's step; returns the loss terms."""
    losses = problem.losses(net, problem.sample(rng))
    balancer(losses, step).backward()
    optimizer.step()
    optimizer.clear_grad()
    if scheduler is not None:
        scheduler.step()
    return losses


def trainable_parameters(net, balancer) -> list:
    """The parameters one optimizer trains: ``net``'s, then the balancer's own learnable weights (uncertainty
    weighting's ``log sigma^2``, GradNorm's loss weights when the balancer is used without its wrapper), each once."""
    params = list(net.parameters())
    seen = {id(p) for p in params}
    for p in balancer.parameters():
        if id(p) not in seen and not p.stop_gradient:
            params.append(p)
            seen.add(id(p))
    return params


def setup_run(problem, config: dict, seed: int):
    """What one training run of ``problem`` starts from, for :func:`train` and the diagnosis alike: the network
    (``build_model(seed)``), the batch generator, the balancer, the layer trained (GradNorm's wrapper, which holds
    the loss weights, else the network), its optimizer and learning-rate scheduler."""
    model = problem.build_model(seed)
    rng = np.random.default_rng(seed)
    balancer = problem_balancer(problem, config, model, seed)
    net = getattr(balancer, "wrapper", None) or model
    optimizer, scheduler = problem.optimizer(trainable_parameters(net, balancer))
    return model, rng, balancer, net, optimizer, scheduler


def problem_balancer(problem, balancer_config, model, seed: int = 0):
    """The balancer of ``balancer_config`` for ``problem``'s ``model``: the one place that completes a config.

    * ``loss_names``: set to ``problem.loss_names`` when the balancer takes them and the config names neither
      them nor ``n_loss`` (fixes the term order; GradNorm needs it up front);
    * ``kernels`` for ``ntk`` in ``mode: trace`` (and any registered method that takes ``kernels``) when the
      config has none: ``problem.kernels(batch)`` on one batch drawn once from a generator of its own,
      ``numpy.random.default_rng([seed, 1])``, so the training draws are unchanged and runs with one seed share
      the kernels' points (the CLI's check before training uses the same call).

    Raises ``ValueError`` when a method needs kernels and the problem has no ``kernels(batch)``.
    """
    config = load_config(balancer_config)
    build_config = dict(config)
    name = config.get("name")
    keys = allowed_keys(name) if name in REGISTRY else []
    if "loss_names" in keys and not {"loss_names", "n_loss"} & set(config):
        build_config["loss_names"] = list(problem.loss_names)
    wants_kernels = "kernels" in keys and "kernels" not in config and config.get("mode", "trace") == "trace"
    if wants_kernels:
        if not callable(getattr(problem, "kernels", None)):
            raise ValueError(f"balancer {name!r} (mode 'trace') needs kernels, and problem {problem.name!r} has no "
                             "`kernels(batch)`; use `mode: grad_norm` or pass `kernels` in a Python config")
        build_config["kernels"] = problem.kernels(problem.sample(np.random.default_rng([int(seed), 1])))
    return build_balancer(build_config, model)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class _TextBar:
    """A minimal progress bar on stderr (used when ``tqdm`` is not installed)."""

    width = 30

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.start = self._last = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    def set_postfix(self, values: dict, refresh: bool = True):
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1):
        self.n += n
        now = time.perf_counter()
        # redraw at most twice a second on a terminal, every 10% otherwise (logs stay short)
        due = now - self._last >= 0.5 if self.interactive else self.n % max(1, self.total // 10) == 0
        if due or self.n == self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float):
        frac = self.n / self.total
        filled = int(self.width * frac)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        line = (f"{self.desc}: {100 * frac:3.0f}% |{'#' * filled}{'.' * (self.width - filled)}| "
                f"{self.n}/{self.total} [{elapsed:.0f}s<{eta:.0f}s] {self.postfix}")
        sys.stderr.write(("\r" + line) if self.interactive else (line + "\n"))
        sys.stderr.flush()

    def close(self):
        if self.interactive:
            sys.stderr.write("\n")
            sys.stderr.flush()
