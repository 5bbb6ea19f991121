"""Import Opacus without the root-logger handler it installs on import.

`opacus.utils.module_utils` calls `logging.basicConfig`, after which every
Flower log line (Flower's logger propagates to the root) is printed twice.
Modules that need Opacus import this first.
"""

import logging

_root = logging.getLogger()
_before = list(_root.handlers)

import opacus  # noqa: E402,F401

for _handler in [h for h in _root.handlers if h not in _before]:
    _root.removeHandler(_handler)
