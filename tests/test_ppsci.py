"""Balancers inside the real ``ppsci.solver.Solver`` (PaddleScience): training, checkpoints, config, kernels, logs."""

import logging

import numpy as np
import paddle
import pytest
from reference import DTYPE

ppsci = pytest.importorskip("ppsci")

from ppsci.autodiff import hessian  # noqa: E402

from paddle_pinn_balance import GradNorm, LRAnnealing, NTKWeighting, Sum, build_balancer  # noqa: E402
from paddle_pinn_balance import ppsci as adapter  # noqa: E402
from paddle_pinn_balance.per_point import per_point_sq_grad_norms  # noqa: E402

K = 1.0
N_INT, N_BC = 48, 24


def source(d):
    x, y = d["x"], d["y"]
    return (-(np.pi**2) - (2 * np.pi) ** 2 + K**2) * np.sin(np.pi * x) * np.sin(2 * np.pi * y)


def helmholtz_expr(out):
    return hessian(out["u"], out["x"]) + hessian(out["u"], out["y"]) + K**2 * out["u"]


def full_batch(n):
    return {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": n}


def make_constraints(split_bc=False, bc_key="u"):
    """Helmholtz 2D on [-1, 1]^2: interior residual "helmholtz" and Dirichlet u = 0 on the boundary."""
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    cons = {"EQ": ppsci.constraint.InteriorConstraint(
        {"helmholtz": helmholtz_expr}, {"helmholtz": source}, rect, full_batch(N_INT), mse, name="EQ")}
    if split_bc:  # the per-constraint recipe: one key per constraint
        for name, crit in (("BC_lr", lambda x, y: np.isclose(np.abs(x), 1.0)),
                           ("BC_tb", lambda x, y: ~np.isclose(np.abs(x), 1.0))):
            key = f"u_{name[3:]}"
            cons[name] = ppsci.constraint.BoundaryConstraint(
                {key: lambda out: out["u"]}, {key: 0.0}, rect, full_batch(N_BC // 2), mse, criteria=crit, name=name)
    else:
        cons["BC"] = ppsci.constraint.BoundaryConstraint(
            {bc_key: lambda out: out["u"]}, {bc_key: 0.0}, rect, full_batch(N_BC), mse, name="BC")
    return cons


CONFIGS = {
    "sum": {"name": "sum", "weights": {"u": 10.0}},
    "lr_annealing": {"name": "lr_annealing", "ref": "helmholtz", "update_freq": 5},
    "grad_norm": {"name": "grad_norm", "alpha": 0.5},
    "ntk": {"name": "ntk", "update_freq": 20},
}


def make_solver(cfg, out_dir, epochs, iters=50, checkpoint_path=None, constraints=None, log_freq=50, seed=0,
                use_amp=False):
    ppsci.utils.misc.set_random_seed(seed)
    # parameter names restart at linear_0 (as in a fresh process), so that the optimizer state reloads
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 12, "tanh")
        cons = make_constraints() if constraints is None else constraints
        net, agg = adapter.build_for_solver(cfg, model, cons)
        opt = ppsci.optimizer.Adam(1e-3)(adapter.optimizer_layers(net, agg))
        solver = ppsci.solver.Solver(net, cons, str(out_dir), opt, epochs=epochs, iters_per_epoch=iters,
                                     log_freq=log_freq, loss_aggregator=agg, checkpoint_path=checkpoint_path,
                                     use_amp=use_amp)
    return solver, agg, model


def train(solver):
    with paddle.utils.unique_name.guard():  # optimizer accumulator names as in a fresh process
        solver.train()


def raw_losses(solver):
    """The unweighted losses of the solver's terms on its (full-batch) constraint data."""
    inputs, labels, weights = [], [], []
    for c in solver.constraint.values():
        i, lab, w = next(iter(c.data_loader))
        for v in i.values():
            v.stop_gradient = False
        inputs.append(i)
        labels.append(lab)
        weights.append(w)
    losses, _ = solver.forward_helper.train_forward(
        tuple(c.output_expr for c in solver.constraint.values()), inputs, solver.model, solver.constraint,
        labels, weights)
    return {k: float(v) for k, v in losses.items()}


# --------------------------------------------------------------------------- training with each balancer


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_balancer_trains_in_the_solver(name, tmp_path):
    solver, agg, model = make_solver(CONFIGS[name], tmp_path, epochs=3, iters=100)
    before = raw_losses(solver)
    train(solver)
    after = raw_losses(solver)
    assert set(before) == {"helmholtz", "u"} == set(agg.loss_names)
    assert sum(after.values()) < sum(before.values())
    w = agg.weights
    assert all(np.isfinite(v) and v > 0 for v in w.values())
    if name == "sum":
        assert isinstance(agg, Sum) and w == {"helmholtz": 1.0, "u": 10.0}
    elif name == "lr_annealing":
        assert isinstance(agg, LRAnnealing) and w["helmholtz"] == 1.0 and w["u"] != 1.0
        assert int(agg.num_updates.numpy()[0]) == 300 // 5
    elif name == "grad_norm":
        assert solver.model is model and not isinstance(solver.model, GradNorm)  # the bare net (.pdparams)
        assert np.isclose(sum(w.values()), 2.0, atol=1e-5) and w["u"] != 1.0
        # the loss weights are trained by the solver's optimizer
        assert any(p is agg.loss_weights for p in solver.optimizer._parameter_list)
    else:
        assert isinstance(agg, NTKWeighting) and agg.last_path == "expanded"
        tr = agg.traces()
        expected = {k: sum(tr.values()) / tr[k] for k in tr}  # lambda_i = sum_j Tr(K_jj) / Tr(K_ii), last update
        np.testing.assert_allclose([w[k] for k in tr], [expected[k] for k in tr], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:(AmpScaler|amp_guard) can only be enabled:UserWarning")
@pytest.mark.filterwarnings("ignore:The input state dict is empty:UserWarning")
@pytest.mark.parametrize("name", ["lr_annealing", "grad_norm", "ntk"])
def test_solver_amp_path_runs(name, tmp_path):
    # GradScaler + amp.decorate (on CPU autocast itself does not lower precision; no GPU here)
    solver, agg, _ = make_solver(CONFIGS[name], tmp_path, epochs=1, iters=20, use_amp=True)
    train(solver)
    assert solver.scaler is not None
    assert all(np.isfinite(v) and v > 0 for v in agg.weights.values()) and agg.weights["u"] != 1.0


def test_eval_and_visualize_paths_with_gradnorm(tmp_path):
    solver, agg, model = make_solver(CONFIGS["grad_norm"], tmp_path, epochs=1, iters=5)
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    solver.validator = {"val": ppsci.validate.GeometryValidator(
        {"u": lambda out: out["u"]}, {"u": lambda d: np.sin(np.pi * d["x"]) * np.sin(2 * np.pi * d["y"])}, rect,
        {"dataset": "NamedArrayDataset", "total_size": 32, "batch_size": 32}, ppsci.loss.MSELoss("mean"),
        evenly=True, metric={"MSE": ppsci.metric.MSE()}, name="val")}
    train(solver)
    metric, groups = solver.eval()
    assert np.isfinite(metric) and "MSE" in groups
    if DTYPE == "float32":  # ppsci's VTU writer: float32 coordinates, z = 0 in the default dtype (pyevtk: one)
        grid = {"x": np.linspace(-1, 1, 8, dtype=DTYPE)[:, None], "y": np.zeros([8, 1], DTYPE)}
        solver.visualizer = {"vis": ppsci.visualize.VisualizerVtu(grid, {"u": lambda o: o["u"]}, prefix="result_u")}
        solver.visualize()
        assert list((tmp_path / "visual").rglob("result_u*"))
    out = solver.predict({"x": np.zeros([4, 1], DTYPE), "y": np.zeros([4, 1], DTYPE)})
    assert list(out["u"].shape) == [4, 1]
    ref = model({"x": paddle.zeros([4, 1]), "y": paddle.zeros([4, 1])})["u"]
    np.testing.assert_allclose(out["u"].numpy(), ref.numpy(), rtol=1e-6)


# --------------------------------------------------------------------------- checkpoint and resume


@pytest.mark.parametrize("name", ["lr_annealing", "grad_norm", "ntk"])
def test_resume_from_solver_checkpoint_is_identical(name, tmp_path):
    cfg = dict(CONFIGS[name], update_freq=3) if name != "grad_norm" else CONFIGS[name]
    full, agg_full, _ = make_solver(cfg, tmp_path / "full", epochs=4, iters=10)
    train(full)
    half, _, _ = make_solver(cfg, tmp_path / "half", epochs=2, iters=10)
    train(half)
    ckpt = tmp_path / "half" / "checkpoints" / "latest"
    assert (tmp_path / "half" / "checkpoints" / "latest.pdagg").exists()
    resumed, agg_res, _ = make_solver(cfg, tmp_path / "resumed", epochs=4, iters=10, checkpoint_path=str(ckpt))
    assert agg_res.loss_names == agg_full.loss_names
    train(resumed)
    assert resumed.global_step == full.global_step == 40
    a, b = agg_full.state_dict(), agg_res.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    np.testing.assert_allclose(list(agg_full.weights.values()), list(agg_res.weights.values()), rtol=1e-6)
    for (k, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)


@pytest.mark.parametrize("name", ["sum", "lr_annealing", "grad_norm", "ntk"])
def test_resume_with_other_loss_names_fails_clearly(name, tmp_path):
    first, _, _ = make_solver(CONFIGS[name] if name != "sum" else {"name": "sum"}, tmp_path / "a", epochs=1, iters=3)
    train(first)
    ckpt = str(tmp_path / "a" / "checkpoints" / "latest")
    renamed = make_constraints(bc_key="u_bc")
    cfg = dict(CONFIGS[name], ref="helmholtz") if name == "lr_annealing" else CONFIGS[name]
    cfg = {"name": "sum"} if name == "sum" else cfg
    with pytest.raises(ValueError, match=r"loss names|n_loss|other|saved for"):
        make_solver(cfg, tmp_path / "b", epochs=2, iters=3, checkpoint_path=ckpt, constraints=renamed)


def test_resume_without_known_names_fails_at_the_first_step(tmp_path):
    first, _, _ = make_solver(CONFIGS["lr_annealing"], tmp_path / "a", epochs=1, iters=3)
    train(first)
    ppsci.utils.misc.set_random_seed(0)
    ckpt = str(tmp_path / "a" / "checkpoints" / "latest")
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 12, "tanh")
        agg = LRAnnealing(model, ref="helmholtz")  # names taken from the checkpoint, not from the constraints
        solver = ppsci.solver.Solver(model, make_constraints(bc_key="u_bc"), str(tmp_path / "b"),
                                     ppsci.optimizer.Adam(1e-3)(model), epochs=2, iters_per_epoch=3,
                                     loss_aggregator=agg, checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="loss names changed"):
        train(solver)


def test_resume_from_another_method_is_refused(tmp_path):
    first, _, _ = make_solver({"name": "sum"}, tmp_path / "a", epochs=1, iters=3)
    train(first)
    ckpt = str(tmp_path / "a" / "checkpoints" / "latest")
    with pytest.raises(ValueError, match="state of a Sum, not of a LRAnnealing"):
        make_solver(CONFIGS["lr_annealing"], tmp_path / "b", epochs=2, iters=3, checkpoint_path=ckpt)


# --------------------------------------------------------------------------- configuration


YAML = """
TRAIN:
  epochs: 1
  iters_per_epoch: 5
  balancer:
    name: lr_annealing
    ref: helmholtz
    variant: arxiv
    update_freq: ${TRAIN.iters_per_epoch}
    max_weight: 1000.0
"""


def test_train_balancer_block_from_hydra_yaml(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    path = tmp_path / "conf.yaml"
    path.write_text(YAML)
    cfg = omegaconf.OmegaConf.load(path)
    model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 12, "tanh")
    cons = make_constraints()
    net, agg = adapter.build_for_solver(cfg, model, cons)  # the whole config: TRAIN.balancer is found
    assert net is model and isinstance(agg, LRAnnealing)
    assert (agg.variant, agg.update_freq, agg.max_weight, agg.loss_names) == ("arxiv", 5, 1000.0, ("helmholtz", "u"))
    _, agg2 = adapter.build_for_solver(cfg.TRAIN.balancer, model, cons)  # the block as a DictConfig
    assert agg2.update_freq == 5
    # the core builder reads the converted block
    agg3 = build_balancer(adapter.balancer_config(cfg), model)
    assert agg3.ref == ("helmholtz",)
    cfg.TRAIN.balancer = {"name": "ntk", "update_freq": 10, "reduction": "mean", "max_points": 16}
    net, ntk = adapter.build_for_solver(cfg, model, cons)
    assert isinstance(ntk, NTKWeighting) and ntk.reduction == "mean" and ntk.loss_names == ("helmholtz", "u")
    cfg.TRAIN.balancer = {"name": "grad_norm", "alpha": 0.12}
    net, gn = adapter.build_for_solver(cfg, model, cons)
    assert net is model and gn.wrapper.net is model and gn.alpha == 0.12
    cfg.TRAIN.balancer = {"name": "lr_annealing", "reff": "helmholtz"}
    with pytest.raises(ValueError, match="unknown key"):
        adapter.build_for_solver(cfg, model, cons)


def test_loss_names_merge_keys_across_constraints_and_the_per_constraint_recipe():
    cons = make_constraints()
    assert adapter.loss_names(cons) == ["helmholtz", "u"]
    split = make_constraints(split_bc=True)
    assert adapter.loss_names(split) == ["helmholtz", "u_lr", "u_tb"]


# --------------------------------------------------------------------------- NTK kernels from constraints


def hand_kernel(pts):
    def kernel(m):
        x = paddle.to_tensor(pts["x"])
        y = paddle.to_tensor(pts["y"])
        x.stop_gradient = False
        y.stop_gradient = False
        u = m({"x": x, "y": y})["u"]
        u_x, u_y = paddle.grad(u.sum(), [x, y], create_graph=True)
        u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0]
        u_yy = paddle.grad(u_y.sum(), y, create_graph=True)[0]
        return u_xx + u_yy + K**2 * u
    return kernel


def dataset_input(constraint):
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in constraint.data_loader.input.items()}


