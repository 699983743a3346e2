"""Demonstration stores, training windows, normalization, augmentation and converters."""

from wm.data.errors import (
    AppendError,
    CorruptStoreError,
    NotAStoreError,
    SchemaError,
    StoreBusyError,
    StoreError,
)
from wm.data.ops import copy_episodes, delete_episodes, keep_episodes, merge_stores
from wm.data.schema import ActionSpace, KeySpec, Schema, infer_schema
from wm.data.store import DemoStore
from wm.data.writer import EpisodeWriter

__all__ = [
    "ActionSpace",
    "AppendError",
    "StoreBusyError",
    "CorruptStoreError",
    "DemoStore",
    "EpisodeWriter",
    "KeySpec",
    "NotAStoreError",
    "Schema",
    "SchemaError",
    "StoreError",
    "copy_episodes",
    "delete_episodes",
    "infer_schema",
    "keep_episodes",
    "merge_stores",
]
