"""Data-parallel training (two CPU processes, gloo): every rank ends with the same weights, equal to one
process trained on the union of the ranks' points."""

import json
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test spawns two processes

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ["sum", "lra_siam", "lra_code", "lra_norm", "gradnorm", "lra_clear_before", "ntk_trace",
         "ntk_mean", "ntk_grad_norm"]
STEPS = 5
N_RES, N_BC = 16, 8  # points per rank and term


def points(step, rank, world):
    """Rank `rank`'s share of the step's points (world == 1: all of them)."""
    rng = np.random.default_rng(100 + step)
    xr = rng.uniform(-1, 1, (2 * N_RES, 2)).astype("float32")
    xb = rng.uniform(-1, 1, (2 * N_BC, 2)).astype("float32")
    if world == 1:
        return xr, xb
    return xr[rank * N_RES:(rank + 1) * N_RES], xb[rank * N_BC:(rank + 1) * N_BC]


def train(kind, rank, world):
    import paddle
    from reference import make_net

    from paddle_pinn_balance import GradNorm, LRAnnealing, NTKWeighting, Sum

    net = make_net((2, 6, 6, 1), seed=3)
    model = paddle.DataParallel(net) if world > 1 else net
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
    elif kind == "lra_clear_before":
        bal = LRAnnealing(net, ref="res", update_freq=1)
    elif kind == "ntk_trace":
        bal = NTKWeighting(net, kernels={"res": kernel("res"), "bc": kernel("bc")}, update_freq=2)
    elif kind == "ntk_mean":
        bal = NTKWeighting(net, kernels={"res": kernel("res"), "bc": kernel("bc")}, update_freq=1,
                           reduction="mean", momentum=0.5)
    else:
        bal = NTKWeighting(net, mode="grad_norm", update_freq=1)
    opt = paddle.optimizer.SGD(0.05, parameters=model.parameters())
    history = []
    for step in range(STEPS):
        xr, xb = points(step, rank, world)
        kernel_pts["res"], kernel_pts["bc"] = xr, xb
        losses = {"res": (model(paddle.to_tensor(xr)) ** 2).mean(),
                  "bc": ((model(paddle.to_tensor(xb)) - 2.0) ** 2).mean()}
        total = bal(losses, step)
        if kind == "lra_clear_before":  # clear right before backward, stale gradients present
            opt.clear_grad()
        total.backward()
        opt.step()
        if kind != "lra_clear_before":
            opt.clear_grad()
        history.append(bal.weights)
    return {"weights": history, "params": [p.numpy().ravel().tolist() for p in net.parameters()]}


def worker(out_dir):
    import paddle.distributed as dist

    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {kind: train(kind, rank, world) for kind in KINDS}
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
    if kind != "sum":  # the weights did move: the comparison is not of constants
        assert any(abs(w["bc"] - 1.0) > 1e-3 for w in r0["weights"])
