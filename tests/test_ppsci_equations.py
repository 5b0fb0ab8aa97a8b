"""PaddleScience's built-in equations with several outputs: NTK trace kernels evaluate a term as the Solver
does (all of the constraint's expressions in order on one dict, sharing fused derivative results)."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

ppsci = pytest.importorskip("ppsci")

from paddle_pinn_balance.ppsci import build_for_solver  # noqa: E402


def navier_stokes_problem():
    paddle.seed(0)
    np.random.seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u", "v", "p"), 2, 8)
    ns = ppsci.equation.NavierStokes(0.01, 1.0, 2, False)
    rect = ppsci.geometry.Rectangle((0, 0), (1, 1))
    pde = ppsci.constraint.InteriorConstraint(
        ns.equations, {"continuity": 0, "momentum_x": 0, "momentum_y": 0}, rect,
        {"dataset": "IterableNamedArrayDataset", "batch_size": 12, "iters_per_epoch": 1}, ppsci.loss.MSELoss("sum"),
        name="EQ")
    bc = ppsci.constraint.BoundaryConstraint(
        {"u": lambda d: d["u"], "v": lambda d: d["v"]}, {"u": 0, "v": 0}, rect,
        {"dataset": "IterableNamedArrayDataset", "batch_size": 8, "iters_per_epoch": 1}, ppsci.loss.MSELoss("sum"),
        name="BC")
    return model, {pde.name: pde, bc.name: bc}


@pytest.mark.parametrize("fast", [True, False])
def test_navier_stokes_three_outputs_trains_with_ntk_traces(tmp_path, fast):
    model, cons = navier_stokes_problem()
    model2, bal = build_for_solver({"name": "ntk", "update_freq": 1, "fast": fast}, model, cons)
    opt = ppsci.optimizer.Adam(1e-3)(model2)
    solver = ppsci.solver.Solver(model2, cons, output_dir=str(tmp_path), optimizer=opt, epochs=1, iters_per_epoch=2,
                                 loss_aggregator=bal)
    solver.train()  # failed with KeyError 'u__x__x' when a kernel evaluated one expression alone
    assert sorted(bal.weights) == ["continuity", "momentum_x", "momentum_y", "u", "v"]
    traces = bal.traces()
    assert all(np.isfinite(v) and v > 0 for v in traces.values())
    assert int(bal.num_updates.numpy()[0]) == 2


# --------------------------------------------------------------------------- every built-in equation


from paddle_pinn_balance import NTKWeighting  # noqa: E402
from paddle_pinn_balance.config import REGISTRY, allowed_keys  # noqa: E402
from paddle_pinn_balance.ppsci import constraint_kernels, ntk_model  # noqa: E402

N_POINTS = 5


def _equation_cases():
    """``{case: (equation factory(model), input keys, output keys, geometry, boundary?)}``: PaddleScience's
    equations that apply to a network's outputs. Not in this list: VIV and the heat exchanger (extra learnable
    parameters, several networks), and ``Helmholtz``, whose expression calls ``model.forward_tensor(x, y)``,
    which ``ppsci.arch.MLP`` does not offer (it takes one concatenated tensor)."""
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    cube = ppsci.geometry.Cuboid((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    time_rect = ppsci.geometry.TimeXGeometry(ppsci.geometry.TimeDomain(0.0, 1.0, 0.1), rect)
    return {
        "navier_stokes_2d": (lambda m: ppsci.equation.NavierStokes(0.01, 1.0, 2, False), ("x", "y"), ("u", "v", "p"),
                             rect, False),
        "navier_stokes_2d_unsteady": (lambda m: ppsci.equation.NavierStokes(0.01, 1.0, 2, True), ("t", "x", "y"),
                                      ("u", "v", "p"), time_rect, False),
        "navier_stokes_3d": (lambda m: ppsci.equation.NavierStokes(0.01, 1.0, 3, False), ("x", "y", "z"),
                             ("u", "v", "w", "p"), cube, False),
        "laplace": (lambda m: ppsci.equation.Laplace(2), ("x", "y"), ("u",), rect, False),
        "poisson": (lambda m: ppsci.equation.Poisson(2), ("x", "y"), ("p",), rect, False),
        "biharmonic": (lambda m: ppsci.equation.Biharmonic(2, 1.0, 1.0), ("x", "y"), ("u",), rect, False),
        "normal_dot_vec": (lambda m: ppsci.equation.NormalDotVec(("u", "v")), ("x", "y"), ("u", "v"), rect, True),
        # the interior expressions (traction_x / traction_y need normals: a boundary constraint's)
        "linear_elasticity": (lambda m: _only(ppsci.equation.LinearElasticity(E=None, nu=None, lambda_=1.0, mu=1.0,
                                                                              dim=2), "traction"),
                              ("x", "y"), ("u", "v", "sigma_xx", "sigma_yy", "sigma_xy"), rect, False),
        "allen_cahn": (lambda m: ppsci.equation.AllenCahn(0.01), ("t", "x"), ("u",),
                       ppsci.geometry.TimeXGeometry(ppsci.geometry.TimeDomain(0.0, 1.0, 0.1),
                                                    ppsci.geometry.Interval(-1.0, 1.0)), False),
    }


def _only(eq, drop):
    """``eq`` without the expressions whose name starts with ``drop``."""
    for name in [k for k in eq.equations if k.startswith(drop)]:
        del eq.equations[name]
    return eq


CASES = sorted(_equation_cases())


def equation_problem(case):
    """``(model, constraints, equation, points)``: one constraint ``EQ`` with every expression of the
    equation (residual 0) on fixed points, plus a boundary constraint ``BC`` on the first output."""
    make_eq, ins, outs, geom, boundary = _equation_cases()[case]
    paddle.seed(0)
    np.random.seed(0)
    model = ppsci.arch.MLP(ins, outs, 2, 6, "tanh")
    eq = make_eq(model)
    loader = {"dataset": "IterableNamedArrayDataset", "batch_size": N_POINTS, "iters_per_epoch": 1}
    if boundary:
        pts = geom.sample_boundary(N_POINTS)
        pde = ppsci.constraint.BoundaryConstraint(eq.equations, {k: 0.0 for k in eq.equations}, geom,
                                                  loader, ppsci.loss.MSELoss("mean"),
                                                  name="EQ")
    else:
        pts = geom.sample_interior(N_POINTS)
        pde = ppsci.constraint.InteriorConstraint(eq.equations, {k: 0.0 for k in eq.equations}, geom,
                                                  loader, ppsci.loss.MSELoss("mean"),
                                                  name="EQ")
    first = outs[0]
    bc = ppsci.constraint.BoundaryConstraint({f"{first}_bc": lambda d, k=first: d[k]}, {f"{first}_bc": 0.0}, geom,
                                             {**loader, "batch_size": 4}, ppsci.loss.MSELoss("mean"), name="BC")
    return model, {pde.name: pde, bc.name: bc}, eq, {k: v.astype(DTYPE) for k, v in pts.items()}


def per_point_traces(model, eq, pts):
    """The reference: for every point alone, the expression evaluated by PaddleScience's own machinery
    (``ppsci.lambdify`` of a sympy expression, or the equation's function on the model's output dict), and
    ``||d f(x_p)/d theta||^2`` by ``paddle.grad``; summed over the points. No code of ours is involved."""
    from ppsci.autodiff import clear

    params = [p for p in model.parameters() if not p.stop_gradient]
    traces = {}
    for name, expr in eq.equations.items():
        fn = ppsci.lambdify(expr, model) if not callable(expr) or hasattr(expr, "free_symbols") else None
        total = 0.0
        n = len(next(iter(pts.values())))
        for p in range(n):
            data = {}
            for k, v in pts.items():
                t = paddle.to_tensor(v[p:p + 1])
                t.stop_gradient = False
                data[k] = t
            data.update(model({k: data[k] for k in model.input_keys}))  # the Solver's dict: inputs and outputs
            f = fn(data) if fn is not None else expr(data)
            grads = paddle.grad(f.sum(), params, allow_unused=True)
            total += sum(float((g ** 2).sum()) for g in grads if g is not None)
            clear()
        traces[name] = total
    return traces


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fast", [True, False])
def test_ntk_traces_of_every_equation_match_a_per_point_reference(case, fast, tmp_path):
    """Every expression of the equation is its own term; its trace, on the fast path (where the model allows
    it) and on the exact loop, equals the per-point ``paddle.grad`` reference on PaddleScience's expression."""
    import warnings

    from paddle_pinn_balance import BalanceWarning

    model, cons, eq, pts = equation_problem(case)
    expected = per_point_traces(model, eq, pts)
    ppsci.solver.Solver(model, cons, output_dir=str(tmp_path))  # converts the sympy expressions, as in training
    kernels = constraint_kernels(cons, model, points={"EQ": pts})
    assert set(expected) <= set(kernels)
    net = ntk_model(model) if fast else model
    ntk = NTKWeighting(net, kernels={k: kernels[k] for k in expected}, path="auto" if fast else "loop",
                       loss_names=list(expected))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalanceWarning)  # a kernel the fast path cannot take: the loop, said
        got = dict(zip(expected, ntk.compute_traces().numpy().tolist()))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=2e-4), (name, ntk.last_paths)


