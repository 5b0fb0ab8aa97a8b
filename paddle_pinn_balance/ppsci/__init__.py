"""PaddleScience adapters: balancers inside ``ppsci.solver.Solver`` (optional; imports ``ppsci`` lazily).

Every balancer already has the shape of a PaddleScience loss aggregator: the solver calls
``solver.loss_aggregator(losses_all, solver.global_step)`` and saves / loads ``state_dict()`` as
``<checkpoint>.pdagg`` because ``should_persist`` is True. This package adds what the solver does not know,
one module per job (every name below is also importable from ``paddle_pinn_balance.ppsci``):

* :mod:`~paddle_pinn_balance.ppsci.config`: :func:`~paddle_pinn_balance.ppsci.config.balancer_config` (the
  ``TRAIN.balancer`` block of a dict, an omegaconf ``DictConfig`` or a whole Hydra config) and
  :func:`~paddle_pinn_balance.ppsci.config.loss_names` (the Solver's loss terms: label keys, summed over
  constraints).
* :mod:`~paddle_pinn_balance.ppsci.solver`: :func:`~paddle_pinn_balance.ppsci.solver.build_for_solver`
  (``(model, balancer)`` from the config block, ``loss_names`` filled in from the constraints, NTK kernels
  built from them; the model comes back bare, so ``.pdparams`` are the network's own) and
  :func:`~paddle_pinn_balance.ppsci.solver.attach` (after each ``Solver(...)``: learned weights into its
  optimizer, a second Solver continues the balancer, logging).
* :mod:`~paddle_pinn_balance.ppsci.optimizers`:
  :func:`~paddle_pinn_balance.ppsci.optimizers.optimizer_layers` (the layers to build the optimizer from:
  the network plus learned loss weights, each once) and
  :func:`~paddle_pinn_balance.ppsci.optimizers.attach_weight_optimizer` (GradNorm's weights on an optimizer of
  their own, for L-BFGS in the Solver).
* :mod:`~paddle_pinn_balance.ppsci.kernels`:
  :func:`~paddle_pinn_balance.ppsci.kernels.constraint_kernels` (NTK kernels ``kernel(model) -> Tensor[N]``
  from the constraints' own output expressions and points: no residual written twice).
* :mod:`~paddle_pinn_balance.ppsci.log`: :func:`~paddle_pinn_balance.ppsci.log.attach_logging` (the weights,
  NTK traces and GradNorm's :math:`L_\\mathrm{grad}` in the solver's training log line and its VisualDL /
  WandB / TensorBoard writer, at the solver's log steps only).
"""

from .config import _ppsci, balancer_config, loss_names, to_container  # noqa: F401  (_ppsci: tests, no ppsci)
from .kernels import constraint_kernels, ntk_model
from .log import attach_logging
from .optimizers import attach_weight_optimizer, optimizer_layers
from .solver import GRADNORM_LBFGS_WEIGHT_LR, NTK_ADAPTER_KEYS, SolverSum, attach, build_for_solver

__all__ = ["to_container", "balancer_config", "loss_names", "build_for_solver", "optimizer_layers",
           "attach_weight_optimizer", "constraint_kernels", "ntk_model", "attach_logging", "attach", "SolverSum",
           "NTK_ADAPTER_KEYS", "GRADNORM_LBFGS_WEIGHT_LR"]
