"""Mixed precision (GradScaler), non-finite and extreme losses, warnings, configuration fuzzing."""

import contextlib
import types
import warnings

import numpy as np
import paddle
import paddle.amp.grad_scaler as grad_scaler
import pytest
from reference import DTYPE, make_net, update_with_gradients

from paddle_pinn_balance import GradNorm, LRAnnealing, NTKWeighting, Sum, build_balancer
from paddle_pinn_balance.config import REGISTRY, allowed_keys


def kernels_for(pts):
    return {n: (lambda m, n=n: m(pts[n]).reshape([-1])) for n in ("res", "bc")}


def build(kind, net, **kw):
    """(model to train, balancer)."""
    if kind == "lra":
        return net, LRAnnealing(net, ref="res", update_freq=1, **kw)
    if kind == "gradnorm":
        w = GradNorm(net, n_loss=2, alpha=1.0, **kw)
        return w, w.aggregator
    if kind == "ntk_grad_norm":
        return net, NTKWeighting(net, mode="grad_norm", update_freq=1, **kw)
    if kind == "ntk_trace":
        pts = {"res": paddle.rand([6, 2]), "bc": paddle.rand([4, 2])}
        return net, NTKWeighting(net, kernels=kernels_for(pts), update_freq=1, **kw)
    return net, Sum(**kw)


KINDS = ["lra", "gradnorm", "ntk_grad_norm", "ntk_trace"]


def losses_of(model, step, scale=(1.0, 1.0)):
    rng = np.random.default_rng(step)
    xr = paddle.to_tensor(rng.uniform(-1, 1, (12, 2)).astype(DTYPE))
    xb = paddle.to_tensor(rng.uniform(-1, 1, (6, 2)).astype(DTYPE))
    return {"res": scale[0] * (model(xr) ** 2).mean(), "bc": scale[1] * ((model(xb) - 1.0) ** 2).mean()}


@contextlib.contextmanager
def cpu_grad_scaler_allowed():
    """Paddle disables GradScaler off the GPU; let its real code run on the CPU (construction only)."""
    real = grad_scaler._dygraph_tracer

    def pretend_gpu():
        return types.SimpleNamespace(_expected_place=types.SimpleNamespace(is_gpu_place=lambda: True))

    grad_scaler._dygraph_tracer = pretend_gpu
    try:
        yield
    finally:
        grad_scaler._dygraph_tracer = real


def run_amp(kind, scaling, overflow_at=None, steps=4):
    with paddle.utils.unique_name.guard():
        model, bal = build(kind, make_net(seed=4))
        opt = paddle.optimizer.Adam(1e-2, parameters=model.parameters())
    scaler = None
    if scaling:
        with cpu_grad_scaler_allowed():
            scaler = paddle.amp.GradScaler(init_loss_scaling=scaling, use_dynamic_loss_scaling=False)
    history = []
    for step in range(steps):
        losses = losses_of(model, step)
        if step == overflow_at:
            losses["bc"] = losses["bc"] * float("inf")
        total = bal(losses, step)  # no auto_cast: float16 on a GPU would change the numbers compared
        if scaler is None:
            total.backward()
            opt.step()
        else:
            scaler.scale(total).backward()
            scaler.step(opt)
            scaler.update()
        opt.clear_grad()
        net_params = [p for p in model.parameters() if p is not getattr(bal, "loss_weights", None)]
        history.append((bal.weights, [p.numpy().copy() for p in net_params]))
    return history


@pytest.mark.skipif(DTYPE == "float64", reason="Paddle's GradScaler checks and unscales float16, bfloat16 and "
                    "float32 gradients only (core.eager.get_grads_lists leaves float64 ones out): mixed precision")
@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_gives_the_same_weights_and_skips_overflow_updates(kind):
    plain = run_amp(kind, None)
    scaled = run_amp(kind, 1024.0)
    overflow = run_amp(kind, 1024.0, overflow_at=2)
    for (w1, p1), (w2, p2) in zip(plain, scaled):
        for n in w1:
            assert w2[n] == pytest.approx(w1[n], rel=1e-6)  # statistics on unscaled gradients
        for a, b in zip(p1, p2):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the overflow step keeps the weights of step 1 and the scaler skips the parameter update
    assert overflow[2][0] == overflow[1][0]
    for a, b in zip(overflow[1][1], overflow[2][1]):
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(v) for w, _ in overflow for v in w.values())
    assert all(np.isfinite(p).all() for _, ps in overflow for p in ps)


