"""The methods' math as pure functions of arrays, on hand-made numbers worked out in the comments:
``lra_estimates`` (LRA), ``ntk_trace_weights`` (NTK), ``gradnorm_weight_gradient`` (GradNorm), and the
class-creation check that a balancer reading per-term gradients declares ``needs_gradients = True``."""

import math

import numpy as np
import paddle
import pytest
from reference import update_with_gradients

import paddle_pinn_balance as ppb
from paddle_pinn_balance import (
    Balancer,
    GradNormBalancer,
    LRAnnealing,
    NTKWeighting,
    gradnorm_weight_gradient,
    lra_estimates,
    ntk_trace_weights,
)
from paddle_pinn_balance.lr_annealing import Segments


def T(x, dtype=None):
    return paddle.to_tensor(np.asarray(x, dtype=dtype or paddle.get_default_dtype()))


def close(t, expected, rtol=1e-6):
    np.testing.assert_allclose(np.asarray(t.numpy(), dtype=np.float64), expected, rtol=rtol, atol=0)


def test_the_functions_are_exported():
    for name in ("lra_estimates", "ntk_trace_weights", "gradnorm_weight_gradient", "grad_norm_ratio_weights",
                 "relobralo_weights", "softadapt_weights"):
        assert name in ppb.__all__ and callable(getattr(ppb, name))


# --------------------------------------------------------------------------- LRA (SIAM 2021)

# G = [[3, 4], [0, 1]] (row 0 the residual), lambdas = [1, 2]:
#   max|g_r| = 4, mean|g_r| = 3.5, ||g_r|| = 5;  mean|g_1| = 0.5, ||g_1|| = 1
#   siam  max:  4 / (2 * 0.5) = 4      arxiv max:  4 / 0.5 = 8
#   siam  mean: 3.5 / (2 * 0.5) = 3.5  arxiv mean: 3.5 / 0.5 = 7
#   siam  norm: 5 / (2 * 1) = 2.5      arxiv norm: 5 / 1 = 5
# the residual keeps its weight 1; den = the denominator statistic of each row.
FLAT = [("siam", "max", 4.0, [3.5, 0.5]), ("arxiv", "max", 8.0, [3.5, 0.5]),
        ("siam", "mean", 3.5, [3.5, 0.5]), ("arxiv", "mean", 7.0, [3.5, 0.5]),
        ("siam", "norm", 2.5, [5.0, 1.0]), ("arxiv", "norm", 5.0, [5.0, 1.0])]


@pytest.mark.parametrize("variant,statistic,expected,den", FLAT)
def test_lra_flat_on_hand_made_gradients(variant, statistic, expected, den):
    hat, d = lra_estimates(T([[3, 4], [0, 1]]), T([1, 2]), 0, variant=variant, statistic=statistic, eps=0.0)
    close(hat, [1.0, expected])
    close(d, den)


# G = [[3, -4, 2], [0, 1, -2]], two parameter tensors: columns {0, 1} (layer A) and {2} (layer B);
# lambdas = [1, 2].  |g_r| = [3, 4, 2], |g_1| = [0, 1, 2].
#   flat:            max 4, mean|g_1| = 3/3 = 1                  -> siam 4 / 2 = 2,     arxiv 4
#   layer_mean:      max 4, (mean_A 0.5 + mean_B 2) / 2 = 1.25    -> siam 4 / 2.5 = 1.6, arxiv 3.2
#   layer_max_ratio: A: 4 / (2 * 0.5) = 4, B: 2 / (2 * 2) = 0.5   -> siam 4
#                    A: 4 / 0.5 = 8,       B: 2 / 2 = 1           -> arxiv 8;  den = 0.5 + 2 = 2.5
LAYERED = [("flat", "siam", 2.0, 1.0), ("flat", "arxiv", 4.0, 1.0),
           ("layer_mean", "siam", 1.6, 1.25), ("layer_mean", "arxiv", 3.2, 1.25),
           ("layer_max_ratio", "siam", 4.0, 2.5), ("layer_max_ratio", "arxiv", 8.0, 2.5)]


@pytest.mark.parametrize("reduction,variant,expected,den", LAYERED)
def test_lra_layer_reductions_on_hand_made_gradients(reduction, variant, expected, den):
    segments = Segments([paddle.zeros([1, 2]), paddle.zeros([1])])
    hat, d = lra_estimates(T([[3, -4, 2], [0, 1, -2]]), T([1, 2]), 0, variant=variant, reduction=reduction,
                           segments=segments, eps=0.0)
    close(hat, [1.0, expected])
    close(d[1:], [den])


