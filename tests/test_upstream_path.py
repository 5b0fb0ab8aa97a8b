"""A PaddleScience user's whole path, on PaddleScience-style scripts (``tests/upstream_like/``, Hydra
callbacks, two Solvers, ``mode=eval`` / ``export`` on a saved checkpoint): compare balancers through the
runner (seeded as ``python SCRIPT``), evaluate a balanced checkpoint in the script's own code, make the hand
edit of ``docs/paddlescience.md``, continue into the L-BFGS stage, NTK on a ``stan`` network.

``python SCRIPT`` is run in this process as the interpreter runs it (``runpy`` as ``__main__`` with its
``sys.argv``), parameter names reset as in a fresh process (``unique_name.guard``)."""

import contextlib
import os
import re
import runpy
import sys
import warnings

import numpy as np
import paddle
import pytest
from reference import DTYPE

ppsci = pytest.importorskip("ppsci")
pytest.importorskip("hydra")
pytest.importorskip("pydantic")  # ppsci's InitCallback

from test_upstream import upstream  # noqa: E402

from paddle_pinn_balance import GradNormBalancer  # noqa: E402
from paddle_pinn_balance.ppsci import SolverSum  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_like")
BEAM, DARCY, POISSON = (os.path.join(HERE, f"{n}.py") for n in ("beam_like", "darcy_like", "poisson_like"))
BEAM_EDITED, DARCY_EDITED = (os.path.join(HERE, f"{n}_edited.py") for n in ("beam_like", "darcy_like"))
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")]


@contextlib.contextmanager
def fresh(monkeypatch):
    """What a new process has: parameter names from linear_0, a global RNG state we do not control (the
    scripts seed themselves or through their Hydra callback), Hydra errors raised (not sys.exit)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    paddle.seed(np.random.randint(1 << 30))  # a run that did not seed would differ
    with paddle.utils.unique_name.guard():
        yield


def python(script, out, *overrides, monkeypatch):
    """``python script hydra.run.dir=out output_dir=out *overrides``."""
    from hydra.core.global_hydra import GlobalHydra

    argv = sys.argv
    sys.argv = [script, f"hydra.run.dir={out}", f"output_dir={out}", *overrides]
    try:
        with fresh(monkeypatch):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def runner(script, block, out, *overrides, monkeypatch):
    """``python examples/ppsci/upstream.py script --balancer block --out out *overrides``."""
    run = upstream()
    with fresh(monkeypatch):
        return run.run(script, run.balancer_block(block), overrides, out=str(out))


_STAMP = re.compile(r"\x1b\[[0-9;]*m|^\[[0-9/: ]+\] |, (batch_cost|reader_cost|ips|eta): [^,]*")


def log_lines(path, out, drop=("weight/", "gradnorm_loss")):
    """The log's lines without time stamps, colours, timings and the output folder."""
    lines = []
    for line in open(path).read().splitlines():
        line = _STAMP.sub("", _STAMP.sub("", line)).replace(str(out), "OUT")
        line = ", ".join(f for f in line.split(", ") if not f.startswith(drop))
        lines.append(line)
    return lines


def metrics(path):
    """``{metric: value}`` of the log's last ``[Eval][Avg]`` line."""
    avg = [line for line in open(path).read().splitlines() if "[Eval][Avg]" in line][-1]
    return {k: float(v) for k, v in re.findall(r"([\w/.]+): ([-0-9.e+]+)", avg.split("[Eval][Avg]")[1])}


def train_losses(path):
    return [float(v) for v in re.findall(r"\[Train\].*? loss: ([-0-9.e+]+)", open(path).read())]


