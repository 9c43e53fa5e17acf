"""Task relatedness between two tasks; `python -m negtransfer_losses.relatedness` estimates one from a CSV."""

from ._matrix import TaskRelatedness

__all__ = ["TaskRelatedness"]
