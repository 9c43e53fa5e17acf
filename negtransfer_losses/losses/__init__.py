"""The `nn.Module` losses users construct: thin holders of configuration over `functional`."""

from .anti_transfer import AntiTransferLoss

__all__ = ["AntiTransferLoss"]
