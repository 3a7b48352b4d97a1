"""Validation of OCSF 1.3 Detection Findings: the vendored OCSF 1.3.0 schema extract
(tests/fixtures/ocsf-1.3.0) as a strict JSON Schema, and py-ocsf-models' DetectionFinding model."""

from __future__ import annotations

import functools
import ipaddress
import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMA = Path(__file__).parent / "fixtures" / "ocsf-1.3.0" / "detection_finding.json"
_BASE = {
    "string_t": {"type": "string"},
    "integer_t": {"type": "integer"},
    "long_t": {"type": "integer"},
    "float_t": {"type": "number"},
    "boolean_t": {"type": "boolean"},
    "json_t": {},
}


def _type_schema(name: str, types: dict[str, Any]) -> dict[str, Any]:
    if name in _BASE:
        return dict(_BASE[name])
    base = types.get(name, {}).get("type")
    return _type_schema(base, types) if base else {}


def _attributes(holder: dict[str, Any], types: dict[str, Any], profiles: tuple[str, ...]) -> dict[str, Any]:
    """One class or object; an attribute of a profile exists only when the event declares that profile."""
    properties: dict[str, Any] = {}
    required = []
    for name, attr in holder["attributes"].items():
        if attr.get("profile") and attr["profile"] not in profiles:
            continue
        if attr.get("object_type") and attr["object_type"] != "object":
            item: dict[str, Any] = {"$ref": f"#/$defs/{attr['object_type']}"}
        elif attr.get("type") == "object":
            item = {"type": "object"}
        else:
            item = _type_schema(attr["type"], types)
            if attr.get("enum"):
                values = list(attr["enum"])
                item["enum"] = [int(v) for v in values] if item.get("type") == "integer" else values
        properties[name] = {"type": "array", "items": item} if attr.get("is_array") else item
        if attr.get("requirement") == "required":
            required.append(name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    constraints = holder.get("constraints") or {}
    if constraints.get("at_least_one"):
        schema["anyOf"] = [{"required": [name]} for name in constraints["at_least_one"] if name in properties]
    if constraints.get("just_one"):
        schema["oneOf"] = [{"required": [name]} for name in constraints["just_one"] if name in properties]
    return schema


@functools.cache
def validator(profiles: tuple[str, ...]) -> jsonschema.Draft202012Validator:
    """The JSON Schema of a Detection Finding declaring ``profiles`` (``metadata.profiles``)."""
    source = json.loads(SCHEMA.read_text())
    types = source["types"]
    schema = _attributes(source["classes"]["detection_finding"], types, profiles)
    schema["$defs"] = {name: _attributes(obj, types, profiles) for name, obj in source["objects"].items()}
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(event: dict[str, Any]) -> list[str]:
    """Every way ``event`` breaks the OCSF 1.3.0 Detection Finding schema, plus address checks."""
    profiles = tuple(sorted((event.get("metadata") or {}).get("profiles") or ()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(profiles).iter_errors(event)]
    for evidence in event.get("evidences") or []:
        ip = (evidence.get("src_endpoint") or {}).get("ip")
        if ip is not None:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                errors.append(f"evidences/src_endpoint/ip: {ip!r} is not an IP address")
    return errors


def assert_valid_ocsf(event: dict[str, Any]) -> None:
    """Valid against the OCSF 1.3.0 schema extract and accepted by py-ocsf-models' DetectionFinding."""
    from py_ocsf_models.events.findings.detection_finding import DetectionFinding

    import pydantic

    errors = schema_errors(event)
    assert not errors, errors
    assert event["metadata"]["version"] == "1.3.0"
    try:
        model = DetectionFinding.model_validate(event)
    except pydantic.ValidationError as exc:
        # py-ocsf-models (written for OCSF 1.4/1.5) makes a few attributes mandatory that OCSF 1.3.0 only
        # recommends (cloud.account.name, api.service.uid and version): those, and only those, may be missing.
        wrong = [e for e in exc.errors() if e["type"] != "missing" or _required_in_schema(e["loc"])]
        assert not wrong, wrong
        model = DetectionFinding.model_construct(**event)
    assert model.class_uid == 2004 and model.category_uid == 2
    assert int(model.type_uid) == 200400 + event["activity_id"]


def _required_in_schema(loc: tuple[Any, ...]) -> bool:
    """Whether the attribute at ``loc`` (a pydantic error location) is required by OCSF 1.3.0."""
    source = json.loads(SCHEMA.read_text())
    holder = source["classes"]["detection_finding"]
    names = [part for part in loc if isinstance(part, str)]
    for i, name in enumerate(names):
        attr = holder["attributes"].get(name)
        if attr is None:
            return False
        if i == len(names) - 1:
            return attr.get("requirement") == "required"
        holder = source["objects"][attr["object_type"]]
    return False
