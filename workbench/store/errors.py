"""The store's own errors, in a module of their own so that every part of the store (and every
command that turns them into one-line messages) can import them without importing the rest."""
from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreFormatError(StoreError, ValueError):
    """The path is not a feature store, or one this version cannot read."""


class StoreMismatchError(StoreError, ValueError):
    """A store is used with another model, config or data set than the one it was captured from."""


class StoreDamagedError(StoreFormatError):
    """A shard listed in the index is missing, truncated or altered (its digest does not match)."""


class StoreLockedError(StoreError, RuntimeError):
    """Another live writer holds the same rank of this store."""


class StoreWriteError(StoreError, OSError):
    """Writing a shard or index rows failed (e.g. a full disk); flushed items are intact."""
