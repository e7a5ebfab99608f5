//! The egress policy against the IANA IPv4 and IPv6 Special-Purpose Address Registries and the
//! IPv6 forms that carry an IPv4 address, through its public API only: every registry row is
//! refused, by name; every form that carries an IPv4 address is refused whatever it carries; the
//! allow list opens exactly what it names; and no input panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use taskfactory_model::egress::EgressPolicy;

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is an IP address"))
}

/// Every row of the registries (as their CSV exports list them, rows up to RFC 9780, 2025-04),
/// with the multicast ranges and the IPv6 space outside the registry that is not global unicast;
/// each with a word the refusal must contain. Rows the registry marks globally reachable are
/// refused too (see `egress/special.rs` for why).
const BLOCKS: &[(&str, &str)] = &[
    // IPv4 Special-Purpose Address Registry.
    ("0.0.0.0/8", "this network"),
    ("0.0.0.0/32", "this host"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.0.0/29", "service continuity"),
    ("192.0.0.8/32", "dummy"),
    ("192.0.0.9/32", "Port Control Protocol"),
    ("192.0.0.10/32", "TURN"),
    ("192.0.0.170/32", "NAT64/DNS64 discovery"),
    ("192.0.0.171/32", "NAT64/DNS64 discovery"),
    ("192.0.2.0/24", "documentation"),
    ("192.31.196.0/24", "AS112"),
    ("192.52.193.0/24", "AMT"),
    ("192.88.99.0/24", "6to4 relay"),
    ("192.88.99.2/32", "6a44"),
    ("192.168.0.0/16", "private"),
    ("192.175.48.0/24", "AS112"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
    // IPv4 Multicast Address Space.
    ("224.0.0.0/4", "multicast"),
    // IPv6 Special-Purpose Address Registry.
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("64:ff9b::/96", "NAT64"),
    ("64:ff9b:1::/48", "NAT64"),
    ("100::/64", "discard-only"),
    ("100:0:0:1::/64", "dummy"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001::/32", "Teredo"),
    ("2001:1::1/128", "Port Control Protocol"),
    ("2001:1::2/128", "TURN"),
    ("2001:1::3/128", "DNS-SD"),
    ("2001:2::/48", "benchmarking"),
    ("2001:3::/32", "AMT"),
    ("2001:4:112::/48", "AS112"),
    ("2001:10::/28", "ORCHID"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:30::/28", "Drone Remote ID"),
    ("2001:db8::/32", "documentation"),
    ("2002::/16", "6to4"),
    ("2620:4f:8000::/48", "AS112"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    // Outside the registry: deprecated forms, multicast, and the rest of the space outside
    // global unicast (IANA IPv6 Address Space: reserved by the IETF).
    ("::/96", "IPv4-compatible"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
    ("::/8", "global unicast"),
    ("200::/7", "global unicast"),
    ("4000::/3", "global unicast"),
    ("e000::/4", "global unicast"),
];

fn parse_block(block: &str) -> (IpAddr, u8) {
    let (addr, bits) = block.split_once('/').expect("a CIDR");
    (ip(addr), bits.parse().expect("a prefix length"))
}

/// The first, last and a middle address of a block.
fn samples(net: IpAddr, bits: u8) -> Vec<IpAddr> {
    match net {
        IpAddr::V4(v4) => {
            let host = u32::MAX.checked_shr(u32::from(bits)).unwrap_or(0);
            let first = u32::from(v4) & !host;
            [first, first | host, first | (host / 3)]
                .into_iter()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                .collect()
        }
        IpAddr::V6(v6) => {
            let host = u128::MAX.checked_shr(u32::from(bits)).unwrap_or(0);
            let first = u128::from(v6) & !host;
            [first, first | host, first | (host / 3)]
                .into_iter()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .collect()
        }
    }
}

#[test]
fn every_special_purpose_block_is_refused_by_name() {
    let policy = EgressPolicy::default();
    let mut problems = Vec::new();
    for (block, word) in BLOCKS {
        let (net, bits) = parse_block(block);
        for addr in samples(net, bits) {
            match policy.check_ip(addr) {
                Ok(()) => problems.push(format!("{addr} ({block}) is not refused")),
                Err(reason) if !reason.to_lowercase().contains(&word.to_lowercase()) => {
                    // A more specific row may name it (192.0.0.9 in 192.0.0.0/24): the reason
                    // names some block holding the address.
                    let named = BLOCKS.iter().any(|(other, other_word)| {
                        let (onet, obits) = parse_block(other);
                        contains(onet, obits, addr)
                            && reason.to_lowercase().contains(&other_word.to_lowercase())
                    });
                    if !named {
                        problems.push(format!(
                            "{addr} ({block}): {reason:?} does not say {word:?}"
                        ));
                    }
                }
                Err(_) => {}
            }
        }
    }
    assert_eq!(problems, Vec::<String>::new());
}

fn contains(net: IpAddr, bits: u8, addr: IpAddr) -> bool {
    match (net, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

#[test]
fn public_addresses_and_the_neighbours_of_special_blocks_are_reachable() {
    let policy = EgressPolicy::default();
    for public in [
        "1.1.1.1",
        "8.8.8.8",
        "93.184.216.34",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "191.255.255.255",
        "192.0.1.0",
        "192.0.3.0",
        "192.31.195.255",
        "192.31.197.0",
        "192.52.192.255",
        "192.52.194.0",
        "192.88.98.255",
        "192.88.100.0",
        "192.167.255.255",
        "192.169.0.0",
        "192.175.47.255",
        "192.175.49.0",
        "198.17.255.255",
        "198.20.0.0",
        "198.51.99.255",
        "198.51.101.0",
        "203.0.112.255",
        "203.0.114.0",
        "223.255.255.255",
        "2000::1",
        "2001:200::1",
        "2001:4860:4860::8888",
        "2003::1",
        "2606:4700::1111",
        "2620:4f:7fff:ffff:ffff:ffff:ffff:ffff",
        "2620:4f:8001::",
        "2a00:1450:4001:80b::200e",
        "3ffe::1",
        "3ff0:0:0:1::1",
    ] {
        assert!(
            policy.check_ip(ip(public)).is_ok(),
            "{public}: {:?}",
            policy.check_ip(ip(public))
        );
    }
}

/// What the red team tried, and what they would have tried next.
#[test]
fn the_red_teams_forms_are_refused() {
    let policy = EgressPolicy::default();
    for (addr, words) in [
        ("192.0.0.1", &["192.0.0.0/29"][..]),
        ("192.0.0.77", &["192.0.0.0/24"]),
        ("192.0.0.8", &["192.0.0.8/32"]),
        ("2002:7f00:1::", &["6to4", "2002::/16", "127.0.0.1"]),
        ("2002:7f00:0001::1", &["6to4", "127.0.0.1"]),
        ("::ffff:0:7f00:1", &["IPv4-translated", "127.0.0.1"]),
        ("::ffff:0:127.0.0.1", &["IPv4-translated", "127.0.0.1"]),
        ("::127.0.0.1", &["IPv4-compatible", "127.0.0.1"]),
        ("64:ff9b::7f00:1", &["NAT64", "64:ff9b::/96", "127.0.0.1"]),
        ("64:ff9b::a9fe:a9fe", &["NAT64", "169.254.169.254"]),
        ("64:ff9b:1::7f00:1", &["NAT64", "64:ff9b:1::/48"]),
        (
            "::ffff:169.254.169.254",
            &["IPv4-mapped", "169.254.169.254"],
        ),
        ("::ffff:127.0.0.1", &["IPv4-mapped", "127.0.0.1"]),
        (
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            &["Teredo", "127.0.0.1"],
        ),
        ("2001:db8::5efe:7f00:1", &["ISATAP", "127.0.0.1"]),
        (
            "2606:4700::200:5efe:a9fe:a9fe",
            &["ISATAP", "169.254.169.254"],
        ),
        ("fe80::5efe:10.0.0.1", &["10.0.0.1"]),
    ] {
        let reason = policy
            .check_ip(ip(addr))
            .expect_err(&format!("{addr} is refused"));
        for word in words {
            assert!(
                reason.contains(word),
                "{addr}: {reason:?} does not say {word:?}"
            );
        }
        assert!(reason.contains("TASKFACTORY_EGRESS_ALLOW"), "{reason}");
        // Spelled as a URL host (bracketed), the same.
        let host = if addr.contains(':') {
            format!("[{addr}]")
        } else {
            addr.to_owned()
        };
        assert!(policy.check_url_target(&host, 80).is_err(), "{host}");
    }
}

/// The IPv6 forms that carry an IPv4 address, each as a way to build one from an IPv4 address and
/// the bits it leaves free, and the allow-list entry that opens the whole form.
type Form = (&'static str, &'static str, fn(Ipv4Addr, u128) -> Ipv6Addr);

const FORMS: &[Form] = &[
    ("IPv4-mapped", "::ffff:0:0/96", |v4, _| v4.to_ipv6_mapped()),
    ("IPv4-translated", "::ffff:0:0:0/96", |v4, _| {
        Ipv6Addr::from((0xffff_u128 << 48) | u128::from(u32::from(v4)))
    }),
    ("IPv4-compatible", "::/96", |v4, _| {
        Ipv6Addr::from(u128::from(u32::from(v4)))
    }),
    ("NAT64", "64:ff9b::/96", |v4, _| {
        Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(u32::from(v4)))
    }),
    ("6to4", "2002::/16", |v4, free| {
        Ipv6Addr::from(
            (0x2002_u128 << 112) | (u128::from(u32::from(v4)) << 80) | (free & ((1 << 80) - 1)),
        )
    }),
    ("Teredo", "2001::/32", |v4, free| {
        // Server address and flags free; the client's address and port inverted.
        Ipv6Addr::from(
            (0x2001_0000_u128 << 96)
                | (free & (((1 << 64) - 1) << 32))
                | u128::from(!u32::from(v4)),
        )
    }),
    ("ISATAP", "2600::/12", |v4, free| {
        // Any prefix in 2600::/12, and either u bit.
        let prefix = (0x2600_u128 << 112) | ((free & ((1 << 52) - 1)) << 64);
        let u = if free >> 127 == 1 { 0x0200 } else { 0 };
        Ipv6Addr::from(prefix | (u << 48) | (0x5efe << 32) | u128::from(u32::from(v4)))
    }),
];

fn form(name: &str) -> fn(Ipv4Addr, u128) -> Ipv6Addr {
    FORMS
        .iter()
        .find(|(form, _, _)| *form == name)
        .map(|(_, _, build)| *build)
        .expect("a form")
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // No regression files next to the tests: a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases)
    }
}

/// An IPv4 address, often one of the non-public ones.
fn any_ipv4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        any::<u32>().prop_map(Ipv4Addr::from),
        (
            prop::sample::select(vec![
                "0.0.0.0/8",
                "10.0.0.0/8",
                "100.64.0.0/10",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "172.16.0.0/12",
                "192.0.0.0/24",
                "192.168.0.0/16",
                "198.18.0.0/15",
                "224.0.0.0/4",
                "240.0.0.0/4",
            ]),
            any::<u32>()
        )
            .prop_map(|(block, host)| {
                let (net, bits) = parse_block(block);
                let IpAddr::V4(net) = net else {
                    unreachable!("IPv4 blocks")
                };
                let mask = u32::MAX << (32 - u32::from(bits));
                Ipv4Addr::from((u32::from(net) & mask) | (host & !mask))
            }),
    ]
}

/// IPv4 addresses whose IPv4-compatible form is `::` or `::1`: those are judged as themselves.
fn compatible_exception(form: &str, v4: Ipv4Addr) -> bool {
    form == "IPv4-compatible" && u32::from(v4) <= 1
}

proptest! {
    #![proptest_config(config(512))]

    /// Every form of every IPv4 address — public or not — is refused by default, naming the form.
    #[test]
    fn every_ipv4_carrying_form_is_refused_by_default(
        v4 in any_ipv4(),
        free in any::<u128>(),
        form in 0..FORMS.len(),
    ) {
        let (name, _, build) = FORMS[form];
        prop_assume!(!compatible_exception(name, v4));
        let addr = IpAddr::V6(build(v4, free));
        let reason = EgressPolicy::default().check_ip(addr);
        prop_assert!(reason.is_err(), "{addr} ({name} of {v4})");
        let reason = reason.unwrap_err();
        prop_assert!(reason.contains(name), "{addr}: {reason}");
        prop_assert!(reason.contains(&v4.to_string()), "{addr}: {reason}");
    }

    /// Every 6to4 address of a non-public IPv4 address is refused, even with the address allowed.
    #[test]
    fn a_6to4_address_of_a_private_ipv4_address_is_refused(v4 in any_ipv4(), free in any::<u128>()) {
        prop_assume!(EgressPolicy::default().check_ip(IpAddr::V4(v4)).is_err());
        let addr = IpAddr::V6(form("6to4")(v4, free));
        prop_assert!(EgressPolicy::default().check_ip(addr).is_err(), "{addr}");
        let allowed = EgressPolicy::parse(&v4.to_string()).unwrap();
        prop_assert!(allowed.check_ip(addr).is_err(), "{addr} with {v4} allowed");
    }

    /// Allowing an IPv4 address (or its /24) opens none of its IPv6 forms.
    #[test]
    fn allowing_an_ipv4_address_opens_none_of_its_ipv6_forms(
        v4 in any_ipv4(),
        free in any::<u128>(),
        form in 0..FORMS.len(),
    ) {
        let (name, _, build) = FORMS[form];
        prop_assume!(!compatible_exception(name, v4));
        let addr = IpAddr::V6(build(v4, free));
        for allow in [v4.to_string(), format!("{v4}/24")] {
            let policy = EgressPolicy::parse(&allow).unwrap();
            prop_assert!(policy.check_ip(IpAddr::V4(v4)).is_ok());
            prop_assert!(policy.check_ip(addr).is_err(), "{addr} with {allow} allowed");
        }
    }

    /// Opening a form's block opens it to public IPv4 addresses only: what it carries is judged as
    /// an IPv4 address, so a private one must be allowed too.
    #[test]
    fn opening_a_form_reaches_what_the_ipv4_policy_allows(
        v4 in any_ipv4(),
        free in any::<u128>(),
        form in 0..FORMS.len(),
    ) {
        let (name, block, build) = FORMS[form];
        prop_assume!(!compatible_exception(name, v4));
        let addr = IpAddr::V6(build(v4, free));
        let public = EgressPolicy::default().check_ip(IpAddr::V4(v4)).is_ok();
        let opened = EgressPolicy::parse(block).unwrap();
        prop_assert_eq!(opened.check_ip(addr).is_ok(), public, "{} with {} allowed: {:?}", addr, block, opened.check_ip(addr));
        if !public {
            let reason = opened.check_ip(addr).unwrap_err();
            prop_assert!(reason.contains(&v4.to_string()), "{reason}");
        }
        let both = EgressPolicy::parse(&format!("{block}, {v4}")).unwrap();
        prop_assert!(both.check_ip(addr).is_ok(), "{addr} with {block} and {v4} allowed: {:?}", both.check_ip(addr));
        // The exact address, allowed alone, still needs what it carries to pass.
        let exact = EgressPolicy::parse(&addr.to_string()).unwrap();
        prop_assert_eq!(exact.check_ip(addr).is_ok(), public);
    }

    /// No address, allow list or URL host makes the policy panic.
    #[test]
    fn no_input_panics(
        allow in proptest::collection::vec(
            prop_oneof![
                "[0-9a-fA-F:./*,\\[\\] ]{0,40}",
                (any::<u128>(), 0u8..=130).prop_map(|(a, b)| format!("{}/{b}", Ipv6Addr::from(a))),
                (any::<u32>(), 0u8..=130).prop_map(|(a, b)| format!("::ffff:{}/{b}", Ipv4Addr::from(a))),
                (any::<u32>(), 0u8..=40).prop_map(|(a, b)| format!("{}/{b}", Ipv4Addr::from(a))),
            ],
            0..4,
        ),
        v6 in any::<u128>(),
        v4 in any::<u32>(),
        host in "[0-9a-fA-F:.\\[\\]]{0,40}",
        port in any::<u16>(),
    ) {
        if let Ok(policy) = EgressPolicy::parse(&allow.join(",")) {
            let _ = policy.check_ip(IpAddr::V6(Ipv6Addr::from(v6)));
            let _ = policy.check_ip(IpAddr::V4(Ipv4Addr::from(v4)));
            let _ = policy.check_ip(IpAddr::V6(Ipv4Addr::from(v4).to_ipv6_mapped()));
            let _ = policy.check_url_target(&host, port);
            let _ = policy.host_allowed(&host);
        }
    }
}

/// An allow entry written as an IPv4-mapped network (`::ffff:10.0.0.0/104`) with the IPv6 prefix
/// length: it opens the mapped addresses it names, and nothing panics.
///
/// FINDING (services/taskfactory-model/src/egress.rs, `check_ip`/`in_network`): the entry was
/// turned into the IPv4 network 10.0.0.0 but kept its IPv6 prefix length (104), and the mask
/// `u32::MAX << (32 - 104)` overflowed: every address check panicked.
#[test]
fn a_mapped_allow_entry_with_an_ipv6_prefix_length_does_not_panic() {
    let policy = EgressPolicy::parse("::ffff:10.0.0.0/104, 10.0.0.0/8").unwrap();
    assert!(policy.check_ip(ip("::ffff:10.1.2.3")).is_ok());
    assert!(policy.check_ip(ip("10.1.2.3")).is_ok());
    assert!(policy.check_ip(ip("::ffff:127.0.0.1")).is_err());
    assert!(policy.check_ip(ip("8.8.8.8")).is_ok());
    let single = EgressPolicy::parse("::ffff:7f00:1/128").unwrap();
    assert!(single.check_ip(ip("127.0.0.1")).is_err());
}
