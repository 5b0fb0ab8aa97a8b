"""The diagnosis (issue 27): statistics against hand-made numbers, the verdict on built cases, recording that
leaves training bit for bit unchanged, the CLI's files."""

import json
import math

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import diagnose as dg
from paddle_pinn_balance.cli import main
from paddle_pinn_balance.diagnose_run import diagnose_problem, record_steps
from paddle_pinn_balance.per_point import per_point_sq_grad_norms
from paddle_pinn_balance.problems import get_problem
from paddle_pinn_balance.recorder import Diagnosis
from paddle_pinn_balance.train import train

# --------------------------------------------------------------------------- statistics on hand-made arrays


def test_log_histogram_counts_by_hand():
    values = np.array([0.0, 1e-3, -2e-3, 0.5, -10.0, 0.05, np.nan])
    edges = dg.histogram_edges([values])
    assert edges[0] == -3 and edges[-1] == 1 and len(edges) == 4 * 4 + 1  # whole decades, 4 bins each
    counts, zeros = dg.log_histogram(values, edges)
    expected = np.zeros(16, dtype=int)
    # log10|v|: -3 -> bin 0; -2.70 -> bin 1 ([-2.75, -2.5)); -0.30 -> bin 10 ([-0.5, -0.25)); 1 -> bin 15 (the
    # last bin is closed); -1.30 -> bin 6 ([-1.5, -1.25))
    for b in (0, 1, 10, 15, 6):
        expected[b] += 1
    assert counts.tolist() == expected.tolist()
    assert zeros == 2  # the zero and the NaN
    assert counts.sum() + zeros == values.size


def test_histogram_edges_span_every_array_and_all_zero_arrays():
    edges = dg.histogram_edges([np.array([3e-5, 0.0]), np.array([250.0])], per_decade=2)
    assert edges[0] == -5 and edges[-1] == 3 and len(edges) == 17
    assert dg.histogram_edges([np.zeros(4)]).tolist() == [-1.0, 0.0]
    counts, zeros = dg.log_histogram(np.zeros(4), [-1.0, 0.0])
    assert counts.tolist() == [0] and zeros == 4


def test_norms_ratios_and_cosines_by_hand():
    G = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0], [0.0, 0.0]])
    assert np.allclose(dg.grad_norms(G), [1.0, 1.0, math.sqrt(2.0), 0.0])
    r = dg.log_scale_ratios(dg.grad_norms(G), 0)
    assert r[0] == 0 and r[1] == 0 and np.isclose(r[2], 0.5 * math.log10(2.0)) and r[3] == -np.inf
    c = dg.cosines(G)
    assert np.isclose(c[0, 1], 0.0) and np.isclose(c[0, 2], -1 / math.sqrt(2)) and np.isclose(c[1, 2], 1 / math.sqrt(2))
    assert np.allclose(np.diag(c)[:3], 1.0) and np.isnan(c[3, 0])
    assert np.all(np.isnan(dg.log_scale_ratios([0.0, 1.0], 0)))  # a zero reference: no ratio
    # LRA: max|g_ref| / mean|g_i| (row 2: max 1; means 0.5, 0.5, 1, 0)
    assert np.allclose(dg.lra_estimates(G, 2)[:3], [2.0, 2.0, 1.0]) and dg.lra_estimates(G, 2)[3] == np.inf


