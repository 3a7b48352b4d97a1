"""Apache Kafka itself for the tests: one KRaft node (broker + controller) run from Maven Central's jars.

``provision()`` resolves ``org.apache.kafka:kafka_2.13`` and a Log4j 2 backend with ``mvn`` (tests/kafka/pom.xml)
into a cache outside the repository (``$DETECTOR_KAFKA_CACHE`` or ``~/.cache/ec2-detector-kafka``), once per
version. ``ApacheKafkaBroker`` formats a log directory with ``kafka.tools.StorageTool`` and runs ``kafka.Kafka``
with ``java`` on free loopback ports; ``restart()`` keeps the log directory, the ports and the cluster.

Listeners (all on 127.0.0.1):

- ``bootstrap``: PLAINTEXT, what every test uses;
- ``secure_bootstrap``: SASL_SSL with SCRAM-SHA-512, its certificate signed by ``ca`` (a ``trustme`` CA made
  at start), for the TLS/SCRAM tests; users are added with the admin API (``add_scram_user``);
- ``proxied_port``: PLAINTEXT, but advertised as ``proxy_port``, where a test puts a ``TcpProxy`` it can
  cut (a network outage) or start late (a broker that is not there yet);
- the KRaft controller listener, never advertised.

This is test infrastructure (the demo keeps the memory-only tansu broker of detector/embedded.py, which
needs no JDK); it lives in tests/ with the pom that pins the version.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from detector.embedded import free_port

# Keep in step with docker-compose.yml and deploy/kubernetes (test_deploy checks the compose file).
KAFKA_VERSION = "4.4.0"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
CLUSTER_ID = "ec2-detector-tests-0A"  # 22 characters of base64url: a fixed id, so a restart finds its cluster

JVM_OPTIONS = [
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",  # two shared cores: no parallel GC threads
    "-XX:TieredStopAtLevel=1",  # C1 only: a much shorter start, fast enough for the tests' load
    "-Xshare:auto",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
]

LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: WARN
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
      - name: kafka.log.LogCleaner
        level: INFO
"""


class KafkaUnavailable(RuntimeError):
    """Apache Kafka cannot be provisioned or started here (no JDK or Maven, no network, a failed start)."""


def cache_root() -> Path:
    return Path(os.environ.get("DETECTOR_KAFKA_CACHE") or Path.home() / ".cache" / "ec2-detector-kafka")


def tools_present() -> bool:
    return shutil.which("java") is not None and shutil.which("mvn") is not None


def provision(version: str = KAFKA_VERSION, timeout: float = 600.0) -> Path:
    """The directory of the broker's jars for ``version``, downloaded by Maven the first time.

    Concurrent test sessions on one machine share the cache: a lock file serialises the download, and a
    marker written last tells a complete copy from an interrupted one.
    """
    if not tools_present():
        raise KafkaUnavailable("java and mvn are needed to run Apache Kafka in the tests")
    home = cache_root() / version
    libs, marker = home / "libs", home / "libs.complete"
    if marker.exists():
        return libs
    try:
        home.mkdir(parents=True, exist_ok=True)
        return _download(version, home, libs, marker, timeout)
    except OSError as exc:
        raise KafkaUnavailable(f"cannot provision Apache Kafka {version} in {home}: {exc}") from None


