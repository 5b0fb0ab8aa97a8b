"""A stand-in written the way PaddleScience's example scripts are (here: its Euler beam example's shape):
``@hydra.main`` with ``ppsci.utils.callbacks.InitCallback`` in its config (the callback, not ``train``, seeds
the run and opens ``<mode>.log``), ``mode`` = train / eval / export, a validator with PaddleScience's
``L2Rel`` metric, checkpoints every ``save_freq`` epochs. No loss aggregator anywhere: the tests balance it
through ``examples/ppsci/upstream.py`` and through the hand edit (``beam_like_edited.py``).
(Written for the tests; PaddleScience's scripts are not copied here.)"""

import hydra
import ppsci
from omegaconf import DictConfig
from ppsci.autodiff import hessian, jacobian


def exact(d):
    x = d["x"]
    return -(x**4) / 24 + x**3 / 6 - x**2 / 4  # u'''' = -1, clamped at 0, free at 1


def validator(cfg, geom):
    metric = ppsci.validate.GeometryValidator(
        {"u": lambda out: out["u"]}, {"u": exact}, geom,
        {"dataset": "IterableNamedArrayDataset", "total_size": cfg.EVAL.total_size}, ppsci.loss.MSELoss(),
        evenly=True, metric={"L2Rel": ppsci.metric.L2Rel()}, name="L2Rel_Metric")
    return {metric.name: metric}


def constraints(cfg, geom, equation):
    loader = {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": cfg.TRAIN.iters_per_epoch}
    pde = ppsci.constraint.InteriorConstraint(
        equation["biharmonic"].equations, {"biharmonic": 0}, geom, {**loader, "batch_size": cfg.TRAIN.batch_size.pde},
        ppsci.loss.MSELoss(), random="Hammersley", name="EQ")
    bc = ppsci.constraint.BoundaryConstraint(
        {"u0": lambda d: d["u"][0:1], "u__x": lambda d: jacobian(d["u"], d["x"])[1:2],
         "u__x__x": lambda d: hessian(d["u"], d["x"])[2:3],
         "u__x__x__x": lambda d: jacobian(hessian(d["u"], d["x"]), d["x"])[3:4]},
        {"u0": 0, "u__x": 0, "u__x__x": 0, "u__x__x__x": 0}, geom, {**loader, "batch_size": cfg.TRAIN.batch_size.bc},
        ppsci.loss.MSELoss("sum"), evenly=True, name="BC")
    return {pde.name: pde, bc.name: bc}


def train(cfg: DictConfig):
    model = ppsci.arch.MLP(**cfg.MODEL)
    geom = ppsci.geometry.Interval(0, 1)
    equation = {"biharmonic": ppsci.equation.Biharmonic(dim=1, q=cfg.q, D=cfg.D)}
    constraint = constraints(cfg, geom, equation)
    optimizer = ppsci.optimizer.Adam(cfg.TRAIN.learning_rate)(model)
    solver = ppsci.solver.Solver(
        model, constraint, cfg.output_dir, optimizer, epochs=cfg.TRAIN.epochs,
        iters_per_epoch=cfg.TRAIN.iters_per_epoch, save_freq=cfg.TRAIN.save_freq,
        eval_during_train=cfg.TRAIN.eval_during_train, eval_freq=cfg.TRAIN.eval_freq, log_freq=cfg.log_freq,
        seed=cfg.seed, equation=equation, geom={"interval": geom}, validator=validator(cfg, geom),
        pretrained_model_path=cfg.TRAIN.pretrained_model_path, checkpoint_path=cfg.TRAIN.checkpoint_path)
    solver.train()
    solver.eval()


def evaluate(cfg: DictConfig):
    model = ppsci.arch.MLP(**cfg.MODEL)
    geom = ppsci.geometry.Interval(0, 1)
    solver = ppsci.solver.Solver(model, None, cfg.output_dir, None, seed=cfg.seed, validator=validator(cfg, geom),
                                 pretrained_model_path=cfg.EVAL.pretrained_model_path)
    solver.eval()


def export(cfg: DictConfig):
    from paddle.static import InputSpec

    model = ppsci.arch.MLP(**cfg.MODEL)
    solver = ppsci.solver.Solver(model, pretrained_model_path=cfg.INFER.pretrained_model_path)
    solver.export([{k: InputSpec([None, 1], "float32", name=k) for k in model.input_keys}], cfg.INFER.export_path)


@hydra.main(version_base=None, config_path="./conf", config_name="beam_like.yaml")
def main(cfg: DictConfig):
    {"train": train, "eval": evaluate, "export": export}[cfg.mode](cfg)


if __name__ == "__main__":
    main()
