"""The service's settings: one typed model, four layers, generated flags and documentation.

Precedence, lowest first: the model's defaults < the TOML config file < ``DETECTOR_*`` environment
variables < command-line flags. These are pydantic-settings sources, ordered by
``KafkaClientSettings.settings_customise_sources``: its InitSettingsSource (the flags, as keyword
arguments), its EnvSettingsSource (prefix, case and empty variables from ``model_config``) and
``_ConfigFile``. Two small pieces are ours because pydantic-settings lacks them: ``_ConfigFile`` (its
TomlConfigSettingsSource takes the file from the class, treats a missing file as empty, accepts tables and
resolves nothing against the file's directory) and ``_Recorded``, which remembers which source gave each
value, so that an error names both the setting and its source ("flag --http-port", "env
DETECTOR_HTTP_PORT", "file /etc/detector.toml") and ``detector settings show`` reports it.
:func:`load_settings` picks the file (``--config``, else ``$DETECTOR_CONFIG``) and hands it, with the
record, to the sources through a context variable: pydantic-settings builds sources from the class alone.

Adding a setting is one declaration in :class:`Settings`: a typed field with a default and a
``description``. Its ``--kebab-case`` flag (:func:`settings_options`), its ``DETECTOR_<NAME>`` environment
variable, its TOML key and its row in ``docs/configuration.md`` (:func:`configuration_markdown`) all derive
from the field; regenerate the doc with ``python -m detector.service.settings > docs/configuration.md``
(a test fails until you do). Fields must be scalars (str, int, float, bool, Path, a Literal, SecretStr,
optionally ``| None``) so that one flag and one environment variable can carry them. Use
``json_schema_extra={"doc_default": "..."}`` when the default needs words rather than a value.
"""

from __future__ import annotations

import contextvars
import difflib
import math
import os
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import (
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

ENV_PREFIX = "DETECTOR_"
CONFIG_ENV = "DETECTOR_CONFIG"
MASK = "***"

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "AWS_MSK_IAM"]

_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
_BRACKETED_HOST_RE = re.compile(r"\[[0-9A-Fa-f:.]+\](?::(\d{1,5}))?")
_SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
_SSL_PROTOCOLS = ("SSL", "SASL_SSL")



class SettingsError(ValueError):
    """A setting could not be read or is invalid; the message names the setting and its source."""


def _aws_region_from_env() -> tuple[str | None, str | None]:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, None


def _conflict(message: str, *fields: str) -> PydanticCustomError:
    return PydanticCustomError("settings_conflict", "{message}", {"message": message, "fields": ",".join(fields)})


def _check_topic(setting: str, name: str) -> str:
    if not _TOPIC_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"{setting}: {name!r} is not a valid Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -)"
        )
    return name


def non_empty(value: str, info: ValidationInfo) -> str:
    if not value.strip():
        raise ValueError(f"{info.field_name} must not be empty")
    return value.strip()


def existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    if not value.exists():
        raise ValueError(f"{info.field_name}: file {str(value)!r} does not exist")
    if not value.is_file():
        raise ValueError(f"{info.field_name}: {str(value)!r} is not a file")
    return value


