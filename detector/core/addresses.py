"""Address parsing and prefix lookup over integer ranges.

Every CIDR set the detector consults (AWS's published ranges, registry account CIDRs, expected
networks) is flattened once, at start or on reload, into sorted, non-overlapping integer ranges per
address family. A lookup is then one C-level ``bisect`` over a list of ints: no per-event scan and no
``ipaddress`` objects on the hot path.

CIDR blocks are either nested or disjoint, so flattening is a single sweep with a stack. Where blocks
nest, ``combine(outer, inner)`` decides the payload of the inner part (default: the more specific block
wins, as in longest-prefix match).
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

P = TypeVar("P")

V4 = 4
V6 = 6

_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6
_from_bytes = int.from_bytes
_V4_MAPPED_PREFIX = 0xFFFF << 32


def parse_address(text: str) -> tuple[int, int] | None:
    """Parse a textual IPv4 or IPv6 address into ``(family, integer)``.

    Strict (``inet_pton``): ``"1"`` or ``"01.2.3.4"`` are not addresses. IPv4-mapped IPv6 addresses
    (``::ffff:192.0.2.1``) are folded to IPv4, since that is the address that made the call.
    Returns ``None`` for anything that is not an address (host names, zone-scoped addresses, junk).
    """
    if ":" in text:
        try:
            value = _from_bytes(_inet_pton(_AF_INET6, text), "big")
        except (OSError, ValueError):
            return None
        if value >> 32 == 0xFFFF:
            return V4, value & 0xFFFFFFFF
        return V6, value
    try:
        return V4, _from_bytes(_inet_pton(_AF_INET, text), "big")
    except (OSError, ValueError):
        return None


def format_address(family: int, value: int) -> str:
    if family == V4:
        return _inet_ntop(_AF_INET, value.to_bytes(4, "big"))  # dotted quad, as ipaddress writes it
    return str(ipaddress.IPv6Address(value))  # RFC 5952 as ipaddress writes it (inet_ntop differs on ::a.b.c.d)


def is_global(family: int, value: int) -> bool:
    """True for a publicly routable address (the rare path: only reached after every index missed)."""
    addr = ipaddress.IPv4Address(value) if family == V4 else ipaddress.IPv6Address(value)
    return addr.is_global


def parse_network(cidr: str) -> tuple[int, int, int]:
    """Parse a CIDR (host bits must be zero) into ``(family, first, last)``; ValueError if invalid."""
    if not isinstance(cidr, str):
        raise ValueError(f"not a CIDR string: {cidr!r}")
    text = cidr.strip()
    address, slash, length = text.partition("/")
    if slash and length.isdigit() and (len(length) == 1 or length[0] != "0"):
        # Fast path (start-up parses ~17k AWS prefixes): inet_pton, then the host-bits check.
        parsed = parse_address(address)
        if parsed is not None and (parsed[0] == V6 or ":" not in address):
            family, value = parsed
            bits = 32 if family == V4 else 128
            prefix = int(length)
            if prefix <= bits:
                host = (1 << (bits - prefix)) - 1
                if value & host == 0:
                    return family, value, value | host
    net = ipaddress.ip_network(text, strict=True)  # the slow path, with ipaddress's precise errors
    first = int(net.network_address)
    last = int(net.broadcast_address)
    if net.version == 6 and first >> 32 == 0xFFFF and net.prefixlen >= 96:
        # ::ffff:a.b.c.d/n behaves as the IPv4 network it maps, matching parse_address.
        return V4, first & 0xFFFFFFFF, last & 0xFFFFFFFF
    return net.version, first, last


def _keep_inner(outer: Any, inner: Any) -> Any:
    return inner


class _Ranges(Generic[P]):
    """Sorted, disjoint ``[start, end]`` integer ranges with a payload each."""

    __slots__ = ("starts", "ends", "payloads")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.payloads: list[P] = []

    def _emit(self, start: int, end: int, payload: P) -> None:
        if start > end:
            return
        if self.ends and self.ends[-1] + 1 == start and self.payloads[-1] == payload:
            self.ends[-1] = end
            return
        self.starts.append(start)
        self.ends.append(end)
        self.payloads.append(payload)

    @classmethod
    def build(cls, items: list[tuple[int, int, P]], combine: Callable[[P, P], P]) -> _Ranges[P]:
        ranges: _Ranges[P] = cls()
        items.sort(key=lambda t: (t[0], -t[1]))
        stack: list[tuple[int, P]] = []  # (end, effective payload) of the open enclosing blocks
        pos = 0  # first point not yet emitted
        for start, end, payload in items:
            while stack and stack[-1][0] < start:
                top_end, top_payload = stack.pop()
                ranges._emit(pos, top_end, top_payload)
                pos = max(pos, top_end + 1)
            if stack:
                ranges._emit(pos, start - 1, stack[-1][1])
                payload = combine(stack[-1][1], payload)
                end = min(end, stack[-1][0])  # CIDRs nest; clip defensively all the same
            pos = max(pos, start)
            stack.append((end, payload))
        while stack:
            top_end, top_payload = stack.pop()
            ranges._emit(pos, top_end, top_payload)
            pos = max(pos, top_end + 1)
        return ranges

    def get(self, value: int) -> P | None:
        i = bisect_right(self.starts, value) - 1
        if i >= 0 and value <= self.ends[i]:
            return self.payloads[i]
        return None

    def __len__(self) -> int:
        return len(self.starts)


class AddressIndex(Generic[P]):
    """Longest-prefix lookup of an address (family, int) to a payload, IPv4 and IPv6."""

    __slots__ = ("_v4", "_v6", "size")

    def __init__(
        self,
        networks: Iterable[tuple[str | tuple[int, int, int], P]] = (),
        combine: Callable[[P, P], P] = _keep_inner,
    ) -> None:
        v4: list[tuple[int, int, P]] = []
        v6: list[tuple[int, int, P]] = []
        for net, payload in networks:
            family, first, last = parse_network(net) if isinstance(net, str) else net
            (v4 if family == V4 else v6).append((first, last, payload))
        self.size = len(v4) + len(v6)
        self._v4: _Ranges[P] = _Ranges.build(v4, combine)
        self._v6: _Ranges[P] = _Ranges.build(v6, combine)

    def lookup(self, family: int, value: int) -> P | None:
        return (self._v4 if family == V4 else self._v6).get(value)

    def lookup_text(self, text: str) -> P | None:
        parsed = parse_address(text)
        return None if parsed is None else self.lookup(*parsed)

    def __len__(self) -> int:
        return self.size
