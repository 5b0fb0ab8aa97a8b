"""Loss balancing for physics-informed neural networks in PaddlePaddle.

Every balancer is called as ``balancer({name: scalar loss}, step) -> weighted total``, the shape of
PaddleScience's ``Solver(loss_aggregator=...)``.
"""

from ._version import __version__ as __version__  # the one version string
from .balancer import Balancer, BalanceWarning
from .causal import CausalResidual, build_causal, causal_weights
from .config import build_balancer, build_loss_layer
from .fixed import Sum
from .grad_norm_ratio import GradNormRatio, grad_norm_ratio_weights
from .gradnorm import GradNorm, GradNormBalancer, gradnorm_weight_gradient
from .lr_annealing import LRAnnealing, lra_estimates
from .ntk import NTKWeighting, ntk_trace_weights
from .recorder import Diagnosis, attach_diagnosis
from .relobralo import ReLoBRaLo, relobralo_weights
from .self_adaptive import SelfAdaptive
from .softadapt import SoftAdapt, softadapt_weights
from .surgery import ConFIG, MConFIG, PCGrad, UPGrad
from .uncertainty import UncertaintyWeighting

__all__ = ["Balancer", "BalanceWarning", "Sum", "LRAnnealing", "NTKWeighting", "GradNorm", "GradNormBalancer",
           "GradNormRatio", "build_balancer", "build_loss_layer", "ReLoBRaLo", "SoftAdapt", "UncertaintyWeighting",
           "CausalResidual", "causal_weights", "build_causal", "PCGrad", "ConFIG", "MConFIG", "UPGrad", "SelfAdaptive",
           # the methods' math as pure functions of arrays (the classes above hold state and call them)
           "lra_estimates", "ntk_trace_weights", "gradnorm_weight_gradient", "grad_norm_ratio_weights",
           "relobralo_weights", "softadapt_weights"]
__all__ += ["Diagnosis", "attach_diagnosis"]  # why a PINN does not train (recorder.py, diagnose.py)


def _export_registered() -> None:
    """Every class a module registers with ``@register(name)`` (contract.py) is exported here by its class name: a
    new method's module is found (:func:`~paddle_pinn_balance.contract.discover`) without being listed."""
    from .contract import REGISTRY

    for builder, _ in REGISTRY.values():
        cls = builder.method_class
        if cls.__name__ not in globals():
            globals()[cls.__name__] = cls
            __all__.append(cls.__name__)


_export_registered()
