//! Outbound HTTP that cannot be pointed at what it must not reach.
//!
//! Every request taskfactory makes on a user's behalf (`http` tasks, `http` context sources) goes
//! through [`guarded_client`]: names are resolved by a resolver that drops addresses the
//! [`EgressPolicy`] refuses (loopback, private, link-local, metadata … unless allowlisted), so a
//! DNS name pointing inside cannot get around it; every redirect hop is checked the same way; and
//! [`check_url`] refuses literal addresses and odd schemes before anything connects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use taskfactory_model::egress::EgressPolicy;

/// Why a URL is not fetched.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A client whose every connection, including redirects, obeys `egress`.
pub fn guarded_client(
    egress: Arc<EgressPolicy>,
    user_agent: &str,
) -> Result<reqwest::Client, reqwest::Error> {
    build_guarded(egress, user_agent, false)
}

/// The guarded client for requests that carry secrets: it also follows no redirect to another
/// origin (reqwest would carry custom headers, such as an `X-Api-Key`, along).
pub fn guarded_client_for_secrets(
    egress: Arc<EgressPolicy>,
    user_agent: &str,
) -> Result<reqwest::Client, reqwest::Error> {
    build_guarded(egress, user_agent, true)
}

fn build_guarded(
    egress: Arc<EgressPolicy>,
    user_agent: &str,
    same_origin_only: bool,
) -> Result<reqwest::Client, reqwest::Error> {
    // One TLS stack (ring) for the process, whoever builds the first client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redirect_egress = egress.clone();
    reqwest::Client::builder()
        .dns_resolver(Arc::new(CheckedResolver { egress }))
        // A proxy would resolve names itself, out of the policy's sight.
        .no_proxy()
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 5 {
                return attempt.error("more than 5 redirects");
            }
            let url = attempt.url().clone();
            if same_origin_only
                && attempt
                    .previous()
                    .first()
                    .is_some_and(|first| first.origin() != url.origin())
            {
                return attempt.error(format!(
                    "redirect to {} refused: the request carries secrets, which go to their origin only",
                    url.origin().ascii_serialization()
                ));
            }
            match check_url(&redirect_egress, &url) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(format!("redirect to {url} refused: {reason}")),
            }
        }))
        .connect_timeout(Duration::from_secs(10))
        .user_agent(user_agent)
        .build()
}

/// Checks a URL before connecting: http(s) only, no credentials in it, and a host the policy
/// allows (literal addresses are checked here; names again when they resolve).
pub fn check_url(egress: &EgressPolicy, url: &reqwest::Url) -> Result<(), Refused> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Refused(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused(
            "credentials in the URL are not allowed; send them in a header".to_owned(),
        ));
    }
    let Some(host) = url.host() else {
        return Err(Refused("the URL has no host".to_owned()));
    };
    let host = match host {
        url::Host::Domain(name) => name.to_owned(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => ip.to_string(),
    };
    let port = url.port_or_known_default().unwrap_or(0);
    egress
        .check_url_target(&host, port)
        .map_err(|reason| Refused(format!("egress to {host} refused: {reason}")))
}

/// Reads a response body, refusing one larger than `cap` bytes.
pub async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > cap {
            return Err(ReadError::TooLarge { cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the response")]
    Transport(#[source] reqwest::Error),
    #[error("response body exceeds {cap} bytes")]
    TooLarge { cap: usize },
}

/// Resolves names and keeps only the addresses the egress policy allows.
struct CheckedResolver {
    egress: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for CheckedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let egress = self.egress.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if egress.host_allowed(&host) {
                return Ok(Box::new(resolved.into_iter()) as reqwest::dns::Addrs);
            }
            let mut allowed = Vec::new();
            let mut refusal = None;
            for addr in resolved {
                match egress.check_ip(addr.ip()) {
                    Ok(()) => allowed.push(addr),
                    Err(reason) => refusal = Some(reason),
                }
            }
            if allowed.is_empty() {
                let reason = refusal.unwrap_or_else(|| "no addresses".to_owned());
                return Err(format!("egress to {host} refused: {reason}").into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
