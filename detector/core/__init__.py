"""The pure detection core: no I/O, no clock, no logging. Adapters (replay, Kafka, HTTP) wrap it."""

from .engine import INSIDE_AWS, OUTSIDE_AWS, Engine, FindingChange, MalformedRecord
from .findings import render
from .registry import EMPTY_REGISTRY, Registry, RegistryError, registry_from_mapping
from .state import DetectorState, EngineConfig

__all__ = [
    "EMPTY_REGISTRY",
    "INSIDE_AWS",
    "OUTSIDE_AWS",
    "DetectorState",
    "Engine",
    "EngineConfig",
    "FindingChange",
    "MalformedRecord",
    "Registry",
    "RegistryError",
    "registry_from_mapping",
    "render",
]
