//! Which addresses are not plain public ones, and why: every block of the IANA IPv4 and IPv6
//! Special-Purpose Address Registries (RFC 6890 and its updates), multicast, the IPv6 space outside
//! global unicast, and the IPv6 forms that carry an IPv4 address.
//!
//! The tables follow the registries' CSV exports row for row (rows up to RFC 9780, 2025-04):
//! <https://www.iana.org/assignments/iana-ipv4-special-registry/> and
//! <https://www.iana.org/assignments/iana-ipv6-special-registry/>. A row added later is not
//! refused until it is added here; `tests/egress_registry.rs` lists the rows again, to be updated
//! with them.
//!
//! Every row is refused, including those the registry marks *globally reachable*: they are
//! protocol infrastructure, not web servers, and most are anycast, so the instance that answers is
//! the nearest one — often run by the network taskfactory sits in. The Port Control Protocol and
//! TURN anycast addresses are answered by the local NAT gateway or relay; AS112 servers (DNS sinks
//! for reverse lookups of private space) run at exchange points and inside ISPs; AMT relays tunnel
//! multicast; ORCHIDv2 and drone-ID tags are identifiers, not locators. An operator who needs one
//! allows it by name in `TASKFACTORY_EGRESS_ALLOW`.
//!
//! # IPv4 carried in IPv6
//!
//! A packet to an IPv6 address that carries an IPv4 address goes to that IPv4 address, or through a
//! tunnel, relay or translator that reaches it: IPv4-mapped (`::ffff:a.b.c.d`, an IPv6 socket's
//! name for an IPv4 peer), IPv4-compatible (`::a.b.c.d`), IPv4-translated (`::ffff:0:a.b.c.d`),
//! NAT64 (`64:ff9b::a.b.c.d`), 6to4 (`2002:AABB:CCDD::`), Teredo (`2001:0:…`, the client's
//! address inverted) and ISATAP interface ids (`…:0:5efe:a.b.c.d`, in any prefix). Each *form* is
//! refused as a whole, whatever it carries: translators and relays differ in what they agree to
//! reach (RFC 6052 forbids translating the NAT64 well-known prefix into private space;
//! draft-ietf-v6ops-nat64-wkp-1918 proposes to allow it), and a public IPv4 address is reached
//! directly. The one network that needs a form is an IPv6-only one behind DNS64, whose operator
//! opens `64:ff9b::/96`; what it carries is then judged as an IPv4 address (see `check_ip`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::in_network;

/// A block of addresses that is not plain public space.
#[derive(Debug)]
pub(super) struct Block {
    net: IpAddr,
    bits: u8,
    /// As in "127.0.0.1 is {what}".
    what: &'static str,
    /// Where the block is defined.
    source: &'static str,
}

impl Block {
    fn contains(&self, ip: IpAddr) -> bool {
        in_network(ip, self.net, self.bits)
    }
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}/{}, {})",
            self.what, self.net, self.bits, self.source
        )
    }
}

const fn v4(octets: [u8; 4], bits: u8, what: &'static str, source: &'static str) -> Block {
    let [a, b, c, d] = octets;
    Block {
        net: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        bits,
        what,
        source,
    }
}

const fn v6(segments: [u16; 8], bits: u8, what: &'static str, source: &'static str) -> Block {
    let [a, b, c, d, e, f, g, h] = segments;
    Block {
        net: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
        bits,
        what,
        source,
    }
}

