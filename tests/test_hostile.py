"""Hostile inputs and environments (issue 24, items 2-5): missing extras, non-finite and mixed-dtype losses,
failing calls, a reference term without gradient, refused checkpoints, steps going backwards, other threads'
random numbers, and the methods' edges against numpy re-implementations."""

import sys
import threading
import time
import warnings

import numpy as np
import paddle
import pytest
from reference import DTYPE, make_net

from paddle_pinn_balance import (
    BalanceWarning,
    GradNormRatio,
    LRAnnealing,
    NTKWeighting,
    ReLoBRaLo,
    Sum,
    build_balancer,
)
from paddle_pinn_balance.contract import method_names
from paddle_pinn_balance.per_point import per_point_sq_grad_norms
from paddle_pinn_balance.relobralo import lookback_draw
from paddle_pinn_balance.surgery import MConFIG, PCGrad, UPGrad, config_direction, pcgrad_direction

X = np.linspace(-1, 1, 12).reshape(6, 2)


def _losses(net, bad=None, dtypes=None):
    x = paddle.to_tensor(X.astype(DTYPE))
    u = net(x)
    out = {"res": (u ** 2).mean(), "bc": ((u - 1) ** 2).mean(), "ic": ((u + 0.5) ** 2).mean()}
    if bad is not None:
        out["bc"] = out["bc"] * bad
    for n, d in (dtypes or {}).items():
        out[n] = out[n].astype(d)
    return out


def _state(bal):
    return {k: v.numpy().copy() for k, v in bal.state_dict().items()}


def _same_state(bal, before):
    after = _state(bal)
    assert sorted(after) == sorted(before)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


# --------------------------------------------------------------------------- item 2: the SciPy extra