def test_lra_layer_max_ratio_skips_a_layer_the_term_does_not_reach():
    # row 1 = [0, 0, -2]: layer A gives 0 / 0 (left out, not inf); layer B: 2 / (2 * 2) = 0.5
    segments = Segments([paddle.zeros([1, 2]), paddle.zeros([1])])
    hat, d = lra_estimates(T([[3, -4, 2], [0, 0, -2]]), T([1, 2]), 0, reduction="layer_max_ratio",
                           segments=segments, eps=0.0)
    close(hat, [1.0, 0.5])
    close(d[1:], [2.0])


def test_lra_authors_code_preset_calls_the_function():
    # preset wang2021_code: siam, max, weight matrices only, layer_mean. The net's weights are [1, 2] and
    # [2, 1] (biases left out): G over them = [[3, -4, 1, 2], [0, 1, 2, 0]], lambdas [1, 2].
    # max|g_r| = 4; layer means of |g_1|: (0 + 1)/2 = 0.5 and (2 + 0)/2 = 1 -> 0.75;
    # lambda_hat = 4 / (2 * 0.75 + 1e-8) = 8/3.
    net = paddle.nn.Sequential(paddle.nn.Linear(1, 2), paddle.nn.Tanh(), paddle.nn.Linear(2, 1))
    lra = LRAnnealing(net, ref="res", preset="wang2021_code", loss_names=["res", "bc"])
    hat, d = lra.estimates(T([[3, -4, 1, 2], [0, 1, 2, 0]]), T([1, 2]))
    close(hat, [1.0, 8.0 / 3.0])
    close(d, [2.5, 0.75])  # row 0: (3.5 + 1.5) / 2


def test_lra_several_references_and_another_reference_row():
    # refs rows 0 and 1: numerator max(4, 6) = 6; row 2: mean|g| = 0.5, siam 6 / (2 * 0.5) = 6
    G = T([[3, 4], [6, 0], [0, 1]])
    for ref in ([0, 1], paddle.to_tensor([0, 1], dtype="int64")):
        hat, _ = lra_estimates(G, T([1, 1, 2]), ref, eps=0.0)
        close(hat, [1.0, 1.0, 6.0])
    # reference in row 1, lambdas [2, 1]: row 0 gets 4 / (2 * 0.5) = 4, the reference keeps its 1
    hat, _ = lra_estimates(T([[0, 1], [3, 4]]), T([2, 1]), 1, eps=0.0)
    close(hat, [4.0, 1.0])
    # an explicit mask of annealed terms wins over the one derived from `ref`
    hat, _ = lra_estimates(T([[3, 4], [0, 1]]), T([1, 2]), 0, free=paddle.to_tensor([False, False]), eps=0.0)
    close(hat, [1.0, 2.0])


def test_lra_eps_and_zero_gradient():
    # eps in the denominator: 4 / (2 * 0.5 + 1) = 2
    hat, _ = lra_estimates(T([[3, 4], [0, 1]]), T([1, 2]), 0, eps=1.0)
    close(hat, [1.0, 2.0])
    # a term with an identically zero gradient keeps its weight (not max / eps)
    hat, d = lra_estimates(T([[3, 4], [0, 0]]), T([1, 2.5]), 0)
    close(hat, [1.0, 2.5])
    close(d, [3.5, 0.0])


def test_lra_non_finite_gradients_and_the_class_skips_them():
    # Inf in a term's row: den = Inf, and the estimate 4 / (2 * Inf) is a finite 0: den tells it apart
    hat, d = lra_estimates(T([[3, 4], [math.inf, 1]]), T([1, 2]), 0, eps=0.0)
    close(hat, [1.0, 0.0])
    assert np.isinf(d.numpy()[1])
    # NaN in the residual's row: the numerator is NaN, so is every annealed estimate
    hat, _ = lra_estimates(T([[math.nan, 4], [0, 1]]), T([1, 2]), 0, eps=0.0)
    assert hat.numpy()[0] == 1.0 and np.isnan(hat.numpy()[1])
    # the class: finite G -> lambda = 0.9 * 1 + 0.1 * 4 / (1 * 0.5 + 1e-8) = 1.7; non-finite G -> kept
    lra = LRAnnealing(paddle.nn.Linear(1, 1), ref="res", loss_names=["res", "bc"], update_freq=1)
    for step, G in enumerate(([[3, 4], [math.inf, 1]], [[math.nan, 4], [0, 1]])):
        update_with_gradients(lra, T(G), step)  # the public call, its per-term gradients replaced by G
        assert lra.weights == {"res": 1.0, "bc": 1.0}
    update_with_gradients(lra, T([[3, 4], [0, 1]]), 2)
    assert lra.weights["res"] == 1.0 and lra.weights["bc"] == pytest.approx(1.7, rel=1e-6)