def _download(version: str, home: Path, libs: Path, marker: Path, timeout: float) -> Path:
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return libs
        staging = Path(tempfile.mkdtemp(prefix="libs.", dir=home))
        command = [
            "mvn", "-q", "-B", "-f", str(POM), f"-Dkafka.version={version}",
            "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
        ]
        try:
            done = subprocess.run(command, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(staging, ignore_errors=True)
            raise KafkaUnavailable(f"mvn did not resolve Apache Kafka {version} within {timeout:.0f}s") from None
        if done.returncode != 0 or not list(staging.glob(f"kafka_2.13-{version}.jar")):
            shutil.rmtree(staging, ignore_errors=True)
            output = (done.stdout + done.stderr).decode(errors="replace")[-3000:]
            raise KafkaUnavailable(f"mvn could not resolve Apache Kafka {version} (exit {done.returncode}): {output}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        marker.write_text(version)
    return libs


def pkcs8_key(pem: bytes) -> bytes:
    """Kafka's PEM key stores take PKCS#8 keys only; trustme writes the traditional OpenSSL form."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class ApacheKafkaBroker:
    """``with ApacheKafkaBroker(workdir) as broker: broker.bootstrap`` — Apache Kafka on free loopback ports."""

    name = "Apache Kafka"
    real = True  # transactions, idempotence, TLS, SASL, compaction, durable log: what tansu lacks

    def __init__(self, workdir: Path, version: str = KAFKA_VERSION, host: str = "127.0.0.1") -> None:
        try:
            import trustme
        except ImportError:
            raise KafkaUnavailable("the test CA needs trustme (a dev dependency): pip install -e '.[dev]'") from None

        self.version = version
        self.host = host
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / "data"
        self.port = free_port(host)
        self.secure_port = free_port(host)
        self.proxied_port = free_port(host)
        self.proxy_port = free_port(host)
        self.controller_port = free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.libs: Path | None = None
        self.ca = trustme.CA()
        self.ca_file = self.workdir / "ca.pem"
        self._log_path = self.workdir / "broker.log"

    # -- the interface the tests use ---------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def secure_bootstrap(self) -> str:
        return f"{self.host}:{self.secure_port}"

    @property
    def proxied_bootstrap(self) -> str:
        return f"{self.host}:{self.proxy_port}"

    def describe(self) -> str:
        return f"{self.name} {self.version} (KRaft, one node, {self.bootstrap})"

    # -- files -----------------------------------------------------------------------------------
    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        leaf = self.ca.issue_cert("localhost", self.host)
        keystore = self.workdir / "broker-keystore.pem"
        keystore.write_bytes(pkcs8_key(leaf.private_key_pem.bytes()) + b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (self.workdir / "log4j2.yaml").write_text(LOG4J2)
        h = self.host
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{h}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": (
                f"PLAINTEXT://{h}:{self.port},SECURE://{h}:{self.secure_port},"
                f"PROXIED://{h}:{self.proxied_port},CONTROLLER://{h}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{h}:{self.port},SECURE://{h}:{self.secure_port},PROXIED://{h}:{self.proxy_port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SECURE:SASL_SSL,PROXIED:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            # the SASL_SSL listener: SCRAM-SHA-512 over TLS with the test CA's certificate
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.secure.scram-sha-512.sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(keystore),
            "ssl.client.auth": "none",
            # one node: internal topics with one replica, no wait for more members
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "5",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "3",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # tests create their topics; the service may create its own (auto_create_topics)
            "auto.create.topics.enable": "false",
            # CloudTrail log files are one message each
            "message.max.bytes": "8388608",
            "replica.fetch.max.bytes": "8388608",
            # the compaction test forces cleaning on its changelog topic (segment.ms, dirty ratio)
            "log.cleaner.backoff.ms": "200",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "log.segment.delete.delay.ms": "1000",
            "log.flush.offset.checkpoint.interval.ms": "1000",
            # a short controlled shutdown for restarts
            "controlled.shutdown.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "background.threads": "4",
        }
        config = self.workdir / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return config

    def _java(self, main: str, *args: str) -> list[str]:
        assert self.libs is not None
        return [
            "java", *JVM_OPTIONS,
            f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.yaml'}",
            "-cp", f"{self.libs}/*", main, *args,
        ]

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> ApacheKafkaBroker:
        if self.libs is None:
            self.libs = provision(self.version)
        config = self._write_config()
        if not (self.log_dir / "meta.properties").exists():
            fmt = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c", str(config)),
                capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False,
            )
            if fmt.returncode != 0:
                raise KafkaUnavailable(f"kafka-storage format failed: {(fmt.stdout + fmt.stderr).decode(errors='replace')[-3000:]}")
        log = open(self._log_path, "ab")
        self.process = subprocess.Popen(
            self._java("kafka.Kafka", str(config)), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        atexit.register(self._kill, self.process)  # never outlive the test session, even on an error path
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the broker answers a metadata request naming itself (and its group coordinator is up)."""
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + timeout
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0, "logger": _quiet_logger()})
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise KafkaUnavailable(f"Apache Kafka exited with {code}: {self.output()[-3000:]}")
            try:
                metadata = admin.list_topics(timeout=1.0)
                if metadata.brokers:
                    admin.describe_cluster(request_timeout=2).result(timeout=3)
                    return
            except Exception:  # noqa: BLE001 - not up yet; the process check above catches a dead broker
                time.sleep(0.1)
        self.stop()
        raise KafkaUnavailable(f"Apache Kafka did not answer on {self.bootstrap} within {timeout:.0f}s: {self.output()[-3000:]}")

    def output(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """An orderly shutdown (SIGTERM), killed if it takes longer than ``timeout``; the log dir is kept."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    @staticmethod
    def _kill(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> ApacheKafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- SASL users ----------------------------------------------------------------------------------
    def add_scram_user(self, user: str, password: str, iterations: int = 8192) -> None:
        """A SCRAM-SHA-512 user, created through the admin API (AlterUserScramCredentials) as an operator would."""
        from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        upsert = UserScramCredentialUpsertion(
            user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, iterations), password.encode()
        )
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(timeout=30)

    def client_settings(self, user: str, password: str) -> dict[str, Any]:
        """The service settings (docs/configuration.md) that reach the SASL_SSL listener as ``user``."""
        return {
            "kafka_bootstrap": self.secure_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user,
            "sasl_password": password,
            "ssl_cafile": self.ca_file,
        }


def _quiet_logger() -> Any:
    import logging

    logger = logging.getLogger("tests.apache_kafka.librdkafka")
    logger.setLevel(logging.CRITICAL)
    return logger
