"""The method contract (contract.py, Balancer.__init_subclass__): registry, declared state, pure update, the
base's guard and counters, old checkpoints, and every list of methods held against the registry."""

import os
import re

import numpy as np
import paddle
import pytest

import paddle_pinn_balance
from paddle_pinn_balance import Balancer, ReLoBRaLo, SoftAdapt
from paddle_pinn_balance.contract import REGISTRY, Slot, method_names, register

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_registered_method_is_in_the_docs_table_and_exported():
    with open(os.path.join(ROOT, "docs", "index.md"), encoding="utf-8") as f:
        text = f.read()
    rows = [line.split("|")[2] for line in text.split("## The methods", 1)[1].splitlines() if line.startswith("| [")]
    documented = set(re.findall(r"`([a-z_]+)`", " ".join(re.findall(r"\(([^()]*)\)", " ".join(rows)))))
    documented.add("sum")  # the baseline, named below the table
    assert "`Sum`, YAML `sum`" in text
    assert documented == set(method_names())
    for builder, _ in REGISTRY.values():
        cls = builder.method_class
        assert getattr(paddle_pinn_balance, cls.__name__) is cls
        assert cls.__name__ in paddle_pinn_balance.__all__


#: how the README's first paragraph names each registered method (a new method must be named there too)
README_NAMES = {"lr_annealing": "learning-rate annealing", "ntk": "NTK trace weighting", "grad_norm": "GradNorm",
                "grad_norm_ratio": "grad-norm ratios", "relobralo": "ReLoBRaLo", "softadapt": "SoftAdapt",
                "dwa": "Dynamic Weight Average", "uncertainty": "uncertainty weighting", "pcgrad": "PCGrad",
                "conflict_free": "ConFIG", "m_conflict_free": "M-ConFIG", "upgrad": "UPGrad"}


def test_the_readme_names_every_registered_method():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        intro = " ".join(f.read().split("\n\n")[2].split())  # the paragraph that lists the methods
    assert set(README_NAMES) == set(method_names()) - {"sum"}
    missing = [n for n, words in README_NAMES.items() if words not in intro]
    assert not missing, missing


def test_the_loop_idiom_and_data_parallel_tests_cover_every_registered_method():
    import test_distributed
    import test_loops

    surgery = {n for n in method_names() if REGISTRY[n][0].method_class.__module__ == "paddle_pinn_balance.surgery"}
    assert surgery == {"pcgrad", "conflict_free", "upgrad", "m_conflict_free"}
    assert set(test_loops.METHOD_OF_KIND) == set(test_loops.BALANCERS)
    # the total's gradient is w^T G with the reported weights for every weighting; surgery's c^T G is checked in
    # the loops of tests/test_surgery.py
    assert set(test_loops.METHOD_OF_KIND.values()) == set(method_names()) - surgery
    assert set(test_distributed.METHOD_OF_KIND) == set(test_distributed.KINDS)
    assert set(test_distributed.METHOD_OF_KIND.values()) == set(method_names())


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register("softadapt")(type("Other", (), {"__init__": lambda self: None}))
    with pytest.raises(ValueError, match="lower-case identifier"):
        register("Soft Adapt")


def _method(**body):
    return type("M", (Balancer,), {"history": 1, "state_spec": lambda self, k: {"prev": Slot([k], 0.0)}, **body})


def test_the_contract_is_checked_when_the_class_is_created():
    with pytest.raises(TypeError, match=r"update\(self, losses, G, state\)"):
        _method(update=lambda self, losses, state: None)
    with pytest.raises(TypeError, match="older hook"):
        _method(update=lambda self, losses, G, state: None, _update=lambda self, values: None)
    with pytest.raises(TypeError, match="history"):
        _method(update=lambda self, losses, G, state: None, history=-1)
    with pytest.raises(TypeError, match=r"N must define `update\(self, losses, G, state\)`"):
        type("N", (Balancer,), {})


def test_a_slot_named_like_base_state_and_an_undeclared_result_are_refused():
    bad = _method(update=lambda self, losses, G, state: (losses, {}),
                  state_spec=lambda self, k: {"lambdas": Slot([k])})
    with pytest.raises(TypeError, match="taken by the base"):
        bad(loss_names=["a", "b"])
    stray = _method(update=lambda self, losses, G, state: (losses, {"other": losses}))
    with pytest.raises(KeyError, match="not a slot"):
        stray()({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(2.0)}, 0)


