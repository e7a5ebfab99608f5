//! The egress policy for outbound HTTP (the `http` task type, and `http` context sources): which
//! hosts and addresses may be reached.
//!
//! By default only public addresses are reachable: every block of the IANA special-purpose address
//! registries is refused — loopback, private, link-local (including the cloud metadata address
//! 169.254.169.254), carrier-grade NAT, unique-local, documentation, benchmarking, multicast,
//! unspecified, the IETF protocol assignments (192.0.0.0/24, 2001::/23) and the rest — and so is
//! every IPv6 form that carries an IPv4 address (mapped, compatible, translated, NAT64, 6to4,
//! Teredo, ISATAP), whatever it carries ([`special`] lists them and says why).
//!
//! `TASKFACTORY_EGRESS_ALLOW` opens more, as a comma-separated list of hostnames (`api.internal`,
//! `*.internal`), `host:port`, IP addresses and CIDRs (`10.0.0.0/8`). An address or CIDR opens the
//! addresses it holds, in its own family only: `127.0.0.1` opens 127.0.0.1, not `::ffff:127.0.0.1`
//! nor `2002:7f00:1::`. Opening an IPv6 form that carries an IPv4 address (`64:ff9b::/96` for a
//! DNS64 network) opens the way, not what is at the end of it: the carried IPv4 address is then
//! judged as one, so `64:ff9b::a00:1` also needs `10.0.0.1` allowed.
//!
//! The check applies to the *resolved* address, so a public name that resolves to a private
//! address is refused too.

use std::net::{IpAddr, Ipv4Addr};

mod special;