def checkpoints(folder):
    """``{file: {key: array}}`` of every checkpoint file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            if f.endswith((".pdparams", ".pdopt", ".pdstates", ".pdagg")):
                state = paddle.load(os.path.join(root, f))
                rel = os.path.relpath(os.path.join(root, f), folder)
                out[rel] = {k: (v.numpy() if isinstance(v, paddle.Tensor) else np.asarray(v))
                            for k, v in state.items() if not isinstance(v, dict)}
    return out


def assert_same_checkpoints(a, b):
    assert sorted(a) == sorted(b)
    for f in a:
        assert sorted(a[f]) == sorted(b[f]), f
        for k in a[f]:
            np.testing.assert_array_equal(a[f][k], b[f][k], err_msg=f"{f}: {k}")


# --------------------------------------------------------------------------- 1. the runner is `python SCRIPT`


@pytest.mark.parametrize("script, logs", [(BEAM, ["train.log"]), (DARCY, ["train.log", "lbfgs/train.log"]),
                                          (POISSON, ["train.log"])])
def test_runner_with_sum_is_python_script_bit_for_bit(script, logs, tmp_path, monkeypatch):
    """Seed (beam_like is seeded by its Hydra InitCallback only), logs, checkpoints and metrics of
    ``upstream.py SCRIPT --balancer "{name: sum}"`` are those of ``python SCRIPT``."""
    python(script, tmp_path / "plain", monkeypatch=monkeypatch)
    built = runner(script, "{name: sum}", tmp_path / "sum", monkeypatch=monkeypatch)
    assert built and all(isinstance(b, SolverSum) for _, b in built)
    plain, ours = checkpoints(tmp_path / "plain"), checkpoints(tmp_path / "sum")
    assert {f for f in ours if not f.endswith(".pdagg")} == set(plain)  # ours adds the balancer's state
    assert_same_checkpoints(plain, {f: v for f, v in ours.items() if f in plain})
    for log in logs:
        a, b = log_lines(tmp_path / "plain" / log, tmp_path / "plain"), log_lines(tmp_path / "sum" / log,
                                                                                   tmp_path / "sum")
        assert a == b and any("[Train]" in line for line in a)


def test_runner_comparisons_are_seeded(tmp_path, monkeypatch):
    """Two balancers start from the same network: the first step's raw losses are the same (the weighted
    total is not: the balancers update their weights before the first total)."""
    first = {}
    for name in ("sum", "lr_annealing", "relobralo"):
        block = "{name: lr_annealing, ref: biharmonic}" if name == "lr_annealing" else f"{{name: {name}}}"
        runner(BEAM, block, tmp_path / name, "log_freq=1", monkeypatch=monkeypatch)
        first[name] = log_lines(tmp_path / name / "train.log", tmp_path / name, drop=("weight/", "loss:"))
        first[name] = [line for line in first[name] if "[Train]" in line][0]
    assert first["sum"] == first["lr_annealing"] == first["relobralo"] and "EQ: " in first["sum"]


# --------------------------------------------------------------------------- 2. a balanced checkpoint evaluates


@pytest.mark.parametrize("name", ["grad_norm", "uncertainty", "lr_annealing"])
def test_balanced_checkpoint_evaluates_exports_and_fine_tunes_in_the_scripts_own_code(name, tmp_path, monkeypatch):
    block = {"grad_norm": "{name: grad_norm}", "uncertainty": "{name: uncertainty}",
             "lr_annealing": "{name: lr_annealing, ref: biharmonic}"}[name]
    runner(BEAM, block, tmp_path / "train", "TRAIN.epochs=20", monkeypatch=monkeypatch)
    trained = metrics(tmp_path / "train" / "train.log")
    ckpt = tmp_path / "train" / "checkpoints" / "latest"
    # the network's parameters under the network's own names, as a plain run's (the balancer's in .pdagg)
    keys = set(paddle.load(f"{ckpt}.pdparams"))
    assert keys == set(ppsci.arch.MLP(("x",), ("u",), 2, 16).state_dict())
    assert "loss_weights" in paddle.load(f"{ckpt}.pdagg") or name != "grad_norm"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Skip loading")  # Paddle's only sign of a key it did not find
        python(BEAM, tmp_path / "eval", "mode=eval", f"EVAL.pretrained_model_path={ckpt}", monkeypatch=monkeypatch)
        assert metrics(tmp_path / "eval" / "eval.log") == trained
        # fine-tune from it (learning rate 0: the parameters stay, so the metric is the checkpoint's)
        python(BEAM, tmp_path / "tune", "TRAIN.epochs=1", "TRAIN.learning_rate=0.0",
               f"TRAIN.pretrained_model_path={ckpt}", monkeypatch=monkeypatch)
        assert metrics(tmp_path / "tune" / "train.log") == trained
        if DTYPE == "float32":  # the script's InputSpec is float32
            python(BEAM, tmp_path / "export", "mode=export", f"INFER.pretrained_model_path={ckpt}",
                   f"INFER.export_path={tmp_path / 'export' / 'beam'}", monkeypatch=monkeypatch)
            exported = paddle.jit.load(str(tmp_path / "export" / "beam"))
            net = ppsci.arch.MLP(("x",), ("u",), 2, 16)
            net.set_state_dict(paddle.load(f"{ckpt}.pdparams"))
            x = paddle.linspace(0, 1, 7, dtype="float32").reshape([7, 1])
            got = exported(x)
            got = got["u"] if isinstance(got, dict) else got[0] if isinstance(got, (list, tuple)) else got
            np.testing.assert_allclose(got.numpy(), net({"x": x})["u"].numpy(), rtol=1e-6)


def test_resume_of_a_balanced_run_in_the_script(tmp_path, monkeypatch):
    """``TRAIN.checkpoint_path`` through the runner: the balancer's state reloads with the network's."""
    runner(BEAM, "{name: grad_norm}", tmp_path / "whole", "TRAIN.epochs=10", monkeypatch=monkeypatch)
    runner(BEAM, "{name: grad_norm}", tmp_path / "half", "TRAIN.epochs=10", monkeypatch=monkeypatch)
    (built,) = runner(BEAM, "{name: grad_norm}", tmp_path / "half", "TRAIN.epochs=10",
                      f"TRAIN.checkpoint_path={tmp_path / 'half' / 'checkpoints' / 'epoch_5'}", monkeypatch=monkeypatch)
    a, b = checkpoints(tmp_path / "whole" / "checkpoints"), checkpoints(tmp_path / "half" / "checkpoints")
    assert_same_checkpoints({"latest.pdparams": a["latest.pdparams"], "latest.pdagg": a["latest.pdagg"]},
                            {"latest.pdparams": b["latest.pdparams"], "latest.pdagg": b["latest.pdagg"]})


# --------------------------------------------------------------------------- 3. the hand edit


@pytest.mark.parametrize("overrides", [["+TRAIN.balancer={name: lr_annealing, ref: biharmonic}"],
                                       ["+TRAIN.balancer.name=lr_annealing", "+TRAIN.balancer.ref=biharmonic"]])
def test_hand_edit_with_command_line_block(overrides, tmp_path, monkeypatch):
    python(BEAM_EDITED, tmp_path, *overrides, monkeypatch=monkeypatch)
    log = open(tmp_path / "train.log").read()
    assert "weight/u__x__x: " in log and "weight/biharmonic: 1.00000" in log  # on by the edit's attach line
    assert np.isfinite(metrics(tmp_path / "train.log")["L2Rel_Metric/L2Rel.u"])


def test_hand_edit_without_plus_names_hydras_error(tmp_path, monkeypatch):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="balancer"):  # not in struct: the `+` is needed
        python(BEAM_EDITED, tmp_path, "TRAIN.balancer.name=lr_annealing", monkeypatch=monkeypatch)


def test_hand_edit_without_a_balancer_is_the_unedited_script(tmp_path, monkeypatch):
    python(BEAM, tmp_path / "plain", monkeypatch=monkeypatch)
    python(BEAM_EDITED, tmp_path / "edited", monkeypatch=monkeypatch)
    plain, edited = checkpoints(tmp_path / "plain"), checkpoints(tmp_path / "edited")
    assert_same_checkpoints(plain, {f: v for f, v in edited.items() if f in plain})
    assert metrics(tmp_path / "plain" / "train.log") == metrics(tmp_path / "edited" / "train.log")


def test_hand_edit_two_solvers_yaml_block(tmp_path, monkeypatch):
    """``conf/darcy_like_edited.yaml`` holds the block; the second Solver takes the same balancer: its log
    starts from the Adam stage's weight, not from 1."""
    python(DARCY_EDITED, tmp_path, monkeypatch=monkeypatch)
    adam = re.findall(r"weight/p: ([0-9.]+)", open(tmp_path / "train.log").read())
    lbfgs = re.findall(r"weight/p: ([0-9.]+)", open(tmp_path / "lbfgs" / "train.log").read())
    assert adam and lbfgs and float(adam[-1]) > 5
    assert abs(float(lbfgs[0]) - float(adam[-1])) < 0.5 * float(adam[-1])  # carried on (a restart: 1 then up)
    # switching the method from the command line: delete the YAML block, add another
    python(DARCY_EDITED, tmp_path / "gn", "~TRAIN.balancer", "+TRAIN.balancer={name: grad_norm}",
           monkeypatch=monkeypatch)
    assert "gradnorm_loss" in open(tmp_path / "gn" / "lbfgs" / "train.log").read()


