"""The `nn.Module` losses users construct: thin holders of configuration over `functional`."""

from .anti_transfer import AntiTransferLoss
from .purify import Purify
from .suppression import TaskIrrelevantSuppression

__all__ = ["AntiTransferLoss", "Purify", "TaskIrrelevantSuppression"]
