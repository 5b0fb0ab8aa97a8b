"""A stand-in written the way PaddleScience's own example scripts are (``examples/<problem>/<script>.py``):
it builds its constraints, optimizer and Solver itself, with no loss aggregator; ``examples/ppsci/upstream.py``
must balance it without any edit. (Written for the tests; PaddleScience's scripts are not copied here.)"""

from os import path as osp

import hydra
import numpy as np
import ppsci
from omegaconf import DictConfig
from ppsci.utils import logger


def train(cfg: DictConfig):
    ppsci.utils.misc.set_random_seed(cfg.seed)
    logger.init_logger("ppsci", osp.join(cfg.output_dir, "train.log"), "info")
    model = ppsci.arch.MLP(**cfg.MODEL)
    equation = {"Poisson": ppsci.equation.Poisson(2)}
    rect = ppsci.geometry.Rectangle((0.0, 0.0), (1.0, 1.0))
    loader = {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": cfg.TRAIN.iters_per_epoch}
    pde = ppsci.constraint.InteriorConstraint(
        equation["Poisson"].equations, {"poisson": 1.0}, rect, {**loader, "batch_size": 64},
        ppsci.loss.MSELoss("mean"), name="EQ")
    bc_lr = ppsci.constraint.BoundaryConstraint(
        {"p": lambda out: out["p"]}, {"p": 0.0}, rect, {**loader, "batch_size": 16}, ppsci.loss.MSELoss("mean"),
        criteria=lambda x, y: np.isclose(x, 0.0) | np.isclose(x, 1.0), name="BC_lr")
    bc_tb = ppsci.constraint.BoundaryConstraint(
        {"p": lambda out: out["p"]}, {"p": 1.0}, rect, {**loader, "batch_size": 16}, ppsci.loss.MSELoss("mean"),
        criteria=lambda x, y: np.isclose(y, 0.0) | np.isclose(y, 1.0), name="BC_tb")
    constraint = {c.name: c for c in (pde, bc_lr, bc_tb)}
    optimizer = ppsci.optimizer.Adam(cfg.TRAIN.learning_rate)(model)
    solver = ppsci.solver.Solver(model, constraint, cfg.output_dir, optimizer, None, cfg.TRAIN.epochs,
                                 cfg.TRAIN.iters_per_epoch, equation=equation, log_freq=cfg.log_freq)
    solver.train()


@hydra.main(version_base=None, config_path="./conf", config_name="poisson_like.yaml")
def main(cfg: DictConfig):
    train(cfg)


if __name__ == "__main__":
    main()