def comma_joined(value: Any) -> Any:
    """A TOML array of strings as the comma-separated string a list setting takes; anything else as is."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value


def optional_str(value: str | None, info: ValidationInfo) -> str | None:
    if value is not None and not value.strip():
        raise ValueError(f"{info.field_name} must not be blank")
    return value.strip() if value is not None else None


class KafkaClientSettings(BaseSettings):
    """What every long-running command shares: the Kafka connection (bootstrap, TLS, SASL), the HTTP
    endpoints and the process (logging, event loop). :class:`Settings` (``detector run``) and the settings
    of the other Kafka commands extend it. Field name = TOML key; env var = ``DETECTOR_<NAME>``; flag =
    ``--name``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    # --- Kafka connection ---------------------------------------------------------------------------
    kafka_bootstrap: str = Field(
        "localhost:9092", description="Kafka bootstrap servers, comma-separated `host:port` list."
    )
    client_id: str = Field("detector", description="Kafka client id (broker logs and quotas).")

    # --- Security -----------------------------------------------------------------------------------
    security_protocol: SecurityProtocol = Field("PLAINTEXT", description="Protocol used to talk to the brokers.")
    sasl_mechanism: SaslMechanism | None = Field(
        None,
        description="SASL mechanism, required with `SASL_*` protocols. `AWS_MSK_IAM` is OAUTHBEARER with a token "
        "signed from the AWS credentials in the environment (Amazon MSK IAM access control).",
    )
    sasl_username: str | None = Field(None, description="SASL username (PLAIN and SCRAM).")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (PLAIN and SCRAM). Prefer the environment variable to the flag."
    )
    sasl_oauth_token_file: Path | None = Field(
        None,
        description="File holding the bearer token for `OAUTHBEARER`; re-read at every authentication, so a "
        "sidecar may rotate it.",
    )
    msk_iam_region: str | None = Field(
        default_factory=lambda: _aws_region_from_env()[0],
        description="AWS region of the MSK cluster, required with `AWS_MSK_IAM`.",
        json_schema_extra={"doc_default": "`$AWS_REGION`, else `$AWS_DEFAULT_REGION`, else none"},
    )
    ssl_cafile: Path | None = Field(
        None, description="PEM file of CA certificates to verify the brokers with; unset: the system CAs."
    )
    ssl_certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS); needs `ssl_keyfile`.")
    ssl_keyfile: Path | None = Field(None, description="PEM private key of the client certificate.")
    ssl_key_password: SecretStr | None = Field(None, description="Password of an encrypted `ssl_keyfile`.")
    ssl_check_hostname: bool = Field(True, description="Check that the broker certificate matches its host name.")

    # --- HTTP endpoints -----------------------------------------------------------------------------
    http_host: str = Field("0.0.0.0", description="Address of the HTTP server (`/metrics`, `/healthz`, `/readyz`).")
    http_port: int = Field(9108, ge=0, le=65535, description="Port of the HTTP server; 0 picks a free port.")

    # --- Process ------------------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Least severe level logged.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="Log format: JSON lines, or the human console renderer; `auto` is console on a TTY, else JSON."
    )
    use_uvloop: bool = Field(False, description="Run the event loop on uvloop (install the `uvloop` extra).")

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    # --- sources ------------------------------------------------------------------------------------
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: keyword arguments (flags), environment, then within :func:`load_settings` the config
        file, each recorded. No ``.env`` file, no secrets directory."""
        load = _LOAD.get()
        if load is None:
            return (init_settings, env_settings)
        file, named_by, origin = load
        sources = [
            _Recorded(init_settings, origin, lambda name: f"flag {flag(name)}"),
            _Recorded(env_settings, origin, lambda name: f"env {env_var(name)}"),
        ]
        if file is not None:
            sources.append(_Recorded(_ConfigFile(settings_cls, file, named_by), origin, lambda _name: f"file {file}"))
        return tuple(sources)

    # --- field validation ---------------------------------------------------------------------------
    @field_validator("security_protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.strip().upper()
        return value.replace("_", "-") if value.startswith("SCRAM") else value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("client_id", "http_host")
    @classmethod
    def _non_empty(cls, value: str, info: ValidationInfo) -> str:
        return non_empty(value, info)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        entries = [e.strip() for e in value.split(",")]
        if not any(entries) or not all(entries):
            raise ValueError(f"kafka_bootstrap: {value!r} is not a comma-separated list of host:port")
        for entry in entries:
            port: str | None = None
            if entry.startswith("["):
                m = _BRACKETED_HOST_RE.fullmatch(entry)
                if not m:
                    raise ValueError(f"kafka_bootstrap: bad address {entry!r}")
                port = m.group(1)
            elif entry.count(":") == 1:
                host, port = entry.split(":")
                if not host or not port.isdigit():
                    raise ValueError(f"kafka_bootstrap: bad address {entry!r} (expected host:port)")
            if any(c.isspace() for c in entry) or "/" in entry:
                raise ValueError(f"kafka_bootstrap: bad address {entry!r} (expected host:port, no scheme)")
            if port is not None and not 0 < int(port) <= 65535:
                raise ValueError(f"kafka_bootstrap: port out of range in {entry!r}")
        return ",".join(entries)

    @field_validator("sasl_oauth_token_file", "ssl_cafile", "ssl_certfile", "ssl_keyfile")
    @classmethod
    def _existing_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info)

    @field_validator("sasl_username", "msk_iam_region")
    @classmethod
    def _optional_str(cls, value: str | None, info: ValidationInfo) -> str | None:
        return optional_str(value, info)

    @model_validator(mode="after")
    def _secure(self) -> KafkaClientSettings:
        """The Kafka security settings agree with each other."""
        protocol, mechanism = self.security_protocol, self.sasl_mechanism
        if protocol in _SASL_PROTOCOLS and mechanism is None:
            raise _conflict(f"security_protocol {protocol} requires sasl_mechanism", "security_protocol", "sasl_mechanism")
        if protocol not in _SASL_PROTOCOLS and mechanism is not None:
            raise _conflict(
                f"sasl_mechanism {mechanism} needs security_protocol SASL_PLAINTEXT or SASL_SSL, not {protocol}",
                "sasl_mechanism", "security_protocol",
            )
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            missing = [n for n in ("sasl_username", "sasl_password") if getattr(self, n) is None]
            if missing:
                raise _conflict(f"sasl_mechanism {mechanism} requires {' and '.join(missing)}", "sasl_mechanism", *missing)
        elif self.sasl_username is not None or self.sasl_password is not None:
            raise _conflict(
                f"sasl_username/sasl_password are only used with sasl_mechanism PLAIN or SCRAM-*, not {mechanism}",
                "sasl_mechanism", "sasl_username", "sasl_password",
            )
        if mechanism == "OAUTHBEARER" and self.sasl_oauth_token_file is None:
            raise _conflict("sasl_mechanism OAUTHBEARER requires sasl_oauth_token_file", "sasl_mechanism", "sasl_oauth_token_file")
        if mechanism == "AWS_MSK_IAM" and not self.msk_iam_region:
            raise _conflict(
                "sasl_mechanism AWS_MSK_IAM requires msk_iam_region (or AWS_REGION in the environment)",
                "sasl_mechanism", "msk_iam_region",
            )
        if protocol not in _SSL_PROTOCOLS:
            ssl_set = [n for n in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password") if getattr(self, n) is not None]
            if ssl_set:
                raise _conflict(
                    f"{', '.join(ssl_set)} only apply to security_protocol SSL or SASL_SSL, not {protocol}",
                    "security_protocol", *ssl_set,
                )
        if self.ssl_certfile is not None and self.ssl_keyfile is None:
            raise _conflict("ssl_certfile requires ssl_keyfile", "ssl_certfile", "ssl_keyfile")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise _conflict("ssl_keyfile requires ssl_certfile", "ssl_keyfile", "ssl_certfile")
        if self.ssl_key_password is not None and self.ssl_keyfile is None:
            raise _conflict("ssl_key_password requires ssl_keyfile", "ssl_key_password", "ssl_keyfile")
        return self

    @property
    def bootstrap_servers(self) -> list[str]:
        return self.kafka_bootstrap.split(",")

    @property
    def sources(self) -> dict[str, str]:
        """Where each value came from: ``default``, ``file PATH``, ``env NAME``, ``flag --name`` (or ``argument``)."""
        return {
            name: self._sources.get(name, "argument" if name in self.model_fields_set else "default")
            for name in type(self).model_fields
        }

    def redacted(self) -> dict[str, Any]:
        """The settings as a JSON-able dict, secrets replaced by ``***`` (unset secrets stay ``None``)."""
        data = self.model_dump(mode="json")
        for name in _secret_fields(type(self)):
            if getattr(self, name) is not None:
                data[name] = MASK
        return data


AnySettings = typing.TypeVar("AnySettings", bound=KafkaClientSettings)


class Settings(KafkaClientSettings):
    """Every setting of ``detector run`` (on top of :class:`KafkaClientSettings`)."""

    # --- Kafka topics and identity ------------------------------------------------------------------
    input_topics: str = Field(
        "cloudtrail",
        description="Input topics: a comma-separated list of names, or one value starting with `^`, a regular "
        "expression every topic to consume must match (new matching topics are picked up).",
    )
    findings_topic: str = Field(
        "detector.findings", description="Topic the findings are published to, keyed by finding `id`."
    )
    dlq_topic: str = Field("detector.dlq", description="Dead-letter topic for malformed input.")
    group_id: str = Field("detector", description="Kafka consumer group id.")

    # --- Detection inputs ---------------------------------------------------------------------------
    registry: Path | None = Field(
        None,
        description="Affiliation registry file (.json or .toml); must exist. Unset: an empty registry.",
        json_schema_extra={"doc_default": "none (empty registry)"},
    )
    ip_ranges: Path | None = Field(
        None,
        description="AWS `ip-ranges.json` (plain or .gz); must exist. Unset: the snapshot shipped in the package.",
        json_schema_extra={"doc_default": "the packaged snapshot"},
    )
    registry_reload_seconds: float = Field(
        5.0, ge=0, allow_inf_nan=False,
        description="How often the registry and ip-ranges files are checked for changes and reloaded; 0 disables.",
    )

    registry_sync_seconds: float = Field(
        0.0, ge=0, allow_inf_nan=False,
        description="Rebuild the registry from AWS in-process this often (Organizations, GuardDuty members, network "
        "inventory through `registry_sync_role_name`), hot-swapping it on success; 0 disables. Credentials: the "
        "standard AWS chain.",
    )
    registry_sync_role_name: str = Field(
        "OrganizationAccountAccessRole", description="Read-only role assumed in each account by the in-process sync."
    )
    registry_sync_regions: str = Field(
        "", description="Comma-separated regions the in-process sync inventories; empty: every enabled region."
    )
    registry_sync_overlay: Path | None = Field(
        None, description="Hand-written registry merged over each sync (names, trusted hubs, expected networks, overrides)."
    )
    registry_sync_output: Path | None = Field(
        None, description="Where each successful sync is also written (atomically), so a restart starts from it."
    )
    registry_sync_endpoint_url: str | None = Field(
        None, description="One endpoint URL for every AWS service the sync calls (a private endpoint or a test double)."
    )

    # --- Findings -----------------------------------------------------------------------------------
    finding_update_seconds: float = Field(
        60.0, ge=0, allow_inf_nan=False,
        description="How often an open finding's updated state is re-published (new findings are published at once).",
    )
    eventbridge_envelope: bool = Field(
        False,
        description="Wrap each finding in an EventBridge `GuardDuty Finding` event envelope (guardduty format only).",
    )
    finding_format: Literal["guardduty", "ocsf"] = Field(
        "guardduty",
        description="How findings are written: `guardduty` (GuardDuty-shaped JSON) or `ocsf` (an OCSF 1.3 Detection "
        "Finding, class_uid 2004, the GuardDuty-shaped fields under `unmapped`; see docs/findings.md).",
    )

    # --- Detection (SPEC part two) ------------------------------------------------------------------
    stop_grace_seconds: float = Field(
        600.0, ge=0, allow_inf_nan=False,
        description="SPEC §11: use of an instance's credentials more than this many seconds (of event time) "
        "after the instance stopped or terminated is an `AfterInstanceStopped` finding.",
    )
    imdsv1_findings: bool = Field(
        True, description="SPEC §13: a Low `Policy:EC2/InstanceCredentialsDeliveredByIMDSv1` finding for every "
        "session whose credentials were delivered by IMDSv1.",
    )

    # --- State --------------------------------------------------------------------------------------
    session_ttl_seconds: float = Field(
        43200.0, gt=0, allow_inf_nan=False, description="Idle TTL of a session entry, seconds of event time."
    )
    max_sessions: int = Field(1_000_000, ge=1, description="Cap of the session index (least recently used evicted).")
    finding_ttl_seconds: float = Field(
        604800.0, gt=0, allow_inf_nan=False,
        description="How long a finding group is kept after its last update, seconds of event time.",
    )

    # --- Service loop -------------------------------------------------------------------------------
    grace_seconds: float = Field(
        15.0, ge=0, allow_inf_nan=False,
        description="Shutdown grace period after SIGTERM: flush findings, commit, exit within it.",
    )
    max_poll_records: int = Field(2000, ge=1, description="Most records fetched per poll.")
    fetch_max_wait_ms: int = Field(100, ge=0, description="Longest a fetch waits on the broker for data, milliseconds.")
    stage: Literal["all", "route", "detect"] = Field(
        "all",
        description="The stages this process runs: `all` (both, on one event loop), `route` (input topics to the "
        "sessions topic) or `detect` (sessions topic to state, changelog and findings). Run one `route` and one "
        "`detect` process with the same settings to use two cores (see docs/scaling.md); each creates or checks "
        "the topics at start-up as `all` does.",
    )
    checkpoint_interval_ms: int = Field(
        200, ge=10, le=60_000,
        description="How often each stage checkpoints, milliseconds: awaits the acknowledgement of every output "
        "queued since the last checkpoint, writes the changelog record of each session changed since then (once), "
        "then commits the input offsets it covers (also on rebalance and shutdown). New findings go out at once, "
        "not at the checkpoint, except with `transactional_id`, where a checkpoint is one transaction and findings "
        "become visible when it commits. Longer: fewer changelog records and commits, more input consumed again "
        "after a crash.",
    )
    startup_retry_max_seconds: float = Field(
        30.0, gt=0, allow_inf_nan=False,
        description="Cap of the exponential backoff between broker connection attempts at start-up.",
    )

    # --- Producer -----------------------------------------------------------------------------------
    producer_acks: Literal["all", "1", "0"] = Field(
        "all", description="Producer acknowledgements: `all` (all in-sync replicas), `1` (leader) or `0` (none)."
    )
    enable_idempotence: bool = Field(
        False, description="Idempotent producer (needs `producer_acks = all` and broker support)."
    )
    transactional_id: str | None = Field(
        None,
        description="Transactional producer id: outputs and input offsets of each checkpoint are committed in one Kafka "
        "transaction (exactly once). Must be unique per instance and stable across its restarts (e.g. the pod "
        "name). Needs `enable_idempotence` and broker support; unset: at least once, no transactions.",
    )

    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024,
        description="Largest message the producer sends (a dead letter keeps the original bytes; a bigger one is "
        "truncated and marked). The dead-letter topic is created allowing it.",
    )

    # --- Topic administration -----------------------------------------------------------------------
    auto_create_topics: bool = Field(
        True, description="Create the findings and dead-letter topics at start-up when they are missing."
    )
    topic_partitions: int = Field(3, ge=1, description="Partitions of topics created by the detector.")
    topic_replication_factor: int = Field(1, ge=1, description="Replication factor of topics created by the detector.")

    # --- Stream processing state (internal topics) ---------------------------------------------------
    sessions_topic: str | None = Field(
        None,
        description="Internal repartition topic: instance-session, issuance and lifecycle records keyed by "
        "instance ID (SPEC §10), so everything about one instance lives in one partition of one process.",
        json_schema_extra={"doc_default": "`<group_id>.sessions`"},
    )
    changelog_topic: str | None = Field(
        None,
        description="Internal compacted changelog of the session index and finding groups; same partition count "
        "as `sessions_topic`. Restored on partition assignment.",
        json_schema_extra={"doc_default": "`<group_id>.changelog`"},
    )
    reorder_window_ms: int = Field(
        1000, ge=0, le=10_000,
        description="The longest the detection stage holds a fetched record before applying it in eventTime order "
        "across source partitions, so that instances routing in parallel apply a session's records in the order "
        "one instance would (trust on first use depends on it). A record goes as soon as every input partition "
        "heard from within this window has delivered one at least as new, so under steady input the hold is about "
        "one fetch; this bound is paid when an input partition is quiet or lags. 0 disables the hold.",
    )
    state_partitions: int = Field(
        6, ge=1, description="Partitions of the internal topics when the detector creates them (the unit of scale-out)."
    )

    # --- field validation ---------------------------------------------------------------------------
    @field_validator("producer_acks", mode="before")
    @classmethod
    def _acks(cls, value: Any) -> Any:
        if isinstance(value, bool):  # TOML `producer_acks = true` is a mistake, not "1"
            return value
        if isinstance(value, int):
            value = str(value)
        if isinstance(value, str):
            value = value.strip().lower()
            return "all" if value == "-1" else value
        return value

    @field_validator("input_topics", mode="before")
    @classmethod
    def _topics_list(cls, value: Any) -> Any:
        return comma_joined(value)  # a TOML array of names is accepted too

    @field_validator("input_topics")
    @classmethod
    def _input_topics(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("^"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"input_topics: invalid regular expression {value!r}: {exc}") from None
            return value
        names = [n.strip() for n in value.split(",") if n.strip()]
        if not names:
            raise ValueError("input_topics: no topic given (a comma-separated list, or a ^regex)")
        for name in names:
            _check_topic("input_topics", name)
        return ",".join(dict.fromkeys(names))

    @field_validator("findings_topic", "dlq_topic")
    @classmethod
    def _output_topic(cls, value: str, info: ValidationInfo) -> str:
        return _check_topic(info.field_name, value.strip())

    @field_validator("group_id")
    @classmethod
    def _group(cls, value: str, info: ValidationInfo) -> str:
        return non_empty(value, info)

    @field_validator("sessions_topic", "changelog_topic")
    @classmethod
    def _internal_topic(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None or not value.strip() else _check_topic(info.field_name, value.strip())

    @field_validator("registry", "ip_ranges")
    @classmethod
    def _existing_input(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return existing_file(value, info)

    @field_validator("transactional_id")
    @classmethod
    def _optional_transactional(cls, value: str | None, info: ValidationInfo) -> str | None:
        return optional_str(value, info)

    @field_validator("finding_format", mode="before")
    @classmethod
    def _lower_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    # --- cross-field validation ---------------------------------------------------------------------
    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.eventbridge_envelope and self.finding_format != "guardduty":
            raise _conflict(
                "eventbridge_envelope wraps GuardDuty-shaped findings; it cannot be combined with finding_format "
                f"{self.finding_format}", "eventbridge_envelope", "finding_format",
            )
        if self.transactional_id is not None and not self.enable_idempotence:
            raise _conflict("transactional_id requires enable_idempotence", "transactional_id", "enable_idempotence")
        if self.enable_idempotence and self.producer_acks != "all":
            raise _conflict(
                f"enable_idempotence requires producer_acks all, not {self.producer_acks}",
                "enable_idempotence", "producer_acks",
            )
        outputs = {
            "findings_topic": self.findings_topic,
            "dlq_topic": self.dlq_topic,
            "sessions_topic": self.sessions_topic_name,
            "changelog_topic": self.changelog_topic_name,
        }
        if len(set(outputs.values())) != len(outputs):
            raise _conflict(
                "findings_topic, dlq_topic, sessions_topic and changelog_topic must all differ", *outputs
            )
        kind, topics = self.input_subscription
        for output, name in outputs.items():
            consumed = re.match(topics, name) if kind == "pattern" else name in topics
            if consumed:
                raise _conflict(
                    f"input_topics {self.input_topics!r} would consume {output} {name!r} (a feedback loop)",
                    "input_topics", output,
                )
        return self

    # --- derived values -----------------------------------------------------------------------------
    @property
    def input_subscription(self) -> tuple[Literal["topics"], list[str]] | tuple[Literal["pattern"], str]:
        """``("topics", [names...])`` or ``("pattern", "^regex")`` — for ``consumer.subscribe(topics=/pattern=)``."""
        if self.input_topics.startswith("^"):
            return ("pattern", self.input_topics)
        return ("topics", self.input_topics.split(","))

    @property
    def sessions_topic_name(self) -> str:
        return self.sessions_topic or f"{self.group_id}.sessions"

    @property
    def changelog_topic_name(self) -> str:
        return self.changelog_topic or f"{self.group_id}.changelog"

    @property
    def detect_group_id(self) -> str:
        """Consumer group of the detection stage (reads ``sessions_topic``)."""
        return f"{self.group_id}.detect"

# ------------------------------------------------------------------------------------------------------
# field introspection (flags, env vars, docs)
# ------------------------------------------------------------------------------------------------------

def env_var(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(field: FieldInfo) -> tuple[Any, bool]:
    """The annotation without ``| None``, and whether None is allowed."""
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return ann, False


def _secret_fields(cls: type[KafkaClientSettings]) -> list[str]:
    return [n for n, f in cls.model_fields.items() if _base_type(f)[0] in (SecretStr, SecretBytes)]


def _path_fields(cls: type[BaseSettings]) -> list[str]:
    return [n for n, f in cls.model_fields.items() if _base_type(f)[0] is Path]


def _choices(field: FieldInfo) -> list[str] | None:
    base, _ = _base_type(field)
    return list(typing.get_args(base)) if typing.get_origin(base) is Literal else None


# ------------------------------------------------------------------------------------------------------
# loading: defaults < file < env < flags
# ------------------------------------------------------------------------------------------------------

# load_settings' config file (path, what named it) and record of origins, for settings_customise_sources
_LOAD: contextvars.ContextVar[tuple[Path | None, str, dict[str, str]] | None] = contextvars.ContextVar(
    "detector_settings_load", default=None
)


class _Recorded(PydanticBaseSettingsSource):
    """A source whose keys are recorded with where they came from (``describe(name)``), first source first, so
    that :attr:`KafkaClientSettings.sources` and error messages can name each value's layer."""

    def __init__(self, source: PydanticBaseSettingsSource, origin: dict[str, str], describe: Callable[[str], str]) -> None:
        super().__init__(source.settings_cls)
        self.source, self.origin, self.describe = source, origin, describe

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.source.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        try:
            data = self.source()
        except PydanticSettingsError as exc:  # a complex (JSON) value that does not parse
            name = m.group(1) if (m := re.search(r'field "(\w+)"', str(exc))) else "?"
            raise SettingsError(f"invalid setting {name}: {exc.__cause__} (from {self.describe(name)})") from None
        for key in data:
            self.origin.setdefault(key, self.describe(key))
        return data