def test_lra_refuses_unknown_variant_and_layer_reduction_without_segments():
    with pytest.raises(ValueError, match="variant"):
        lra_estimates(T([[3, 4], [0, 1]]), T([1, 1]), 0, variant="paper")
    with pytest.raises(ValueError, match="segments"):
        lra_estimates(T([[3, 4], [0, 1]]), T([1, 1]), 0, reduction="layer_mean")


# --------------------------------------------------------------------------- NTK (JCP 2022)


def test_ntk_trace_weights_on_hand_made_traces():
    close(ntk_trace_weights(T([1, 3])), [4.0, 4.0 / 3.0])  # (1 + 3) / 1, (1 + 3) / 3
    close(ntk_trace_weights(T([2, 2, 4])), [4.0, 4.0, 2.0])  # sum 8
    # mean of the NTK diagonal: traces [2, 6] over counts [2, 3] = [1, 2] -> (1 + 2) / [1, 2] = [3, 1.5]
    close(ntk_trace_weights(T([2, 6]), counts=T([2, 3])), [3.0, 1.5])


@pytest.mark.parametrize("traces", [[1, 0], [1, -1], [1, math.inf], [math.nan, 1]])
def test_ntk_trace_weights_bad_trace_gives_all_nan(traces):
    assert np.isnan(ntk_trace_weights(T(traces)).numpy()).all()


def test_ntk_class_uses_the_function_and_keeps_weights_on_a_bad_trace():
    net = paddle.nn.Linear(1, 1)
    kernel = lambda m: m(paddle.ones([2, 1]))  # noqa: E731
    ntk = NTKWeighting(net, kernels={"res": kernel, "bc": kernel}, loss_names=["res", "bc"], update_freq=1)
    assert ntk.needs_gradients is False and NTKWeighting.needs_gradients is True  # trace mode: no G
    losses = {"res": T(1.0), "bc": T(2.0)}
    ntk.compute_traces = lambda: T([1, 3], "float64")
    ntk(losses, 0)
    assert ntk.weights["res"] == pytest.approx(4.0, rel=1e-6)
    assert ntk.weights["bc"] == pytest.approx(4.0 / 3.0, rel=1e-6)
    ntk.compute_traces = lambda: T([1, 0], "float64")
    with pytest.warns(UserWarning, match="non-finite or zero trace"):
        ntk(losses, 1)
    assert ntk.weights["res"] == pytest.approx(4.0, rel=1e-6)
    assert ntk.weights["bc"] == pytest.approx(4.0 / 3.0, rel=1e-6)


# --------------------------------------------------------------------------- GradNorm (Chen et al. 2018)

# (weights, norms, losses, initial_losses, alpha) -> (L_grad, dL_grad/dw), eps = 0:
GRADNORM = [
    # G = [2, 2], Gbar = 2; L~ = [1, 3], r = [0.5, 1.5]; targets 2 * [0.25, 2.25] = [0.5, 4.5];
    # diff = [1.5, -2.5] -> L_grad 4, grad = sign(diff) * norms = [1, -4]
    ([2, 0.5], [1, 4], [2, 3], [2, 1], 2.0, 4.0, [1.0, -4.0]),
    # G = [1, 3], Gbar = 2; L~ = [1, 4], r = [0.4, 1.6]; alpha 1: targets [0.8, 3.2];
    # diff = [0.2, -0.2] -> L_grad 0.4, grad [1, -3]
    ([1, 1], [1, 3], [1, 4], [1, 1], 1.0, 0.4, [1.0, -3.0]),
    # alpha 0: targets Gbar = [2, 2]; diff = [-1, 1] -> L_grad 2, grad [-1, 3]
    ([1, 1], [1, 3], [1, 4], [1, 1], 0.0, 2.0, [-1.0, 3.0]),
]


@pytest.mark.parametrize("w,norms,losses,init,alpha,l_grad,grad", GRADNORM)
def test_gradnorm_weight_gradient_on_hand_made_numbers(w, norms, losses, init, alpha, l_grad, grad):
    lg, g = gradnorm_weight_gradient(T(norms), T(losses), T(init), T(w), alpha, eps=0.0)
    close(lg, l_grad)
    close(g, grad)


def test_gradnorm_terms_without_initial_loss_have_ratio_one():
    # first case with L_2(0) not taken: L~ = [1, 1], r = [1, 1], targets [2, 2] = G: diff 0, sign 0
    lg, g = gradnorm_weight_gradient(T([1, 4]), T([2, 3]), T([2, 1]), T([2, 0.5]), 2.0, eps=0.0,
                                     has_initial=paddle.to_tensor([True, False]))
    close(lg, 0.0)
    close(g, [0.0, 0.0])


