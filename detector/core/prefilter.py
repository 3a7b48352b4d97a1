"""An exact byte-level prefilter: can this raw input hold a record that matters? (SPEC §3)

Only these kinds of input can change the detector's state or raise a finding: records made with EC2
instance credentials (``userIdentity.arn`` ``arn:<p>:sts::<account>:assumed-role/<role>/i-…``), EC2's
own ``AssumeRole`` issuing them (``eventName`` ``AssumeRole``, ``userIdentity.invokedBy``
``ec2.amazonaws.com``), and lifecycle or address signals (SPEC §11, §13: ``StopInstances``,
``TerminateInstances``, ``StartInstances``, ``BidEvictedEvent``, ``AssociateAddress``, and EventBridge
``EC2 Instance State-change Notification`` events). Every other record is only counted.

``may_matter(raw)`` is False only when ``raw`` cannot contain either kind:

- without a backslash in ``raw``, no JSON string in it has an escape, so every string value appears in
  the bytes exactly as it decodes — an instance session ARN puts ``:assumed-role/`` and ``/i-`` in the
  bytes, an issuance record ``AssumeRole`` and ``ec2.amazonaws.com``;
- with a backslash anywhere, an escape (``\\/``, ``\\u0069``…) could spell any of those, so the answer is
  True (decide after parsing).

It never looks at validity: an input it rejects must still be validated (SPEC §2 counts and dead-letters
malformed input). Measured on realistic CloudTrail (docs/performance.md), three substring searches cost
about as much as msgspec validating the input *and* extracting the fields that decide the same question,
so the replay's fast path does not call it per input; :func:`detector.core.records.decode_fast` uses it
after a reference (orjson) parse, to skip the per-record checks of inputs that cannot matter.
"""

from __future__ import annotations

_SESSION_MARKERS = (b":assumed-role/", b"/i-")
_ISSUANCE_MARKERS = (b"AssumeRole", b"ec2.amazonaws.com")
# Lifecycle and address signals (SPEC §11, §13), whoever made them: their eventName, or the detail-type
# of an EventBridge state-change notification, appears in the bytes.
_SIGNAL_MARKERS = (
    b"StopInstances",
    b"TerminateInstances",
    b"StartInstances",
    b"BidEvictedEvent",
    b"AssociateAddress",
    b"EC2 Instance State-change Notification",
)


def may_matter(raw: bytes | bytearray | memoryview | str) -> bool:
    """False only if ``raw`` (one input: a JSON line, message value or file) cannot contain a record
    made with EC2 instance credentials or an EC2 credential-issuance record. Pure and exact."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    elif isinstance(raw, memoryview):
        raw = raw.tobytes()
    if b"\\" in raw:
        return True
    if _SESSION_MARKERS[0] in raw and _SESSION_MARKERS[1] in raw:
        return True
    if _ISSUANCE_MARKERS[0] in raw and _ISSUANCE_MARKERS[1] in raw:
        return True
    return any(marker in raw for marker in _SIGNAL_MARKERS)
