"""Data-parallel training (two CPU processes, gloo): every rank ends with the same weights, equal to one
process trained on the union of the ranks' points."""

import json
import os
import sys

import numpy as np
import pytest
from reference import DTYPE

pytestmark = pytest.mark.slow  # every test spawns two processes

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ["sum", "lra_siam", "lra_code", "lra_norm", "gradnorm", "gradnorm_outside", "lra_clear_before", "ntk_trace",
         "ntk_mean", "ntk_grad_norm", "grad_norm_ratio", "relobralo", "softadapt", "uncertainty",
         "pcgrad", "conflict_free", "upgrad", "m_conflict_free", "relobralo_nan",
         "softadapt_nan", "dwa", "dwa_nan"]
#: the registry name of each kind's method (tests/test_contract.py holds it against the registry: every method is
#: here); "plain" is the surgery kinds' reference, not a kind of its own
METHOD_OF_KIND = {"sum": "sum", "lra_siam": "lr_annealing", "lra_code": "lr_annealing", "lra_norm": "lr_annealing",
                  "gradnorm": "grad_norm", "gradnorm_outside": "grad_norm", "lra_clear_before": "lr_annealing",
                  "ntk_trace": "ntk", "ntk_mean": "ntk", "ntk_grad_norm": "ntk", "grad_norm_ratio": "grad_norm_ratio",
                  "relobralo": "relobralo", "softadapt": "softadapt", "uncertainty": "uncertainty",
                  "pcgrad": "pcgrad", "conflict_free": "conflict_free", "upgrad": "upgrad",
                  "m_conflict_free": "m_conflict_free", "relobralo_nan": "relobralo", "softadapt_nan": "softadapt",
                  "dwa": "dwa", "dwa_nan": "dwa"}


def _registered_later() -> list:
    """Methods registered after this file was written, with no kind above: each runs with its defaults."""
    from paddle_pinn_balance.contract import method_names

    return sorted(set(method_names()) - set(METHOD_OF_KIND.values()))


_LATER = _registered_later()
for _name in _LATER:
    KINDS.append(_name)
    METHOD_OF_KIND[_name] = _name
#: weights stay 1: the direction changes (checked against a plain single-process run instead)
SURGERY = ("pcgrad", "conflict_free", "upgrad", "m_conflict_free")
#: loss-only kinds "*_nan": at this step rank 1's (and the single process's) boundary loss is NaN, as when one
#: rank's batch overflows; every rank skips the optimizer step (a loop's GradScaler-like guard)
NAN_STEP = 2
STEPS = 5
N_RES, N_BC = 16, 8  # points per rank and term


@pytest.fixture(autouse=True)
def _on_the_ranks_device():
    """The ranks run on the CPU (gloo, CUDA hidden) whatever the suite's device: so does the one process
    they are compared with."""
    import paddle

    previous = paddle.device.get_device()
    paddle.set_device("cpu")
    yield
    paddle.set_device(previous)


def points(step, rank, world):
    """Rank `rank`'s share of the step's points (world == 1: all of them)."""
    rng = np.random.default_rng(100 + step)
    xr = rng.uniform(-1, 1, (2 * N_RES, 2)).astype(DTYPE)
    xb = rng.uniform(-1, 1, (2 * N_BC, 2)).astype(DTYPE)
    if world == 1:
        return xr, xb
    return xr[rank * N_RES:(rank + 1) * N_RES], xb[rank * N_BC:(rank + 1) * N_BC]