/// The IANA IPv4 Special-Purpose Address Registry, and multicast. Rows marked "globally reachable"
/// in the registry say so; they are refused all the same (see the module comment).
const IPV4: &[Block] = &[
    v4([0, 0, 0, 0], 8, "a \"this network\" address", "RFC 791"),
    v4(
        [0, 0, 0, 0],
        32,
        "the \"this host\" (unspecified) address",
        "RFC 1122",
    ),
    v4([10, 0, 0, 0], 8, "a private address", "RFC 1918"),
    v4(
        [100, 64, 0, 0],
        10,
        "a shared (carrier-grade NAT) address",
        "RFC 6598",
    ),
    v4([127, 0, 0, 0], 8, "a loopback address", "RFC 1122"),
    v4(
        [169, 254, 0, 0],
        16,
        "a link-local address (cloud metadata lives here)",
        "RFC 3927",
    ),
    v4([172, 16, 0, 0], 12, "a private address", "RFC 1918"),
    v4(
        [192, 0, 0, 0],
        24,
        "an IETF protocol assignment address",
        "RFC 6890",
    ),
    v4(
        [192, 0, 0, 0],
        29,
        "an IPv4 service continuity (DS-Lite) address",
        "RFC 7335",
    ),
    v4([192, 0, 0, 8], 32, "the IPv4 dummy address", "RFC 7600"),
    // Globally reachable; answered by the nearest PCP server, the network's own NAT gateway.
    v4(
        [192, 0, 0, 9],
        32,
        "the Port Control Protocol anycast address",
        "RFC 7723",
    ),
    // Globally reachable; answered by the network's own TURN relay.
    v4([192, 0, 0, 10], 32, "the TURN anycast address", "RFC 8155"),
    v4(
        [192, 0, 0, 170],
        32,
        "a NAT64/DNS64 discovery address",
        "RFC 8880",
    ),
    v4(
        [192, 0, 0, 171],
        32,
        "a NAT64/DNS64 discovery address",
        "RFC 8880",
    ),
    v4(
        [192, 0, 2, 0],
        24,
        "a documentation address (TEST-NET-1)",
        "RFC 5737",
    ),
    // Globally reachable; anycast DNS sinks, often run by the local network or exchange point.
    v4([192, 31, 196, 0], 24, "an AS112 DNS address", "RFC 7535"),
    // Globally reachable; anycast relays that tunnel multicast.
    v4([192, 52, 193, 0], 24, "an AMT relay address", "RFC 7450"),
    // Deprecated (terminated 2015): the anycast of 6to4 relays, the gateways into 6to4.
    v4(
        [192, 88, 99, 0],
        24,
        "a 6to4 relay anycast address (deprecated)",
        "RFC 7526",
    ),
    v4(
        [192, 88, 99, 2],
        32,
        "the 6a44 relay anycast address",
        "RFC 6751",
    ),
    v4([192, 168, 0, 0], 16, "a private address", "RFC 1918"),
    // Globally reachable; as 192.31.196.0/24.
    v4(
        [192, 175, 48, 0],
        24,
        "an AS112 DNS address (direct delegation)",
        "RFC 7534",
    ),
    v4([198, 18, 0, 0], 15, "a benchmarking address", "RFC 2544"),
    v4(
        [198, 51, 100, 0],
        24,
        "a documentation address (TEST-NET-2)",
        "RFC 5737",
    ),
    v4(
        [203, 0, 113, 0],
        24,
        "a documentation address (TEST-NET-3)",
        "RFC 5737",
    ),
    v4([240, 0, 0, 0], 4, "a reserved address", "RFC 1112"),
    v4(
        [255, 255, 255, 255],
        32,
        "the limited broadcast address",
        "RFC 919",
    ),
    // Not in the registry: the IANA IPv4 Multicast Address Space.
    v4([224, 0, 0, 0], 4, "a multicast address", "RFC 5771"),
];

