"""Prometheus metrics of ``detector ingest``: prefix ``detector_ingest_``, base units, ``_total`` counters.

Labels stay bounded: the queue's name (from the configured URLs), a source kind, a reason. Never a key,
a bucket object or an account.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.exposition import generate_latest

from .. import __version__
from .bodies import BAD_GZIP, INVALID_JSON, NOT_CLOUDTRAIL, UNKNOWN_SHAPE

# Failure reasons besides the body ones (bodies.py): AWS and Kafka.
MISSING_OBJECT = "missing_object"  # NoSuchKey / NoSuchBucket
ACCESS_DENIED = "access_denied"  # AccessDenied, KMS refusals
EXPIRED_CREDENTIALS = "expired_credentials"  # ExpiredToken, InvalidClientTokenId, ...
THROTTLED = "throttled"  # still throttled after aws_max_attempts
AWS_ERROR = "aws_error"  # any other AWS error or a connection lost mid-object
KAFKA_ERROR = "kafka_error"  # a record refused by the broker (too large, unknown topic, not authorised)
SHUTDOWN = "shutdown"  # still in work when the grace period ended
WORKER_LOST = "worker_lost"  # its worker process died with it in hand (--workers > 1)
REASONS = (
    INVALID_JSON, UNKNOWN_SHAPE, BAD_GZIP, NOT_CLOUDTRAIL, MISSING_OBJECT, ACCESS_DENIED, EXPIRED_CREDENTIALS,
    THROTTLED, AWS_ERROR, KAFKA_ERROR, SHUTDOWN, WORKER_LOST,
)  # fmt: skip


class IngestMetrics:
    def __init__(self, queue_names: list[str]) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        Info("detector_ingest_build", "Version of the running detector.", registry=r).info({"version": __version__})
        self.messages = Counter(
            "detector_ingest_messages_total",
            "SQS messages finished, by queue and result (deleted: all produced and acknowledged; ignored: nothing to "
            "produce, deleted; failed: left for the redrive policy).",
            ["queue", "result"],
            registry=r,
        )
        self.objects = Counter("detector_ingest_objects_total", "S3 objects read to their end.", registry=r)
        self.bytes = Counter("detector_ingest_object_bytes_total", "Bytes of S3 objects read (as stored).", registry=r)
        self.json_bytes = Counter(
            "detector_ingest_json_bytes_total", "Bytes of log-file JSON parsed (after decompression).", registry=r
        )
        self.records = Counter(
            "detector_ingest_records_total",
            "Records produced to the topic and acknowledged, by source (eventbridge: events as received; s3: "
            "elements of log files).",
            ["source"],
            registry=r,
        )
        self.failures = Counter(
            "detector_ingest_failures_total", "SQS messages that could not be processed, by reason.", ["reason"], registry=r
        )
        self.receive_errors = Counter(
            "detector_ingest_receive_errors_total", "Failed SQS receives, by reason.", ["reason"], registry=r
        )
        self.visibility_extensions = Counter(
            "detector_ingest_visibility_extensions_total", "Visibility timeouts renewed for messages still in work.", registry=r
        )
        self.broker_errors = Counter(
            "detector_ingest_broker_errors_total", "Failed attempts to connect to the Kafka cluster.", registry=r
        )
        self.worker_restarts = Counter(
            "detector_ingest_worker_restarts_total", "Worker processes started again after one died (--workers > 1).", registry=r
        )
        self.in_flight = Gauge("detector_ingest_messages_in_flight", "SQS messages in work.", registry=r)
        self.oldest_age = Gauge(
            "detector_ingest_oldest_message_age_seconds",
            "Age of the oldest message in work, from when SQS received it (its SentTimestamp); 0 when none.",
            registry=r,
        )
        self.ready = Gauge("detector_ingest_ready", "1 when connected to Kafka and the last receive of every queue succeeded.", registry=r)
        for queue in queue_names:
            for result in ("deleted", "ignored", "failed"):
                self.messages.labels(queue, result)
        for source in ("eventbridge", "s3"):
            self.records.labels(source)
        for reason in REASONS:
            self.failures.labels(reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
