//! The activity versions runs use, parsed once each and kept in a cache bounded in bytes.
//!
//! Versions are immutable, so a cached spec is never stale; what needs bounding is memory. The
//! cache keeps at most `--spec-cache-bytes` of specs, counted by their stored JSON's compact size
//! (`model::sizes::json_bytes`; the parsed form takes a few times that), and at most
//! [`MAX_CACHED_VERSIONS`] of them; past either, the versions loaded longest ago are dropped
//! first. A spec larger than the whole bound is parsed for its run and not kept. A version
//! dropped is read from Postgres again when a run needs it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use taskfactory_model::ids::ActivityId;
use taskfactory_model::sizes;
use taskfactory_proto::v1::ActivitySpec;

use crate::store;

/// Versions kept at most, whatever their size.
pub const MAX_CACHED_VERSIONS: usize = 10_000;

type Version = (ActivityId, u32);

/// Immutable activity versions, loaded once each while they stay in the cache.
#[derive(Clone)]
pub struct SpecCache {
    cached: Arc<Mutex<Cached>>,
}

impl SpecCache {
    /// A cache of at most `max_bytes` of specs (as compact JSON).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            cached: Arc::new(Mutex::new(Cached::new(max_bytes, MAX_CACHED_VERSIONS))),
        }
    }

    /// The spec of `activity` at `version`; the inner error says why a run cannot use it.
    pub async fn get(
        &self,
        pool: &PgPool,
        activity: ActivityId,
        version: u32,
    ) -> Result<Result<Arc<ActivitySpec>, String>, sqlx::Error> {
        if let Some(spec) = self
            .cached
            .lock()
            .expect("spec cache lock")
            .get(&(activity, version))
        {
            return Ok(Ok(spec));
        }
        let Some(json) = store::activity_spec(pool, activity, version).await? else {
            return Ok(Err(format!("activity {activity} has no version {version}")));
        };
        let bytes = usize::try_from(sizes::json_bytes(&json)).unwrap_or(usize::MAX);
        let spec: ActivitySpec = match taskfactory_proto::from_json(&json) {
            Ok(spec) => spec,
            Err(error) => {
                return Ok(Err(format!(
                    "stored spec of version {version} does not parse: {error}"
                )));
            }
        };
        drop(json);
        let spec = Arc::new(spec);
        self.cached.lock().expect("spec cache lock").insert(
            (activity, version),
            spec.clone(),
            bytes,
        );
        Ok(Ok(spec))
    }
}

/// What the cache holds, and the bookkeeping of its bounds (no I/O: unit-tested below).
struct Cached {
    by_version: HashMap<Version, (Arc<ActivitySpec>, usize)>,
    /// Versions in the order they were loaded, oldest first.
    loaded: VecDeque<Version>,
    bytes: usize,
    max_bytes: usize,
    max_versions: usize,
}

impl Cached {
    fn new(max_bytes: usize, max_versions: usize) -> Self {
        Self {
            by_version: HashMap::new(),
            loaded: VecDeque::new(),
            bytes: 0,
            max_bytes,
            max_versions,
        }
    }

    fn get(&self, version: &Version) -> Option<Arc<ActivitySpec>> {
        self.by_version.get(version).map(|(spec, _)| spec.clone())
    }

    /// Keeps `spec` (of `bytes`), dropping the versions loaded longest ago until it fits; a spec
    /// larger than the whole cache is not kept.
    fn insert(&mut self, version: Version, spec: Arc<ActivitySpec>, bytes: usize) {
        if bytes > self.max_bytes
            || self.max_versions == 0
            || self.by_version.contains_key(&version)
        {
            return;
        }
        while self.bytes + bytes > self.max_bytes || self.by_version.len() >= self.max_versions {
            let Some(oldest) = self.loaded.pop_front() else {
                break;
            };
            if let Some((_, dropped)) = self.by_version.remove(&oldest) {
                self.bytes -= dropped;
            }
        }
        self.bytes += bytes;
        self.by_version.insert(version, (spec, bytes));
        self.loaded.push_back(version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(n: u32) -> Version {
        (ActivityId(uuid::Uuid::nil()), n)
    }

    fn spec() -> Arc<ActivitySpec> {
        Arc::new(ActivitySpec::default())
    }

    #[test]
    fn the_cache_holds_no_more_bytes_than_its_bound_dropping_the_oldest_first() {
        let mut cached = Cached::new(1000, 100);
        for n in 0..10 {
            cached.insert(version(n), spec(), 300);
            assert!(cached.bytes <= 1000, "{} bytes", cached.bytes);
        }
        assert_eq!(cached.bytes, 900);
        let kept: Vec<u32> = cached.loaded.iter().map(|(_, n)| *n).collect();
        assert_eq!(kept, vec![7, 8, 9]);
        assert!(cached.get(&version(6)).is_none());
        assert!(cached.get(&version(9)).is_some());
    }

    #[test]
    fn a_spec_larger_than_the_cache_is_not_kept_and_drops_nothing() {
        let mut cached = Cached::new(1000, 100);
        cached.insert(version(1), spec(), 600);
        cached.insert(version(2), spec(), 1001);
        assert!(cached.get(&version(2)).is_none());
        assert!(cached.get(&version(1)).is_some());
        assert_eq!(cached.bytes, 600);
    }

    #[test]
    fn the_cache_holds_no_more_versions_than_its_bound() {
        let mut cached = Cached::new(usize::MAX, 3);
        for n in 0..5 {
            cached.insert(version(n), spec(), 1);
        }
        assert_eq!(cached.by_version.len(), 3);
        assert!(cached.get(&version(1)).is_none());
        assert!(cached.get(&version(4)).is_some());
    }

    #[test]
    fn a_version_loaded_twice_is_counted_once() {
        let mut cached = Cached::new(1000, 100);
        cached.insert(version(1), spec(), 400);
        cached.insert(version(1), spec(), 400);
        assert_eq!(cached.bytes, 400);
        assert_eq!(cached.loaded.len(), 1);
    }
}
