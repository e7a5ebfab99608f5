//! SSRF: outbound HTTP on a user's behalf (`http` tasks and context sources) cannot be pointed at
//! what it must not reach. Every URL of a corpus — loopback in its many spellings, private ranges,
//! IPv6 forms, metadata addresses and names, userinfo and parser tricks, other schemes, names that
//! resolve inside — is refused before anything connects; so is a redirect from an allowlisted
//! server to inside; and an allowlisted local server still works.
//!
//! Each URL goes the way the executor sends it: parse, [`check_url`], then the [`guarded_client`].
//! Loopback targets aim at counting listeners on this machine, which must accept nothing.

use std::collections::BTreeSet;
use std::error::Error as StdError;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use taskfactory_model::egress::EgressPolicy;
use taskfactory_runtime::egress::{check_url, guarded_client, read_capped};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long one request may take before it counts as "not refused".
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a listener answers, given the request path.
type Answer = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// A loopback HTTP/1.1 listener that counts the connections it accepts.
struct CountingListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CountingListener {
    async fn bind(addr: &str, answer: Answer) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&request);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let _ = stream.write_all(answer(&path).as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Self {
            port,
            accepted,
            task,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ok_answer(body: &'static str) -> Answer {
    Arc::new(move |_| {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    })
}

fn redirect(location: &str) -> String {
    format!(
        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
}

/// The counting listeners every loopback URL of the corpus aims at.
struct Targets {
    v4: CountingListener,
    /// `[::1]`, when this machine has IPv6 loopback.
    v6: Option<CountingListener>,
}

impl Targets {
    async fn start() -> anyhow::Result<Self> {
        let v4 = CountingListener::bind("127.0.0.1:0", ok_answer("reached")).await?;
        let v6 = CountingListener::bind("[::1]:0", ok_answer("reached"))
            .await
            .ok();
        Ok(Self { v4, v6 })
    }

    fn accepted(&self) -> usize {
        self.v4.accepted() + self.v6.as_ref().map_or(0, CountingListener::accepted)
    }

    /// The URL with `{P}` as the IPv4 listener's port and `{P6}` as the IPv6 one's.
    fn aim(&self, url: &str) -> String {
        let p6 = self.v6.as_ref().unwrap_or(&self.v4).port;
        url.replace("{P6}", &p6.to_string())
            .replace("{P}", &self.v4.port.to_string())
    }
}

/// What must happen to a corpus URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Refused by `check_url` or by the client (resolver or redirect check).
    Refused,
    /// A name whose address only DNS knows: refused if it resolves (to an inside address), and
    /// unreachable if it does not. Either way nothing connects.
    RefusedOrUnresolved,
}

/// Every URL that must not be reached, `{P}`/`{P6}` standing for the listeners' ports.
const CORPUS: &[(&str, Expect)] = &[
    // Loopback, spelled many ways. The URL parser normalises IPv4 hosts (WHATWG), so these reach
    // the policy as 127.0.0.1; the point is that none slips past as a "name".
    ("http://127.0.0.1:{P}/", Expect::Refused),
    ("http://127.1:{P}/", Expect::Refused),
    ("http://127.0.1:{P}/", Expect::Refused),
    ("http://0177.0.0.1:{P}/", Expect::Refused),
    ("http://0177.0000.0000.0001:{P}/", Expect::Refused),
    ("http://017700000001:{P}/", Expect::Refused),
    ("http://2130706433:{P}/", Expect::Refused),
    ("http://0x7f.0.0.1:{P}/", Expect::Refused),
    ("http://0x7f000001:{P}/", Expect::Refused),
    ("http://0X7F.1:{P}/", Expect::Refused),
    ("http://127.000.000.001:{P}/", Expect::Refused),
    ("http://127.0.0.1.:{P}/", Expect::Refused),
    ("http://127.255.255.254:{P}/", Expect::Refused),
    ("http://%31%32%37.0.0.1:{P}/", Expect::Refused),
    (
        "http://\u{2460}\u{2461}\u{2466}.\u{24EA}.\u{24EA}.\u{2460}:{P}/",
        Expect::Refused,
    ),
    (
        "http://\u{FF11}\u{FF12}\u{FF17}.\u{FF10}.\u{FF10}.\u{FF11}:{P}/",
        Expect::Refused,
    ),
    (
        "http://127\u{3002}0\u{3002}0\u{3002}1:{P}/",
        Expect::Refused,
    ),
    ("HTTP://127.0.0.1:{P}/", Expect::Refused),
    ("http:/127.0.0.1:{P}/", Expect::Refused),
    ("http:\\\\127.0.0.1:{P}\\", Expect::Refused),
    ("https://127.0.0.1:{P}/", Expect::Refused),
    ("http://0.0.0.0:{P}/", Expect::Refused),
    ("http://0:{P}/", Expect::Refused),
    ("http://0x0:{P}/", Expect::Refused),
    ("http://localhost:{P}/", Expect::Refused),
    ("http://LOCALHOST:{P}/", Expect::Refused),
    // glibc does not look `localhost.` up in /etc/hosts; a DNS resolver that answers it is
    // refused by address.
    ("http://localhost.:{P}/", Expect::RefusedOrUnresolved),
    ("http://LocalHost.:{P}/", Expect::RefusedOrUnresolved),
    ("http://[::1]:{P6}/", Expect::Refused),
    ("http://[0:0:0:0:0:0:0:1]:{P6}/", Expect::Refused),
    (
        "http://[0000:0000:0000:0000:0000:0000:0000:0001]:{P6}/",
        Expect::Refused,
    ),
    ("http://[::]:{P6}/", Expect::Refused),
    ("http://[::ffff:127.0.0.1]:{P}/", Expect::Refused),
    ("http://[::ffff:7f00:1]:{P}/", Expect::Refused),
    ("http://[0:0:0:0:0:ffff:127.0.0.1]:{P}/", Expect::Refused),
    // Userinfo and parser tricks: the host is 127.0.0.1 in each.
    ("http://user:pass@127.0.0.1:{P}/", Expect::Refused),
    ("http://example.com@127.0.0.1:{P}/", Expect::Refused),
    ("http://example.com:443@127.0.0.1:{P}/", Expect::Refused),
    ("http://@127.0.0.1:{P}/", Expect::Refused),
    ("http://127.0.0.1:{P}#@example.com/", Expect::Refused),
    ("http://127.0.0.1:{P}?@example.com/", Expect::Refused),
    ("http://127.0.0.1:{P}\\@example.com/", Expect::Refused),
    // Private and carrier-grade NAT ranges.
    ("http://10.0.0.1/", Expect::Refused),
    ("http://10.255.255.254:{P}/", Expect::Refused),
    ("http://172.16.0.1/", Expect::Refused),
    ("http://172.31.255.254/", Expect::Refused),
    ("http://192.168.1.1/", Expect::Refused),
    ("http://192.168.0.1:{P}/", Expect::Refused),
    ("http://100.64.0.1/", Expect::Refused),
    ("http://100.127.255.254/", Expect::Refused),
    // Cloud metadata, by address in several spellings, and by name.
    ("http://169.254.169.254/latest/meta-data/", Expect::Refused),
    ("http://169.254.170.2/v2/credentials", Expect::Refused),
    ("http://2852039166/latest/meta-data/", Expect::Refused),
    ("http://0xa9fea9fe/latest/meta-data/", Expect::Refused),
    (
        "http://0251.0376.0251.0376/latest/meta-data/",
        Expect::Refused,
    ),
    (
        "http://169.254.169.254.:80/latest/meta-data/",
        Expect::Refused,
    ),
    ("http://[fd00:ec2::254]/latest/meta-data/", Expect::Refused),
    (
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
        Expect::Refused,
    ),
    (
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        Expect::Refused,
    ),
    ("http://100.100.100.200/latest/meta-data/", Expect::Refused),
    (
        "http://metadata.google.internal/computeMetadata/v1/",
        Expect::RefusedOrUnresolved,
    ),
    (
        "http://metadata.google.internal./computeMetadata/v1/",
        Expect::RefusedOrUnresolved,
    ),
    (
        "http://metadata/computeMetadata/v1/",
        Expect::RefusedOrUnresolved,
    ),
    (
        "http://instance-data/latest/meta-data/",
        Expect::RefusedOrUnresolved,
    ),
    // Other IPv6 ranges.
    ("http://[fe80::1]/", Expect::Refused),
    ("http://[fc00::1]/", Expect::Refused),
    ("http://[fd12:3456:789a::1]/", Expect::Refused),
    ("http://[ff02::1]/", Expect::Refused),
    // Multicast, broadcast, reserved, documentation, benchmarking.
    ("http://224.0.0.1/", Expect::Refused),
    ("http://239.255.255.250:1900/", Expect::Refused),
    ("http://255.255.255.255/", Expect::Refused),
    ("http://240.0.0.1/", Expect::Refused),
    ("http://198.18.0.1/", Expect::Refused),
    ("http://192.0.2.1/", Expect::Refused),
    // Other schemes.
    ("file:///etc/passwd", Expect::Refused),
    ("file://localhost/etc/passwd", Expect::Refused),
    ("gopher://127.0.0.1:{P}/_GET%20/", Expect::Refused),
    ("ftp://127.0.0.1:{P}/", Expect::Refused),
    ("dict://127.0.0.1:{P}/info", Expect::Refused),
    ("ldap://127.0.0.1:{P}/", Expect::Refused),
    ("ws://127.0.0.1:{P}/", Expect::Refused),
    ("data:text/plain,hello", Expect::Refused),
    ("unix:///var/run/docker.sock", Expect::Refused),
    // The rest of the IANA IPv4 Special-Purpose Address Registry, in several spellings.
    // FINDING (services/taskfactory-model/src/egress.rs, `non_public_reason`): 192.0.0.0/24 (an
    // address in it answered inside the sandbox), the AS112, AMT and 6to4-relay blocks, and
    // TEST-NET-2 and -3 passed as public.
    ("http://192.0.0.1:{P}/", Expect::Refused),
    ("http://192.0.0.8/", Expect::Refused),
    ("http://192.0.0.9/", Expect::Refused),
    ("http://192.0.0.10/", Expect::Refused),
    ("http://192.0.0.170/", Expect::Refused),
    ("http://192.0.0.255/", Expect::Refused),
    ("http://3221225473/", Expect::Refused),
    ("http://0300.0.0.010/", Expect::Refused),
    ("http://0xc0000008/", Expect::Refused),
    ("http://0xc0.0.0x0.1/", Expect::Refused),
    ("http://192.0.1/", Expect::Refused),
    ("http://192.31.196.1/", Expect::Refused),
    ("http://192.52.193.1/", Expect::Refused),
    ("http://192.88.99.1/", Expect::Refused),
    ("http://192.175.48.6/", Expect::Refused),
    ("http://198.51.100.1/", Expect::Refused),
    ("http://203.0.113.1/", Expect::Refused),
    ("http://0.1.2.3/", Expect::Refused),
    // IPv6 special-purpose blocks that passed as public (same FINDING).
    ("http://[100::1]/", Expect::Refused),
    ("http://[100:0:0:1::1]/", Expect::Refused),
    ("http://[2001:2::1]/", Expect::Refused),
    ("http://[2001:10::1]/", Expect::Refused),
    ("http://[2001:4:112::1]/", Expect::Refused),
    ("http://[2001:db8::1]/", Expect::Refused),
    ("http://[2620:4f:8000::6]/", Expect::Refused),
    ("http://[3fff::1]/", Expect::Refused),
    ("http://[5f00::1]/", Expect::Refused),
    ("http://[fec0::1]/", Expect::Refused),
    ("http://[::2:1]/", Expect::Refused),
    // IPv4 carried in IPv6. Every such form is refused as a whole, whatever IPv4 address it
    // carries: mapped (::ffff:0:0/96), IPv4-compatible (::/96, deprecated), IPv4-translated
    // (::ffff:0:0:0/96), NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48), 6to4 (2002::/16),
    // Teredo (2001::/32, the client's address inverted) and ISATAP interface ids (…:0:5efe:a.b.c.d).
    // FINDING (services/taskfactory-model/src/egress.rs, `canonical`): only mapped, compatible and
    // NAT64 /96 were judged as their IPv4 address; 6to4, translated, local-use NAT64, Teredo and
    // ISATAP forms of loopback and metadata passed as public.
    ("http://[::127.0.0.1]:{P6}/", Expect::Refused),
    ("http://[::7f00:1]:{P6}/", Expect::Refused),
    (
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
        Expect::Refused,
    ),
    ("http://[64:ff9b::7f00:1]:{P}/", Expect::Refused),
    ("http://[64:ff9b::127.0.0.1]:{P}/", Expect::Refused),
    ("http://[64:ff9b:1::7f00:1]:{P}/", Expect::Refused),
    ("http://[64:ff9b::808:808]/", Expect::Refused),
    ("http://[2002:7f00:1::]:{P}/", Expect::Refused),
    ("http://[2002:7f00:0001::1]:{P}/", Expect::Refused),
    ("http://[2002:7f00:1:0:0:0:0:0]:{P6}/", Expect::Refused),
    (
        "http://[2002:a9fe:a9fe::]/latest/meta-data/",
        Expect::Refused,
    ),
    ("http://[2002:a00:1::1]/", Expect::Refused),
    ("http://[::ffff:0:7f00:1]:{P}/", Expect::Refused),
    ("http://[::ffff:0:127.0.0.1]:{P}/", Expect::Refused),
    (
        "http://[::ffff:0:a9fe:a9fe]/latest/meta-data/",
        Expect::Refused,
    ),
    ("http://[::ffff:8.8.8.8]/", Expect::Refused),
    (
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{P}/",
        Expect::Refused,
    ),
    ("http://[2001:db8::5efe:7f00:1]:{P}/", Expect::Refused),
    (
        "http://[2606:4700::200:5efe:a9fe:a9fe]/latest/meta-data/",
        Expect::Refused,
    ),
    (
        "http://[fe80::5efe:169.254.169.254]/latest/meta-data/",
        Expect::Refused,
    ),
];

/// How one URL fared.
#[derive(Debug)]
enum Fate {
    NotAUrl(String),
    RefusedByCheck(String),
    RefusedByClient(String),
    /// The request failed for another reason (connection error, DNS failure …).
    Failed(String),
    Reached(reqwest::StatusCode),
    TimedOut,
}

impl Fate {
    /// Refused before anything connected: the executor fails such a task permanently.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            Fate::NotAUrl(_) | Fate::RefusedByCheck(_) | Fate::RefusedByClient(_)
        )
    }

    fn describe(&self) -> String {
        match self {
            Fate::NotAUrl(e) => format!("not a URL: {e}"),
            Fate::RefusedByCheck(e) => format!("refused by check_url: {e}"),
            Fate::RefusedByClient(e) => format!("refused by the client: {e}"),
            Fate::Failed(e) => format!("NOT REFUSED, failed otherwise: {e}"),
            Fate::Reached(status) => format!("NOT REFUSED, answered {status}"),
            Fate::TimedOut => format!("NOT REFUSED, no answer within {REQUEST_TIMEOUT:?}"),
        }
    }
}

