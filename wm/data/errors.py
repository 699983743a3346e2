"""Errors raised by the demonstration store and the data layer.

Every error message names the file, the key and the episode where that is known, in one line a
user can act on.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every data-layer error."""


class NotAStoreError(StoreError):
    """The path is not a demonstration store (no `meta/episode_ends`, or not zarr at all)."""


class SchemaError(StoreError):
    """The schema is invalid, or the store lacks a key its schema (or a model) declares."""


class AppendError(StoreError):
    """An appended episode or step does not match the store: shape, dtype, missing key, non-finite."""


class CorruptStoreError(StoreError):
    """Data on disk cannot be decoded (truncated chunk, broken metadata)."""


class StoreBusyError(StoreError):
    """Another process (or another open store object) is writing to the store."""
