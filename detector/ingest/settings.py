"""Settings of ``detector ingest`` (SPEC §14 "In"): the Kafka connection of every command plus the queues."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ..service.settings import KafkaClientSettings, _check_topic, _conflict, comma_joined


class IngestSettings(KafkaClientSettings):
    """`detector ingest` long-polls SQS queues of EventBridge events and of S3 notifications of CloudTrail
    log files, and produces every record to the input topic. AWS credentials, region and `AWS_ENDPOINT_URL`
    come from the standard AWS chain, not from these settings."""

    queue_urls: str = Field(
        "",
        description="SQS queue URLs to read, comma-separated (`--queue-url` may also be repeated); at least one.",
        json_schema_extra={"doc_default": "none (required)"},
    )
    topic: str = Field("cloudtrail", description="Topic every record and event is produced to (the detector's first input topic). It must exist: ingest checks at start-up and exits with an error naming it if not (it never creates topics).")
    wait_seconds: int = Field(20, ge=0, le=20, description="SQS long-poll wait of each receive, seconds.")
    max_messages: int = Field(10, ge=1, le=10, description="Most messages taken by one receive.")
    visibility_timeout_seconds: int = Field(
        300, ge=1, le=43200,
        description="Visibility timeout given to each received message, renewed every third of it while the message "
        "is still in work; a message not deleted (failed, or its process killed) is delivered again after it.",
    )
    concurrency: int = Field(
        16, ge=1, le=256,
        description="Messages read at once (their S3 objects streamed), over all queues; as many more may be in work "
        "only awaiting the acknowledgement of their records and their deletion. Each holds up to "
        "`object_chunk_bytes` twice and 4 MB of records awaiting acknowledgement. A receive waits for room "
        "for min(10, concurrency/2) messages (each queue's receive asks for what is free when it polls, so "
        "with several queues up to 10 more per extra queue may briefly be in work).",
    )
    workers: int = Field(
        1, ge=1, le=64,
        description="Processes that read S3 objects, split them and produce their records (the CPU-bound half of "
        "ingest); 1 does it in the main process. Give a pod as many as it has cores. Each has its own S3 client "
        "and Kafka producer; the main process keeps receiving, visibility, deletion and the HTTP endpoints, and "
        "`concurrency` counts over all workers. A worker that dies is started again; its messages come back "
        "after their visibility timeout.",
    )
    object_chunk_bytes: int = Field(
        1024 * 1024, ge=4096, description="Bytes read from an S3 object at a time (an object is streamed, never held whole)."
    )
    aws_max_attempts: int = Field(
        8, ge=1, le=50,
        description="Attempts of one AWS call (botocore standard retry mode: throttling and transient errors retried "
        "with exponential backoff and jitter) before the message is left for a later delivery.",
    )
    retry_max_seconds: float = Field(
        60.0, gt=0, allow_inf_nan=False,
        description="Cap of the backoff between failed receives (throttling, expired credentials) and broker connection attempts.",
    )
    max_message_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest message the producer sends; a bigger record fails its SQS message."
    )
    grace_seconds: float = Field(
        30.0, ge=0, allow_inf_nan=False,
        description="After SIGTERM, how long messages in work may take to finish (produced, acknowledged, deleted); "
        "the rest are left to reappear after their visibility timeout.",
    )

    @field_validator("queue_urls", mode="before")
    @classmethod
    def _urls_list(cls, value: Any) -> Any:
        return comma_joined(value)  # a TOML array of URLs is accepted too

    @field_validator("queue_urls")
    @classmethod
    def _urls(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("https://", "http://")) or url.count("/") < 4:
                raise ValueError(f"queue_urls: {url!r} is not an SQS queue URL (https://sqs.<region>.amazonaws.com/<account>/<name>)")
        return ",".join(dict.fromkeys(urls))

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str, info: ValidationInfo) -> str:
        return _check_topic(info.field_name or "topic", value.strip())

    @model_validator(mode="after")
    def _some_queue(self) -> IngestSettings:
        if not self.queue_urls:
            raise _conflict("no queue to read: give --queue-url (or queue_urls / DETECTOR_QUEUE_URLS)", "queue_urls")
        return self

    @property
    def queues(self) -> list[str]:
        return self.queue_urls.split(",")