# --------------------------------------------------------------------------- 4. the L-BFGS stage carries on


class Recorder:
    """Per call: (step, weights before the call, buffers before the call)."""

    def __init__(self, balancer):
        self.calls = []
        balancer.register_forward_pre_hook(self.hook)

    def hook(self, layer, inputs):
        buffers = {k: v.numpy().copy() for k, v in layer.named_buffers()}
        self.calls.append((int(inputs[1]), layer._weight_vector().numpy().copy(), buffers))


@pytest.mark.parametrize("block", ["{name: lr_annealing, ref: poisson, update_freq: 1}", "{name: grad_norm}",
                                   "{name: softadapt, beta: 0.01}", "{name: ntk, update_freq: 2}"])
def test_runner_carries_the_balancer_into_the_lbfgs_stage(block, tmp_path, monkeypatch):
    recorders = []
    run = upstream()
    original = run.balanced_solvers

    @contextlib.contextmanager
    def recording(blk, built):  # a Recorder on each balancer as it is built
        with original(blk, built) as b:
            solver_cls = ppsci.solver.Solver
            init = solver_cls.__init__

            def __init__(self, *a, **k):
                init(self, *a, **k)
                if not recorders or recorders[-1][0] is not self.loss_aggregator:
                    recorders.append((self.loss_aggregator, Recorder(self.loss_aggregator)))

            solver_cls.__init__ = __init__
            try:
                yield b
            finally:
                solver_cls.__init__ = init

    monkeypatch.setattr(run, "balanced_solvers", recording)
    with fresh(monkeypatch):
        (adam, bal), (lbfgs, bal2) = run.run(DARCY, run.balancer_block(block), out=str(tmp_path))
    assert bal2 is bal and len(recorders) == 1 and isinstance(lbfgs.optimizer, paddle.optimizer.LBFGS)
    calls = recorders[0][1].calls
    steps = [s for s, _, _ in calls]
    k = steps.index(0, 1)  # the first call of the L-BFGS stage (its global step restarts at 0)
    assert steps[:k] == list(range(6)) and set(steps[k:]) == {0, 1, 2}
    updates = 6 + 3 if "ntk" not in block else 3 + 2
    assert int(bal.num_updates.numpy()[0]) == updates  # L-BFGS step 0 is an update (restart_steps)
    # the state at the start of the L-BFGS stage is the Adam stage's (nothing reset)
    _, w_start, buffers_start = calls[k]
    assert not np.allclose(w_start, 1.0)
    held = {id(p) for p in lbfgs.optimizer._parameter_list}
    if isinstance(bal, GradNormBalancer):  # not in L-BFGS; an Adam of their own moves them during the stage
        assert id(bal.loss_weights) not in held and id(bal.loss_weights) in {id(p) for p in
                                                                              adam.optimizer._parameter_list}
        assert not np.array_equal(calls[-1][1], w_start)
        np.testing.assert_array_equal(buffers_start["initial_losses"], calls[k - 1][2]["initial_losses"])
    if "ntk" in block:
        assert bal.last_path == "expanded"  # the stan network takes the fast path (warnings are errors here)


def test_ntk_on_a_stan_network_takes_the_fast_path(tmp_path, monkeypatch):
    """darcy2d's ``stan`` activation: exact fast path (no per-point loop, no warning), traces in the log."""
    built = runner(DARCY, "{name: ntk, update_freq: 1}", tmp_path, "TRAIN.lbfgs.epochs=1", monkeypatch=monkeypatch)
    bal = built[0][1]
    assert bal.last_path == "expanded" and all(np.isfinite(v) for v in bal.traces().values())
    assert "ntk_trace/p" in open(tmp_path / "train.log").read()
