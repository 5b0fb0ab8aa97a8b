"""Cost of a balanced training step relative to a plain summed-loss step, measured side by side.

The Helmholtz PINN of the learning-rate annealing paper (2-50-50-50-1 tanh, Laplacian residual,
128 points per term), in two setups: the paper's two terms (residual + one boundary group) and five terms
(residual + four edges, as PaddleScience keys them). Every method trains from the same weights on the
same points; methods are interleaved in rounds and the median step time over rounds is reported, with
its ratio to the plain step of the same run. PaddleScience's aggregators (``ppsci.loss.mtl.Sum``,
``GradNorm``, ``NTK``) are measured too when ``ppsci`` is importable.

    python benchmarks/step_overhead.py                 # both setups, update_freq 1, 10, 100
    python benchmarks/step_overhead.py --memory        # also the peak memory of a step
    python benchmarks/step_overhead.py --surgery       # also PCGrad / ConFIG (and ppsci's PCGrad), every step
    python benchmarks/step_overhead.py --methods lra relobralo softadapt uncertainty pcgrad conflict_free \
        upgrad m_conflict_free --freqs 1             # exactly these methods (names: METHODS below)

Methods without an update frequency or whose direction is needed on every step (``EVERY_STEP``) are timed at
update_freq 1 only.

One CPU thread by default (``--threads``); on a GPU machine it runs on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from _common import add_device_argument, amortised_ratio, clock, use_device  # noqa: E402  (sets OMP_NUM_THREADS etc. before paddle)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from paddle_pinn_balance import GradNorm, LRAnnealing, ReLoBRaLo, SoftAdapt, Sum, UncertaintyWeighting  # noqa: E402

try:
    from paddle_pinn_balance import NTKWeighting  # noqa: E402
except ImportError:  # before the NTK method existed
    NTKWeighting = None

EDGES = ("bc_left", "bc_right", "bc_bottom", "bc_top")
#: every method name `build` knows (ppsci_*: PaddleScience's aggregators, measured when ppsci is importable)
METHODS = ("sum", "lra", "gradnorm", "ntk_grad_norm", "grad_norm_ratio", "relobralo", "softadapt", "uncertainty",
           "pcgrad", "conflict_free", "upgrad", "m_conflict_free", "ppsci_sum", "ppsci_gradnorm", "ppsci_ntk",
           "ppsci_relobralo", "ppsci_pcgrad")
#: timed at update_freq 1 only: no update frequency (uncertainty, ppsci's Sum / Relobralo / PCGrad), or a
#: direction that needs G on every step it is used (surgery)
EVERY_STEP = ("sum", "uncertainty", "pcgrad", "conflict_free", "upgrad", "m_conflict_free", "ppsci_sum",
              "ppsci_relobralo", "ppsci_pcgrad")


def make_net(seed=0):
    paddle.seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip([2, 50, 50, 50], [50, 50, 50, 1])):
        layers.append(paddle.nn.Linear(a, b, weight_attr=paddle.nn.initializer.XavierNormal(),
                                       bias_attr=paddle.nn.initializer.Constant(0.0)))
        if i < 3:
            layers.append(paddle.nn.Tanh())
    return paddle.nn.Sequential(*layers)


def make_points(n=128, seed=0):
    rng = np.random.default_rng(seed)
    pts = {"res": rng.uniform(-1, 1, (n, 2))}
    s = rng.uniform(-1, 1, (n, 1))
    one = np.ones((n, 1))
    pts["bc_left"] = np.hstack([-one, s])
    pts["bc_right"] = np.hstack([one, s])
    pts["bc_bottom"] = np.hstack([s, -one])
    pts["bc_top"] = np.hstack([s, one])
    return {k: paddle.to_tensor(v.astype("float32")) for k, v in pts.items()}


def helmholtz_losses(model, pts, terms):
    x = pts["res"].detach()
    x.stop_gradient = False
    u = model(x)
    du = paddle.grad(u, x, create_graph=True)[0]
    u_xx = paddle.grad(du[:, 0:1], x, create_graph=True)[0][:, 0:1]
    u_yy = paddle.grad(du[:, 1:2], x, create_graph=True)[0][:, 1:2]
    a1, a2 = np.pi, 4 * np.pi
    q = (-(a1 ** 2) - a2 ** 2 + 1.0) * paddle.sin(a1 * pts["res"][:, 0:1]) * paddle.sin(a2 * pts["res"][:, 1:2])
    losses = {"res": ((u_xx + u_yy + u - q) ** 2).mean()}
    edges = {e: (model(pts[e]) ** 2).mean() for e in EDGES}
    if terms == 2:
        losses["bc"] = edges["bc_left"] + edges["bc_right"] + edges["bc_bottom"] + edges["bc_top"]
    else:
        losses.update(edges)
    return losses


def plain_sum(losses, step):
    return paddle.add_n(list(losses.values()))


def build(method, freq, terms, net):
    """(model to train, aggregator) for a method name."""
    if method == "plain":
        return net, plain_sum
    if method == "sum":  # our fixed-weight balancer: the floor of any balancer call (names, checks, counters)
        return net, Sum()
    if method == "lra":
        return net, LRAnnealing(net, ref="res", update_freq=freq)
    if method == "gradnorm":
        wrapper = GradNorm(net, n_loss=terms, alpha=1.5, update_freq=freq)
        return wrapper, wrapper.aggregator
    if method == "ntk_grad_norm":
        return net, NTKWeighting(net, mode="grad_norm", update_freq=freq)
    if method == "grad_norm_ratio":
        from paddle_pinn_balance import GradNormRatio

        return net, GradNormRatio(net, update_freq=freq)
    if method == "relobralo":
        return net, ReLoBRaLo(update_freq=freq)
    if method == "softadapt":
        return net, SoftAdapt(update_freq=freq)
    if method == "uncertainty":  # its log-variances are in the optimizer (Runner adds the aggregator's parameters)
        return net, UncertaintyWeighting(loss_names=["res", "bc"] if terms == 2 else ["res", *EDGES])
    if method in ("pcgrad", "conflict_free", "upgrad", "m_conflict_free"):
        from paddle_pinn_balance.surgery import ConFIG, MConFIG, PCGrad, UPGrad

        cls = {"pcgrad": PCGrad, "conflict_free": ConFIG, "upgrad": UPGrad, "m_conflict_free": MConFIG}[method]
        return net, cls(net, update_freq=freq)
    from ppsci.loss import mtl

    if method == "ppsci_pcgrad":
        return net, _PpsciBackward(mtl.PCGrad(net))
    if method == "ppsci_sum":
        return net, mtl.Sum()
    if method == "ppsci_gradnorm":
        return net, mtl.GradNorm(net, num_losses=terms, update_freq=freq)
    if method == "ppsci_ntk":
        return net, mtl.NTK(net, num_losses=terms, update_freq=freq)
    if method == "ppsci_relobralo":
        return net, mtl.Relobralo(num_losses=terms)
    raise ValueError(f"unknown method {method!r}")


class _PpsciBackward:
    """``ppsci.loss.mtl.PCGrad`` returns itself and sets ``.grad`` in its own ``backward()``."""

    def __init__(self, agg):
        self.agg = agg

    def __call__(self, losses, step):
        self.value = paddle.add_n([v.detach() for v in losses.values()])
        return self.agg(losses, step)

    def __getattr__(self, name):
        return getattr(self.agg, name)


class Runner:
    def __init__(self, method, freq, terms):
        with paddle.utils.unique_name.guard():
            self.model, self.agg = build(method, freq, terms, make_net())
            params, seen = [], set()
            extra = self.agg.parameters() if getattr(self.agg, "learns_weights", False) else []  # ours only
            for p in self.model.parameters() + extra:  # learned balancer parameters once (GradNorm's are in both)
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            self.opt = paddle.optimizer.Adam(1e-3, parameters=params)
        self.pts = make_points()
        self.terms = terms
        self.freq = freq
        self.step = 0

    def run(self, n, timed=False):
        """Train `n` steps; with `timed`, start at an update step and return [(seconds, is update step)]."""
        gpu = paddle.device.get_device().startswith("gpu")
        if timed:
            self.step = -(-self.step // self.freq) * self.freq
        out = []
        for _ in range(n):
            t0 = clock()
            total = self.agg(helmholtz_losses(self.model, self.pts, self.terms), self.step)
            total.backward()
            self.opt.step()
            self.opt.clear_grad()
            if timed:
                if gpu:
                    # a synchronisation per timed step, in every runner alike
                    _ = float(getattr(self.agg, "value", total))
                out.append((clock() - t0, self.step % self.freq == 0))
            self.step += 1
        _ = float(getattr(self.agg, "value", total))
        return out


def methods_available(with_ppsci, surgery=False):
    """The default method list: ppsci's Sum, our gradient-reading weightings and ppsci's (when importable);
    with ``surgery`` also PCGrad / ConFIG (and ppsci's PCGrad)."""
    names = (["ppsci_sum"] if with_ppsci else []) + ["lra", "gradnorm"]
    names += ["ntk_grad_norm"] if NTKWeighting is not None else []
    if with_ppsci:
        names += ["ppsci_gradnorm", "ppsci_ntk"]
    if surgery:  # gradient surgery (update every step only), beside LRAnnealing
        names += ["pcgrad", "conflict_free"] + (["ppsci_pcgrad"] if with_ppsci else [])
    return names


def time_pair(method, freq, terms, rounds, block):
    """Step time of `method` against a plain runner built beside it: `rounds` rounds, each one block of
    `block` steps of either (in alternating order); each method block starts with an update step.

    Per round: the plain step is the median of its block; the method's update step and the median of its
    other steps are taken relative to it. The amortised ratio is
    ``(median update ratio + (freq - 1) * median other ratio) / freq`` over the rounds: ratios of steps
    timed milliseconds apart are robust to the machine's drift. Returns (seconds per amortised step,
    ratio, seconds per plain step)."""
    runners = {"plain": Runner("plain", 1, terms), method: Runner(method, freq, terms)}
    for r in runners.values():  # warm-up (and the first update step, which fixes names and state)
        r.run(3)
    upd, other, plain = [], [], []
    for i in range(rounds):
        steps = {key: runners[key].run(block, timed=True)
                 for key in (list(runners) if i % 2 == 0 else list(runners)[::-1])}
        p = statistics.median(t for t, _ in steps["plain"])
        plain.append(p)
        upd += [t / p for t, u in steps[method] if u]
        others = [t / p for t, u in steps[method] if not u]
        if others:
            other.append(statistics.median(others))
    ratio = amortised_ratio(upd, other, freq)
    return ratio * statistics.median(plain), ratio, statistics.median(plain)


def time_setup(terms, freqs, rounds, block, methods):
    """{(method, update_freq): (seconds per step, ratio to its paired plain step)}, and the plain step.
    Methods in ``EVERY_STEP`` are timed at update_freq 1 only, the others at every frequency of ``freqs``."""
    out, plains = {}, []
    keys = [(m, f) for m in methods for f in ([1] if m in EVERY_STEP else freqs)]
    for m, f in keys:
        t, ratio, plain = time_pair(m, f, terms, rounds, block)
        out[(m, f)] = (t, ratio)
        plains.append(plain)
    return out, statistics.median(plains)


def peak_memory(method, freq, terms, steps):
    """Peak memory a step needs beyond what is allocated before it (MB): the allocator's own counters
    (host allocator on the CPU, device allocator on a GPU), over `steps` steps of a fresh runner."""
    from paddle.base import core

    gpu = paddle.device.get_device().startswith("gpu")
    current = core.device_memory_stat_current_value if gpu else core.host_memory_stat_current_value
    peak = core.device_memory_stat_peak_value if gpu else core.host_memory_stat_peak_value
    reset = core.device_memory_stat_reset_peak_value if gpu else core.host_memory_stat_reset_peak_value
    r = Runner(method, freq, terms)
    r.run(1)  # optimizer state and balancer buffers exist from here on
    before = current("Allocated", 0)
    reset("Allocated", 0)
    r.run(steps)
    return (peak("Allocated", 0) - before) / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--terms", type=int, nargs="+", default=[2, 5])
    p.add_argument("--freqs", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--block", type=int, default=10, help="steps per runner and round")
    p.add_argument("--threads", default="1")
    p.add_argument("--no-ppsci", action="store_true", help="skip PaddleScience's aggregators")
    p.add_argument("--memory", action="store_true", help="also measure the peak memory of a step")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--surgery", action="store_true",
                   help="also time PCGrad / ConFIG (and ppsci's PCGrad) at update_freq 1")
    p.add_argument("--methods", nargs="+", choices=METHODS, metavar="NAME",
                   help=f"time exactly these methods (instead of the default list and --surgery): {', '.join(METHODS)}")
    add_device_argument(p)
    args = p.parse_args(argv)
    use_device(args.device)
    with_ppsci = False
    if not args.no_ppsci:
        try:
            import ppsci.loss.mtl  # noqa: F401

            with_ppsci = True
        except ImportError:
            print("ppsci not installed: PaddleScience's aggregators are not measured")
    if args.methods:
        methods = [m for m in dict.fromkeys(args.methods) if with_ppsci or not m.startswith("ppsci_")]
    else:
        methods = methods_available(with_ppsci, args.surgery)
    device = paddle.device.get_device()
    print(f"device {device}, paddle {paddle.__version__}, threads {os.environ['OMP_NUM_THREADS']}, "
          f"rounds {args.rounds} x {args.block} steps per method and its paired plain runner, medians")
    results = []
    for terms in args.terms:
        med, plain = time_setup(terms, args.freqs, args.rounds, args.block, methods)
        print(f"\n{terms} terms: plain step {plain * 1e3:.2f} ms (median over the pairs)")
        print(f"  {'method':<16}{'update_freq':>12}{'ms/step':>10}{'x plain':>9}{'ppsci/ours':>12}"
              + (f"{'peak MB':>9}{'x plain':>9}" if args.memory else ""))
        mem_plain = peak_memory("plain", 1, terms, 10) if args.memory else None
        for (m, f), (t, ratio) in med.items():
            ppsci_ratio = ""
            theirs = {"lra": ("ppsci_gradnorm", "ppsci_ntk"), "gradnorm": ("ppsci_gradnorm", "ppsci_ntk"),
                      "ntk_grad_norm": ("ppsci_gradnorm", "ppsci_ntk"), "grad_norm_ratio": ("ppsci_gradnorm",),
                      "relobralo": ("ppsci_relobralo",), "pcgrad": ("ppsci_pcgrad",)}.get(m, ())
            timed = [med[(pm, f)][1] for pm in theirs if (pm, f) in med]
            if timed:
                ppsci_ratio = f"{min(timed) / ratio:.2f}"
            row = dict(terms=terms, method=m, update_freq=f, ms=t * 1e3, ratio=ratio)
            line = f"  {m:<16}{f:>12}{t * 1e3:>10.2f}{ratio:>9.3f}{ppsci_ratio:>12}"
            if args.memory:
                mem = peak_memory(m, f, terms, 10)
                row["peak_mb"] = mem
                line += f"{mem:>9.2f}{mem / max(mem_plain, 1e-9):>9.2f}"
            results.append(row)
            print(line)
    if args.memory:
        print("\npeak MB: the most memory a step allocates beyond what is allocated before it (allocator counters)")
    print("x plain: amortised step time over that of a plain step timed beside it, (update + (freq - 1) x other) / "
          "freq, each the median of its ratios to the plain step of its round (CPU time of the process on a CPU; "
          "wall time with a synchronisation per step on a GPU)")
    print("ppsci/ours: x plain of PaddleScience's counterpart at the same update_freq over ours (the faster of "
          "its GradNorm / NTK for lra, gradnorm, ntk_grad_norm; GradNorm for grad_norm_ratio; Relobralo; PCGrad)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, results=results), f, indent=1)


if __name__ == "__main__":
    main()
