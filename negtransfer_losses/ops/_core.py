"""The one internal door into `ops` for the modules (`losses/`).

A module uses `ops` through its public names (`negtransfer_losses.ops.__all__`) or through this module (the
architecture test holds every module to it). The contract:

- `check_backend`: the check of a `backend` argument, raising the `ValueError` of the public functions; a module
  calls it once, in its constructor.
- `anti_transfer_terms_for`, `matching_terms`, `multi_task_parts`: what a module's `forward` calls on every step,
  with options validated once by the module (`functional._core.AntiTransferOptions`, `MatchingOptions`) and a
  checked backend. Each is a public entry point of its own: it checks its tensors once, switches precision once
  (`_validation.full_precision`) and asks the dispatcher for the path.
"""

from __future__ import annotations

from .anti_transfer import anti_transfer_terms_for
from .dispatch import check_backend
from .distribution_matching import matching_terms, multi_task_parts

__all__ = ["anti_transfer_terms_for", "check_backend", "matching_terms", "multi_task_parts"]