def test_gradnorm_eps_enters_both_ratios():
    # eps 1: L~ = [2/3, 3/2], mean 13/12, + 1 -> r = [8/25, 18/25]; alpha 1, Gbar 2: targets [16/25, 36/25]
    # G = [2, 2]: diff = [34/25, 14/25] -> L_grad 48/25, grad [1, 4]
    lg, g = gradnorm_weight_gradient(T([1, 4]), T([2, 3]), T([2, 1]), T([2, 0.5]), 1.0, eps=1.0)
    close(lg, 48.0 / 25.0)
    close(g, [1.0, 4.0])


def test_gradnorm_non_finite_norms_give_zero_gradient_entries():
    # NaN norm: G_1 and Gbar NaN, every target NaN -> every entry NaN -> replaced by 0; L_grad NaN
    lg, g = gradnorm_weight_gradient(T([math.nan, 4]), T([2, 3]), T([2, 1]), T([2, 0.5]), 2.0, eps=0.0)
    assert np.isnan(lg.numpy())
    close(g, [0.0, 0.0])
    # Inf norm: G = [Inf, 1], Gbar = Inf, r = [1, 1], targets [Inf, Inf]; diff = [NaN, -Inf],
    # sign(diff) * norms = [NaN, -1] -> [0, -1]
    lg, g = gradnorm_weight_gradient(T([math.inf, 1]), T([1, 1]), T([1, 1]), T([1, 1]), 1.0, eps=0.0)
    assert np.isnan(lg.numpy())
    close(g, [0.0, -1.0])


def test_gradnorm_class_gives_the_function_bit_for_bit():
    net = paddle.nn.Sequential(paddle.nn.Linear(1, 3), paddle.nn.Tanh(), paddle.nn.Linear(3, 1))
    bal = GradNormBalancer(net, loss_names=["res", "bc"], alpha=1.5)
    dtype = bal.loss_weights.dtype
    bal._capture_initial(paddle.to_tensor([2.0, 3.0]).astype(dtype))
    bal.loss_weights.set_value(paddle.to_tensor([1.25, 0.75]).astype(dtype))
    values = [paddle.to_tensor(1.0), paddle.to_tensor(6.0)]
    norms = paddle.to_tensor([0.3, 2.0]).astype(dtype)
    lg, g = bal.weight_gradient(values, norms)
    lg2, g2 = gradnorm_weight_gradient(norms, paddle.to_tensor([1.0, 6.0]).astype(dtype), bal.initial_losses,
                                       bal.loss_weights, 1.5, 1e-8)
    assert lg.numpy().tobytes() == lg2.numpy().tobytes()
    assert g.numpy().tobytes() == g2.numpy().tobytes()
    assert float(bal.last_grad_norm_loss) == float(lg)


# --------------------------------------------------------------------------- class-creation check


def test_the_older_hooks_and_a_class_without_a_way_in_are_refused_at_class_creation():
    with pytest.raises(TypeError, match=r"ReadsG defines the older hook\(s\) \['_update_from_gradients'\]"):
        type("ReadsG", (Balancer,), {"needs_gradients": True, "_update_from_gradients": lambda self, losses, G: None})
    with pytest.raises(TypeError, match=r"OwnDirection defines the older hook\(s\) \['_direction'\]"):
        type("OwnDirection", (Balancer,), {"_total": lambda self, values, update: None,
                                           "_direction": lambda self, G, w: G.sum(axis=0)})
    with pytest.raises(TypeError, match=r"OwnState defines the older hook\(s\) \['_create_state'\]"):
        type("OwnState", (Balancer,), {"_total": lambda self, values, update: None,
                                       "_create_state": lambda self, k: None})
    with pytest.raises(TypeError, match=r"NoHook must define `update\(self, losses, G, state\)`"):
        type("NoHook", (Balancer,), {"needs_gradients": True})
    # on the contract, or inheriting it: fine
    type("MyLRA", (LRAnnealing,), {"update": lambda self, losses, G, state: (state["weights"], {})})
    type("LossOnly", (Balancer,), {"update": lambda self, losses, G, state: (losses, {})})
    type("OwnTotal", (Balancer,), {"_total": lambda self, values, update: values[0]})
    with pytest.raises(TypeError, match="older hook"):  # a method on the contract cannot take the old way in
        type("OldLRA", (LRAnnealing,), {"_update_from_gradients": lambda self, losses, G: None})
    # every balancer of the package reads G exactly when it declares the flag
    for cls in (ppb.LRAnnealing, ppb.NTKWeighting, ppb.GradNormBalancer, ppb.GradNormRatio, ppb.PCGrad,
                ppb.ConFIG, ppb.UPGrad):
        assert cls.needs_gradients is True
    for cls in (ppb.Sum, ppb.ReLoBRaLo, ppb.SoftAdapt, ppb.UncertaintyWeighting):
        assert not cls.needs_gradients
