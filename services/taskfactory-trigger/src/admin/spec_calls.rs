//! At most `--spec-calls-at-once` calls that carry or read whole specs (CreateActivity,
//! UpdateActivity, PreviewRun, GetActivity, ListActivities, whose pages hold about one spec's
//! worth) are decoded and handled at once; the others wait, before their message is decoded,
//! holding no more than what HTTP/2 flow control lets their client send.
//!
//! Why: turning a spec into its stored form and back goes through `prost_reflect` and
//! `serde_json` trees that take up to about a hundred times the spec's JSON for a spec of many
//! small tasks (about 110 MB for a 1 MiB spec; a few times its size for specs of long strings).
//! `--max-spec-bytes` bounds one call; this bounds how many such calls the trigger holds at once.
//!
//! A tower layer inside the auth layer: only authenticated callers wait here. The slot goes on
//! to the handler in the request's extensions ([`SpecCallSlot`]), and the handler keeps it in
//! the task that carries out the change, which outlives a caller that goes away: a caller that
//! resets its calls cannot have more of them running than the slots.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The RPCs that take or read whole specs.
const SPEC_CALLS: [&str; 5] = [
    "/taskfactory.v1.AdminService/CreateActivity",
    "/taskfactory.v1.AdminService/UpdateActivity",
    "/taskfactory.v1.AdminService/PreviewRun",
    "/taskfactory.v1.AdminService/GetActivity",
    "/taskfactory.v1.AdminService/ListActivities",
];

/// A call's slot, free again when the last clone is dropped.
#[derive(Clone)]
pub struct SpecCallSlot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

impl SpecCallSlot {
    /// The slot the layer took for this call, if it is a spec call.
    pub fn of<T>(request: &tonic::Request<T>) -> Option<Self> {
        request.extensions().get::<Self>().cloned()
    }
}

#[derive(Clone)]
pub struct SpecCallsLayer {
    slots: Arc<Semaphore>,
}

impl SpecCallsLayer {
    pub fn new(at_once: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(at_once.clamp(1, Semaphore::MAX_PERMITS))),
        }
    }
}

impl<S> tower::Layer<S> for SpecCallsLayer {
    type Service = SpecCallsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SpecCallsService {
            inner,
            slots: self.slots.clone(),
        }
    }
}

#[derive(Clone)]
pub struct SpecCallsService<S> {
    inner: S,
    slots: Arc<Semaphore>,
}

impl<S, B> tower::Service<http::Request<B>> for SpecCallsService<S>
where
    S: tower::Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let slots = SPEC_CALLS
            .contains(&request.uri().path())
            .then(|| self.slots.clone());
        Box::pin(async move {
            if let Some(slots) = slots {
                let permit = slots
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                request
                    .extensions_mut()
                    .insert(SpecCallSlot(Arc::new(permit)));
            }
            inner.call(request).await
        })
    }
}