/// Sends `GET url` the way the executor does: parse, `check_url`, then the guarded client.
async fn fetch(policy: &Arc<EgressPolicy>, client: &reqwest::Client, url: &str) -> Fate {
    let url = match reqwest::Url::parse(url) {
        Ok(url) => url,
        Err(e) => return Fate::NotAUrl(e.to_string()),
    };
    if let Err(refused) = check_url(policy, &url) {
        return Fate::RefusedByCheck(refused.to_string());
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, client.get(url).send()).await {
        Err(_) => Fate::TimedOut,
        Ok(Ok(response)) => Fate::Reached(response.status()),
        Ok(Err(e)) => {
            let chain = error_chain(&e);
            // The resolver's and the redirect check's refusals read "… to <host> refused: <why>";
            // a closed port's "Connection refused (os error 111)" does not.
            if chain.contains(" refused: ") {
                Fate::RefusedByClient(chain)
            } else {
                Fate::Failed(chain)
            }
        }
    }
}

fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn client(policy: &Arc<EgressPolicy>) -> reqwest::Client {
    // The services install this provider at start (the client is built with reqwest's
    // `rustls-no-provider`); these tests build the client without any service running.
    let _ = rustls::crypto::ring::default_provider().install_default();
    guarded_client(policy.clone(), "taskfactory-ssrf-test").expect("the guarded client builds")
}