def test_constraint_kernels_match_hand_written_kernels():
    ppsci.utils.misc.set_random_seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 12, "tanh")
    cons = make_constraints()
    kernels = adapter.constraint_kernels(cons, model)
    assert sorted(kernels) == ["helmholtz", "u"]
    view = adapter.ntk_model(model)
    assert view is model  # the network itself: the fast path records it (no Sequential view any more)
    eq_pts, bc_pts = dataset_input(cons["EQ"]), dataset_input(cons["BC"])
    ref_res = per_point_sq_grad_norms(model, hand_kernel(eq_pts), path="loop")
    ref_bc = per_point_sq_grad_norms(
        model, lambda m: m({"x": paddle.to_tensor(bc_pts["x"]), "y": paddle.to_tensor(bc_pts["y"])})["u"], path="loop")
    for name, ref in (("helmholtz", ref_res), ("u", ref_bc)):
        fast, ran = per_point_sq_grad_norms(view, kernels[name], return_path=True)
        slow = per_point_sq_grad_norms(model, kernels[name], path="loop")
        assert ran == "expanded"
        np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(slow.numpy(), ref.numpy(), rtol=2e-4, atol=1e-6)
    # max_points keeps the first points
    few = adapter.constraint_kernels(cons, model, max_points=5)
    np.testing.assert_allclose(per_point_sq_grad_norms(view, few["helmholtz"]).numpy(), ref_res.numpy()[:5],
                               rtol=2e-4, atol=1e-6)


