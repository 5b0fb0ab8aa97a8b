"""Loss balancing for physics-informed neural networks in PaddlePaddle.

Every balancer is called as ``balancer({name: scalar loss}, step) -> weighted total``, the shape of
PaddleScience's ``Solver(loss_aggregator=...)``.
"""

from .balancer import Balancer, Sum
from .causal import CausalResidual, build_causal, causal_weights
from .config import build_balancer
from .grad_norm_ratio import GradNormRatio
from .gradnorm import GradNorm, GradNormBalancer
from .lr_annealing import LRAnnealing
from .ntk import NTKWeighting
from .relobralo import ReLoBRaLo
from .self_adaptive import SelfAdaptive
from .softadapt import SoftAdapt
from .surgery import ConFIG, PCGrad, UPGrad
from .uncertainty import UncertaintyWeighting

__all__ = ["Balancer", "Sum", "LRAnnealing", "NTKWeighting", "GradNorm", "GradNormBalancer", "GradNormRatio",
           "build_balancer", "ReLoBRaLo", "SoftAdapt", "UncertaintyWeighting", "CausalResidual", "causal_weights",
           "build_causal", "PCGrad", "ConFIG", "UPGrad", "SelfAdaptive"]
__version__ = "0.1.0"
