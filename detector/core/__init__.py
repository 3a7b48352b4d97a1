"""The pure detection core: no I/O, no clock, no logging. Adapters (replay, Kafka, HTTP) wrap it."""

from .engine import AFTER_STOP, IMDSV1, INSIDE_AWS, OTHER_INSTANCE, OUTSIDE_AWS, Engine, FindingChange, MalformedRecord
from .findings import render
from .registry import EMPTY_REGISTRY, Registry, RegistryError, registry_from_mapping
from .state import DetectorState, EngineConfig

__all__ = [
    "AFTER_STOP",
    "EMPTY_REGISTRY",
    "IMDSV1",
    "OTHER_INSTANCE",
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