def test_constraint_kernels_several_output_keys_and_merged_keys():
    ppsci.utils.misc.set_random_seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u", "v"), 2, 8, "tanh")
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    two = ppsci.constraint.BoundaryConstraint(  # one constraint, two output keys -> two terms
        {"u": lambda o: o["u"], "v": lambda o: o["v"] * o["x"]}, {"u": 0.0, "v": 0.0}, rect, full_batch(10), mse,
        name="BC")
    other = ppsci.constraint.InteriorConstraint(  # "u" again -> merged into term "u"
        {"u": lambda o: o["u"]}, {"u": 1.0}, rect, full_batch(6), mse, name="IC")
    cons = {"BC": two, "IC": other}
    assert adapter.loss_names(cons) == ["u", "v"]
    kernels = adapter.constraint_kernels(cons, model)
    pb, pi = dataset_input(two), dataset_input(other)

    def out(pts, key):
        def kernel(m):
            x, y = paddle.to_tensor(pts["x"]), paddle.to_tensor(pts["y"])
            o = m({"x": x, "y": y})
            return o["u"] if key == "u" else o["v"] * x
        return kernel
    ref_u = np.concatenate([per_point_sq_grad_norms(model, out(pb, "u"), path="loop").numpy(),
                            per_point_sq_grad_norms(model, out(pi, "u"), path="loop").numpy()])
    ref_v = per_point_sq_grad_norms(model, out(pb, "v"), path="loop").numpy()
    view = adapter.ntk_model(model)
    u, ran = per_point_sq_grad_norms(view, kernels["u"], return_path=True)
    np.testing.assert_allclose(u.numpy(), ref_u, rtol=1e-5, atol=1e-7)
    assert ran == "loop" and "merged from 2 constraints ['BC', 'IC']" in ran.reason  # the warning says why
    v, ran = per_point_sq_grad_norms(view, kernels["v"], return_path=True)
    assert ran == "expanded"
    np.testing.assert_allclose(v.numpy(), ref_v, rtol=1e-5, atol=1e-7)


