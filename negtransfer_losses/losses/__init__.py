"""The `nn.Module` losses users construct: thin holders of configuration over `functional`."""

from ._base import SuppressionLoss
from .adversarial import AdversarialSuppression
from .anti_transfer import AntiTransferLoss
from .bias_twin import BiasTwin, TwinOutput
from .distribution_matching import DistributionMatchingLoss, MultiTaskLoss, SoftCoAnnotationLoss
from .purify import Purify
from .suppression import CKASuppression, HSICSuppression, make_suppression

__all__ = [
    "AdversarialSuppression",
    "AntiTransferLoss",
    "BiasTwin",
    "CKASuppression",
    "DistributionMatchingLoss",
    "HSICSuppression",
    "MultiTaskLoss",
    "Purify",
    "SoftCoAnnotationLoss",
    "SuppressionLoss",
    "TwinOutput",
    "make_suppression",
]