def _solver_config(name, eq):
    cfg = {"name": name}
    if name == "lr_annealing":
        cfg["ref"] = sorted(eq.equations)[0]
    if "update_freq" in allowed_keys(name):
        cfg["update_freq"] = 1
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("case", CASES)
def test_every_balancer_trains_every_equation_in_the_solver(case, name, tmp_path):
    import warnings

    from paddle_pinn_balance import BalanceWarning
    from paddle_pinn_balance.ppsci import optimizer_layers

    model, cons, eq, _ = equation_problem(case)
    with paddle.utils.unique_name.guard():
        net, bal = build_for_solver(_solver_config(name, eq), model, cons)
        opt = ppsci.optimizer.Adam(1e-3)(optimizer_layers(net, bal))
        solver = ppsci.solver.Solver(net, cons, output_dir=str(tmp_path), optimizer=opt, epochs=1,
                                     iters_per_epoch=2, loss_aggregator=bal, log_freq=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BalanceWarning)  # ntk on a kernel the fast path cannot take
            solver.train()
    assert set(eq.equations) <= set(bal.weights)
    assert all(np.isfinite(v) for v in bal.weights.values())
    assert all(np.all(np.isfinite(p.numpy())) for p in net.parameters())
    assert int(bal.num_calls.numpy()[0]) == 2


