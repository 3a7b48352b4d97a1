"""Writing a synced registry: validated, deterministic JSON, replaced atomically."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from ..core.registry import Registry, RegistryError
from ..ipranges_update import write_atomically  # temp file, fsync, os.replace, directory fsync
from .merge import normalise_registry

__all__ = ["render_registry", "write_registry"]


def render_registry(mapping: Mapping[str, Any]) -> tuple[bytes, Registry]:
    """Validate ``mapping`` and serialise it as sorted, indented JSON: the bytes, and the registry of their
    SPEC §7 part (:func:`detector.aws.merge.normalise_registry`; its ``summary()`` counts what was written)."""
    normalised, registry = normalise_registry(mapping, "<synced registry>")
    data = orjson.dumps(normalised, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    return data, registry


def write_registry(path: str | Path, mapping: Mapping[str, Any]) -> Registry:
    """Write ``mapping`` to ``path`` (.json only) atomically; an existing file is untouched on any failure.

    The bytes go to a temporary file in the same directory, are fsynced, then moved over ``path`` with
    ``os.replace``, so a detector reloading the registry sees the old file or the new one, never a mix.
    TOML output is refused (the detector reads TOML, but writing it would need another dependency).
    """
    target = Path(path)
    if target.suffix.lower() != ".json":
        raise RegistryError(
            f"{target}: the synced registry is written as JSON only; name the output *.json "
            "(a hand-written TOML file can still be the --overlay)"
        )
    data, registry = render_registry(mapping)
    write_atomically(target, data)
    return registry
