"""negtransfer_losses: PyTorch regularizers that stop negative transfer.

- feature taps for any model: `FeatureTap`, `FrozenReference`;
- anti-transfer: `AntiTransferLoss`;
- suppression of task-irrelevant factors: `AdversarialSuppression`, `HSICSuppression`, `CKASuppression`
  (`make_suppression` builds one by name), `Purify`;
- when no one labelled the bias: `BiasTwin`, a twin of your model that learns the shortcut (its features,
  LfF's per-sample weights, its predictions as the bias's labels);
- batches that hold every (task class, irrelevant factor) group: `GroupBalancedBatchSampler`;
- multi-task distribution matching: `TaskRelatedness`, `DistributionMatchingLoss`, `SoftCoAnnotationLoss`,
  `MultiTaskLoss`;
- the math of every method as plain functions: `negtransfer_losses.functional`;
- fused kernels and the backend choice: `negtransfer_losses.ops`;
- where negative transfer lives (layer probes, CKA maps): `negtransfer_losses.diagnostics`;
- every module's logged terms as floats: `collect_terms`;
- the input checks' errors that a GPU reports late, raised now: `raise_pending_errors`.
"""

from . import diagnostics, functional, ops
from ._validation import raise_pending_errors
from ._version import __version__
from .losses import (
    AdversarialSuppression,
    AntiTransferLoss,
    BiasTwin,
    CKASuppression,
    DistributionMatchingLoss,
    HSICSuppression,
    MultiTaskLoss,
    Purify,
    SoftCoAnnotationLoss,
    SuppressionLoss,
    TwinOutput,
    make_suppression,
)
from .relatedness import TaskRelatedness
from .sampling import GroupBalancedBatchSampler
from .taps import FeatureTap, FrozenReference, MissingFeaturesError, StaleFeaturesError
from .terms import collect_terms

__all__ = [
    "AdversarialSuppression",
    "AntiTransferLoss",
    "BiasTwin",
    "CKASuppression",
    "DistributionMatchingLoss",
    "FeatureTap",
    "FrozenReference",
    "GroupBalancedBatchSampler",
    "HSICSuppression",
    "MissingFeaturesError",
    "MultiTaskLoss",
    "Purify",
    "SoftCoAnnotationLoss",
    "StaleFeaturesError",
    "SuppressionLoss",
    "TaskRelatedness",
    "TwinOutput",
    "__version__",
    "collect_terms",
    "diagnostics",
    "functional",
    "make_suppression",
    "ops",
    "raise_pending_errors",
]
