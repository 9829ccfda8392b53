"""The adapter store: immutable version folders (`adapters/vNNNN/`) and the active-version pointer.

- `files`: checking a folder is a LoRA adapter of the fixed shape; publishing one atomically.
- `registry`: the versions and the pointer, both in the database (promote, rollback, list).
- `follower`: a thread in every bot replica that follows the pointer and hot-swaps the engine.

Torch-free: only `safetensors` is read, so the Slack side may list versions without the model.
"""

from bot.adapter_store.files import AdapterInvalid, publish_adapter, validate_adapter_folder
from bot.adapter_store.registry import (
    AdapterRegistry,
    RollbackImpossible,
    UnknownVersion,
    VersionInfo,
)

__all__ = [
    "AdapterInvalid",
    "AdapterRegistry",
    "RollbackImpossible",
    "UnknownVersion",
    "VersionInfo",
    "publish_adapter",
    "validate_adapter_folder",
]