def test_expression_calling_the_network_itself_is_recorded_exactly():
    """An output expression that evaluates the network again (as ``ppsci.equation.Helmholtz`` does) instead of
    reading ``out["u"]``: the recording sees the parameters' uses wherever they happen: fast and exact."""
    ppsci.utils.misc.set_random_seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 8, "tanh")
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))

    def sneaky(out):  # evaluates the network again instead of reading out["u"]
        return model.forward_tensor(paddle.concat([out["x"], out["y"]], axis=-1)) * 2.0
    cons = {"S": ppsci.constraint.InteriorConstraint(
        {"s": sneaky}, {"s": 0.0}, rect, full_batch(6), ppsci.loss.MSELoss("mean"), name="S")}
    kernel = adapter.constraint_kernels(cons, model)["s"]
    got, ran = per_point_sq_grad_norms(adapter.ntk_model(model), kernel, return_path=True)
    ref = per_point_sq_grad_norms(model, kernel, path="loop")
    assert ran == "expanded"
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-5)
    assert float(ref.sum()) > 0


# --------------------------------------------------------------------------- logging


class RecordingWriter:
    """A VisualDL-like sink (``add_scalar(tag, value, step)``)."""

    def __init__(self):
        self.records = []

    def add_scalar(self, tag, value, step):
        self.records.append((tag, float(value), int(step)))