class _ConfigFile(InitSettingsSource):
    """The TOML file :func:`load_settings` chose at run time, as pydantic-settings' TomlConfigSettingsSource is
    an InitSettingsSource of a file's data but with what that one lacks: a missing, unreadable or invalid file
    is an error naming it and what named it (not an empty layer); an unknown key or a table is refused naming
    the file and the key, with a did-you-mean; relative paths in it are relative to its directory."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path, named_by: str) -> None:
        where = f"config file {str(path)!r} (from {named_by})"
        try:
            data = tomllib.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"{where} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{where} cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{where} is not valid TOML: {exc}") from None
        fields = settings_cls.model_fields
        for key, value in data.items():
            if key not in fields:
                hint = difflib.get_close_matches(key, list(fields), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                if isinstance(value, dict):
                    extra += " (settings are top-level keys, not tables)"
                raise SettingsError(f"unknown setting {key!r} in config file {str(path)!r}{extra}")
        for key in _path_fields(settings_cls):  # relative paths in a file are relative to the file
            if isinstance(value := data.get(key), str) and value:
                data[key] = str(path.parent / os.path.expanduser(value))
        super().__init__(settings_cls, data)


def load_settings(
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    cls: type[AnySettings] = Settings,  # type: ignore[assignment]
) -> AnySettings:
    """Build the settings from defaults < ``config_file`` (TOML) < ``DETECTOR_*`` env < ``overrides`` (flags).

    ``config_file`` defaults to ``$DETECTOR_CONFIG`` when given as None. Keys of ``overrides`` are field
    names; None values are ignored (a flag that was not given). Raises :class:`SettingsError`.
    """
    if config_file is not None:
        file, named_by = Path(config_file), "--config"
    else:
        file, named_by = (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None), CONFIG_ENV
    flags: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if key not in cls.model_fields:
            raise SettingsError(f"unknown setting {key!r} (from flag)")
        if value is not None:
            flags[key] = value
    origin: dict[str, str] = {}
    token = _LOAD.set((file, named_by, origin))
    try:
        settings = cls(**flags)
    except ValidationError as exc:
        raise SettingsError(_describe_errors(exc, origin, cls)) from None
    finally:
        _LOAD.reset(token)
    region_var = _aws_region_from_env()[1]
    if region_var and settings.msk_iam_region is not None:  # its default_factory read the variable
        origin.setdefault("msk_iam_region", f"env {region_var}")
    settings._sources = {name: origin.get(name, "default") for name in cls.model_fields}
    return settings


def _describe_errors(exc: ValidationError, origin: Mapping[str, str], cls: type[KafkaClientSettings]) -> str:
    secrets = set(_secret_fields(cls))
    lines = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err.get("loc", ())]
        ctx = err.get("ctx") or {}
        if loc:
            name = loc[0]
            shown = MASK if name in secrets else repr(err.get("input"))
            msg = err["msg"].removeprefix("Value error, ")
            if not msg.startswith(f"{name}:") and not msg.startswith(f"{name} "):
                msg = f"{name}: {msg}"
            lines.append(f"invalid setting {msg} (value {shown} from {origin.get(name, 'default')})")
        else:
            names = [n for n in str(ctx.get("fields", "")).split(",") if n]
            where = ", ".join(f"{n} from {origin.get(n, 'default')}" for n in names)
            msg = str(ctx.get("message", err["msg"].removeprefix("Value error, ")))
            lines.append(f"invalid settings: {msg} ({where})" if where else f"invalid settings: {msg}")
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------

_METAVARS = {int: "INT", float: "SECONDS", Path: "FILE", str: "TEXT", SecretStr: "SECRET"}


def settings_params(cls: type[KafkaClientSettings] = Settings) -> list[click.Option]:
    """One click option per setting (plus ``--config``), every default None so only given flags override."""
    params = [
        click.Option(
            ["--config", "config"],
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help=f"TOML config file (top-level keys = setting names)  [env: {CONFIG_ENV}]",
        )
    ]
    for name, field in cls.model_fields.items():
        base, _ = _base_type(field)
        help_text = f"{field.description}  [env: {env_var(name)}]"
        if base is bool:
            params.append(click.Option([f"{flag(name)}/--no-{name.replace('_', '-')}", name], default=None, help=help_text))
            continue
        choices = _choices(field)
        if choices is not None:
            params.append(click.Option([flag(name), name], type=click.Choice(choices, case_sensitive=False), default=None, help=help_text))
            continue
        metavar = _METAVARS.get(base, "TEXT")
        if base is float and not name.endswith("_seconds"):
            metavar = "NUMBER"
        # values stay strings: the model validates them, so a bad flag gets the same message as a bad env var
        params.append(click.Option([flag(name), name], type=str, default=None, metavar=metavar, help=help_text))
    return params


def settings_options(func: Callable[..., Any], cls: type[KafkaClientSettings] = Settings) -> Callable[..., Any]:
    """Click decorator: adds ``--config`` and one flag per setting of ``cls`` to a command (kwargs named like
    the fields). For another settings class: ``functools.partial(settings_options, cls=IngestSettings)``."""
    if isinstance(func, click.Command):
        func.params.extend(settings_params(cls))
        return func
    params = getattr(func, "__click_params__", None)
    if params is None:
        params = func.__click_params__ = []  # type: ignore[attr-defined]
    # click applies decorators bottom-up and reverses __click_params__; append reversed to keep model order
    params.extend(reversed(settings_params(cls)))
    return func


def settings_overrides(kwargs: Mapping[str, Any], cls: type[KafkaClientSettings] = Settings) -> dict[str, Any]:
    """The flags actually given among a command's kwargs, as ``load_settings`` overrides."""
    return {name: kwargs[name] for name in cls.model_fields if kwargs.get(name) is not None}


