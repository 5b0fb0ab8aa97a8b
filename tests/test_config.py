import glob
import os

import paddle
import pytest
from reference import make_net

from paddle_pinn_balance import GradNorm, LRAnnealing, Sum, build_balancer
from paddle_pinn_balance.gradnorm import GradNormBalancer

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def test_dict_config_builds_each_method():
    net = make_net()
    lra = build_balancer({"name": "lr_annealing", "ref": "res", "variant": "arxiv", "update_freq": 5}, net)
    assert isinstance(lra, LRAnnealing) and (lra.variant, lra.update_freq, lra.alpha) == ("arxiv", 5, 0.9)
    assert isinstance(build_balancer({"name": "sum"}), Sum)
    gn = build_balancer({"name": "grad_norm", "n_loss": 2, "alpha": 0.12}, net)
    assert isinstance(gn, GradNormBalancer) and isinstance(gn.wrapper, GradNorm) and gn.alpha == 0.12
    assert gn.wrapper.net is net
    wrapper = GradNorm(make_net(), n_loss=2)
    assert build_balancer({"name": "grad_norm"}, wrapper) is wrapper.aggregator


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(EXAMPLES, "*.yaml"))
                                         if os.path.basename(p) != "table.yaml"))  # a `table` file: test_table.py
def test_shipped_yaml_files_build(path):
    bal = build_balancer(path, make_net())
    net = getattr(bal, "wrapper", make_net())
    x = paddle.rand([4, 2])
    total = bal({"res": (net(x) ** 2).mean(), "bc": ((net(x) - 1) ** 2).mean()}, 0)
    assert total.shape == [] and bal.weights


def test_yaml_under_balancer_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("balancer:\n  name: lr_annealing\n  ref: pde\n  statistic: mean\n")
    lra = build_balancer(str(path), make_net())
    assert lra.ref == ("pde",) and lra.statistic == "mean"


@pytest.mark.parametrize("config,match", [
    ({"name": "lra"}, "unknown balancer name 'lra'.*allowed.*lr_annealing"),
    ({"ref": "res"}, "needs a `name`"),
    ({"name": "lr_annealing", "beta": 0.9}, "unknown key.*beta.*allowed.*variant"),
    ({"name": "lr_annealing", "update_freq": "10"}, "update_freq"),
    ({"name": "lr_annealing", "update_freq": -1}, "update_freq"),
    ({"name": "lr_annealing", "variant": "paper"}, "variant"),
    ({"name": "grad_norm", "alpha": "fast", "n_loss": 2}, "alpha"),
    ({"name": "sum", "weights": [1, 2]}, "weights"),
    ({"name": "ntk"}, "kernels"),
    (["name", "sum"], "mapping"),
])
def test_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        build_balancer(config, make_net())


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        build_balancer(str(tmp_path / "missing.yaml"), make_net())
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: lr_annealing\n  ref: [res\n")
    with pytest.raises(ValueError, match="malformed YAML.*bad.yaml"):
        build_balancer(str(bad), make_net())
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="malformed YAML"):
        build_balancer(str(evil), make_net())
    listy = tmp_path / "list.yaml"
    listy.write_text("- name: sum\n")
    with pytest.raises(ValueError, match="mapping"):
        build_balancer(str(listy), make_net())


def test_model_required():
    with pytest.raises(ValueError, match="needs the model"):
        build_balancer({"name": "lr_annealing"})