def test_the_base_guards_every_slot_and_counts_taken_losses():
    seen = []

    def update(self, losses, G, state):
        seen.append(None if state["taken"] is None else state["taken"].numpy().tolist())
        return losses, {"prev": losses}

    bal = _method(update=update)(check_every=1)
    bal({"a": paddle.to_tensor(1.0), "b": paddle.to_tensor(2.0)}, 0)
    with pytest.warns(Warning, match="non-finite"):
        bal({"a": paddle.to_tensor(float("nan")), "b": paddle.to_tensor(3.0)}, 1)
    assert bal.prev.numpy().tolist() == [1.0, 2.0] and bal.weights == {"a": 1.0, "b": 2.0}
    bal({"a": paddle.to_tensor(4.0), "b": paddle.to_tensor(5.0)}, 2)
    assert seen == [[0, 0], None, None]  # the host read the counters after the first accepted update
    assert bal.prev.numpy().tolist() == [4.0, 5.0] and bal.initialised.numpy().tolist() == [1, 1]


SEQ = [[1.0, 2.0], [0.5, 2.1], [0.4, 1.5], [0.41, 1.0], [0.2, 0.9]]


@pytest.mark.parametrize("make", [lambda: SoftAdapt(beta=2.0), lambda: ReLoBRaLo(seed=3, expected_rho=0.5)])
@pytest.mark.parametrize("taken", [True, False])
def test_an_old_checkpoint_with_boolean_flags_resumes_bit_exactly(make, taken):
    """Before the contract, `initialised` was a bool per term; it loads as the count 0 / 1."""
    def run(bal, seq, start):
        for t, L in enumerate(seq, start):
            bal({"res": paddle.to_tensor(L[0]), "bc": paddle.to_tensor(L[1])}, t)
        return bal.weights

    whole = make()
    ref = run(whole, SEQ, 0)
    first = make()
    n = 2 if taken else 0
    run(first, SEQ[:n], 0)
    if not taken:
        first._set_names(["res", "bc"])  # state before any call
    state = {k: v.numpy().copy() for k, v in first.state_dict().items()}
    state["initialised"] = state["initialised"].astype(bool)  # the old format
    second = make()
    second.set_state_dict(state)
    assert second.initialised.dtype == paddle.int64
    assert run(second, SEQ[n:], n) == ref
    np.testing.assert_array_equal(second.initialised.numpy(), [1, 1])


def test_the_options_table_matches_the_constructors():
    """docs/methods/index.md's table of shared options, row by row, against the keys `build_balancer` accepts."""
    from paddle_pinn_balance.config import allowed_keys

    with open(os.path.join(ROOT, "docs", "methods", "index.md"), encoding="utf-8") as f:
        lines = f.read().split("<!-- options-table", 1)[1].splitlines()[1:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    header, body = rows[0], rows[2:]
    options = [h.strip("`") for h in header[1:]]
    table = {r[0].strip("`"): {o for o, mark in zip(options, r[1:]) if mark == "yes"} for r in body}
    assert sorted(table) == method_names()
    for name, accepted in table.items():
        keys = set(allowed_keys(name))
        assert accepted == keys & set(options), name
        assert all(r[1 + i] in ("yes", "-") for r in body for i in range(len(options)))


def test_a_gradient_reading_method_on_the_contract():
    """update(losses, G, state) with needs_gradients: G is the per-term gradients, the third element the guard's
    statistic; the total's gradient is w^T G (no second backward)."""
    from paddle_pinn_balance.gradients import trainable_parameters

    class Ratio(Balancer):
        needs_gradients = True

        def __init__(self, model):
            self._params = trainable_parameters(model)
            super().__init__()

        def update(self, losses, G, state):
            norms = paddle.linalg.norm(G, axis=1)
            return norms.max() / norms, {}, norms

    paddle.seed(0)
    net = paddle.nn.Linear(1, 1)
    bal = Ratio(net)
    x = paddle.ones([4, 1])
    total = bal({"a": net(x).mean(), "b": (3 * net(x)).mean()}, 0)
    total.backward()
    assert [round(w, 6) for w in bal.weights.values()] == [3.0, 1.0]
    expect = 6 * paddle.grad((net(x)).mean(), net.weight)[0].numpy()  # 3 * a + 1 * (3 a)
    np.testing.assert_allclose(net.weight.grad.numpy(), expect, rtol=1e-6)
    net.clear_gradients()
    with pytest.warns(Warning, match="non-finite gradient"):
        bal.check_every = 1
        bal({"a": net(x).mean() * float("inf"), "b": (3 * net(x)).mean()}, 1).backward()
    assert [round(w, 6) for w in bal.weights.values()] == [3.0, 1.0]  # the update was rejected


def test_the_default_builder_passes_the_model_when_the_constructor_takes_one():
    from paddle_pinn_balance.config import build_balancer

    net = paddle.nn.Linear(1, 1)
    assert build_balancer({"name": "grad_norm_ratio", "update_freq": 1}, net)._params[0] is net.weight
    assert build_balancer({"name": "dwa"}, net).loss_names is None
