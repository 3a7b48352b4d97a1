"""The ``detector`` command line. Subcommands import their adapters lazily to keep start-up fast."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="detector")
def cli() -> None:
    """Real-time detector of stolen EC2 instance credentials (CloudTrail in, GuardDuty-shaped findings out)."""


@cli.command()
@click.option("--registry", "registry_path", type=click.Path(dir_okay=False), help="Affiliation registry (.json or .toml).")
@click.option("--ip-ranges", "ip_ranges", type=click.Path(dir_okay=False), help="AWS ip-ranges.json (plain or .gz); default: packaged snapshot.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, allow_dash=True), default="-", show_default=True, help="Where to write findings (JSON Lines).")
@click.option("--session-ttl", type=float, default=12 * 3600.0, show_default=True, help="Idle TTL of a session entry, seconds of event time.")
@click.option("--max-sessions", type=click.IntRange(min=1), default=1_000_000, show_default=True, help="Cap of the session index (LRU eviction).")
@click.option(
    "--jobs", type=click.IntRange(min=1), default=None,
    help="Processes of the replay (same results with any): 2 decodes and sorts the lines of a large plain JSON Lines "
    "file in a second process while this one applies them; 3 or more: this process reads and routes every input "
    "(any kind) to N-1 appliers, each keeping the instances that hash to it (opt-in: measured slower on 2 CPUs). "
    "Default: 2 when this process may use two CPUs or more, else 1.",
)  # fmt: skip
@click.option(
    "--stop-grace-seconds", type=click.FloatRange(min=0), default=600.0, show_default=True,
    envvar="DETECTOR_STOP_GRACE_SECONDS",
    help="SPEC §11: use of an instance's credentials later than this after it stopped is a finding.",
)  # fmt: skip
@click.option(
    "--imdsv1-findings/--no-imdsv1-findings", default=True, show_default=True, envvar="DETECTOR_IMDSV1_FINDINGS",
    help="SPEC §13: a Low finding for credentials delivered by IMDSv1.",
)  # fmt: skip
@click.option(
    "--since", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
    help="s3:// inputs: first day (YYYY-MM-DD, inclusive) of CloudTrail's .../CloudTrail/<region>/YYYY/MM/DD/ "
    "layout to read; keys outside that layout are then skipped.",
)  # fmt: skip
@click.option("--until", type=click.DateTime(formats=["%Y-%m-%d"]), default=None, help="s3:// inputs: last day (inclusive), as --since.")
@click.option(
    "--finding-format", type=click.Choice(["guardduty", "ocsf"], case_sensitive=False), default="guardduty",
    show_default=True, help="GuardDuty-shaped findings, or OCSF 1.3 Detection Findings (class_uid 2004).",
)  # fmt: skip
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress on standard error when it is a terminal.")
@click.argument("inputs", nargs=-1, required=True)
def replay(
    registry_path: str | None, ip_ranges: str | None, output: str, session_ttl: float, max_sessions: int,
    jobs: int | None, stop_grace_seconds: float, imdsv1_findings: bool, since: Any, until: Any, finding_format: str,
    progress: bool, inputs: tuple[str, ...],
) -> None:  # fmt: skip
    """Replay CloudTrail INPUTS (files, directories, .gz, '-' for stdin, s3://bucket/prefix) and print the final findings.

    \b
    s3:// inputs: every object under the prefix named like a log file (.json, .jsonl, either .gz), in
    key order, streamed (credentials, region and AWS_ENDPOINT_URL from the standard AWS chain). An
    object that cannot be read is counted as malformed and the replay goes on; a bucket that cannot be
    listed is an error (exit 2). Inputs are read in the order given, local and s3:// mixed.
    """
    import orjson

    from .core.engine import Engine
    from .core.state import DetectorState, EngineConfig
    from .ipranges import IpRangesError, load
    from .registry import RegistryError, load_registry
    from .replay import InputError, Replayer, default_jobs, expand_inputs, write_findings

    if since and until and since > until:
        click.echo(f"detector replay: error: --since {since:%Y-%m-%d} is after --until {until:%Y-%m-%d}", err=True)
        sys.exit(2)
    remote_urls = [item for item in inputs if item.startswith("s3://")]
    if (since or until) and not remote_urls:
        click.echo("detector replay: warning: --since/--until select days of s3:// inputs only; local inputs are read whole", err=True)
    s3 = None
    display = None
    try:
        registry = load_registry(registry_path)
        ranges, _ = load(ip_ranges)
        engine = Engine(registry, ranges, stop_grace_seconds=stop_grace_seconds, imdsv1_findings=imdsv1_findings)
        state = DetectorState(EngineConfig(session_ttl_seconds=session_ttl, max_sessions=max_sessions))
        replayer = Replayer(engine, state, jobs=default_jobs() if jobs is None else jobs)
        from .progress import Progress, ProgressDisplay

        counters = Progress(listing_done=not remote_urls)
        if remote_urls:
            from .s3input import S3Inputs

            s3 = S3Inputs(remote_urls, since.date() if since else None, until.date() if until else None, counters)
            s3.start()  # list at once: a missing bucket fails before any replay work, and totals come early
        for name in expand_inputs([item for item in inputs if not item.startswith("s3://")]):
            counters.objects_total += 1
            counters.bytes_total += os.path.getsize(name) if name != "-" else 0
        if progress and sys.stderr.isatty():
            display = ProgressDisplay(counters, lambda: replayer.summary.records, sys.stderr).start()
        try:
            summary = replayer.run(list(inputs), s3.sources if s3 else None, counters)
        finally:
            if display is not None:
                display.stop()
            if s3 is not None:
                s3.close()
    except (RegistryError, IpRangesError, InputError) as exc:
        click.echo(f"detector replay: error: {exc}", err=True)
        sys.exit(2)
    findings = replayer.iter_findings(finding_format.lower())
    if output == "-":
        write_findings(findings, sys.stdout.buffer)
        sys.stdout.flush()
    else:
        with open(output, "wb") as out:
            write_findings(findings, out)
    report = summary.as_dict()
    if remote_urls:
        report["s3"] = {
            "objects": counters.objects_total,
            "bytes": counters.bytes_total,
            "skipped_outside_layout": counters.skipped_outside_layout,
        }
    click.echo(orjson.dumps({"summary": report}).decode(), err=True)


@cli.group("registry")
def registry_group() -> None:
    """Affiliation registry tools."""


@registry_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def registry_check(path: str) -> None:
    """Validate a registry file and print what it holds."""
    import orjson

    from .registry import RegistryError, load_registry

    try:
        registry = load_registry(path)
    except RegistryError as exc:
        click.echo(f"detector registry check: error: {exc}", err=True)
        sys.exit(2)
    click.echo(orjson.dumps(registry.summary()).decode())


@registry_group.command("sync")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Registry file to write (.json), replaced atomically.")
@click.option("--overlay", type=click.Path(dir_okay=False, exists=True), help="Hand-written registry (.json or .toml) merged over the sync; see below.")
@click.option("--role-name", default="OrganizationAccountAccessRole", show_default=True, help="Role assumed in each account (not in the caller's own).")
@click.option("--regions", help="Comma-separated regions to inventory.  [default: EC2 DescribeRegions]")
@click.option("--endpoint-url", help="One endpoint for every AWS service (a test double such as moto).")
@click.option("--concurrency", type=click.IntRange(min=1, max=256), default=8, show_default=True, help="AWS calls in flight at once.")
def registry_sync(output: str, overlay: str | None, role_name: str, regions: str | None, endpoint_url: str | None, concurrency: int) -> None:
    """Build the registry from AWS and write it to OUTPUT.

    \b
    Accounts: every ACTIVE account of the AWS Organization (management account included) and every
    member of the caller's GuardDuty detectors, all affiliated. Per account and region, through
    arn:<partition>:iam::<account>:role/ROLE_NAME (the caller's own account with its own credentials):
    Elastic IPs, NAT gateway and instance public addresses (/32), associated VPC IPv6 blocks, VPC
    endpoints with their VPC, and instances (VPC, private/public/IPv6 addresses of every attached
    interface; egress when SourceDestCheck is off; terminated ones left out).
    Credentials come from the standard AWS chain (environment, profile, SSO, instance role...).

    \b
    Overlay merge (a sync never erases a human decision):
      - affiliated, trusted: the overlay's value wins for an account it lists;
      - name: the overlay's wins unless empty, else the Organizations name;
      - cidrs, vpc_endpoints: union of overlay and sync (an endpoint the overlay
        places under another account stays there); an endpoint's VPC: the overlay's if named;
      - instances: per instance, the overlay's vpc if named, addresses united, egress if
        either says so (an instance the overlay places under another account stays there);
      - accounts only in the overlay are kept; expected_networks come from the overlay.

    \b
    GuardDuty unavailable or denied: a WARNING. An account that cannot be read: reported
    and skipped (it stays affiliated, without inventory). Exit 1, nothing written, when
    nothing could be read; exit 2 on a bad overlay or a non-.json OUTPUT (TOML is read,
    never written). Progress goes to stderr, one line per account.
    """
    import asyncio

    from .registry import RegistryError, load_registry

    if not output.lower().endswith(".json"):
        click.echo(f"detector registry sync: error: {output}: the synced registry is written as JSON only; name it *.json (an overlay may be TOML)", err=True)
        sys.exit(2)
    try:
        human = load_registry(overlay) if overlay else None
    except RegistryError as exc:
        click.echo(f"detector registry sync: error: overlay: {exc}", err=True)
        sys.exit(2)

    from .aws import SyncError, SyncOptions, collect_inventory, merge_registry, write_registry

    def say(line: str) -> None:
        click.echo(f"detector registry sync: {line}", err=True)

    options = SyncOptions(
        role_name=role_name, regions=tuple((regions or "").split(",")), endpoint_url=endpoint_url, concurrency=concurrency
    )
    try:
        report = asyncio.run(collect_inventory(None, options, progress=say))
        written = write_registry(output, merge_registry(report.to_mapping(), human, warn=lambda m: say(f"WARNING: {m}")))
    except SyncError as exc:
        say(f"error: {exc}; {output} not written")
        sys.exit(1)
    except (RegistryError, OSError) as exc:
        say(f"error: {exc}; {output} not written")
        sys.exit(2)
    summary = written.summary()
    skipped = report.failed
    say(
        f"wrote {output}: {summary['accounts']} accounts ({summary['affiliated']} affiliated, {summary['trusted']} trusted), "
        f"{summary['cidrs']} CIDRs, {summary['vpc_endpoints']} VPC endpoints, {summary['expected_networks']} expected networks"
        + (f"; {len(skipped)} account(s) skipped: {', '.join(skipped)}" if skipped else "")
    )


@cli.group("ip-ranges")
def ip_ranges_group() -> None:
    """AWS published IP ranges (ip-ranges.json) tools."""


@ip_ranges_group.command("update")
@click.option("--url", help="Where to download ip-ranges.json from.  [default: AWS's official URL, https://ip-ranges.amazonaws.com/ip-ranges.json]")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="File to write, gzipped when the name ends in .gz.  [default: ./aws-ip-ranges.json.gz]")
@click.option("--force", is_flag=True, help="Write even if the download is older than OUTPUT, or OUTPUT is unreadable.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Download timeout, seconds.")
def ip_ranges_update(url: str | None, output: str | None, force: bool, timeout: float) -> None:
    """Download, validate and atomically write AWS's ip-ranges.json to OUTPUT.

    OUTPUT defaults to ./aws-ip-ranges.json.gz (a user-writable copy; the snapshot packaged with the
    detector is never modified); use it with `detector replay --ip-ranges OUTPUT`. Nothing is written
    and the exit status is 2 on an HTTP error, invalid JSON, a document failing validation, or one whose
    syncToken/createDate is older than OUTPUT's (unless --force).
    """
    import asyncio

    from .ipranges import OFFICIAL_URL, IpRangesError
    from .ipranges_update import DEFAULT_OUTPUT, update

    try:
        summary = asyncio.run(update(url or OFFICIAL_URL, output or DEFAULT_OUTPUT, force=force, timeout=timeout))
    except IpRangesError as exc:
        click.echo(f"detector ip-ranges update: error: {exc}", err=True)
        sys.exit(2)
    click.echo(
        f"detector ip-ranges update: wrote {summary['output']}: createDate {summary['createDate']}, "
        f"syncToken {summary['syncToken']}, {summary['ipv4_prefixes']} IPv4 and {summary['ipv6_prefixes']} IPv6 prefixes",
        err=True,
    )


class SettingsCommand(click.Command):
    """A command taking every setting of a settings class as a flag (see detector.service.settings.settings_params):
    ``detector run``'s by default, another one named by ``settings_class="module:Class"``.

    The flags are built on first use, so that the other subcommands never import pydantic.
    """

    def __init__(self, *args: Any, settings_class: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings_class = settings_class

    def settings_cls(self) -> Any:
        import importlib

        from .service.settings import Settings

        if self.settings_class is None:
            return Settings
        module, _, name = self.settings_class.partition(":")
        return getattr(importlib.import_module(module), name)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not getattr(self, "_settings_params_added", False):
            from .service.settings import settings_params

            self.params.extend(settings_params(self.settings_cls()))
            self._settings_params_added = True
        return super().get_params(ctx)


@cli.command(cls=SettingsCommand, context_settings={"show_default": False})
def run(**kwargs: object) -> None:
    """Run the service: consume CloudTrail from Kafka, publish GuardDuty-shaped findings.

    Every setting is a flag, a DETECTOR_* environment variable and a key of the TOML --config file
    (precedence: defaults < file < environment < flags).
    """
    serve_command("run", kwargs, "detector.service.app:serve")


def serve_command(command: str, kwargs: dict[str, Any], target: str, log_stream: Any = None) -> None:
    """The tail of every long-running command (run, ingest, export, respond): the command's settings (those
    of its SettingsCommand) from flags/env/file, logging to ``log_stream`` (default standard output), uvloop
    if asked, then the event loop running ``target`` ("module:function", an async function of the settings
    returning the exit status). Exits 2 on a configuration error or the module's ``StartupError``."""
    import asyncio
    import importlib

    from .service.logging import configure_logging
    from .service.settings import SettingsError, settings_from_cli

    command_class = click.get_current_context().command
    assert isinstance(command_class, SettingsCommand)
    try:
        settings = settings_from_cli(kwargs, command_class.settings_cls())
    except SettingsError as exc:
        click.echo(f"detector {command}: configuration error: {exc}", err=True)
        sys.exit(2)
    configure_logging(settings.log_level, settings.log_format, stream=log_stream)
    if settings.use_uvloop:
        import uvloop

        uvloop.install()
    module_name, _, function = target.partition(":")
    module = importlib.import_module(module_name)
    startup_errors = getattr(module, "StartupError", ())
    try:
        code = asyncio.run(getattr(module, function)(settings))
    except startup_errors as exc:
        click.echo(f"detector {command}: start-up error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


@cli.group("export")
def export_group() -> None:
    """Export findings from the findings topic to other security tools."""


@export_group.command(
    "securityhub", cls=SettingsCommand, settings_class="detector.outputs.settings:ExportSettings",
    context_settings={"show_default": False},
)  # fmt: skip
def export_securityhub(**kwargs: Any) -> None:
    """Consume the findings topic and import every finding into AWS Security Hub (ASFF) in its home account.

    BatchImportFindings into the custom-integration product of the importing account, 100 at a time,
    retried on throttling; a finding's later states replace the earlier one (UpdatedAt only moves
    forward). Offsets are committed only after the import. docs/operations.md explains the IAM rights.
    """
    serve_command("export securityhub", kwargs, "detector.outputs.export:serve")


@cli.command(cls=SettingsCommand, settings_class="detector.outputs.settings:RespondSettings", context_settings={"show_default": False})
def respond(**kwargs: Any) -> None:
    """Consume the findings topic and contain each new High (8) finding with an inline IAM deny policy.

    The policy, on the instance role in the finding's home account, denies the stolen credentials of
    that one instance (by source address, VPC endpoint, or token issue time) without stopping it.
    DRY RUN unless --apply: the policy it would attach is printed as one JSON line per role on standard
    output (logs go to standard error). --role-name-pattern limits the roles it may touch.
    See docs/runbook.md (what it blocks and how to lift it).
    """
    serve_command("respond", kwargs, "detector.outputs.respond:serve", log_stream=sys.stderr)


@cli.command(
    cls=SettingsCommand, settings_class="detector.ingest.settings:IngestSettings", context_settings={"show_default": False}
)
@click.option("--queue-url", "queue_url", multiple=True, metavar="URL", help="SQS queue to read; repeat for several (added to --queue-urls).")
def ingest(queue_url: tuple[str, ...], **kwargs: object) -> None:
    """Bridge AWS to Kafka: long-poll SQS queues of EventBridge events and S3 notifications of CloudTrail
    log files, produce every record to the input topic keyed by instance ID (SPEC §14).

    AWS credentials, region and AWS_ENDPOINT_URL come from the standard AWS chain. Every other setting is a
    flag, a DETECTOR_* environment variable and a key of the TOML --config file (see docs/configuration.md).
    """
    if queue_url:
        given = [u for u in str(kwargs.get("queue_urls") or "").split(",") if u]
        kwargs["queue_urls"] = ",".join([*given, *queue_url])
    serve_command("ingest", kwargs, "detector.ingest.bridge:serve")


@cli.command()
@click.option("--timeout", type=float, default=90.0, show_default=True, help="Give up after this many seconds.")
def demo(timeout: float) -> None:
    """The embedded default: a local broker, the service, the sample world streamed in, findings on screen."""
    import asyncio

    from .demo import run_demo
    from .service.logging import configure_logging

    # Errors only: the screen is the table; malformed input is summed up in one line, not logged per record.
    configure_logging("error", "console")
    sys.exit(asyncio.run(run_demo(sys.stdout, timeout=timeout)))


@cli.group("settings", hidden=True)
def settings_group() -> None:
    """Service settings tools."""


@settings_group.command("show", cls=SettingsCommand)
def settings_show(**kwargs: object) -> None:
    """Print the effective settings of `detector run` and the source of each value as JSON (secrets masked)."""
    import orjson

    from .service.settings import SettingsError, settings_from_cli

    try:
        settings = settings_from_cli(kwargs)
    except SettingsError as exc:
        click.echo(f"detector settings show: error: {exc}", err=True)
        sys.exit(2)
    click.echo(orjson.dumps({"settings": settings.redacted(), "sources": settings.sources}, option=orjson.OPT_INDENT_2).decode())


def main() -> None:
    cli(prog_name="detector")


if __name__ == "__main__":
    main()
