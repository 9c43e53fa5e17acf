"""negtransfer_losses: PyTorch regularizers that stop negative transfer.

Feature taps for any model (`FeatureTap`, `FrozenReference`) and the shared similarity math
(`negtransfer_losses.functional`).
"""

from . import functional
from .taps import FeatureTap, FrozenReference, MissingFeaturesError, StaleFeaturesError

__version__ = "0.1.0.dev0"

__all__ = [
    "FeatureTap",
    "FrozenReference",
    "MissingFeaturesError",
    "StaleFeaturesError",
    "__version__",
    "functional",
]
