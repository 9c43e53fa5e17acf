"""Checkpoints written before a module saved some of its state: they load as the state they stand for."""

from __future__ import annotations

from typing import Any

from torch import nn


class LoadsOlderCheckpoints(nn.Module):
    """A module that saves more state than its earlier versions did.

    `_older_checkpoint_defaults()` names each such piece (a key relative to the module) with the value a
    checkpoint without it stands for; a load fills in the missing ones before the module reads its keys, so a
    strict `load_state_dict` of an older checkpoint keeps working.
    """

    def _older_checkpoint_defaults(self) -> dict[str, Any]:
        return {}

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name, value in self._older_checkpoint_defaults().items():
            state_dict.setdefault(prefix + name, value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
