"""``darcy_like.py`` after the hand edit of ``docs/paddlescience.md`` (the lines marked ``# edit``; the
second Solver takes the same balancer), its config with a ``TRAIN.balancer`` block
(``conf/darcy_like_edited.yaml``). The unedited stand-in, written the way PaddleScience's two-stage example
scripts are (its Darcy 2D example's shape):
the script seeds and opens its log itself, trains with Adam, then builds a SECOND Solver on the same model
and constraints with L-BFGS (another output folder); the network uses ppsci's ``stan`` activation (a
learnable parameter per neuron inside the nonlinearity); ``mode=eval`` evaluates a checkpoint.
(Written for the tests; PaddleScience's scripts are not copied here.)"""

from os import path as osp

import hydra
import numpy as np
import ppsci
from omegaconf import DictConfig
from ppsci.utils import logger

from paddle_pinn_balance import ppsci as balance  # edit


def source(d):
    return -8.0 * np.pi**2 * np.sin(2.0 * np.pi * d["x"]) * np.cos(2.0 * np.pi * d["y"])


def exact(d):
    return np.sin(2.0 * np.pi * d["x"]) * np.cos(2.0 * np.pi * d["y"])


def validator(cfg, geom, equation):
    v = ppsci.validate.GeometryValidator(
        {"p": lambda out: out["p"]}, {"p": exact}, geom,
        {"dataset": "NamedArrayDataset", "total_size": cfg.NPOINT_PDE, "batch_size": cfg.NPOINT_PDE},
        ppsci.loss.MSELoss("mean"), evenly=True, metric={"MSE": ppsci.metric.MSE()}, name="P")
    return {v.name: v}


def train(cfg: DictConfig):
    ppsci.utils.misc.set_random_seed(cfg.seed)
    logger.init_logger("ppsci", osp.join(cfg.output_dir, f"{cfg.mode}.log"), "info")
    model = ppsci.arch.MLP(**cfg.MODEL)
    equation = {"Poisson": ppsci.equation.Poisson(2)}
    geom = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    loader = {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": cfg.TRAIN.iters_per_epoch}
    pde = ppsci.constraint.InteriorConstraint(
        equation["Poisson"].equations, {"poisson": source}, geom, {**loader, "batch_size": cfg.NPOINT_PDE},
        ppsci.loss.MSELoss("sum"), evenly=True, name="EQ")
    bc = ppsci.constraint.BoundaryConstraint(
        {"p": lambda out: out["p"]}, {"p": exact}, geom, {**loader, "batch_size": cfg.NPOINT_BC},
        ppsci.loss.MSELoss("sum"), name="BC")
    constraint = {pde.name: pde, bc.name: bc}
    model, balancer = balance.build_for_solver(cfg, model, constraint)  # edit
    optimizer = ppsci.optimizer.Adam(cfg.TRAIN.learning_rate)(model)
    solver = ppsci.solver.Solver(
        model, constraint, cfg.output_dir, optimizer, None, cfg.TRAIN.epochs, cfg.TRAIN.iters_per_epoch,
        log_freq=cfg.log_freq, equation=equation, validator=validator(cfg, geom, equation),
        loss_aggregator=balancer)  # edit
    balance.attach(solver)  # edit
    solver.train()
    solver.eval()

    # fine-tuning with L-BFGS: a second Solver on the same model and constraints
    out = cfg.TRAIN.lbfgs.output_dir
    logger.init_logger("ppsci", osp.join(out, f"{cfg.mode}.log"), "info")
    optimizer_lbfgs = ppsci.optimizer.LBFGS(cfg.TRAIN.lbfgs.learning_rate, cfg.TRAIN.lbfgs.max_iter)(model)
    solver = ppsci.solver.Solver(
        model, constraint, out, optimizer_lbfgs, None, cfg.TRAIN.lbfgs.epochs, cfg.TRAIN.iters_per_epoch,
        log_freq=cfg.log_freq, equation=equation, validator=validator(cfg, geom, equation),
        loss_aggregator=balancer)  # edit
    balance.attach(solver)  # edit
    solver.train()
    solver.eval()


def evaluate(cfg: DictConfig):
    ppsci.utils.misc.set_random_seed(cfg.seed)
    logger.init_logger("ppsci", osp.join(cfg.output_dir, f"{cfg.mode}.log"), "info")
    model = ppsci.arch.MLP(**cfg.MODEL)
    equation = {"Poisson": ppsci.equation.Poisson(2)}
    geom = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    solver = ppsci.solver.Solver(model, output_dir=cfg.output_dir, equation=equation,
                                 validator=validator(cfg, geom, equation),
                                 pretrained_model_path=cfg.EVAL.pretrained_model_path)
    solver.eval()


@hydra.main(version_base=None, config_path="./conf", config_name="darcy_like_edited.yaml")
def main(cfg: DictConfig):
    {"train": train, "eval": evaluate}[cfg.mode](cfg)


if __name__ == "__main__":
    main()
