//! `http` sources: GET or POST JSON through the guarded client (egress policy on the resolved
//! addresses and every redirect), with a timeout and a response size cap; the JSON answer is the
//! value. `secretHeaders` are resolved here, at send time, from the orchestrator's own secrets
//! (`runtime::secrets`), sent only to the hosts each is bound to, over a client that follows no
//! redirect to another origin; nothing of them is stored or logged.

use taskfactory_model::values;
use taskfactory_proto::v1::HttpSource;
use taskfactory_runtime::egress;
use taskfactory_runtime::telemetry::error_chain;

use super::Sources;

impl Sources {
    /// A `sensitive` source's error leaves out what the other side answered.
    pub(super) async fn http(
        &self,
        http: &HttpSource,
        scope: &serde_json::Value,
        sensitive: bool,
    ) -> Result<serde_json::Value, String> {
        let url = self.render("url", &http.url, scope)?;
        let url = reqwest::Url::parse(&url).map_err(|e| format!("url {url:?}: {e}"))?;
        egress::check_url(&self.egress, &url).map_err(|e| format!("url: {e}"))?;
        let body = http
            .body
            .as_ref()
            .map(|b| self.render_json("body", &values::value_to_json(b), scope))
            .transpose()?;
        let method = match http.method.to_ascii_uppercase().as_str() {
            "" if body.is_some() => reqwest::Method::POST,
            "" | "GET" => reqwest::Method::GET,
            "POST" => reqwest::Method::POST,
            other => return Err(format!("method {other:?} is not GET or POST")),
        };
        let secret_headers = self
            .secrets
            .headers(&http.secret_headers, &url)
            .map_err(|e| e.to_string())?;
        let client = if secret_headers.is_empty() {
            &self.http
        } else {
            &self.http_with_secrets
        };
        // The run's trace continues at the source (`traceparent`); the source's own headers win.
        let mut trace_headers = reqwest::header::HeaderMap::new();
        taskfactory_runtime::propagation::inject_http(&mut trace_headers);
        let mut request = client
            .request(method.clone(), url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        for (name, value) in &http.headers {
            trace_headers.remove(name.to_ascii_lowercase().as_str());
            request = request.header(
                name.as_str(),
                self.render(&format!("headers.{name}"), value, scope)?,
            );
        }
        for name in secret_headers.keys() {
            trace_headers.remove(name);
        }
        request = request.headers(trace_headers).headers(secret_headers);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {}", error_chain(&e)))?;
        let status = response.status();
        let bytes = egress::read_capped(response, self.max_bytes)
            .await
            .map_err(|e| format!("{method} {url}: {}", error_chain(&e)))?;
        if !status.is_success() {
            if sensitive {
                return Err(format!(
                    "{method} {url} answered {status} (the answer of a sensitive source is not shown)"
                ));
            }
            let snippet: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
            return Err(format!("{method} {url} answered {status}: {snippet}"));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            if sensitive {
                format!("{method} {url} did not answer JSON")
            } else {
                format!("{method} {url} did not answer JSON: {e}")
            }
        })
    }
}