use special::Special;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    hosts: Vec<HostRule>,
    networks: Vec<(IpAddr, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct HostRule {
    /// Lowercase; a leading `*.` matches any subdomain.
    pattern: String,
    port: Option<u16>,
}

impl EgressPolicy {
    /// Parses the allow list; an entry that is none of the accepted forms is an error naming it.
    pub fn parse(allow: &str) -> Result<Self, String> {
        let mut policy = Self::default();
        for entry in allow.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if let Some((addr, bits)) = entry.split_once('/') {
                let ip: IpAddr = addr.parse().map_err(|_| {
                    format!("egress allow entry {entry:?}: {addr:?} is not an IP address")
                })?;
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let bits: u8 = bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| {
                    format!("egress allow entry {entry:?}: prefix must be 0–{max}")
                })?;
                policy.networks.push((ip, bits));
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                policy
                    .networks
                    .push((ip, if ip.is_ipv4() { 32 } else { 128 }));
            } else {
                let (host, port) = match entry.rsplit_once(':') {
                    Some((host, port)) if !host.contains(':') => {
                        let port = port.parse().map_err(|_| {
                            format!("egress allow entry {entry:?}: {port:?} is not a port")
                        })?;
                        (host, Some(port))
                    }
                    _ => (entry, None),
                };
                if host.is_empty() || host.contains('/') || host.contains(' ') {
                    return Err(format!(
                        "egress allow entry {entry:?} is not a host, host:port, IP or CIDR"
                    ));
                }
                if let Ok(ip) = host.parse::<IpAddr>() {
                    // `127.0.0.1:8080`: the address, on that port only — kept as a host rule.
                    policy.hosts.push(HostRule {
                        pattern: ip.to_string(),
                        port,
                    });
                } else {
                    policy.hosts.push(HostRule {
                        pattern: host.to_ascii_lowercase(),
                        port,
                    });
                }
            }
        }
        Ok(policy)
    }

    /// Whether the host (by name) is allow-listed (on some port): its resolved addresses are then
    /// not checked. Ports are enforced before resolution, on every URL and every redirect, by
    /// [`EgressPolicy::check_url_target`].
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts
            .iter()
            .any(|rule| matches_host(&rule.pattern, &host))
    }

    /// Whether a URL's host and port pass before resolution: `Err` names why not. Names that are
    /// not allow-listed pass here and are judged by their resolved addresses.
    pub fn check_url_target(&self, host: &str, port: u16) -> Result<(), String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let lower = host.trim_end_matches('.').to_ascii_lowercase();
        let named = self
            .hosts
            .iter()
            .any(|rule| matches_host(&rule.pattern, &lower) && rule.port.is_none_or(|p| p == port));
        if named {
            return Ok(());
        }
        // Listed, but only on other ports: refused here, because its addresses are not checked
        // once it resolves (see `host_allowed`).
        let ports: Vec<u16> = self
            .hosts
            .iter()
            .filter(|rule| matches_host(&rule.pattern, &lower))
            .filter_map(|rule| rule.port)
            .collect();
        if !ports.is_empty() && host.parse::<IpAddr>().is_err() {
            return Err(format!(
                "{host} is allowed only on port {}",
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            return self.check_ip(ip);
        }
        Ok(())
    }

    /// Whether a resolved address may be connected to: `Err` says what the address is (which
    /// block, which form and what it carries) and what to allow to reach it.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        const ALLOW: &str = "in TASKFACTORY_EGRESS_ALLOW to reach it";
        if self.opens(ip) {
            // Opening an address that carries an IPv4 address opens the way to that address, not
            // the address itself: it is judged as any IPv4 address is.
            let IpAddr::V6(v6) = ip else {
                return Ok(());
            };
            for (form, v4) in special::carried(v6) {
                if let Some(block) = self.refused_ipv4(v4) {
                    return Err(format!(
                        "{ip} is allowed, but it is {form} carrying {v4}, {block}; allow that address too {ALLOW}"
                    ));
                }
            }
            return Ok(());
        }
        match special::special(ip) {
            None => Ok(()),
            Some(Special::Block(block)) => Err(format!("{ip} is {block}; allow it {ALLOW}")),
            Some(Special::Carries(form, v4)) => Err(match self.refused_ipv4(v4) {
                None => format!("{ip} is {form} carrying {v4}; allow it {ALLOW}"),
                Some(block) => {
                    format!("{ip} is {form} carrying {v4}, {block}; allow both {ALLOW}")
                }
            }),
        }
    }

    /// Whether the allow list names the address: a network holding it (in its own family), or
    /// the address with no port.
    fn opens(&self, ip: IpAddr) -> bool {
        // An address listed with a port (`127.0.0.1:8080`) is allowed on that port only, which
        // `check_url_target` enforces; a bare address check (a resolved name, port unknown) does
        // not open it.
        self.networks
            .iter()
            .any(|(net, bits)| in_network(ip, *net, *bits))
            || self
                .hosts
                .iter()
                .any(|rule| rule.port.is_none() && rule.pattern == ip.to_string())
    }

    /// The block of an IPv4 address the policy refuses, if it does.
    fn refused_ipv4(&self, v4: Ipv4Addr) -> Option<&'static special::Block> {
        if self.opens(IpAddr::V4(v4)) {
            return None;
        }
        special::ipv4_block(v4)
    }
}

pub(crate) fn matches_host(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len()
                && host.ends_with(suffix)
                && host[..host.len() - suffix.len()].ends_with('.')
        }
        None => pattern == host,
    }
}

