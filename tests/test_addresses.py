"""``detector.core.addresses``: parsing and the flattened prefix index, checked against ``ipaddress``."""

from __future__ import annotations

import ipaddress
from functools import reduce
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from detector.core.addresses import (
    V4,
    V6,
    AddressIndex,
    format_address,
    is_global,
    parse_address,
    parse_network,
)

BITS = {V4: 32, V6: 128}
MAPPED = 0xFFFF << 32  # ::ffff:0:0/96, IPv4-mapped IPv6


def _is_mapped(family: int, value: int) -> bool:
    return family == V6 and value >> 32 == 0xFFFF


def _network(family: int, seed: int, prefixlen: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    bits = BITS[family]
    first = seed >> (bits - prefixlen) << (bits - prefixlen) if prefixlen else 0
    cls = ipaddress.IPv4Network if family == V4 else ipaddress.IPv6Network
    return cls((first, prefixlen))


@st.composite
def network_sets(draw: st.DrawFn, family: int) -> tuple[list[Any], list[int]]:
    """Networks drawn around a few seed addresses, so that they nest, repeat and sit side by side.

    Returns the ``ipaddress`` networks and the probe addresses (seeds, block edges and their
    neighbours, random addresses). IPv6 stays out of ::ffff:0:0/96, which folds to IPv4 (tested apart).
    """
    bits = BITS[family]
    top = (1 << bits) - 1
    address = st.integers(0, top)
    if family == V6:
        address = address.filter(lambda v: v >> 32 != 0xFFFF)
    seeds = draw(st.lists(address, min_size=1, max_size=4))
    # neighbours of a seed: same high bits, so blocks of different seeds nest or abut often
    seeds += [s ^ (1 << draw(st.integers(0, bits - 1))) for s in seeds]
    seeds = [s for s in seeds if not _is_mapped(family, s)]
    prefixlens = st.integers(0, bits) | st.sampled_from([bits - 8, bits - 4, bits - 1, bits])
    nets = draw(st.lists(st.builds(lambda s, p: _network(family, s, p), st.sampled_from(seeds), prefixlens), max_size=12))
    probes = list(seeds)
    for net in nets:
        first, last = int(net.network_address), int(net.broadcast_address)
        probes += [first, last, max(first - 1, 0), min(last + 1, top)]
    probes += draw(st.lists(address, max_size=8))
    probes = [p for p in probes if not _is_mapped(family, p)]
    return nets, probes


def _expected(nets: list[Any], payloads: list[Any], family: int, value: int, combine: Any) -> Any:
    """Longest-prefix match by brute force; nested blocks fold outer to inner, equal blocks in input order."""
    addr = ipaddress.IPv4Address(value) if family == V4 else ipaddress.IPv6Address(value)
    hits = sorted((net.prefixlen, i) for i, net in enumerate(nets) if addr in net)
    if not hits:
        return None
    return reduce(combine, (payloads[i] for _, i in hits))


def _text(family: int, value: int) -> str:
    return format_address(family, value)


@given(v4=network_sets(V4), v6=network_sets(V6))
@example(  # nested, duplicate and adjacent blocks, plus a catch-all
    v4=(
        [ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.0.0/16", "10.1.2.0/24", "10.2.0.0/16", "0.0.0.0/0")],
        [0x0A000000, 0x0A010000, 0x0A0102FF, 0x0A010300, 0x0A02FFFF, 0x0B000000, 0x09FFFFFF, 0],
    ),
    v6=([ipaddress.IPv6Network("2001:db8::/32"), ipaddress.IPv6Network("2001:db8::/32")], [0x20010DB8 << 96]),
)
def test_lookup_agrees_with_ipaddress(v4: Any, v6: Any) -> None:
    """Default combine: the most specific block wins (among equal blocks, the last given)."""
    nets4, probes4 = v4
    nets6, probes6 = v6
    payloads = list(range(len(nets4) + len(nets6)))
    index = AddressIndex(zip([str(n) for n in nets4 + nets6], payloads, strict=True))
    assert len(index) == len(payloads)
    inner = lambda outer, inner: inner  # noqa: E731
    for family, nets, probes, own in ((V4, nets4, probes4, payloads[: len(nets4)]), (V6, nets6, probes6, payloads[len(nets4) :])):
        for value in probes:
            want = _expected(nets, own, family, value, inner)
            assert index.lookup(family, value) == want, (family, _text(family, value))
            assert index.lookup_text(_text(family, value)) == want


@given(st.sampled_from([V4, V6]).flatmap(lambda family: st.tuples(st.just(family), network_sets(family))))
def test_lookup_combine_folds_outer_to_inner(case: Any) -> None:
    """A non-commutative combine (concatenation) shows the whole chain of enclosing blocks."""
    family, (nets, probes) = case
    payloads = [(i,) for i in range(len(nets))]
    index = AddressIndex(
        [((family, int(n.network_address), int(n.broadcast_address)), p) for n, p in zip(nets, payloads, strict=True)],
        combine=lambda outer, inner: outer + inner,
    )
    for value in probes:
        want = _expected(nets, payloads, family, value, lambda a, b: a + b)
        assert index.lookup(family, value) == want, (family, _text(family, value), [str(n) for n in nets])


@given(seed=st.integers(0, 2**32 - 1), prefixlens=st.lists(st.integers(0, 32), min_size=1, max_size=6, unique=True))
def test_combine_set_union_of_nested_blocks(seed: int, prefixlens: list[int]) -> None:
    """The registry's use: payload sets merged over nested blocks, whatever the input order."""
    nets = [_network(V4, seed, p) for p in prefixlens]
    index = AddressIndex(((str(n), frozenset({n.prefixlen})) for n in nets), combine=frozenset.union)
    assert index.lookup(V4, seed) == frozenset(prefixlens)
    outer = min(nets, key=lambda n: n.prefixlen)
    if outer.prefixlen:  # just outside the outermost block
        first, last = int(outer.network_address), int(outer.broadcast_address)
        assert index.lookup(V4, first - 1 if first else last + 1) is None


def test_lookup_families_are_separate() -> None:
    index = AddressIndex([("0.0.0.0/0", "v4"), ("2001:db8::/32", "v6")])
    assert index.lookup(V4, 0x20010DB8) == "v4"
    assert index.lookup(V6, 0x20010DB8) is None  # ::2001:db8 is not in 2001:db8::/32
    assert index.lookup(V6, 0x20010DB8 << 96) == "v6"
    assert index.lookup_text("2001:db8::1") == "v6"
    assert index.lookup_text("::ffff:203.0.113.9") == "v4"
    assert index.lookup_text("not-an-address") is None
    assert AddressIndex().lookup(V4, 1) is None and len(AddressIndex()) == 0


def test_mapped_networks_fold_to_ipv4() -> None:
    assert parse_network("::ffff:192.0.2.0/120") == (V4, 0xC0000200, 0xC00002FF)
    assert parse_network("::ffff:0:0/96") == (V4, 0, 0xFFFFFFFF)
    index = AddressIndex([("::ffff:192.0.2.0/120", "mapped")])
    assert index.lookup_text("192.0.2.77") == "mapped"
    assert index.lookup_text("::ffff:192.0.2.77") == "mapped"
    assert index.lookup_text("192.0.3.0") is None
    # a shorter IPv6 block is not folded (it is mostly not IPv4 space)
    assert parse_network("::fffe:0:0/95")[0] == V6


@pytest.mark.parametrize(
    "cidr",
    ["10.0.0.1/8", "10.0.0.0/33", "2001:db8::1/32", "2001:db8::/129", "10.0.0.0/", "x/8", "", "1.2.3/24", "10.0.0.0/8/8"],
)
def test_parse_network_rejects(cidr: str) -> None:
    with pytest.raises(ValueError):
        parse_network(cidr)


def test_parse_network_non_string() -> None:
    with pytest.raises(ValueError, match="not a CIDR string"):
        parse_network(167772160)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cidr", "expected"),
    [
        ("10.0.0.0/8", (V4, 0x0A000000, 0x0AFFFFFF)),
        (" 10.0.0.0/8 ", (V4, 0x0A000000, 0x0AFFFFFF)),
        ("1.2.3.4", (V4, 0x01020304, 0x01020304)),
        ("0.0.0.0/0", (V4, 0, 2**32 - 1)),
        ("2001:db8::/32", (V6, 0x20010DB8 << 96, ((0x20010DB8 + 1) << 96) - 1)),
        ("::/0", (V6, 0, 2**128 - 1)),
    ],
)
def test_parse_network_accepts(cidr: str, expected: tuple[int, int, int]) -> None:
    assert parse_network(cidr) == expected


# --------------------------------------------------------------------------------------------------
# parse_address: strict inet_pton parsing


@pytest.mark.parametrize(
    "text",
    [
        "1",  # inet_aton would take it as 0.0.0.1
        "1.2.3",
        "01.2.3.4",  # leading zeros: octal to some parsers, rejected by inet_pton
        "1.2.3.04",
        "0x1.2.3.4",
        "1.2.3.256",
        "1.2.3.4.5",
        " 1.2.3.4",
        "1.2.3.4 ",
        "1.2.3.4\x00",
        "fe80::1%eth0",  # zone-scoped
        ":",
        "1:2:3:4:5:6:7:8:9",
        "::g",
        "2001:db8::1::2",
        "ec2.amazonaws.com",
        "AWS Internal",
        "",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    assert parse_address(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", (V4, 0x01020304)),
        ("0.0.0.0", (V4, 0)),
        ("255.255.255.255", (V4, 2**32 - 1)),
        ("::", (V6, 0)),
        ("::1", (V6, 1)),
        ("2001:DB8::1", (V6, (0x20010DB8 << 96) | 1)),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", (V6, (0x20010DB8 << 96) | 1)),
        ("::ffff:1.2.3.4", (V4, 0x01020304)),  # IPv4-mapped: the IPv4 address made the call
        ("::FFFF:102:304", (V4, 0x01020304)),
        ("::ffff:0.0.0.0", (V4, 0)),
        ("::1.2.3.4", (V6, 0x01020304)),  # IPv4-compatible (deprecated) is not folded
        ("64:ff9b::1.2.3.4", (V6, (0x64FF9B << 96) | 0x01020304)),  # NAT64 is not folded
        ("::ffff:0:1.2.3.4", (V6, (0xFFFF << 48) | 0x01020304)),  # SIIT translated, not mapped
    ],
)
def test_parse_address_accepts(text: str, expected: tuple[int, int]) -> None:
    assert parse_address(text) == expected


@given(st.integers(0, 2**32 - 1))
def test_parse_address_ipv4_roundtrip(value: int) -> None:
    text = str(ipaddress.IPv4Address(value))
    assert parse_address(text) == (V4, value)
    assert parse_address(f"::ffff:{text}") == (V4, value)
    assert format_address(V4, value) == text


@given(st.integers(0, 2**128 - 1))
def test_parse_address_ipv6_roundtrip(value: int) -> None:
    addr = ipaddress.IPv6Address(value)
    expected = (V4, value & 0xFFFFFFFF) if value >> 32 == 0xFFFF else (V6, value)
    for text in (str(addr), addr.exploded, addr.exploded.upper()):
        assert parse_address(text) == expected, text
    if expected[0] == V6:
        assert format_address(V6, value) == str(addr)


@given(st.text(alphabet="0123456789abcdefABCDEF.:%x ", max_size=45))
@example("1.2.3.4")
@example("::ffff:1.2.3.4")
@example("fe80::1%eth0")
@example("01.2.3.4")
def test_parse_address_agrees_with_ipaddress(text: str) -> None:
    """parse_address reads exactly what ``ipaddress`` reads (after folding), minus zone-scoped addresses."""
    try:
        addr: Any = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is not None and addr.version == 6 and addr.scope_id is not None:
        addr = None  # fe80::1%eth0: a zone is local to the host that logged it, not an address to attribute
    if addr is not None and addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    assert parse_address(text) == (None if addr is None else (addr.version, int(addr)))


# --------------------------------------------------------------------------------------------------
# is_global


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8.8.8.8", True),
        ("3.5.77.71", True),
        ("2001:4860:4860::8888", True),
        ("2600:1f18::1", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # link-local (the instance metadata service)
        ("100.64.0.1", False),  # shared address space (carrier-grade NAT)
        ("0.0.0.0", False),
        ("192.0.2.1", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fd00:ec2::254", False),  # unique local (the IPv6 metadata service)
        ("2001:db8::1", False),
        ("::ffff:10.0.0.1", False),  # folded to IPv4 first
        ("::ffff:8.8.8.8", True),
    ],
)
def test_is_global(text: str, expected: bool) -> None:
    parsed = parse_address(text)
    assert parsed is not None
    assert is_global(*parsed) is expected


@given(st.integers(0, 2**32 - 1))
def test_is_global_ipv4_matches_ipaddress(value: int) -> None:
    # ipaddress is the reference; this pins that the integer form reaches it as IPv4, not as ::a.b.c.d
    assert is_global(V4, value) is ipaddress.IPv4Address(value).is_global
