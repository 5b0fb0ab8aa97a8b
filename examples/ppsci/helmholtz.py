"""Helmholtz 2D in PaddleScience with a paddle_pinn_balance balancer (sum, lr_annealing, grad_norm, ntk).

Run from the repository root (PaddleScience and hydra installed: ``pip install -e ".[ppsci]"``)::

    python examples/ppsci/helmholtz.py TRAIN.balancer.name=lr_annealing

See ``conf/helmholtz.yaml`` for every option and for how to train longer or resume.
"""

from __future__ import annotations

import os
import sys

import hydra
import numpy as np
import ppsci
from omegaconf import DictConfig, OmegaConf
from ppsci.autodiff import hessian

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # run from a checkout
from paddle_pinn_balance import ppsci as balance  # noqa: E402


def exact(d, cfg):
    return np.sin(cfg.PDE.a1 * np.pi * d["x"]) * np.sin(cfg.PDE.a2 * np.pi * d["y"])


def source(d, cfg):
    a1, a2, k = cfg.PDE.a1, cfg.PDE.a2, cfg.PDE.k
    return (-((a1 * np.pi) ** 2) - (a2 * np.pi) ** 2 + k**2) * exact(d, cfg)


def balancer_block(cfg: DictConfig) -> dict:
    """TRAIN.balancer over the defaults of its name."""
    block = balance.balancer_config(cfg)
    defaults = OmegaConf.to_container(cfg.BALANCER_DEFAULTS, resolve=True).get(block["name"], {})
    return {**defaults, **block}


def train(cfg: DictConfig):
    ppsci.utils.misc.set_random_seed(cfg.seed)
    ppsci.utils.logger.init_logger("ppsci", os.path.join(cfg.output_dir, "train.log"), "info")
    model = ppsci.arch.MLP(**cfg.MODEL)
    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    k = cfg.PDE.k

    def residual(out):  # u_xx + u_yy + k^2 u (the label is the source q)
        return hessian(out["u"], out["x"]) + hessian(out["u"], out["y"]) + k**2 * out["u"]

    def loader(batch):  # a pool of batch x iters_per_epoch points, a fresh shuffled batch of `batch` each step
        return {"dataset": "NamedArrayDataset", "iters_per_epoch": cfg.TRAIN.iters_per_epoch, "batch_size": batch,
                "sampler": {"name": "BatchSampler", "shuffle": True, "drop_last": True}}

    constraints = {
        "EQ": ppsci.constraint.InteriorConstraint(
            {"helmholtz": residual}, {"helmholtz": lambda d: source(d, cfg)}, rect, loader(cfg.TRAIN.batch_size.pde),
            ppsci.loss.MSELoss("mean"), name="EQ"),
        "BC": ppsci.constraint.BoundaryConstraint(
            {"u": lambda out: out["u"]}, {"u": 0.0}, rect, loader(cfg.TRAIN.batch_size.bc),
            ppsci.loss.MSELoss("mean"), name="BC"),
    }
    # (model, balancer); learned weights (grad_norm, uncertainty) are the balancer's: build the optimizer from
    # optimizer_layers(model, balancer) so that they train
    model, balancer = balance.build_for_solver(balancer_block(cfg), model, constraints)
    lr = ppsci.optimizer.lr_scheduler.ExponentialDecay(
        cfg.TRAIN.epochs, cfg.TRAIN.iters_per_epoch, cfg.TRAIN.lr, cfg.TRAIN.gamma, cfg.TRAIN.decay_steps)()
    optimizer = ppsci.optimizer.Adam(lr)(balance.optimizer_layers(model, balancer))

    n = cfg.EVAL.grid
    xs, ys = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n))
    grid = {"x": xs.reshape(-1, 1).astype("float32"), "y": ys.reshape(-1, 1).astype("float32")}
    validator = {"L2Rel": ppsci.validate.SupervisedValidator(
        {"dataset": {"name": "NamedArrayDataset", "input": grid, "label": {"u": exact(grid, cfg).astype("float32")}},
         "batch_size": n * n},
        ppsci.loss.MSELoss("mean"), {"u": lambda out: out["u"]}, metric={"L2Rel": ppsci.metric.L2Rel()},
        name="L2Rel")}

    solver = ppsci.solver.Solver(
        model, constraints, cfg.output_dir, optimizer, epochs=cfg.TRAIN.epochs,
        iters_per_epoch=cfg.TRAIN.iters_per_epoch, save_freq=cfg.TRAIN.save_freq, log_freq=cfg.log_freq,
        seed=cfg.seed, validator=validator, checkpoint_path=cfg.TRAIN.checkpoint_path,
        loss_aggregator=balancer)
    balance.attach_logging(solver)  # weight/<term> (and ntk_trace/<term>) in the [Train] log line and writers
    solver.train()
    if cfg.TRAIN.lbfgs.epochs > 0:
        # then L-BFGS on the same model and balancer: the weights and the update cadence carry on (the
        # balancer's step is the Solver's global step, counted on from Adam's); each L-BFGS step updates the
        # weights once, at its first closure evaluation
        _, metrics = solver.eval()
        ppsci.utils.logger.info(f"after Adam: weights {balancer.weights} relative L2 error {metrics['L2Rel']['u']:.4e}")
        lbfgs = ppsci.optimizer.LBFGS(cfg.TRAIN.lbfgs.lr, max_iter=cfg.TRAIN.lbfgs.max_iter)
        solver = ppsci.solver.Solver(
            model, constraints, cfg.output_dir, lbfgs(balance.optimizer_layers(model, balancer, lbfgs=True)),
            epochs=cfg.TRAIN.epochs + cfg.TRAIN.lbfgs.epochs, iters_per_epoch=cfg.TRAIN.iters_per_epoch,
            save_freq=cfg.TRAIN.save_freq, log_freq=cfg.log_freq, seed=cfg.seed, validator=validator,
            loss_aggregator=balancer)
        solver.best_metric["epoch"] = cfg.TRAIN.epochs  # start after Adam's epochs: global steps continue
        balance.attach_logging(solver)
        if balancer_block(cfg)["name"] == "grad_norm":  # its weights follow L_grad, not the L-BFGS objective
            balance.attach_weight_optimizer(balancer, ppsci.optimizer.Adam(cfg.TRAIN.lr)(balancer))
        solver.train()
    _, metrics = solver.eval()
    ppsci.utils.logger.info(f"balancer={balancer_block(cfg)['name']} final weights {balancer.weights} "
                            f"relative L2 error {metrics['L2Rel']['u']:.4e}")


@hydra.main(version_base=None, config_path="./conf", config_name="helmholtz.yaml")
def main(cfg: DictConfig):
    if cfg.mode != "train":
        raise ValueError(f"cfg.mode should be 'train'; got {cfg.mode!r}")
    train(cfg)


if __name__ == "__main__":
    main()