def train(kind, rank, world):
    import paddle
    from reference import make_net

    from paddle_pinn_balance import (
        DWA,
        ConFIG,
        GradNorm,
        GradNormRatio,
        LRAnnealing,
        MConFIG,
        NTKWeighting,
        PCGrad,
        ReLoBRaLo,
        SoftAdapt,
        Sum,
        UncertaintyWeighting,
        UPGrad,
    )

    net = make_net((2, 6, 6, 1), seed=3)
    # (gradnorm_outside wraps the GradNorm wrapper instead: one DataParallel per parameter)
    model = paddle.DataParallel(net) if world > 1 and kind != "gradnorm_outside" else net
    kernel_pts = {}

    def kernel(name):
        return lambda m: m(paddle.to_tensor(kernel_pts[name])).reshape([-1])

    if kind == "sum":
        bal = Sum(weights={"bc": 2.0})
    elif kind == "lra_siam":
        bal = LRAnnealing(net, ref="res", update_freq=2)
    elif kind == "lra_code":
        bal = LRAnnealing(net, ref="res", preset="wang2021_code", update_freq=1)
    elif kind == "lra_norm":
        bal = LRAnnealing(net, ref="res", variant="arxiv", statistic="norm", update_freq=1)
    elif kind == "gradnorm":
        wrapper = GradNorm(model, n_loss=2, alpha=1.0)  # DataParallel inside: the weights are not DP-managed
        model, bal = wrapper, wrapper.aggregator
    elif kind == "gradnorm_outside":  # DataParallel around the wrapper: "the model you train"
        wrapper = GradNorm(net, n_loss=2, alpha=1.0)
        model, bal = (paddle.DataParallel(wrapper) if world > 1 else wrapper), wrapper.aggregator
    elif kind == "lra_clear_before":
        bal = LRAnnealing(net, ref="res", update_freq=1)
    elif kind == "ntk_trace":
        bal = NTKWeighting(net, kernels={"res": kernel("res"), "bc": kernel("bc")}, update_freq=2)
    elif kind == "ntk_mean":
        bal = NTKWeighting(net, kernels={"res": kernel("res"), "bc": kernel("bc")}, update_freq=1,
                           reduction="mean", momentum=0.5)
    elif kind == "ntk_grad_norm":
        bal = NTKWeighting(net, mode="grad_norm", update_freq=1)
    elif kind == "grad_norm_ratio":
        bal = GradNormRatio(net, update_freq=2, momentum=0.5)
    elif kind.startswith("relobralo"):
        bal = ReLoBRaLo(expected_rho=0.5, tau=0.5, seed=3)  # look-back draws of both outcomes in 5 steps
    elif kind.startswith("softadapt"):
        bal = SoftAdapt(beta=2.0)
    elif kind.startswith("dwa"):
        bal = DWA(temperature=1.0)
    elif kind == "uncertainty":
        bal = UncertaintyWeighting(loss_names=["res", "bc"])
    elif kind == "pcgrad":
        bal = PCGrad(net, seed=1)
    elif kind == "conflict_free":
        bal = ConFIG(net)
    elif kind == "upgrad":
        bal = UPGrad(net)
    elif kind == "m_conflict_free":
        bal = MConFIG(net)
    elif kind in _LATER:
        from paddle_pinn_balance import build_balancer

        bal = build_balancer({"name": kind}, net)
    else:  # "plain": the reference of the surgery kinds
        bal = Sum()
    if kind != "plain":  # the kind builds the method METHOD_OF_KIND names
        from paddle_pinn_balance.contract import REGISTRY

        built = wrapper if kind.startswith("gradnorm") else bal
        assert type(built) is REGISTRY[METHOD_OF_KIND[kind]][0].method_class, kind
    params = model.parameters()
    params += [p for p in bal.parameters() if all(p is not q for q in params)]  # each once
    opt = paddle.optimizer.SGD(0.05, parameters=params)
    history = []
    for step in range(STEPS):
        xr, xb = points(step, rank, world)
        kernel_pts["res"], kernel_pts["bc"] = xr, xb
        losses = {"res": (model(paddle.to_tensor(xr)) ** 2).mean(),
                  "bc": ((model(paddle.to_tensor(xb)) - 2.0) ** 2).mean()}
        nan_step = kind.endswith("_nan") and step == NAN_STEP
        if nan_step and (world == 1 or rank == 1):
            losses["bc"] = losses["bc"] * float("nan")
        total = bal(losses, step)
        if nan_step:  # every rank skips this step (the union's loss is NaN)
            history.append(bal.weights)
            continue
        if kind == "lra_clear_before":  # clear right before backward, stale gradients present
            opt.clear_grad()
        total.backward()
        opt.step()
        if kind != "lra_clear_before":
            opt.clear_grad()
        history.append(bal.weights)
    return {"weights": history, "params": [p.numpy().ravel().tolist() for p in net.parameters()]}