/// Names this machine resolves without DNS (`/etc/hosts`, its own hostname) to an address the
/// default policy refuses: "a name that resolves to a private address", with no network needed.
async fn names_resolving_inside() -> Vec<String> {
    let mut names = BTreeSet::new();
    if let Ok(hosts) = std::fs::read_to_string("/etc/hosts") {
        for line in hosts.lines() {
            let line = line.split('#').next().unwrap_or_default();
            let mut fields = line.split_whitespace();
            if fields
                .next()
                .and_then(|a| a.parse::<IpAddr>().ok())
                .is_some()
            {
                names.extend(fields.map(str::to_owned));
            }
        }
    }
    if let Ok(hostname) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.insert(hostname.trim().to_owned());
    }
    let policy = EgressPolicy::default();
    let mut inside = Vec::new();
    for name in names {
        let Ok(Ok(addrs)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host((name.as_str(), 0)),
        )
        .await
        else {
            continue;
        };
        let addrs: Vec<_> = addrs.collect();
        if !addrs.is_empty() && addrs.iter().all(|a| policy.check_ip(a.ip()).is_err()) {
            inside.push(name);
        }
    }
    inside
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssrf_corpus_is_refused_before_connecting() -> anyhow::Result<()> {
    let targets = Targets::start().await?;
    let policy = Arc::new(EgressPolicy::default());
    let http = client(&policy);

    let mut corpus: Vec<(String, Expect)> = CORPUS
        .iter()
        .map(|(url, expect)| (targets.aim(url), *expect))
        .collect();
    let names = names_resolving_inside().await;
    assert!(
        names.iter().any(|n| n == "localhost"),
        "localhost resolves to loopback here: {names:?}"
    );
    for name in &names {
        corpus.push((
            format!("http://{name}:{}/", targets.v4.port),
            Expect::Refused,
        ));
    }
    assert!(corpus.len() >= 40, "the corpus has {} URLs", corpus.len());

    let mut problems = Vec::new();
    for (url, expect) in &corpus {
        let before = targets.accepted();
        let fate = fetch(&policy, &http, url).await;
        let connected = targets.accepted() - before;
        let refused = fate.is_refusal();
        let unresolved = matches!(&fate, Fate::Failed(e) if e.contains("dns error"));
        let fine = match expect {
            Expect::Refused => refused,
            Expect::RefusedOrUnresolved => refused || unresolved,
        };
        if !fine || connected > 0 {
            problems.push(format!(
                "{url}: {} ({connected} connections accepted)",
                fate.describe()
            ));
        }
    }
    assert_eq!(
        problems,
        Vec::<String>::new(),
        "{} of {} URLs were not refused before connecting",
        problems.len(),
        corpus.len()
    );
    assert_eq!(targets.accepted(), 0, "the listeners accepted a connection");

    // The listeners did accept connections, had anything been let through.
    let open = Arc::new(EgressPolicy::parse("127.0.0.1").map_err(anyhow::Error::msg)?);
    let reached = fetch(&open, &client(&open), &targets.aim("http://127.0.0.1:{P}/")).await;
    assert!(
        matches!(reached, Fate::Reached(s) if s.is_success()),
        "{}",
        reached.describe()
    );
    let mut expected = 1;
    if targets.v6.is_some() {
        let open = Arc::new(EgressPolicy::parse("::1").map_err(anyhow::Error::msg)?);
        let reached = fetch(&open, &client(&open), &targets.aim("http://[::1]:{P6}/")).await;
        assert!(
            matches!(reached, Fate::Reached(s) if s.is_success()),
            "{}",
            reached.describe()
        );
        expected += 1;
    }
    assert_eq!(targets.accepted(), expected);
    Ok(())
}