/// The IANA IPv6 Special-Purpose Address Registry, and what the IPv6 Address Space registry and
/// RFC 4291 say is not global unicast. The rows whose addresses carry an IPv4 address
/// (`::ffff:0:0/96`, `64:ff9b::/96`, `2001::/32`, `2002::/16`) are [`FORMS`], judged first.
const IPV6: &[Block] = &[
    v6([0; 8], 128, "the unspecified address", "RFC 4291"),
    v6(
        [0, 0, 0, 0, 0, 0, 0, 1],
        128,
        "the loopback address",
        "RFC 4291",
    ),
    // Local-use NAT64 prefixes: where the IPv4 address sits depends on the operator's prefix
    // length, so the block is refused as a whole and opened as a whole.
    v6(
        [0x64, 0xff9b, 1, 0, 0, 0, 0, 0],
        48,
        "a local-use NAT64 address",
        "RFC 8215",
    ),
    v6(
        [0x100, 0, 0, 0, 0, 0, 0, 0],
        64,
        "a discard-only address",
        "RFC 6666",
    ),
    v6(
        [0x100, 0, 0, 1, 0, 0, 0, 0],
        64,
        "a dummy IPv6 prefix address",
        "RFC 9780",
    ),
    v6(
        [0x2001, 0, 0, 0, 0, 0, 0, 0],
        23,
        "an IETF protocol assignment address",
        "RFC 2928",
    ),
    // Globally reachable; as 192.0.0.9.
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 1],
        128,
        "the Port Control Protocol anycast address",
        "RFC 7723",
    ),
    // Globally reachable; as 192.0.0.10.
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 2],
        128,
        "the TURN anycast address",
        "RFC 8155",
    ),
    // Globally reachable; answered by the local network's service registration server.
    v6(
        [0x2001, 1, 0, 0, 0, 0, 0, 3],
        128,
        "the DNS-SD service registration anycast address",
        "RFC 9665",
    ),
    v6(
        [0x2001, 2, 0, 0, 0, 0, 0, 0],
        48,
        "a benchmarking address",
        "RFC 5180",
    ),
    // Globally reachable; as 192.52.193.0/24.
    v6(
        [0x2001, 3, 0, 0, 0, 0, 0, 0],
        32,
        "an AMT relay address",
        "RFC 7450",
    ),
    // Globally reachable; as 192.31.196.0/24.
    v6(
        [0x2001, 4, 0x112, 0, 0, 0, 0, 0],
        48,
        "an AS112 DNS address",
        "RFC 7535",
    ),
    v6(
        [0x2001, 0x10, 0, 0, 0, 0, 0, 0],
        28,
        "an ORCHID address (deprecated)",
        "RFC 4843",
    ),
    // Globally reachable; identifiers of an overlay, not locators.
    v6(
        [0x2001, 0x20, 0, 0, 0, 0, 0, 0],
        28,
        "an ORCHIDv2 address",
        "RFC 7343",
    ),
    // Globally reachable; identifiers, as ORCHIDv2.
    v6(
        [0x2001, 0x30, 0, 0, 0, 0, 0, 0],
        28,
        "a Drone Remote ID entity tag",
        "RFC 9374",
    ),
    v6(
        [0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],
        32,
        "a documentation address",
        "RFC 3849",
    ),
    // Globally reachable; as 192.175.48.0/24.
    v6(
        [0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0],
        48,
        "an AS112 DNS address (direct delegation)",
        "RFC 7534",
    ),
    v6(
        [0x3fff, 0, 0, 0, 0, 0, 0, 0],
        20,
        "a documentation address",
        "RFC 9637",
    ),
    v6(
        [0x5f00, 0, 0, 0, 0, 0, 0, 0],
        16,
        "an SRv6 segment identifier",
        "RFC 9602",
    ),
    v6(
        [0xfc00, 0, 0, 0, 0, 0, 0, 0],
        7,
        "a unique-local address",
        "RFC 4193",
    ),
    v6(
        [0xfe80, 0, 0, 0, 0, 0, 0, 0],
        10,
        "a link-local address",
        "RFC 4291",
    ),
    // Not in the registry: deprecated site-local, and multicast.
    v6(
        [0xfec0, 0, 0, 0, 0, 0, 0, 0],
        10,
        "a site-local address (deprecated)",
        "RFC 3879",
    ),
    v6(
        [0xff00, 0, 0, 0, 0, 0, 0, 0],
        8,
        "a multicast address",
        "RFC 4291",
    ),
];

/// What is left outside the blocks above but is not global unicast either: the IPv6 Address Space
/// registry reserves everything outside 2000::/3 (and the blocks above) to the IETF.
static NOT_GLOBAL_UNICAST: Block = v6(
    [0x2000, 0, 0, 0, 0, 0, 0, 0],
    3,
    "reserved by the IETF: outside the global unicast space",
    "RFC 4291",
);