def train_self_adaptive(rank, world, balancer="sum"):
    """SA-PINN point weights in data-parallel training: the residual points are split between the ranks
    (fixed across steps, each rank owns its points' weights), the boundary points are the same on every rank
    (shared). The network is DataParallel, the SelfAdaptive layer is not. A rank's residual loss is the mean
    over its own points, so its point weights get ``world`` times the gradient that one process on the union
    gives them: their learning rate is divided by ``world`` for the same trajectory. The shared weights get
    the same gradient on every rank and need nothing."""
    import paddle
    from reference import make_net

    from paddle_pinn_balance import LRAnnealing, SelfAdaptive, Sum

    net = make_net((2, 6, 6, 1), seed=3)
    model = paddle.DataParallel(net) if world > 1 else net
    xr = paddle.to_tensor(points(0, rank, world)[0])
    xb = paddle.to_tensor(points(0, 0, 1)[1][:N_BC])  # shared: the same points on every rank
    sa = SelfAdaptive({"res": xr.shape[0], "bc": N_BC}, init=1.0)
    if balancer == "sum":
        bal = Sum()
    else:
        bal = LRAnnealing(net, ref="res", update_freq=1)
        bal.add_parameters(sa.parameters())
    opts = [paddle.optimizer.SGD(0.05, parameters=model.parameters()),
            paddle.optimizer.SGD(0.5 / world, parameters=[sa.weight("res")]),
            paddle.optimizer.SGD(0.5, parameters=[sa.weight("bc")])]
    out = {"res": [], "bc": [], "weights": []}
    for step in range(STEPS):
        losses = sa({"res": model(xr), "bc": model(xb) - 2.0})
        bal(losses, step).backward()
        for opt in opts:
            opt.step()
            opt.clear_grad()
        out["res"].append(sa.weight("res").numpy().tolist())
        out["bc"].append(sa.weight("bc").numpy().tolist())
        out["weights"].append(bal.weights)
    out["params"] = [p.numpy().ravel().tolist() for p in net.parameters()]
    return out


def worker(out_dir):
    import paddle.distributed as dist

    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {kind: train(kind, rank, world) for kind in KINDS}
    results["self_adaptive"] = train_self_adaptive(rank, world)
    results["self_adaptive_lra"] = train_self_adaptive(rank, world, "lra")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    import subprocess

    out = tmp_path_factory.mktemp("dp")
    code = (f"import sys; sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]\n"
            "import paddle.distributed as dist, test_distributed as t\n"
            f"if __name__ == '__main__': dist.spawn(t.worker, args=({str(out)!r},), nprocs=2, backend='gloo')\n")
    script = out / "run.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_selected"))}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_agree_with_each_other_and_with_one_process_on_all_points(kind, two_ranks):
    r0, r1 = two_ranks[0][kind], two_ranks[1][kind]
    assert r0["weights"] == r1["weights"]  # bit-identical on every rank, at every step
    single = train(kind, 0, 1)
    for got, want in zip(r0["weights"], single["weights"]):
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=2e-5), (kind, name)
    for a, b in zip(r0["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    if kind in SURGERY:  # weights 1 by design; the direction is not the plain sum's
        assert all(w == {"res": 1.0, "bc": 1.0} for w in r0["weights"])
        plain = train("plain", 0, 1)
        assert max(np.abs(np.subtract(a, b)).max() for a, b in zip(r0["params"], plain["params"])) > 1e-4
    elif kind != "sum":  # the weights did move: the comparison is not of constants
        assert any(abs(w["bc"] - 1.0) > 1e-3 for w in r0["weights"])
        assert len({tuple(w.values()) for w in r0["weights"]}) > 2, r0["weights"]
    if kind.endswith("_nan"):  # the NaN step was skipped alike: the weights of the step before are kept
        assert r0["weights"][NAN_STEP] == r0["weights"][NAN_STEP - 1]


def _check_self_adaptive(result, single):
    r0, r1 = result
    for step in range(STEPS):
        assert r0["bc"][step] == r1["bc"][step]  # shared points: bit-identical weights on every rank
        np.testing.assert_allclose(r0["bc"][step], single["bc"][step], rtol=2e-5)
        for rank, r in enumerate(result):  # own points: the single process's weights of those points
            np.testing.assert_allclose(r["res"][step], single["res"][step][rank * N_RES:(rank + 1) * N_RES],
                                       rtol=2e-5)
    assert r0["params"] == r1["params"]
    for a, b in zip(r0["params"], single["params"]):  # entries grow to ~2e3: float32 rounding relative to that
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6 * max(1.0, float(np.abs(b).max())))
    assert min(min(r0["res"][-1]), min(r0["bc"][-1])) > 1.0  # the ascent raised every weight


def test_self_adaptive_ranks_own_their_points_and_agree_where_they_share_them(two_ranks):
    _check_self_adaptive([r["self_adaptive"] for r in two_ranks], train_self_adaptive(0, 1))


def test_self_adaptive_with_a_gradient_reading_balancer(two_ranks):
    _check_self_adaptive([r["self_adaptive_lra"] for r in two_ranks], train_self_adaptive(0, 1, "lra"))