/// Whether `ip` is in `net/bits`; never across families, and a prefix longer than the family's
/// counts as the whole address.
fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX
                .checked_shl(32_u32.saturating_sub(bits.into()))
                .unwrap_or(0);
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX
                .checked_shl(128_u32.saturating_sub(bits.into()))
                .unwrap_or(0);
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_policy_allows_only_public_addresses() {
        let policy = EgressPolicy::default();
        assert!(policy.check_ip(ip("93.184.216.34")).is_ok());
        assert!(policy.check_ip(ip("2606:4700::1111")).is_ok());
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(
                policy.check_ip(ip(blocked)).is_err(),
                "{blocked} should be refused"
            );
        }
        assert!(policy.check_url_target("127.0.0.1", 80).is_err());
        assert!(policy.check_url_target("[::1]", 80).is_err());
        assert!(policy.check_url_target("example.com", 80).is_ok());
    }

    #[test]
    fn allow_list_opens_hosts_ports_addresses_and_networks() {
        let policy = EgressPolicy::parse(
            "api.internal, *.svc.local, 127.0.0.1, 10.0.0.0/8, db.internal:5432",
        )
        .unwrap();
        assert!(policy.host_allowed("api.internal"));
        assert!(policy.host_allowed("x.svc.local"));
        assert!(!policy.host_allowed("svc.local"));
        // A name listed with a port: allowed on that port, refused on any other before it resolves.
        assert!(policy.host_allowed("db.internal"));
        assert!(policy.check_url_target("db.internal", 5432).is_ok());
        assert!(
            policy
                .check_url_target("db.internal", 22)
                .unwrap_err()
                .contains("only on port 5432")
        );
        // An address listed with a port opens that port only.
        let one_port = EgressPolicy::parse("127.0.0.1:8080").unwrap();
        assert!(one_port.check_url_target("127.0.0.1", 8080).is_ok());
        assert!(one_port.check_url_target("127.0.0.1", 8081).is_err());
        assert!(one_port.check_ip(ip("127.0.0.1")).is_err());
        // IPv4 carried in IPv6 is refused, and allowing the IPv4 address does not open it.
        for hidden in [
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "::ffff:10.0.0.1",
            "2002:a00:1::",
        ] {
            assert!(
                EgressPolicy::default().check_ip(ip(hidden)).is_err(),
                "{hidden}"
            );
            assert!(policy.check_ip(ip(hidden)).is_err(), "{hidden}");
        }
        assert!(policy.check_ip(ip("127.0.0.1")).is_ok());
        assert!(policy.check_ip(ip("10.9.8.7")).is_ok());
        assert!(policy.check_ip(ip("192.168.0.1")).is_err());
    }

    #[test]
    fn refusals_name_the_block_the_form_and_what_it_carries() {
        let refusal = |allow: &str, addr: &str| {
            EgressPolicy::parse(allow)
                .unwrap()
                .check_ip(ip(addr))
                .unwrap_err()
        };
        assert_eq!(
            refusal("", "127.0.0.1"),
            "127.0.0.1 is a loopback address (127.0.0.0/8, RFC 1122); \
             allow it in TASKFACTORY_EGRESS_ALLOW to reach it"
        );
        assert_eq!(
            refusal("", "192.0.0.77"),
            "192.0.0.77 is an IETF protocol assignment address (192.0.0.0/24, RFC 6890); \
             allow it in TASKFACTORY_EGRESS_ALLOW to reach it"
        );
        assert_eq!(
            refusal("", "2002:7f00:1::"),
            "2002:7f00:1:: is a 6to4 address (2002::/16, RFC 3056) carrying 127.0.0.1, \
             a loopback address (127.0.0.0/8, RFC 1122); \
             allow both in TASKFACTORY_EGRESS_ALLOW to reach it"
        );
        assert_eq!(
            refusal("", "64:ff9b::808:808"),
            "64:ff9b::808:808 is a NAT64 address (64:ff9b::/96, RFC 6052) carrying 8.8.8.8; \
             allow it in TASKFACTORY_EGRESS_ALLOW to reach it"
        );
        assert_eq!(
            refusal("64:ff9b::/96", "64:ff9b::a9fe:a9fe"),
            "64:ff9b::a9fe:a9fe is allowed, but it is a NAT64 address (64:ff9b::/96, RFC 6052) \
             carrying 169.254.169.254, a link-local address (cloud metadata lives here) \
             (169.254.0.0/16, RFC 3927); allow that address too in TASKFACTORY_EGRESS_ALLOW to \
             reach it"
        );
        assert_eq!(
            refusal("", "4000::1"),
            "4000::1 is reserved by the IETF: outside the global unicast space (2000::/3, RFC 4291); \
             allow it in TASKFACTORY_EGRESS_ALLOW to reach it"
        );
    }

    #[test]
    fn bad_entries_are_named() {
        assert!(
            EgressPolicy::parse("10.0.0.0/33")
                .unwrap_err()
                .contains("10.0.0.0/33")
        );
        assert!(
            EgressPolicy::parse("host:notaport")
                .unwrap_err()
                .contains("not a port")
        );
    }
}