/// An IPv6 form that carries an IPv4 address.
#[derive(Debug)]
pub(super) struct Form {
    /// As in "2002:7f00:1:: is {what}".
    what: &'static str,
    /// Where the form lives and where it is defined.
    at: &'static str,
    carried: fn(&[u16; 8]) -> Option<Ipv4Addr>,
}

impl std::fmt::Display for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.what, self.at)
    }
}

/// The IPv4 address in the last 32 bits.
fn low(s: &[u16; 8]) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7]))
}

const FORMS: &[Form] = &[
    Form {
        what: "an IPv4-mapped address",
        at: "::ffff:0:0/96, RFC 4291",
        carried: |s| (s[..5] == [0; 5] && s[5] == 0xffff).then(|| low(s)),
    },
    Form {
        what: "an IPv4-compatible address (deprecated)",
        at: "::/96, RFC 4291",
        // `::` and `::1` are the unspecified and loopback addresses, not IPv4 ones.
        carried: |s| (s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1)).then(|| low(s)),
    },
    Form {
        what: "an IPv4-translated address",
        at: "::ffff:0:0:0/96, RFC 2765",
        carried: |s| (s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0).then(|| low(s)),
    },
    // Globally reachable in the registry: a translator to IPv4, refused as a form.
    Form {
        what: "a NAT64 address",
        at: "64:ff9b::/96, RFC 6052",
        carried: |s| (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]).then(|| low(s)),
    },
    // "Globally reachable: N/A" in the registry: whatever the relay reaches.
    Form {
        what: "a 6to4 address",
        at: "2002::/16, RFC 3056",
        carried: |s| {
            (s[0] == 0x2002).then(|| Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])))
        },
    },
    // "Globally reachable: N/A" in the registry. The client's address, inverted, in the last 32
    // bits: where the relay sends the packet (the Teredo server's address follows the prefix).
    Form {
        what: "a Teredo address",
        at: "2001::/32, RFC 4380",
        carried: |s| (s[0] == 0x2001 && s[1] == 0).then(|| !low(s)),
    },
    // In any prefix: the interface id `0000:5efe` (private IPv4) or `0200:5efe` (u bit set,
    // public IPv4), either with the g bit, then the IPv4 address.
    Form {
        what: "an ISATAP address",
        at: "interface id …:0:5efe:a.b.c.d or …:200:5efe:a.b.c.d, RFC 5214",
        carried: |s| (s[4] & 0xfcff == 0 && s[5] == 0x5efe).then(|| low(s)),
    },
];