/// Where the allowlisted server redirects to (`{P}` is the forbidden listener's port).
const REDIRECTS: &[&str] = &[
    "http://127.0.0.1:{P}/",
    "//127.0.0.1:{P}/",
    "http://127.1:{P}/",
    "http://2130706433:{P}/",
    "http://localhost:{P}/",
    "http://[::ffff:127.0.0.1]:{P}/",
    "http://[::1]:{P6}/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://10.0.0.1/",
    "http://192.0.0.1:{P}/",
    "http://[2002:7f00:1::]:{P}/",
    "http://[::ffff:0:7f00:1]:{P}/",
    "http://user:pass@127.0.0.1:{P}/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{P}/",
];

/// An allowlisted server (`127.0.0.1:<its port>` only) answering `302` to each target: the hop
/// is refused, and the forbidden listener sees nothing. `/hop/<i>` first redirects to the server
/// itself, so a refusal two hops in is checked too.
///
/// FINDING (services/taskfactory-model/src/egress.rs, `EgressPolicy::check_ip`): an allow entry
/// `127.0.0.1:<port>` is matched in `check_ip` by address alone, so `check_url_target` falls
/// through to it for any other port and a redirect to `127.0.0.1:<other port>` (in any spelling
/// of that address) is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_from_an_allowlisted_server_to_inside_are_refused() -> anyhow::Result<()> {
    let forbidden = Targets::start().await?;
    let locations: Vec<String> = REDIRECTS.iter().map(|l| forbidden.aim(l)).collect();
    let answer_locations = locations.clone();
    let allowed = CountingListener::bind(
        "127.0.0.1:0",
        Arc::new(move |path: &str| {
            let index = |prefix: &str| {
                path.strip_prefix(prefix)
                    .and_then(|i| i.parse::<usize>().ok())
            };
            if let Some(i) = index("/to/") {
                redirect(&answer_locations[i])
            } else if let Some(i) = index("/hop/") {
                redirect(&format!("/to/{i}"))
            } else {
                redirect("/")
            }
        }),
    )
    .await?;
    let policy = Arc::new(
        EgressPolicy::parse(&format!("127.0.0.1:{}", allowed.port)).map_err(anyhow::Error::msg)?,
    );
    let http = client(&policy);

    let mut problems = Vec::new();
    for (i, location) in locations.iter().enumerate() {
        for path in [format!("/to/{i}"), format!("/hop/{i}")] {
            let before = forbidden.accepted();
            let url = format!("http://127.0.0.1:{}{path}", allowed.port);
            let fate = fetch(&policy, &http, &url).await;
            let connected = forbidden.accepted() - before;
            // A redirect to a scheme the client does not speak is not followed: the 3xx itself
            // comes back, and nothing else is fetched.
            let fine = matches!(&fate, Fate::RefusedByClient(_))
                || matches!(&fate, Fate::Reached(status) if status.is_redirection());
            if !fine || connected > 0 {
                problems.push(format!(
                    "{url} → {location}: {} ({connected} connections accepted)",
                    fate.describe()
                ));
            }
        }
    }
    assert_eq!(
        problems,
        Vec::<String>::new(),
        "{} of {} redirects were not refused",
        problems.len(),
        locations.len() * 2
    );
    assert_eq!(forbidden.accepted(), 0);
    assert!(allowed.accepted() > 0, "the allowlisted server was reached");
    Ok(())
}