def test_upgrad_without_scipy_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "scipy" or m.startswith("scipy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy...` raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"paddle_pinn_balance\[upgrad\]"):
        UPGrad(make_net())


# --------------------------------------------------------------------------- item 3: non-finite losses

#: every registered method but the fixed weights and NTK (whose kernels are callables)
ALL = [n for n in method_names() if n not in ("sum", "ntk")]


def _built(name, net, **kw):
    cfg = {"name": name, "check_every": 5, **kw}
    if name in ("lr_annealing",):
        cfg.update(ref="res", update_freq=1)
    if name == "grad_norm_ratio":
        cfg.update(update_freq=1)
    if name == "grad_norm":
        cfg.update(n_loss=3)
    return build_balancer(cfg, net)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", ALL)
def test_non_finite_steps_warn_every_check_every_and_keep_weights(name, bad):
    net = make_net(sizes=(2, 4, 1))
    bal = _built(name, net)
    bal(_losses(net), 0).backward()
    before = dict(bal.weights)
    with pytest.warns(BalanceWarning, match=r"non-finite (loss|gradient) for term\(s\) \['bc'\]"):
        for step in range(1, 11):
            net.clear_gradients()
            bal(_losses(net, bad=bad), step).backward()  # UPGrad: no error from the QP solver
    if name != "uncertainty":  # its weights are a parameter the loop's optimizer owns (not stepped here)
        assert bal.weights == before


# --------------------------------------------------------------------------- item 3: dtypes


@pytest.mark.parametrize("other", ["float64", "float16"])
@pytest.mark.parametrize("name", ["sum", "lr_annealing", "relobralo", "pcgrad"])
def test_a_term_of_another_floating_dtype_is_cast(name, other):
    net = make_net(sizes=(2, 4, 1))
    odd = other if other != DTYPE else "float32"
    bal = _built(name, net) if name != "sum" else build_balancer({"name": "sum"})
    ref = _built(name, make_net(sizes=(2, 4, 1))) if name != "sum" else build_balancer({"name": "sum"})
    net_ref = make_net(sizes=(2, 4, 1))
    if name != "sum":
        ref = _built(name, net_ref)
    for step in range(3):
        total = bal(_losses(net, dtypes={"bc": odd}), step)
        expect = ref({k: v.astype(odd).astype(DTYPE) if k == "bc" else v for k, v in _losses(net_ref).items()},
                     step)
        assert total.dtype == expect.dtype
        np.testing.assert_allclose(float(total), float(expect), rtol=1e-6)
        total.backward()
        expect.backward()
    for p, q in zip(net.parameters(), net_ref.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-7)
    for a, b in zip(bal.weights.values(), ref.weights.values()):
        assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.parametrize("name", ["sum", "lr_annealing", "relobralo"])
def test_a_term_of_an_integer_dtype_is_refused_naming_it(name):
    net = make_net(sizes=(2, 4, 1))
    bal = _built(name, net) if name != "sum" else build_balancer({"name": "sum"})
    losses = _losses(net)
    losses["ic"] = paddle.to_tensor(3, dtype="int64")
    with pytest.raises(ValueError, match=r"loss 'ic' must be a floating-point tensor; got dtype .*int64"):
        bal(losses, 0)


# --------------------------------------------------------------------------- item 3: a failed call


def test_a_failed_call_changes_no_state_and_its_retry_updates():
    net = make_net(sizes=(2, 4, 1))
    lra, fresh = LRAnnealing(net, ref="res", update_freq=1), LRAnnealing(net, ref="res", update_freq=1)
    lra(_losses(net), 0).backward()
    fresh(_losses(net), 0).backward()
    before = _state(lra)
    bad = _losses(net)
    bad["bc"] = paddle.to_tensor(1, dtype="int64")
    with pytest.raises(ValueError, match="'bc'"):
        lra(bad, 1)
    _same_state(lra, before)
    net.clear_gradients()
    lra(_losses(net), 1).backward()  # the retry updates, as a call that never failed
    fresh(_losses(net), 1).backward()
    assert int(lra.num_updates.numpy()[0]) == 2 and int(lra.num_calls.numpy()[0]) == 2
    assert lra.weights == fresh.weights


def test_a_failing_ntk_kernel_changes_no_state_and_its_retry_updates():
    net = make_net(sizes=(2, 4, 1))
    x = paddle.to_tensor(X.astype(DTYPE))
    fail = {"now": False}

    def bc(model):
        if fail["now"]:
            raise RuntimeError("sampler exhausted")
        return model(x)

    kernels = {"res": lambda m: m(x) ** 2, "bc": bc, "ic": lambda m: m(x) + 0.5}
    ntk = NTKWeighting(net, kernels=kernels, update_freq=1, momentum=0.5)
    fresh = NTKWeighting(net, kernels=dict(kernels, bc=lambda m: m(x)), update_freq=1, momentum=0.5)
    for bal in (ntk, fresh):
        bal(_losses(net), 0)
    before = _state(ntk)
    fail["now"] = True
    with pytest.raises(RuntimeError, match="sampler exhausted"):
        ntk(_losses(net), 1)
    _same_state(ntk, before)
    fail["now"] = False
    ntk(_losses(net), 1)
    fresh(_losses(net), 1)
    assert int(ntk.num_updates.numpy()[0]) == 2
    assert ntk.weights == fresh.weights


# --------------------------------------------------------------------------- item 3: LRA's reference term


@pytest.mark.parametrize("how", ["detached", "constant"])
def test_lra_reference_without_gradient_skips_and_names_it(how):
    net = make_net(sizes=(2, 4, 1))
    lra = LRAnnealing(net, ref="res", update_freq=1, check_every=10)
    with pytest.warns(BalanceWarning, match=r"reference term\(s\) \['res'\] had an identically zero gradient"):
        for step in range(30):
            losses = _losses(net)
            losses["res"] = losses["res"].detach() if how == "detached" else paddle.full([], 0.3, dtype=DTYPE)
            net.clear_gradients()
            lra(losses, step).backward()
    assert lra.weights == {"res": 1.0, "bc": 1.0, "ic": 1.0}  # not driven to 0
    assert int(lra.num_updates.numpy()[0]) == 30


def test_lra_estimates_nan_without_reference_gradient():
    from paddle_pinn_balance.lr_annealing import lra_estimates

    G = paddle.to_tensor(np.array([[0.0, 0.0], [1.0, 2.0]], dtype=DTYPE))
    hat, den = lra_estimates(G, paddle.ones([2], dtype=DTYPE), 0)
    assert np.all(np.isnan(hat.numpy()))
    hat, _ = lra_estimates(paddle.to_tensor(np.array([[3.0, 4.0], [0.0, 1.0]], dtype=DTYPE)),
                           paddle.to_tensor(np.array([1.0, 2.0], dtype=DTYPE)), 0, eps=0.0)
    np.testing.assert_allclose(hat.numpy(), [1.0, 4.0], rtol=1e-6)  # the docstring's example, unchanged


# --------------------------------------------------------------------------- item 3: checkpoints


def _trained(cls, **kw):
    net = make_net(sizes=(2, 4, 1))
    bal = cls(net, **kw)
    for step in range(3):
        net.clear_gradients()
        bal(_losses(net), step).backward()
    return net, bal


def test_another_methods_checkpoint_is_refused_both_ways():
    _, lra = _trained(LRAnnealing, ref="res", update_freq=1)
    _, gnr = _trained(GradNormRatio, update_freq=1)
    for src, dst, name in ((lra, gnr, "LRAnnealing"), (gnr, lra, "GradNormRatio")):
        before = _state(dst)
        with pytest.raises(ValueError, match=f"state of a {name}, not of a {type(dst).__name__}"):
            dst.set_state_dict(src.state_dict())
        _same_state(dst, before)


@pytest.mark.parametrize("key,value,match", [
    ("lambdas", [-5.0, 1.0, 1.0], r"lambdas.*outside \[0.1"),
    ("lambdas", [1.0, 1.0, 99.0], r"lambdas.*outside \[0.1, 10.0\]"),
    ("num_calls", [-7], r"num_calls.*>= 0"),
    ("num_updates", [-1], r"num_updates.*>= 0"),
    ("num_updates", [1000], r"num_updates.*exceeds"),
    ("last_update_step", [-3], r"last_update_step.*>= -1"),
])
def test_out_of_range_checkpoint_values_are_refused(key, value, match):
    _, bal = _trained(GradNormRatio, update_freq=1, min_weight=0.1, max_weight=10.0)
    state = bal.state_dict()
    bad = {k: v.numpy().copy() for k, v in state.items()}
    bad[key] = np.asarray(value, dtype=bad[key].dtype)
    before = _state(bal)
    with pytest.raises(ValueError, match=match):
        bal.set_state_dict(bad)
    _same_state(bal, before)
    fresh = GradNormRatio(make_net(sizes=(2, 4, 1)), update_freq=1, min_weight=0.1, max_weight=10.0)
    with pytest.raises(ValueError, match=match):
        fresh.set_state_dict(bad)
    assert fresh.loss_names is None


def test_lra_reference_weight_is_not_bounded_but_weights_must_be_positive():
    _, lra = _trained(LRAnnealing, ref="res", update_freq=1, min_weight=2.0)
    LRAnnealing(make_net(sizes=(2, 4, 1)), ref="res", min_weight=2.0).set_state_dict(lra.state_dict())  # res: 1
    state = {k: v.numpy().copy() for k, v in lra.state_dict().items()}
    state["lambdas"][1] = 0.0
    with pytest.raises(ValueError, match="lambdas"):
        LRAnnealing(make_net(sizes=(2, 4, 1)), ref="res").set_state_dict(state)


def test_other_method_counters_are_checked():
    _, pc = _trained(PCGrad)
    state = {k: v.numpy().copy() for k, v in pc.state_dict().items()}
    state["pcgrad_draws"] = np.array([-2], dtype=np.int64)
    with pytest.raises(ValueError, match="pcgrad_draws"):
        PCGrad(make_net(sizes=(2, 4, 1))).set_state_dict(state)
    net, mc = _trained(MConFIG)
    state = {k: v.numpy().copy() for k, v in mc.state_dict().items()}
    state["mconfig_turn"] = np.array([-1], dtype=np.int64)
    with pytest.raises(ValueError, match="mconfig_turn"):
        MConFIG(net).set_state_dict(state)
    rb = ReLoBRaLo()
    rb({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(2.0)}, 0)
    state = {k: v.numpy().copy() for k, v in rb.state_dict().items()}
    state["lookback_seed"] = np.array([-1], dtype=np.int64)
    other = ReLoBRaLo(seed=4)
    with pytest.raises(ValueError, match="lookback_seed"):
        other.set_state_dict(state)
    assert other.seed == 4 and other.loss_names is None


@pytest.mark.parametrize("cls,kw", [(LRAnnealing, {"ref": "res", "update_freq": 2}), (ReLoBRaLo, {}),
                                    (PCGrad, {"seed": 1})])
def test_old_checkpoint_without_new_keys_resumes_bit_exactly(cls, kw):
    def make():
        net = make_net(sizes=(2, 4, 1))
        return net, (cls(net, **kw) if cls is not ReLoBRaLo else cls(**kw))

    net, whole = make()
    totals = []
    for step in range(8):
        net.clear_gradients()
        t = whole(_losses(net), step)
        t.backward()
        totals.append(float(t))
    net2, first = make()
    for step in range(4):
        net2.clear_gradients()
        first(_losses(net2), step).backward()
    old = {k: v for k, v in first.state_dict().items() if k not in ("method_utf8", "last_update_step")}
    net3, resumed = make()
    resumed.set_state_dict(old)
    got = []
    for step in range(4, 8):
        net3.clear_gradients()
        t = resumed(_losses(net3), step)
        t.backward()
        got.append(float(t))
    assert got == totals[4:]
    for a, b in zip(resumed.weights.values(), whole.weights.values()):
        assert a == b


def test_last_update_step_survives_a_checkpoint():
    net, lra = _trained(LRAnnealing, ref="res", update_freq=1)  # updates at 0, 1, 2
    again = LRAnnealing(net, ref="res", update_freq=1)
    again.set_state_dict(lra.state_dict())
    w = again.weights
    again(_losses(net), 2)  # the same step again (a resumed L-BFGS step): no second update
    assert again.weights == w and int(again.num_updates.numpy()[0]) == 3
    again(_losses(net), 3)
    assert int(again.num_updates.numpy()[0]) == 4


# --------------------------------------------------------------------------- item 3: config, steps


def test_build_balancer_accepts_a_balancer_section_in_a_dict():
    net = make_net(sizes=(2, 4, 1))
    bal = build_balancer({"balancer": {"name": "relobralo", "alpha": 0.5}}, net)
    assert isinstance(bal, ReLoBRaLo) and bal.alpha == 0.5
    with pytest.raises(ValueError, match="unknown key"):
        build_balancer({"balancer": {"name": "relobralo", "alfa": 0.5}}, net)


def _updates_at(bal, steps):
    out = []
    for s in steps:
        before = int(bal.num_updates.numpy()[0])
        bal({"a": paddle.to_tensor(1.0 + s), "b": paddle.to_tensor(2.0)}, s)
        if int(bal.num_updates.numpy()[0]) > before:
            out.append(s)
    return out


def test_steps_going_backwards_do_not_update_and_warn_once():
    bal = ReLoBRaLo(update_freq=10)
    with pytest.warns(BalanceWarning, match=r"steps went backwards \(step 10 after an update at step 20\).*"
                                            r"restart_steps\(\)") as rec:
        got = _updates_at(bal, [0, 10, 20, 10, 0, 20, 5, 30])
    assert got == [0, 10, 20, 30]
    assert len([r for r in rec if "backwards" in str(r.message)]) == 1


def test_restart_steps_starts_a_new_stage_keeping_the_weights():
    bal = ReLoBRaLo(update_freq=10, seed=2)
    assert _updates_at(bal, [0, 10, 20]) == [0, 10, 20]
    w, state = bal.weights, _state(bal)
    bal.restart_steps()
    assert bal.weights == w
    for k in state:
        if k != "last_update_step":
            np.testing.assert_array_equal(bal.state_dict()[k].numpy(), state[k], err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _updates_at(bal, [0, 5, 10]) == [0, 10]


@pytest.mark.parametrize("step", [-1, -10])
def test_negative_step_is_refused(step):
    bal = Sum()
    with pytest.raises(ValueError, match="`step` must be a non-negative integer"):
        bal({"a": paddle.to_tensor(1.0)}, step)
    assert int(bal.num_calls.numpy()[0]) == 0


def test_step_none_keeps_counting_calls():
    bal = ReLoBRaLo(update_freq=2)
    for _ in range(5):
        bal({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(2.0)})
    assert int(bal.num_updates.numpy()[0]) == 3  # calls 0, 2, 4


# --------------------------------------------------------------------------- item 3/4: NTK kernels


@pytest.mark.parametrize("model_dtype,kernel_dtype", [("float32", "float64"), ("float64", "float32")])
def test_ntk_kernel_in_another_dtype_takes_the_fast_path(model_dtype, kernel_dtype):
    net = make_net(sizes=(2, 4, 1), dtype=model_dtype)
    x = paddle.to_tensor(X.astype(model_dtype))
    same = per_point_sq_grad_norms(net, lambda m: m(x) + 1.0, path="expanded")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, ran = per_point_sq_grad_norms(net, lambda m: m(x).astype(kernel_dtype) + 1.0, return_path=True)
    assert ran == "expanded", ran.reason
    np.testing.assert_allclose(got.numpy(), same.numpy(), rtol=1e-6)
    ntk = NTKWeighting(net, kernels={"a": lambda m: m(x).astype(kernel_dtype), "b": lambda m: 2 * m(x)},
                       update_freq=1)
    ntk({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(1.0)}, 0)
    assert ntk.last_path == "expanded"
    assert ntk.weights["a"] == pytest.approx(5.0, rel=1e-6)  # traces t and 4t: 5t / t


def _mixing_kernel(x, sleep=0.0, draws=None):
    def kernel(model):
        if draws is not None:
            draws.append(np.random.rand(3))  # a sampling kernel drawing from the global generator
        time.sleep(sleep)
        u = model(x)
        return u - u.mean()  # mixes points: the fast path falls back to the loop

    return kernel


def test_fallback_does_not_rewind_global_random_states():
    net = make_net(sizes=(2, 4, 1))
    x = paddle.to_tensor(X.astype(DTYPE))
    np.random.seed(5)
    expected = np.random.rand(6)  # two kernel calls' draws, in sequence
    np.random.seed(5)
    draws = []
    _, ran = per_point_sq_grad_norms(net, _mixing_kernel(x, draws=draws), return_path=True, check_points="always")
    assert ran == "loop" and "mix points" in ran.reason
    np.testing.assert_array_equal(np.concatenate(draws), expected)  # not the same 3 numbers twice
    assert np.random.rand() == np.random.RandomState(5).rand(7)[6]  # the global stream moved on


def test_another_threads_random_numbers_are_not_repeated_during_a_fallback():
    net = make_net(sizes=(2, 4, 1))
    x = paddle.to_tensor(X.astype(DTYPE))
    ntk = NTKWeighting(net, kernels={"res": _mixing_kernel(x, sleep=0.05), "bc": lambda m: m(x)}, update_freq=1)
    seen, stop = [], threading.Event()

    def draw():
        while not stop.is_set():
            seen.append(np.random.rand())
            seen.append(float(paddle.rand([1]).numpy()[0]))
            time.sleep(0.001)

    t = threading.Thread(target=draw)
    t.start()
    try:
        with pytest.warns(BalanceWarning, match="exact per-point loop"):
            ntk({"res": paddle.to_tensor(1.0), "bc": paddle.to_tensor(1.0)}, 0)
    finally:
        stop.set()
        t.join()
    assert ntk.last_path == "loop" and len(seen) > 10
    assert len(set(seen)) == len(seen)


# --------------------------------------------------------------------------- item 5: the methods at the edges


def _np_config_lstsq(G):
    """conflictfree 0.1.8 ConFIG_update: unit rows, least-squares (min-norm) solve of U x = 1, rescale."""
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    x = np.linalg.lstsq(U, np.ones(len(G)), rcond=None)[0]
    gu = x / np.linalg.norm(x)
    return (G @ gu).sum() * gu


def test_config_rcond_cuts_singular_values_of_the_unit_rows():
    rng = np.random.default_rng(3)
    base = rng.normal(size=40)
    G = np.stack([base + 1e-4 * rng.normal(size=40) for _ in range(8)]) * np.arange(1, 9)[:, None]
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    sv = np.linalg.svd(U, compute_uv=False)
    assert (sv[-1] / sv[0]) ** 2 < 1e-6 < sv[-1] / sv[0]  # kept under a singular-value cutoff of 1e-6 only
    d = config_direction(paddle.to_tensor(G)).numpy()
    cos = G @ d / np.linalg.norm(G, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=0, atol=1e-9)  # every cosine equal
    np.testing.assert_allclose(d, _np_config_lstsq(G), rtol=1e-6)


def np_pcgrad_per_term(G, orders):
    """Yu et al. Algorithm 1 with an order per term (row i of ``orders``)."""
    out = []
    for i in range(len(G)):
        g = G[i].copy()
        for j in orders[i]:
            if j != i and g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(g)
    return np.sum(out, axis=0)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_pcgrad_per_term_orders_match_numpy(k):
    rng = np.random.default_rng(40 + k)
    G = rng.normal(size=(k, 6))  # k > 3: strongly conflicting, the order matters
    orders = np.stack([rng.permutation(k) for _ in range(k)])
    got = pcgrad_direction(paddle.to_tensor(G), orders).numpy()
    np.testing.assert_allclose(got, np_pcgrad_per_term(G, orders), rtol=1e-10, atol=1e-12)
    one = pcgrad_direction(paddle.to_tensor(G), orders[0]).numpy()  # one order for all: another direction
    np.testing.assert_allclose(one, np_pcgrad_per_term(G, np.tile(orders[0], (k, 1))), rtol=1e-10, atol=1e-12)
    assert not np.allclose(got, one)


def test_pcgrad_balancer_draws_an_order_per_term():
    net = make_net(sizes=(2, 4, 1))
    pc = PCGrad(net, seed=7)
    orders = [pc.orders(5, d) for d in range(20)]
    assert all(sorted(r) == list(range(5)) for o in orders for r in o.tolist())
    assert any(len({tuple(r) for r in o.tolist()}) > 1 for o in orders)  # terms get their own permutations
    np.testing.assert_array_equal(pc.orders(5, 3), PCGrad(net, seed=7).orders(5, 3))  # seeded
    # end to end: the delivered gradient is numpy's PCGrad with the balancer's orders
    x = paddle.to_tensor(X.astype(DTYPE))
    losses = {f"t{i}": ((net(x) - (i - 1.5)) ** 2).mean() * (1 + i) for i in range(4)}
    rows = []
    for v in losses.values():
        gs = paddle.grad(v, net.parameters(), retain_graph=True)
        rows.append(np.concatenate([g.numpy().ravel() for g in gs]).astype(np.float64))
    net.clear_gradients()
    pc(losses, 0).backward()
    got = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
    tol = 1e-4 if DTYPE == "float32" else 1e-10
    np.testing.assert_allclose(got, np_pcgrad_per_term(np.stack(rows), pc.orders(4, 0)), rtol=tol, atol=tol * 1e-2)


def _np_relobralo(seq, alpha=0.95, rho_e=0.99, tau=1.0, eps=1e-8, seed=0):
    def bal(L, ref):
        z = L / (tau * ref + eps)
        e = np.exp(z - z.max())
        return len(L) * e / e.sum()

    w, init, prev = np.ones(len(seq[0])), None, None
    for t, L in enumerate(seq):
        L = np.asarray(L, dtype=np.float64)
        if init is None:
            init, prev = L, L
            continue
        rho = lookback_draw(seed, t, rho_e)
        w = alpha * (rho * w + (1 - rho) * bal(L, init)) + (1 - alpha) * bal(L, prev)
        prev = L
    return w


def test_float64_default_gives_float64_state_and_an_old_float32_checkpoint_loads():
    previous = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        rng = np.random.default_rng(0)
        seq = rng.uniform(0.1, 3.0, size=(30, 3)) * np.array([1e-3, 1.0, 1e3])
        bal = ReLoBRaLo(seed=3)
        for t, L in enumerate(seq):
            bal({n: paddle.to_tensor(v, dtype="float64") for n, v in zip("abc", L)}, t)
        for key in ("lambdas", "init_losses", "prev_losses"):
            assert bal.state_dict()[key].dtype == paddle.float64, key
        np.testing.assert_allclose(list(bal.weights.values()), _np_relobralo(seq, seed=3), rtol=1e-13)
        old = {k: (v.astype("float32") if v.dtype == paddle.float64 else v) for k, v in bal.state_dict().items()}
        again = ReLoBRaLo(seed=3)
        again.set_state_dict(old)
        assert again.lambdas.dtype == paddle.float64
        np.testing.assert_allclose(again.lambdas.numpy(), bal.lambdas.numpy(), rtol=1e-7)
        assert Sum(loss_names=["a"]).lambdas.dtype == paddle.float64
    finally:
        paddle.set_default_dtype(previous)


def test_last_update_step_in_every_form_of_state_dict():
    bal = ReLoBRaLo(update_freq=1)
    for s in (0, 3, 7):
        bal({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(2.0)}, s)

    class Holder(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.bal = bal

    assert int(bal.state_dict()["last_update_step"].numpy()[0]) == 7
    assert int(bal.state_dict(keep_vars=False)["last_update_step"].numpy()[0]) == 7
    assert int(Holder().state_dict()["bal.last_update_step"].numpy()[0]) == 7
    bal.restart_steps()
    assert int(bal.state_dict()["last_update_step"].numpy()[0]) == -1
