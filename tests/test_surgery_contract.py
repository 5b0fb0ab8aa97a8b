"""Gradient surgery on the method contract: a weighting of the Gram matrix composed with one combiner (c^T G), the
class-creation check of direction methods, declared state and checkpoints in the layout of earlier versions."""

import numpy as np
import paddle
import pytest
from test_surgery import _hand_made, _Linear, _run_mconfig, np_mconfig

from paddle_pinn_balance.contract import Slot, combine
from paddle_pinn_balance.surgery import MConFIG, PCGrad, Surgery

# --------------------------------------------------------------------------- the class-creation check


def _direction_class(name="D", **body):
    body.setdefault("weighting", lambda self, gram, state: (paddle.ones([gram.shape[0]], gram.dtype), {}))
    return type(name, (Surgery,), body)


def test_a_well_formed_direction_method_is_accepted():
    _direction_class()
    type("OwnUpdate", (Surgery,), {"update": lambda self, losses, G, state: (G.sum(axis=0), {}, G.sum(axis=1))})
    type("MyPCGrad", (PCGrad,), {"seed_offset": 1})  # a subclass of a method, changing nothing of the machinery


@pytest.mark.parametrize("body,match", [
    ({"_direction": lambda self, G, w: G.sum(axis=0)},
     r"D overrides \['_direction'\] of the direction machinery \(Surgery\)"),
    ({"_total": lambda self, values, update: None}, r"D overrides \['_total'\] of the direction machinery"),
    ({"_apply_update": lambda self, losses, G: None}, r"D overrides \['_apply_update'\] of the direction machinery"),
    ({"_term_gradients": lambda self, values: None}, r"D overrides \['_term_gradients'\]"),
    ({"_update_from_gradients": lambda self, losses, G: None},  # the dummy hook of earlier versions
     r"D defines `update` and the older hook\(s\) \['_update_from_gradients'\]"),
    ({"needs_gradients": False}, "D is a direction method .* `needs_gradients` must stay True"),
    ({"weighting": lambda self, G: None}, r"D.weighting must be `weighting\(self, gram, state\)`; got \(self, G\)"),
    ({"update": lambda self, losses, state: None}, r"D.update must be `update\(self, losses, G, state\)`"),
    ({"counter": 3}, "D.counter must be None or the name of an int64 \\[1\\] slot; got 3"),
])
def test_a_malformed_direction_method_is_refused_when_defined(body, match):
    with pytest.raises(TypeError, match=match):
        _direction_class(**body)


def test_a_direction_method_without_weighting_or_update_is_refused():
    with pytest.raises(TypeError, match=r"Empty must define `weighting\(self, gram, state\)"):
        type("Empty", (Surgery,), {})


def test_a_counter_that_is_not_a_slot_and_a_stray_slot_are_refused_at_the_first_update():
    net, x = paddle.nn.Linear(2, 1), paddle.rand([4, 2])
    no_slot = _direction_class("NoSlot", counter="draws")(net)
    with pytest.raises(TypeError, match="NoSlot.counter 'draws' is not a slot of its state_spec"):
        no_slot({"a": net(x).mean(), "b": (net(x) ** 2).mean()}, 0)
    stray = _direction_class("Stray", weighting=lambda self, gram, state: (gram.sum(axis=0), {"other": gram}))(net)
    with pytest.raises(KeyError, match="'other', not a slot"):
        stray({"a": net(x).mean(), "b": (net(x) ** 2).mean()}, 0)


# --------------------------------------------------------------------------- a direction method, written here


class Turns(Surgery):
    """One term's gradient per update, in turn (term ``count % K``), scaled by a running count of the turns seen:
    ``c = e_i * seen_i``; the counter, a declared slot, and one guarded slot."""

    counter = "turn"

    def state_spec(self, k):
        return {"turn": Slot([1], 0, "int64"), "seen": Slot([k], 0.0)}

    def weighting(self, gram, state):
        k = gram.shape[0]
        onehot = paddle.to_tensor(np.arange(k) == state["turn"] % k).astype(gram.dtype)
        seen = state["seen"] + onehot
        return onehot * seen, {"seen": seen}


def _grads(net, losses):
    rows = []
    for v in losses.values():
        rows.append(np.concatenate([g.numpy().ravel() for g in paddle.grad(v, net.parameters(), retain_graph=True)]))
    return np.stack(rows).astype(np.float64)


def test_a_direction_method_delivers_c_transpose_g_and_its_state_resumes():
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(2, 5), paddle.nn.Tanh(), paddle.nn.Linear(5, 1))
    xs = [paddle.rand([6, 2]) for _ in range(3)]

    def losses():
        return {f"t{i}": ((net(x) - i) ** 2).mean() for i, x in enumerate(xs)}

    bal = Turns(net)
    seen = np.zeros(3)
    for step in range(5):
        ls = losses()
        G = _grads(net, ls)
        i = step % 3
        seen[i] += 1
        total = bal(ls, step)
        np.testing.assert_allclose(float(total), sum(float(v) for v in ls.values()), rtol=1e-6)  # weights stay 1
        total.backward()
        got = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
        np.testing.assert_allclose(got, seen[i] * G[i], rtol=1e-5, atol=1e-7)  # d = c^T G, c = e_i * seen_i
        net.clear_gradients()
    assert int(bal.turn.numpy()[0]) == 5 and bal.seen.numpy().tolist() == [2.0, 2.0, 1.0]
    assert bal.weights == {"t0": 1.0, "t1": 1.0, "t2": 1.0}
    again = Turns(net)
    again.set_state_dict(bal.state_dict())  # the host learns the counter from the checkpoint
    delivered = []
    for b in (bal, again):
        b(losses(), 5).backward()
        delivered.append([p.grad.numpy().copy() for p in net.parameters()])
        net.clear_gradients()
    for a, b in zip(*delivered):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(bal.seen.numpy(), again.seen.numpy())
    state = {k: v.numpy().copy() for k, v in bal.state_dict().items()}
    state["turn"] = np.array([-1], dtype=np.int64)
    with pytest.raises(ValueError, match="turn"):
        Turns(net).set_state_dict(state)