/// The same hole without a redirect: allowing one port of an address opens every port of it.
///
/// FINDING (services/taskfactory-model/src/egress.rs, `EgressPolicy::check_ip`): see
/// [`redirects_from_an_allowlisted_server_to_inside_are_refused`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisting_one_port_does_not_open_the_others() -> anyhow::Result<()> {
    let allowed = CountingListener::bind("127.0.0.1:0", ok_answer("allowed")).await?;
    let other = CountingListener::bind("127.0.0.1:0", ok_answer("other")).await?;
    let policy = Arc::new(
        EgressPolicy::parse(&format!("127.0.0.1:{}", allowed.port)).map_err(anyhow::Error::msg)?,
    );
    let url = format!("http://127.0.0.1:{}/", other.port);
    let fate = fetch(&policy, &client(&policy), &url).await;
    assert!(
        fate.is_refusal(),
        "{url} with only 127.0.0.1:{} allowed: {}",
        allowed.port,
        fate.describe()
    );
    assert_eq!(other.accepted(), 0);
    Ok(())
}

/// Allowing an IPv4 address opens that address, not the IPv6 forms that carry it: those go through
/// a tunnel, relay or translator (or, for the mapped form, an IPv6 socket) and are opened only by
/// naming them.
///
/// FINDING (services/taskfactory-model/src/egress.rs, `canonical`): IPv6 forms were judged as the
/// IPv4 address they carry, so allowing `127.0.0.1` opened `[::ffff:127.0.0.1]`, `[::127.0.0.1]`
/// and `[64:ff9b::7f00:1]` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowing_an_ipv4_address_opens_none_of_its_ipv6_forms() -> anyhow::Result<()> {
    let targets = Targets::start().await?;
    let policy = Arc::new(EgressPolicy::parse("127.0.0.1").map_err(anyhow::Error::msg)?);
    let http = client(&policy);
    let mut problems = Vec::new();
    for url in [
        "http://[::ffff:127.0.0.1]:{P}/",
        "http://[::ffff:7f00:1]:{P}/",
        "http://[::127.0.0.1]:{P}/",
        "http://[::ffff:0:127.0.0.1]:{P}/",
        "http://[64:ff9b::7f00:1]:{P}/",
        "http://[64:ff9b:1::7f00:1]:{P}/",
        "http://[2002:7f00:1::]:{P}/",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{P}/",
        "http://[2001:db8::5efe:7f00:1]:{P}/",
    ] {
        let url = targets.aim(url);
        let before = targets.accepted();
        let fate = fetch(&policy, &http, &url).await;
        let connected = targets.accepted() - before;
        if !fate.is_refusal() || connected > 0 {
            problems.push(format!(
                "{url}: {} ({connected} connections accepted)",
                fate.describe()
            ));
        }
    }
    assert_eq!(problems, Vec::<String>::new());
    // The address itself is open.
    let reached = fetch(&policy, &http, &targets.aim("http://127.0.0.1:{P}/")).await;
    assert!(
        matches!(reached, Fate::Reached(s) if s.is_success()),
        "{}",
        reached.describe()
    );
    Ok(())
}

