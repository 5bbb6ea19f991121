"""The Opacus pieces fedge uses, imported without Opacus's root-logger handler.

`opacus.utils.module_utils` calls `logging.basicConfig` on import, after which
every Flower log line (Flower's logger propagates to the root) prints twice.
fedge modules import Opacus only through here.
"""

import logging

_root = logging.getLogger()
_before = list(_root.handlers)

from opacus import PrivacyEngine  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from opacus.accountants.analysis import rdp as rdp_analysis  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.grad_sample.functorch import prepare_layer  # noqa: E402
from opacus.grad_sample.grad_sample_module import (  # noqa: E402
    GradSampleHooks,
    promote_current_grad_sample,
)
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks  # noqa: E402
from opacus.layers import DPGRU, DPLSTM, DPRNN  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402
from opacus.optimizers.optimizer import (  # noqa: E402
    _check_processed_flag as check_processed_flag,
)
from opacus.optimizers.optimizer import (  # noqa: E402
    _mark_as_processed as mark_as_processed,
)
from opacus.utils.module_utils import trainable_parameters  # noqa: E402

for _handler in [h for h in _root.handlers if h not in _before]:
    _root.removeHandler(_handler)

__all__ = [
    "DPGRU",
    "DPLSTM",
    "DPRNN",
    "AbstractGradSampleHooks",
    "DPOptimizer",
    "GradSampleHooks",
    "PrivacyEngine",
    "RDPAccountant",
    "check_processed_flag",
    "get_noise_multiplier",
    "mark_as_processed",
    "prepare_layer",
    "promote_current_grad_sample",
    "rdp_analysis",
    "trainable_parameters",
]
