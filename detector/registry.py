"""Loading the affiliation registry from a JSON or TOML file (by extension), for start and reload."""

from __future__ import annotations

import tomllib
from pathlib import Path

import orjson

from .core.registry import EMPTY_REGISTRY, Registry, RegistryError, registry_from_mapping

__all__ = ["RegistryError", "load_registry"]


def load_registry(path: str | Path | None) -> Registry:
    """Read and validate a registry file; ``None`` or empty means the empty registry.

    Raises :class:`RegistryError` naming the file, the key and the problem.
    """
    if path is None or str(path) == "":
        return EMPTY_REGISTRY
    p = Path(path)
    source = str(p)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise RegistryError(f"{source}: registry file must end in .json or .toml")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise RegistryError(f"{source}: cannot read ({exc.strerror or exc})") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        else:
            data = orjson.loads(raw)
    except (orjson.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{source}: not valid {suffix[1:].upper()} ({exc})") from None
    return registry_from_mapping(data, source)