/// Why an address is not a plain public one.
#[derive(Debug)]
pub(super) enum Special {
    Block(&'static Block),
    Carries(&'static Form, Ipv4Addr),
}

/// Why `ip` is not a plain public address, if it is not: the form that carries an IPv4 address,
/// else the most specific block that holds it.
pub(super) fn special(ip: IpAddr) -> Option<Special> {
    let v6 = match ip {
        IpAddr::V4(v4) => return ipv4_block(v4).map(Special::Block),
        IpAddr::V6(v6) => v6,
    };
    if let Some((form, v4)) = carried(v6).next() {
        return Some(Special::Carries(form, v4));
    }
    most_specific(IPV6, ip)
        .or_else(|| (!NOT_GLOBAL_UNICAST.contains(ip)).then_some(&NOT_GLOBAL_UNICAST))
        .map(Special::Block)
}

/// The most specific block that holds an IPv4 address, if any.
pub(super) fn ipv4_block(v4: Ipv4Addr) -> Option<&'static Block> {
    most_specific(IPV4, IpAddr::V4(v4))
}

fn most_specific(table: &'static [Block], ip: IpAddr) -> Option<&'static Block> {
    table
        .iter()
        .filter(|block| block.contains(ip))
        .max_by_key(|block| block.bits)
}

/// Each form `v6` has and the IPv4 address it carries there (a 6to4 or Teredo address can also
/// have an ISATAP interface id: two).
pub(super) fn carried(v6: Ipv6Addr) -> impl Iterator<Item = (&'static Form, Ipv4Addr)> {
    let segments = v6.segments();
    FORMS
        .iter()
        .filter_map(move |form| (form.carried)(&segments).map(|v4| (form, v4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_block_is_its_network() {
        for block in IPV4.iter().chain(IPV6) {
            assert!(block.contains(block.net), "{block}");
            let max = if block.net.is_ipv4() { 32 } else { 128 };
            assert!(block.bits <= max, "{block}");
            // No host bits: the network is written as its first address.
            let host = match block.net {
                IpAddr::V4(a) => {
                    u128::from(u32::from(a) & u32::MAX.checked_shr(block.bits.into()).unwrap_or(0))
                }
                IpAddr::V6(a) => {
                    u128::from(a) & u128::MAX.checked_shr(block.bits.into()).unwrap_or(0)
                }
            };
            assert_eq!(host, 0, "{block}");
        }
    }

    #[test]
    fn the_most_specific_block_names_an_address() {
        let named = |s: &str| match special(ip(s)) {
            Some(Special::Block(block)) => block.to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert!(named("192.0.0.9").contains("Port Control Protocol"));
        assert!(named("192.0.0.77").contains("192.0.0.0/24"));
        assert!(named("192.0.0.3").contains("192.0.0.0/29"));
        assert!(named("0.0.0.0").contains("0.0.0.0/32"));
        assert!(named("0.1.2.3").contains("0.0.0.0/8"));
        assert!(named("2001:1::1").contains("2001:1::1/128"));
        assert!(named("2001:1::4").contains("2001::/23"));
        assert!(named("::1").contains("loopback"));
        assert!(named("::").contains("unspecified"));
        assert!(named("::1:0:0:1").contains("outside the global unicast space"));
        assert!(named("4000::1").contains("2000::/3"));
    }

    #[test]
    fn each_form_finds_the_ipv4_address_it_carries() {
        let carries = |s: &str| -> Vec<(&str, Ipv4Addr)> {
            carried(s.parse().unwrap())
                .map(|(form, v4)| (form.what, v4))
                .collect()
        };
        let loopback = Ipv4Addr::LOCALHOST;
        assert_eq!(carries("::ffff:127.0.0.1"), [(FORMS[0].what, loopback)]);
        assert_eq!(carries("::127.0.0.1"), [(FORMS[1].what, loopback)]);
        assert_eq!(carries("::ffff:0:127.0.0.1"), [(FORMS[2].what, loopback)]);
        assert_eq!(carries("64:ff9b::7f00:1"), [(FORMS[3].what, loopback)]);
        assert_eq!(carries("2002:7f00:1::"), [(FORMS[4].what, loopback)]);
        assert_eq!(carries("2002:7f00:0001::1"), [(FORMS[4].what, loopback)]);
        // RFC 4380's example: server 65.54.227.120, client 192.0.2.45 (port 40000).
        assert_eq!(
            carries("2001:0:4136:e378:8000:63bf:3fff:fdd2"),
            [(FORMS[5].what, Ipv4Addr::new(192, 0, 2, 45))]
        );
        assert_eq!(
            carries("fe80::5efe:10.0.0.1"),
            [(FORMS[6].what, Ipv4Addr::new(10, 0, 0, 1))]
        );
        assert_eq!(
            carries("2001:db8::200:5efe:c000:22d"),
            [(FORMS[6].what, Ipv4Addr::new(192, 0, 2, 45))]
        );
        // 6to4 and ISATAP at once.
        assert_eq!(
            carries("2002:c000:22d::5efe:a00:1"),
            [
                (FORMS[4].what, Ipv4Addr::new(192, 0, 2, 45)),
                (FORMS[6].what, Ipv4Addr::new(10, 0, 0, 1))
            ]
        );
        assert_eq!(carries("::"), []);
        assert_eq!(carries("::1"), []);
        assert_eq!(carries("2606:4700::1111"), []);
        assert_eq!(carries("64:ff9b:1::7f00:1"), []);
    }
}