/// An allowlisted local server is reachable, in each spelling of the allow list that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlisted_local_server_works() -> anyhow::Result<()> {
    let server = CountingListener::bind("127.0.0.1:0", ok_answer("hello from inside")).await?;
    let port = server.port;
    let allow_lists = [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_owned(),
        "127.0.0.0/8".to_owned(),
        "localhost".to_owned(),
    ];
    let problems = reach_allowlisted(port, &allow_lists).await;
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(server.accepted(), allow_lists.len());
    Ok(())
}

/// `host:port` is a documented allow-list form, and works for addresses; a name with its port
/// must work too.
///
/// FINDING (services/taskfactory-runtime/src/egress.rs, `CheckedResolver`): a `host:port` entry
/// for a name (`localhost:<port>`, `db.internal:5432`) passes `check_url_target`, but the resolver
/// only honours port-less host rules (`host_allowed`) and then judges the resolved address alone,
/// so a name allowlisted with its port is refused whenever it resolves to a non-public address —
/// the very case an allow list exists for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_allowlisted_with_its_port_works() -> anyhow::Result<()> {
    let server = CountingListener::bind("127.0.0.1:0", ok_answer("hello from inside")).await?;
    let port = server.port;
    let problems = reach_allowlisted(port, &[format!("localhost:{port}")]).await;
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(server.accepted(), 1);
    Ok(())
}

/// Fetches the local server on `port` under each allow list (by the name or address the list
/// names) and reads its body; returns what went wrong.
async fn reach_allowlisted(port: u16, allow_lists: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    for allow in allow_lists {
        let policy = Arc::new(EgressPolicy::parse(allow).expect("the allow list parses"));
        let host = if allow.starts_with("localhost") {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let url = format!("http://{host}:{port}/");
        match fetch_body(&policy, &url).await {
            Ok(body) if body == b"hello from inside" => {}
            Ok(body) => problems.push(format!(
                "allow {allow:?}: {url} answered {:?}",
                String::from_utf8_lossy(&body)
            )),
            Err(problem) => problems.push(format!("allow {allow:?}: {url}: {problem}")),
        }
    }
    problems
}

async fn fetch_body(policy: &Arc<EgressPolicy>, url: &str) -> Result<Vec<u8>, String> {
    let url = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    check_url(policy, &url).map_err(|refused| format!("refused by check_url: {refused}"))?;
    let response = client(policy)
        .get(url)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    read_capped(response, 1024)
        .await
        .map_err(|e| error_chain(&e))
}