def test_a_label_shared_by_several_constraints_is_one_term_over_the_union_of_their_points(tmp_path):
    """PaddleScience merges the constraints' losses of one label into one term; its kernel runs over the union
    of their points (each constraint's own expression), and the trace equals the per-point reference summed
    over both point sets."""
    paddle.seed(0)
    model = ppsci.arch.MLP(("x", "y"), ("u", "v", "p"), 2, 6, "tanh")
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    loader = {"dataset": "IterableNamedArrayDataset", "batch_size": 4, "iters_per_epoch": 1}
    top = ppsci.constraint.BoundaryConstraint({"u": lambda d: d["u"], "v": lambda d: d["v"]}, {"u": 1, "v": 0},
                                              rect, loader, ppsci.loss.MSELoss("sum"), name="BC_top")
    left = ppsci.constraint.BoundaryConstraint({"u": lambda d: 2.0 * d["u"]}, {"u": 0}, rect, loader,
                                               ppsci.loss.MSELoss("sum"), name="BC_left")
    cons = {"BC_top": top, "BC_left": left}
    pts = {"BC_top": {"x": np.array([[0.1], [0.5], [0.9]], DTYPE), "y": np.ones((3, 1), DTYPE)},
           "BC_left": {"x": np.zeros((2, 1), DTYPE), "y": np.array([[0.2], [0.7]], DTYPE)}}
    ppsci.solver.Solver(model, cons, output_dir=str(tmp_path))
    kernels = constraint_kernels(cons, model, points=pts)
    assert sorted(kernels) == ["u", "v"]
    params = list(model.parameters())

    def reference(scale, points):
        total = 0.0
        for p in range(len(points["x"])):
            out = model({k: paddle.to_tensor(v[p:p + 1]) for k, v in points.items()})
            grads = paddle.grad((scale * out["u"]).sum(), params, allow_unused=True)
            total += sum(float((g ** 2).sum()) for g in grads if g is not None)
        return total

    expected = reference(1.0, pts["BC_top"]) + reference(2.0, pts["BC_left"])
    import warnings

    from paddle_pinn_balance import BalanceWarning

    ntk = NTKWeighting(ntk_model(model), kernels={"u": kernels["u"]}, loss_names=["u"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BalanceWarning)
        got = float(ntk.compute_traces().numpy()[0])
    assert got == pytest.approx(expected, rel=2e-4)
    assert kernels["u"](model).shape[0] == 5