@pytest.mark.parametrize("kind", KINDS + ["sum"])
def test_weights_stay_finite_and_bounded_for_any_loss_magnitude(kind):
    """Property-style: random magnitudes from 1e-12 to 1e12, zeros, NaN and Inf."""
    rng = np.random.default_rng(7)
    kw = {} if kind == "sum" else dict(min_weight=1e-3, max_weight=1e3)
    with paddle.utils.unique_name.guard():
        model, bal = build(kind, make_net(seed=5), **kw)
        opt = paddle.optimizer.SGD(0.0, parameters=model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        for step in range(40):
            special = rng.integers(0, 6)
            scale = [10.0 ** rng.uniform(-12, 12), 10.0 ** rng.uniform(-12, 12)]
            if special == 1:
                scale[rng.integers(0, 2)] = 0.0
            elif special == 2:
                scale[rng.integers(0, 2)] = float("nan")
            elif special == 3:
                scale[rng.integers(0, 2)] = float("inf")
            total = bal(losses_of(model, step, scale), step)
            w = bal.weights
            assert all(np.isfinite(v) for v in w.values()), (step, scale, w)
            if kw:
                assert all(1e-3 * (1 - 1e-6) <= v <= 1e3 * (1 + 1e-6) for v in w.values()), (step, w)
            if np.isfinite(scale).all():  # finite losses never give the model a NaN gradient
                total.backward()
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                assert all(np.isfinite(g.numpy()).all() for g in grads), (step, scale)
            opt.clear_grad()  # no step: the network stays where the magnitudes are meaningful
    state = bal.state_dict()
    assert all(np.isfinite(v.numpy()).all() for v in state.values() if v.dtype in (paddle.float32, paddle.float64))


@pytest.mark.parametrize("kind", ["lra", "ntk_grad_norm", "gradnorm"])
def test_non_finite_and_zero_gradient_terms_are_named_in_a_rate_limited_warning(kind):
    model, bal = build(kind, make_net(), check_every=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2):
            losses = losses_of(model, step)
            losses["bc"] = losses["bc"] * float("nan")
            bal(losses, step)
        assert not [w for w in caught if "non-finite" in str(w.message)]  # not yet: every 3 updates
        bal(losses_of(model, 2), 2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "['bc']" in msgs[0] and "non-finite" in msgs[0]
    model, bal = build(kind, make_net(), check_every=1)
    with pytest.warns(RuntimeWarning, match="\\['bc'\\] have an identically zero gradient"):
        bal({"res": losses_of(model, 0)["res"], "bc": paddle.to_tensor(2.0)}, 0)
    assert bal.weights["bc"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- configuration fuzzing

NASTY = [None, True, -1, 0, 3, 2.5, -0.5, float("nan"), float("inf"), "", "res", "1e-8", [], ["res"], [1, 2],
         {}, {"bc": "x"}, {"bc": -1}, {"nope": 1.0}]


LRA_VARIANTS = [dict(), dict(variant="arxiv"), dict(statistic="mean"), dict(statistic="norm"),
                dict(reduction="layer_mean"), dict(reduction="layer_max_ratio", params="weights")]


def _two_term(kind):
    if kind == "ntk_grad_norm":
        return lambda net: NTKWeighting(net, mode="grad_norm", update_freq=1, loss_names=["res", "bc"])
    return lambda net: LRAnnealing(net, ref="res", update_freq=1, loss_names=["res", "bc"], **LRA_VARIANTS[kind])


@pytest.mark.parametrize("kind", list(range(len(LRA_VARIANTS))) + ["ntk_grad_norm"],
                         ids=[str(v) for v in LRA_VARIANTS] + ["ntk_grad_norm"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("row", [0, 1])
def test_one_non_finite_gradient_entry_skips_the_update(kind, bad, row):
    """One Inf or NaN entry in either term's gradient (the reference's or another's) leaves every weight
    as it was: max / (lambda * Inf) is a finite 0, which must not become a weight."""
    paddle.seed(0)
    net = make_net()
    bal = _two_term(kind)(net)
    n = sum(int(np.prod(p.shape)) for p in net.parameters())
    G = np.random.default_rng(0).standard_normal((2, n)).astype(DTYPE)
    update_with_gradients(bal, G, 0)  # the public call, its per-term gradients replaced by G
    before = bal.weights
    G[row, 3] = bad
    update_with_gradients(bal, G, 1)
    assert bal.weights == before


@pytest.mark.slow
def test_config_fuzzing_raises_only_clear_value_errors():
    """Every key of every balancer with hostile values: it builds, or raises ValueError naming the key."""
    rng = np.random.default_rng(0)
    checked = 0
    for name in REGISTRY:
        keys = allowed_keys(name)
        for key in keys:
            for value in NASTY:
                config = {"name": name, key: value}
                if name == "ntk" and key != "mode":
                    config.setdefault("mode", "grad_norm")
                try:
                    build_balancer(config, make_net())
                except ValueError as e:
                    assert str(e), config
                    checked += 1
                except Exception as e:  # noqa: BLE001 - the point of the test
                    pytest.fail(f"{config} raised {type(e).__name__}: {e}")
        for _ in range(30):  # random combinations of keys
            config = {"name": name}
            for key in rng.choice(keys, size=min(3, len(keys)), replace=False):
                config[str(key)] = NASTY[rng.integers(len(NASTY))]
            try:
                build_balancer(config, make_net())
            except ValueError:
                checked += 1
            except Exception as e:  # noqa: BLE001
                pytest.fail(f"{config} raised {type(e).__name__}: {e}")
    assert checked > 100


def test_yaml_number_written_as_string_gets_a_hint():
    with pytest.raises(ValueError, match="eps.*write 1.0e-8"):
        build_balancer({"name": "lr_annealing", "eps": "1e-8"}, make_net())


@pytest.mark.parametrize("text", ["name: [sum\n", "name: sum\n\tweights: 1\n", ": :\n", "a: b: c\n"])
def test_malformed_yaml(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="c.yaml"):
        build_balancer(str(path), make_net())
