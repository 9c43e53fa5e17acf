"""negtransfer_losses: PyTorch regularizers that stop negative transfer.

Feature taps for any model (`FeatureTap`, `FrozenReference`), the anti-transfer loss
(`AntiTransferLoss`), suppression of task-irrelevant factors (`TaskIrrelevantSuppression`, `Purify`), and the math of every method as plain functions (`negtransfer_losses.functional`).
"""

from . import functional
from .losses import AntiTransferLoss, Purify, TaskIrrelevantSuppression
from .taps import FeatureTap, FrozenReference, MissingFeaturesError, StaleFeaturesError

__version__ = "0.1.0.dev0"

__all__ = [
    "AntiTransferLoss",
    "FeatureTap",
    "FrozenReference",
    "MissingFeaturesError",
    "Purify",
    "StaleFeaturesError",
    "TaskIrrelevantSuppression",
    "__version__",
    "functional",
]