def test_kernel_spectrum_of_known_kernels():
    assert np.allclose(dg.kernel_spectrum([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), [16.0, 9.0])
    assert np.allclose(dg.kernel_spectrum([[1.0, 1.0], [1.0, 1.0]]), [4.0, 0.0])  # K = [[2, 2], [2, 2]]
    J = np.random.default_rng(0).normal(size=(5, 12))
    assert np.allclose(dg.kernel_spectrum(J), np.linalg.svd(J, compute_uv=False) ** 2)
    assert np.isclose(dg.kernel_spectrum(J).sum(), np.trace(J @ J.T))


def test_reference_term():
    assert dg.reference_term(["u", "ut", "res"]) == "res"
    assert dg.reference_term(["task1", "task2"]) == "task1"
    with pytest.raises(ValueError):
        dg.reference_term([])


# --------------------------------------------------------------------------- the verdict on built cases


class Direct(paddle.nn.Layer):
    """One parameter vector w: the loss L = a . w has the gradient a exactly."""

    def __init__(self, n):
        super().__init__()
        self.w = self.create_parameter([n], dtype=DTYPE)


def diagnosis_of(grads, steps=3, **kw):
    """A Diagnosis of losses whose gradients are the given rows, at every step of ``steps``."""
    net = Direct(len(next(iter(grads.values()))))
    diag = Diagnosis(net, every=1, **kw)
    for step in range(steps):
        diag({n: (paddle.to_tensor(np.asarray(a), dtype=DTYPE) * net.w).sum() for n, a in grads.items()}, step)
    return diag


def unit(angle_deg, scale=1.0):
    t = math.radians(angle_deg)
    return [scale * math.cos(t), scale * math.sin(t), 0.0]


def test_verdict_imbalanced():
    diag = diagnosis_of({"res": unit(0), "bc": unit(80, 10 ** -2.3)})
    rec = diag.records[-1]
    assert np.isclose(rec["log10_ratio"]["bc"], -2.3) and np.isclose(rec["cosine"][0][1], math.cos(math.radians(80)))
    v = diag.verdict()
    assert v["kind"] == "imbalance" and v["weighting_helps"]
    assert "term bc's gradients are 10^-2.3 of the residual's" in v["text"]
    assert "lr_annealing (preset wang2021_code)" in v["text"]


def test_verdict_conflicting():
    diag = diagnosis_of({"res": unit(0), "ic": unit(127, 2.0), "bc": unit(60, 0.5)})  # cos(127 deg) = -0.60
    v = diag.verdict()
    assert v["kind"] == "conflict" and v["weighting_helps"]
    assert "terms res and ic conflict: cosine -0.60" in v["text"] and "pcgrad / conflict_free" in v["text"]


def test_verdict_opposed_and_balanced():
    v = diagnosis_of({"res": unit(0), "ic": unit(170, 3.0), "bc": unit(90, 1e-2)}).verdict()
    assert v["kind"] == "opposed+imbalance" and not v["weighting_helps"]
    assert "terms res and ic are opposed: cosine -0.98" in v["text"] and "balancing will not help" in v["text"]
    v = diagnosis_of({"res": unit(0), "u": unit(60), "ut": unit(-120)}).verdict()  # two data terms opposed
    assert v["kind"] == "conflict" and "terms u and ut conflict: cosine -1.00" in v["text"]
    v = diagnosis_of({"res": unit(0), "bc": unit(90, 2.0)}).verdict()
    assert v["kind"] == "balanced" and not v["weighting_helps"]
    assert "no imbalance" in v["text"] and "balancing will not help" in v["text"]


def test_verdict_reads_medians_and_thresholds():
    summary = {"terms": ["res", "bc"], "ref": "res", "steps": [0, 1, 2],
               "log10_ratio": {"res": 0.0, "bc": -0.9}, "cosine": {"res|bc": -0.1}, "log10_trace_ratio": None}
    assert dg.verdict(summary)["kind"] == "balanced"
    assert dg.verdict(summary, {"imbalance_decades": 0.5})["kind"] == "imbalance"
    assert "grad_norm_ratio" in dg.verdict(dict(summary, ref="task1", terms=["task1", "bc"],
                                                log10_ratio={"task1": 0.0, "bc": 2.0}))["remedy"]
    recs = [{"step": s, "terms": ["res", "bc"], "ref": "res", "log10_ratio": {"res": 0.0, "bc": b},
             "cosine": [[1.0, c], [c, 1.0]], "ntk": None}
            for s, b, c in ((0, -3.0, 0.9), (1, -0.5, -0.9), (2, -2.0, 0.1))]
    s = dg.summarize(recs)
    assert s["log10_ratio"]["bc"] == -2.0 and s["cosine"]["res|bc"] == pytest.approx(0.1)


# --------------------------------------------------------------------------- recording from a model


def test_recorded_numbers_match_numpy_and_balancer_is_called():
    paddle.seed(1)
    net = paddle.nn.Sequential(paddle.nn.Linear(2, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
    x = paddle.to_tensor(np.random.default_rng(0).uniform(size=(16, 2)), dtype=DTYPE)

    class Count:
        calls, weights = 0, {"a": 1.0, "b": 1.0}

        def __call__(self, losses, step):
            Count.calls += 1
            return losses["a"] + losses["b"]

    diag = Diagnosis(net, balancer=Count(), steps=[1])
    for step in range(3):
        losses = {"a": net(x).pow(2).mean(), "b": (net(x) - 1).abs().mean()}
        total = diag(losses, step)
    assert Count.calls == 3 and [r["step"] for r in diag.records] == [1] and total is not None
    rec = diag.records[0]
    ga = [g.numpy().ravel() for g in paddle.grad(losses["a"], net.parameters(), retain_graph=True)]
    gb = [g.numpy().ravel() for g in paddle.grad(losses["b"], net.parameters())]
    # (net unchanged between step 1 and 2: no optimizer) the recorded numbers are numpy's on these gradients
    Ga, Gb = np.concatenate(ga), np.concatenate(gb)
    assert np.isclose(rec["grad_norm"]["a"], np.linalg.norm(Ga), rtol=1e-5)
    assert np.isclose(rec["cosine"][0][1], Ga @ Gb / np.linalg.norm(Ga) / np.linalg.norm(Gb), rtol=1e-5)
    assert [ly["name"] for ly in rec["layers"]] == ["0.weight", "2.weight"]  # the weight matrices
    first = rec["layers"][0]
    counts, zeros = dg.log_histogram(ga[0], first["edges"])
    assert first["counts"]["a"] == counts.tolist() and first["zeros"]["a"] == zeros
    assert sum(first["counts"]["b"]) + first["zeros"]["b"] == 16
    assert rec["weights"] == {"a": 1.0, "b": 1.0}


def test_ntk_trace_and_spectrum_of_a_linear_model():
    """f(x) = w . x + b: the per-point Jacobian is [x, 1], the kernel X X^T + 1."""
    net = paddle.nn.Linear(3, 1)
    X = np.random.default_rng(1).normal(size=(10, 3))
    xt = paddle.to_tensor(X, dtype=DTYPE)
    diag = Diagnosis(net, every=1, kernels={"u": lambda m: m(xt)}, ntk_points=10)
    diag({"u": net(xt).pow(2).mean()}, 0)
    ntk = diag.records[0]["ntk"]
    K = X @ X.T + 1.0
    assert np.isclose(ntk["trace"]["u"], np.trace(K), rtol=1e-5)
    assert np.allclose(ntk["eigenvalues"]["u"], np.sort(np.linalg.eigvalsh(K))[::-1], rtol=1e-4, atol=1e-4)
    assert ntk["points"]["u"] == 10 and ntk["subset"]["u"] == 10


def test_ntk_subset_spectrum_sums_to_the_subset_trace():
    problem = get_problem("helmholtz", layers=[2, 8, 8, 1], batch_size=24, test_n=4)
    model = problem.build_model(0)
    kernels = problem.kernels(problem.sample(np.random.default_rng(3)))
    diag = Diagnosis(model, every=1, kernels=kernels, ntk_points=6)
    diag.record(problem.losses(model, problem.sample(np.random.default_rng(4))), 0)
    ntk = diag.records[0]["ntk"]
    for name, kernel in kernels.items():
        sq = per_point_sq_grad_norms(model, kernel).numpy()
        idx = np.unique(np.linspace(0, sq.size - 1, 6).round().astype(int))
        assert np.isclose(ntk["trace"][name], sq.sum(), rtol=1e-5)
        assert np.isclose(sum(ntk["eigenvalues"][name]), sq[idx].sum(), rtol=1e-4)


def test_bad_arguments():
    net = paddle.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="`steps` or `every`"):
        Diagnosis(net, steps=[0], every=2)
    with pytest.raises(ValueError, match="no term"):
        Diagnosis(net, names=["res", "bc"]).record({"res": net(paddle.ones([1, 1])).sum()}, 0)
    with pytest.raises(ValueError, match="paddle.nn.Layer"):
        Diagnosis([net])
    with pytest.raises(ValueError, match="no recorded steps"):
        Diagnosis(net).verdict()
    assert record_steps(200, 5) == [0, 50, 100, 149, 199] and record_steps(1, 5) == [0]


# --------------------------------------------------------------------------- training unchanged, bit for bit

SMALL = {"layers": [2, 12, 12, 1], "batch_size": 32, "test_n": 8}


@pytest.mark.parametrize("config", [{"name": "lr_annealing", "preset": "wang2021_code"},
                                    {"name": "ntk", "update_freq": 5}, {"name": "pcgrad", "seed": 0}])
def test_recording_leaves_training_bit_for_bit_unchanged(config):
    problem = get_problem("helmholtz", **SMALL)
    plain = train(problem, config, iters=12, seed=0, progress=False)
    diag = diagnose_problem(problem, config, steps=12, seed=0, records=4, ntk_points=8)
    assert [r["step"] for r in diag.records] == [0, 4, 7, 11]
    for a, b in zip(plain["model"].parameters(), diag.model.parameters()):
        assert np.array_equal(a.numpy(), b.numpy())
    assert plain["weights"] == diag.balancer.weights
    assert diag.records[-1]["weights"] == plain["weights"]


# --------------------------------------------------------------------------- the command line

BENCH = """problem: helmholtz
settings: {layers: [2, 8, 8, 1], batch_size: 16, test_n: 4}
iters: 10
methods:
  - {label: plain, balancer: {name: sum}}
  - {label: lra, balancer: {name: lr_annealing, preset: wang2021_code}}
"""

TABLE = """iters: 10
problems:
  - {problem: poisson1d, settings: {width: 8, n_res: 16, n_bc: 16}}
  - {problem: klein_gordon, settings: {layers: [2, 8, 1], batch_size: 16, test_n: 4}}
methods:
  - {label: sum, balancer: {name: sum}}
"""


@pytest.mark.slow  # ~3 s: the three figures
def test_cli_writes_every_file(tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(BENCH)
    out = tmp_path / "out"
    assert main(["diagnose", str(cfg), "--steps", "6", "--records", "3", "--ntk-points", "4", "--method", "lra",
                 "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"diagnosis.json", "diagnosis.md", "gradient_histograms.png", "ratios_cosines.png",
                     "ntk_spectra.png"}
    data = json.loads((out / "diagnosis.json").read_text())
    assert data["method"] == "lra" and [r["step"] for r in data["records"]] == [0, 2, 5]
    assert data["verdict"]["kind"] in ("imbalance", "conflict", "opposed", "balanced", "imbalance+conflict",
                                       "opposed+imbalance")
    assert data["plots"] == ["gradient_histograms.png", "ratios_cosines.png", "ntk_spectra.png"]
    md = (out / "diagnosis.md").read_text()
    assert "**Verdict:" in md and "Thresholds:" in md
    assert "Helmholtz 2D (lra, 6 steps" in capsys.readouterr().out


def test_cli_on_a_table_file_and_bad_input(tmp_path, capsys):
    cfg = tmp_path / "table.yaml"
    cfg.write_text(TABLE)
    out = tmp_path / "out"
    assert main(["diagnose", str(cfg), "--steps", "3", "--records", "2", "--out", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["diagnosis.md", "klein_gordon", "poisson1d"]
    assert sorted(p.name for p in (out / "klein_gordon").iterdir()) == ["diagnosis.json", "diagnosis.md"]
    assert json.loads((out / "klein_gordon" / "diagnosis.json").read_text())["records"][0]["ntk"] is None
    assert "| Poisson 1D |" in (out / "diagnosis.md").read_text()
    assert main(["diagnose", str(cfg), "--method", "nope", "--out", str(out)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["diagnose", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "ntk.yaml"
    bad.write_text(TABLE + "  - {label: ntk, balancer: {name: ntk}}\n")
    assert main(["diagnose", str(bad), "--method", "ntk", "--out", str(tmp_path / "o2")]) == 2
    assert "method 'ntk' on Klein-Gordon 1D: balancer 'ntk' (mode 'trace') needs kernels" in capsys.readouterr().err
    assert main(["diagnose", str(cfg), "--out", str(bad)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
