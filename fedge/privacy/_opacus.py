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
from opacus.grad_sample.gsm_base import AbstractGradSampleHooks  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

for _handler in [h for h in _root.handlers if h not in _before]:
    _root.removeHandler(_handler)

__all__ = [
    "AbstractGradSampleHooks",
    "DPOptimizer",
    "PrivacyEngine",
    "RDPAccountant",
    "rdp_analysis",
]