@pytest.mark.parametrize("name", ["lr_annealing", "ntk"])
def test_weights_appear_in_the_training_log_and_writer(name, tmp_path, caplog):
    solver, agg, _ = make_solver(CONFIGS[name], tmp_path, epochs=1, iters=20, log_freq=10)
    caplog.set_level(logging.INFO)
    solver.vdl_writer = RecordingWriter()
    handle = adapter.attach_logging(solver)
    train(solver)
    lines = [r.getMessage() for r in caplog.records if "[Train]" in r.getMessage()]
    assert len(lines) == 3  # steps 1, 10 and 20
    assert all("weight/helmholtz" in ln and "weight/u" in ln for ln in lines)
    tags = {}
    for tag, value, step in solver.vdl_writer.records:
        tags.setdefault(tag, []).append((step, value))
    assert [s for s, _ in tags["train/weight/u"]] == [1, 10, 20]
    assert np.isclose(tags["train/weight/u"][-1][1], agg.weights["u"], rtol=1e-4)
    if name == "ntk":
        assert "train/ntk_trace/helmholtz" in tags
    handle.remove()


def run_example(tmp_path, *overrides) -> str:
    """``examples/ppsci/helmholtz.py`` in a fresh interpreter, a tiny run; returns its train.log."""
    pytest.importorskip("hydra")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "examples", "ppsci", "helmholtz.py"), "TRAIN.epochs=1",
           "TRAIN.iters_per_epoch=4", "TRAIN.batch_size.pde=16", "TRAIN.batch_size.bc=16", "EVAL.grid=8",
           *overrides, f"hydra.run.dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_example_script_runs(tmp_path):
    log = run_example(tmp_path, "TRAIN.balancer.name=ntk", "BALANCER_DEFAULTS.ntk.update_freq=2", "log_freq=2")
    assert "weight/helmholtz" in log and "ntk_trace/u" in log and "relative L2 error" in log
    assert (tmp_path / "checkpoints" / "latest.pdagg").exists()


@pytest.mark.slow
def test_example_script_adam_then_lbfgs(tmp_path):
    """The example's Adam-then-L-BFGS option: the L-BFGS epoch continues the global steps and the weights."""
    log = run_example(tmp_path, "TRAIN.balancer.name=lr_annealing", "TRAIN.lbfgs.epochs=1", "TRAIN.lbfgs.max_iter=3",
                      "log_freq=1")
    assert "after Adam: weights" in log and "[Epoch 2/2][Iter 4/4]" in log and "relative L2 error" in log