def settings_from_cli(
    kwargs: Mapping[str, Any], cls: type[AnySettings] = Settings  # type: ignore[assignment]
) -> AnySettings:
    """``load_settings(--config or $DETECTOR_CONFIG, given flags)`` for a command decorated with settings_options."""
    return load_settings(kwargs.get("config"), settings_overrides(kwargs, cls), cls)


# ------------------------------------------------------------------------------------------------------
# documentation
# ------------------------------------------------------------------------------------------------------

TOML_EXAMPLE = """\
# detector.toml: `detector run --config detector.toml`, or DETECTOR_CONFIG=detector.toml
kafka_bootstrap = "kafka-1.internal:9092,kafka-2.internal:9092"
input_topics = '^cloudtrail\\..*'       # or "cloudtrail,cloudtrail-org", or ["cloudtrail", "cloudtrail-org"]
findings_topic = "detector.findings"
dlq_topic = "detector.dlq"
group_id = "detector"
# registry = "registry.toml"         # relative to this file
finding_update_seconds = 60
eventbridge_envelope = false
max_sessions = 2_000_000

security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "detector"
# sasl_password: set DETECTOR_SASL_PASSWORD in the environment rather than here

log_level = "info"
log_format = "json"
"""


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc_default(name: str, field: FieldInfo) -> str:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "doc_default" in extra:
        return str(extra["doc_default"])
    default = field.get_default(call_default_factory=False)
    if default is None:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def _doc_type(field: FieldInfo) -> str:
    base, optional = _base_type(field)
    choices = _choices(field)
    if choices is not None:
        text = " \\| ".join(f"`{c}`" for c in choices)
    else:
        text = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", SecretStr: "secret"}.get(base, str(base))
    bounds = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if bound is not None and not (isinstance(bound, float) and math.isinf(bound)):
                bounds.append(f"{sign} {bound}")
    if bounds:
        text += " " + ", ".join(bounds)
    return text


