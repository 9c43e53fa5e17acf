"""negtransfer_losses: PyTorch regularizers that stop negative transfer.

Feature taps for any model (`FeatureTap`, `FrozenReference`), the anti-transfer loss
(`AntiTransferLoss`), and the math of every method as plain functions (`negtransfer_losses.functional`).
"""

from . import functional
from .losses import AntiTransferLoss
from .taps import FeatureTap, FrozenReference, MissingFeaturesError, StaleFeaturesError

__version__ = "0.1.0.dev0"

__all__ = [
    "AntiTransferLoss",
    "FeatureTap",
    "FrozenReference",
    "MissingFeaturesError",
    "StaleFeaturesError",
    "__version__",
    "functional",
]
