"""Reading the affiliation registry from AWS (``detector registry sync``), for the CLI and the service.

Importing this package loads aiobotocore; import it lazily from commands that do not need AWS.
"""

from .merge import merge_registry
from .output import render_registry, write_registry
from .sync import (
    DEFAULT_CONCURRENCY,
    DEFAULT_ROLE_NAME,
    AccountInventory,
    SyncError,
    SyncOptions,
    SyncReport,
    collect_inventory,
    sync_registry,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_ROLE_NAME",
    "AccountInventory",
    "SyncError",
    "SyncOptions",
    "SyncReport",
    "collect_inventory",
    "merge_registry",
    "render_registry",
    "sync_registry",
    "write_registry",
]