def settings_table(cls: type[KafkaClientSettings], names: typing.Iterable[str] | None = None) -> str:
    """The markdown table of ``cls``'s settings (all, or ``names``): one row per setting."""
    rows = [
        "| setting (TOML key) | flag | environment variable | type | default | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name in names if names is not None else cls.model_fields:
        field = cls.model_fields[name]
        base, _ = _base_type(field)
        flags = f"`{flag(name)}` / `--no-{name.replace('_', '-')}`" if base is bool else f"`{flag(name)}`"
        rows.append(
            f"| `{name}` | {flags} | `{env_var(name)}` | {_doc_type(field)} | {_doc_default(name, field)} | {_md(field.description or '')} |"
        )
    return "\n".join(rows)


# Settings classes of the other long-running commands (``"module:Class"``, imported only to write the
# docs), documented after `detector run`'s so that the one generated docs/configuration.md covers them all.
COMMAND_SETTINGS: dict[str, str] = {
    "export securityhub": "detector.outputs.settings:ExportSettings",
    "respond": "detector.outputs.settings:RespondSettings",
    "ingest": "detector.ingest.settings:IngestSettings",
}


def _command_settings() -> list[tuple[str, type[KafkaClientSettings]]]:
    import importlib

    out = []
    for command, target in COMMAND_SETTINGS.items():
        module, _, name = target.partition(":")
        out.append((command, getattr(importlib.import_module(module), name)))
    return out


def configuration_markdown() -> str:
    """The text of ``docs/configuration.md``, generated from :class:`Settings` and the registered classes."""
    secrets = ", ".join(f"`{n}`" for n in _secret_fields(Settings))
    others = []
    for command, cls in _command_settings():
        own = [n for n in cls.model_fields if n not in KafkaClientSettings.model_fields]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        others.append(
            f"## `detector {command}`\n\n{doc} It shares the Kafka connection, HTTP and process settings of "
            f"`detector run` (the same names, variables and flags); its own settings are:\n\n{settings_table(cls, own)}\n"
        )
    other_text = ("\n" + "\n".join(others)) if others else ""
    return f"""<!-- Generated by detector.service.settings.configuration_markdown(); do not edit.
     Regenerate: python -m detector.service.settings > docs/configuration.md -->
# Configuration of `detector run`

Every setting has a command-line flag, an environment variable and a key in the TOML config file.
Precedence, lowest first:

1. the defaults below;
2. the TOML config file named by `--config FILE`, or else by `{CONFIG_ENV}`;
3. the environment (`{ENV_PREFIX}<SETTING>`, case-insensitive; an empty variable counts as unset);
4. command-line flags.

An invalid value, an unknown key in the file or an unreadable file stops the service with a message
naming the setting and where its value came from (`flag --http-port`, `env DETECTOR_HTTP_PORT`,
`file /etc/detector/detector.toml`). Unknown `{ENV_PREFIX}*` environment variables are ignored
(Kubernetes defines some for a Service named `detector`). `detector settings show` prints the effective
settings and the source of each value as JSON, with secrets ({secrets}) shown as `{MASK}`.

Booleans accept `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off` in the environment and as TOML booleans
in the file; their flags come in pairs (`--x` / `--no-x`). Choices are case-insensitive.

## The config file

TOML, with the settings as top-level keys named as in the first column (tables are rejected). Relative
paths in the file are relative to the file's directory; in the environment and on the command line they
are relative to the working directory. `input_topics` may also be a TOML array of names.

```toml
{TOML_EXAMPLE.rstrip()}
```

## Settings

{settings_table(Settings)}

## Rules across settings

- `security_protocol` `SASL_PLAINTEXT` or `SASL_SSL` requires `sasl_mechanism`, and `sasl_mechanism`
  requires one of them.
- `PLAIN`, `SCRAM-SHA-256` and `SCRAM-SHA-512` require `sasl_username` and `sasl_password`;
  `OAUTHBEARER` requires `sasl_oauth_token_file`; `AWS_MSK_IAM` requires `msk_iam_region` and AWS
  credentials in the usual places (environment, instance or task role, `AWS_PROFILE`).
- `ssl_*` files apply to `SSL` and `SASL_SSL` only; `ssl_certfile` and `ssl_keyfile` go together.
- `transactional_id` requires `enable_idempotence`, which requires `producer_acks = "all"`.
- `findings_topic` and `dlq_topic` differ, and `input_topics` must not name or match either of them.
{other_text}"""


if __name__ == "__main__":
    sys.stdout.write(configuration_markdown())