def test_a_non_finite_statistic_keeps_every_slot_and_advances_the_counter():
    net, x = paddle.nn.Linear(2, 1), paddle.rand([4, 2])
    bal = Turns(net, check_every=0)
    bal({"a": net(x).mean(), "b": (net(x) ** 2).mean()}, 0).backward()
    bal({"a": net(x).mean() * float("nan"), "b": (net(x) ** 2).mean()}, 1).backward()
    assert bal.seen.numpy().tolist() == [1.0, 0.0]  # the rejected update changed no slot
    assert int(bal.turn.numpy()[0]) == 2  # the counter counts update steps
    with pytest.warns(Warning, match=r"non-finite gradient for term\(s\) \['a'\]"):
        assert bal.check_terms() == {"a": (True, False), "b": (False, False)}


def test_combine_is_c_transpose_rows():
    rng = np.random.default_rng(0)
    c, R = rng.normal(size=3), rng.normal(size=(3, 7))
    np.testing.assert_allclose(combine(paddle.to_tensor(c), paddle.to_tensor(R)).numpy(), c @ R, rtol=1e-12)


# --------------------------------------------------------------------------- M-ConFIG: the base's eps, its state


def test_mconfig_eps_is_the_base_eps_and_enters_the_direction():
    grads = _hand_made(2, 5, 6, seed=3)
    model = _Linear(5)
    bal = MConFIG(model, eps=0.5, beta_1=0.8, beta_2=0.99)
    assert bal.eps == 0.5 and "eps=0.5" in repr(bal)
    got = _run_mconfig(bal, model, grads)
    want, _ = np_mconfig(grads, 0.8, 0.99, eps=0.5)
    other, _ = np_mconfig(grads, 0.8, 0.99)
    for a, b, c in zip(got[1:], want[1:], other[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)
        assert not np.allclose(a, c, rtol=1e-3)  # eps is read: the default would give another direction
    with pytest.raises(TypeError, match="m_eps"):
        MConFIG(model, m_eps=1e-8)  # never a keyword: nothing to keep as an alias


def test_mconfig_state_is_declared_once():
    model = _Linear(4)
    bal = MConFIG(model, loss_names=["a", "b", "c"])
    spec = bal.state_spec(3)
    assert {n: list(s.shape) for n, s in spec.items()} == {
        "momenta": [3, 4], "momentum_counts": [3], "pseudo_momentum": [4], "second_momentum": [4],
        "direction_count": [1], "mconfig_turn": [1]}
    for name, slot in spec.items():
        assert list(getattr(bal, name).shape) == list(slot.shape), name
    extra = paddle.create_parameter([2], "float64")
    bal.add_parameters([extra])  # before the first update: the declared state is sized again
    assert list(bal.momenta.shape) == [3, 6] and list(bal.second_momentum.shape) == [6]


# --------------------------------------------------------------------------- checkpoints of earlier versions

#: the keys and dtypes of a checkpoint before the methods were on the contract (0.x, `_extra_state_shapes`)
OLD_KEYS = {
    "pcgrad": {"lambdas": "float64", "last_update_step": "int64", "method_utf8": "uint8", "names_utf8": "uint8",
               "num_calls": "int64", "num_updates": "int64", "pcgrad_draws": "int64"},
    "m_conflict_free": {"direction_count": "float64", "lambdas": "float64", "last_update_step": "int64",
                        "mconfig_turn": "int64", "method_utf8": "uint8", "momenta": "float64",
                        "momentum_counts": "float64", "names_utf8": "uint8", "num_calls": "int64",
                        "num_updates": "int64", "pseudo_momentum": "float64", "second_momentum": "float64"},
}


def _make(name, model):
    return PCGrad(model, seed=4) if name == "pcgrad" else MConFIG(model, beta_1=0.7)


@pytest.mark.parametrize("older", [False, True])
@pytest.mark.parametrize("name", list(OLD_KEYS))
def test_a_checkpoint_in_the_old_layout_resumes_bit_exactly(name, older):
    """The state_dict is rebuilt key by key in the layout of the earlier versions (`older`: also without the
    `method_utf8` / `last_update_step` of 0.1.0), as plain numpy arrays, then loaded into a fresh balancer."""
    grads = _hand_made(3, 5, 9, seed=7)
    model = _Linear(5)
    whole = _make(name, model)
    ref = _run_mconfig(whole, model, grads)
    first = _make(name, model)
    _run_mconfig(first, model, grads[:5])
    current = first.state_dict()
    keys = OLD_KEYS[name]
    assert {k: str(v.dtype).split(".")[-1] for k, v in current.items()} == keys  # the layout did not change
    old = {k: np.array(current[k].numpy(), dtype=dtype) for k, dtype in keys.items()}
    if older:
        del old["method_utf8"], old["last_update_step"]
    resumed = _make(name, model)
    resumed.set_state_dict(old)
    got = _run_mconfig(resumed, model, grads[5:], start=5)
    for a, b in zip(got, ref[5:]):
        np.testing.assert_array_equal(a, b)
    assert resumed.state_dict().keys() == whole.state_dict().keys()
    for k, v in resumed.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), whole.state_dict()[k].numpy(), err_msg=k)
