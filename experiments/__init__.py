"""Paper reproductions: one registered :class:`experiments.core.Experiment` per figure.

``python -m experiments list | run NAME|--all | check NAME|--all`` (see ``experiments/__main__.py``).
"""

from .core import REGISTRY, Claim, ClaimResult, Experiment, Reference, check_experiment, get, run_experiment

from . import xiong_grad  # noqa: F401,E402  (registers)

__all__ = ["REGISTRY", "Claim", "ClaimResult", "Experiment", "Reference", "check_experiment", "get",
           "run_experiment"]
from . import rank_collapse, deepnet_update, admin_amplification, curse_of_depth  # noqa: F401,E402
from . import wortsman_lr, xiong_warmup  # noqa: F401,E402
from . import lr_sensitivity_depth  # noqa: F401,E402
from . import ngpt_speed, normformer_grad, completep_transfer  # noqa: F401,E402  (nGPT, NormFormer, CompleteP)
from . import mhc_amplification  # noqa: F401,E402  (HC vs mHC)
from . import value_residual_depth  # noqa: F401,E402  (value residual)
