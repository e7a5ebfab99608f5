//! The egress policy for outbound HTTP (the `http` task type, and `http` context sources): which
//! hosts and addresses may be reached.
//!
//! By default only public addresses are reachable: loopback, private, link-local (including the
//! cloud metadata address 169.254.169.254), carrier-grade NAT, unique-local, multicast and
//! unspecified addresses are refused. `TASKFACTORY_EGRESS_ALLOW` opens more, as a comma-separated
//! list of hostnames (`api.internal`, `*.internal`), `host:port`, IP addresses and CIDRs
//! (`10.0.0.0/8`). The check applies to the *resolved* address, so a public name that resolves to
//! a private address is refused too.

use std::net::IpAddr;

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

    /// Whether a resolved address may be connected to.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if self
            .networks
            .iter()
            .any(|(net, bits)| in_network(ip, canonical(*net), *bits))
        {
            return Ok(());
        }
        // An address listed with a port (`127.0.0.1:8080`) is allowed on that port only, which
        // `check_url_target` enforces; a bare address check (a resolved name, port unknown) does
        // not open it.
        if self
            .hosts
            .iter()
            .any(|rule| rule.port.is_none() && rule.pattern == ip.to_string())
        {
            return Ok(());
        }
        match non_public_reason(ip) {
            None => Ok(()),
            Some(reason) => Err(format!(
                "{ip} is a {reason} address; allow it in TASKFACTORY_EGRESS_ALLOW to reach it"
            )),
        }
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

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
/// IPv6 addresses that carry an IPv4 address — mapped (`::ffff:a.b.c.d`), compatible
/// (`::a.b.c.d`, deprecated but routable on some stacks) and NAT64 (`64:ff9b::a.b.c.d`, which a
/// NAT64 gateway forwards to the IPv4 address) — are judged as that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            let embedded = || {
                std::net::Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                )
            };
            let compatible = s[..6].iter().all(|x| *x == 0) && (s[6] != 0 || s[7] > 1);
            let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|x| *x == 0);
            if compatible || nat64 {
                IpAddr::V4(embedded())
            } else {
                IpAddr::V6(v6)
            }
        }
        v4 => v4,
    }
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

/// Why an address is not a public one, if it is not.
fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata lives here)")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("broadcast, multicast or reserved")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("carrier-grade NAT")
            } else if v4.is_documentation() || (o[0] == 198 && (o[1] & 0xfe) == 18) {
                Some("documentation or benchmarking")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (first & 0xfe00) == 0xfc00 {
                Some("unique-local")
            } else if (first & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
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
        // IPv4 carried in IPv6 is judged as the IPv4 address.
        for hidden in [
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::7f00:1",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                EgressPolicy::default().check_ip(ip(hidden)).is_err(),
                "{hidden}"
            );
        }
        assert!(policy.check_ip(ip("127.0.0.1")).is_ok());
        assert!(policy.check_ip(ip("10.9.8.7")).is_ok());
        assert!(policy.check_ip(ip("192.168.0.1")).is_err());
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
