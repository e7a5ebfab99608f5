//! Histogram samples do not pile up while nobody reads `/metrics`: the exporter keeps each
//! sample until upkeep folds it into its buckets, and the services never ran upkeep (a trigger
//! firing 2,000 times a second kept 8 bytes a fire, for ever if nothing scraped).

use std::alloc::System;
use std::time::Duration;

use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated and not yet freed.
fn live() -> usize {
    let stats = ALLOCATOR.stats();
    stats
        .bytes_allocated
        .saturating_sub(stats.bytes_deallocated)
}

#[test]
fn histogram_samples_are_folded_into_buckets_without_a_scrape() {
    taskfactory_runtime::metrics::handle();
    let before = live();
    for n in 0..1_000_000_i64 {
        taskfactory_runtime::metrics::record_fire_lateness(
            "upkept",
            "schedule",
            chrono::TimeDelta::milliseconds(n % 50),
        );
    }
    let recorded = live().saturating_sub(before);
    // Samples keep coming, as in a service (the exporter frees drained samples once the threads
    // that record have moved on).
    let until = std::time::Instant::now()
        + taskfactory_runtime::metrics::UPKEEP_EVERY * 2
        + Duration::from_secs(1);
    while std::time::Instant::now() < until {
        taskfactory_runtime::metrics::record_fire_lateness(
            "upkept",
            "schedule",
            chrono::TimeDelta::milliseconds(3),
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let kept = live().saturating_sub(before);
    assert!(
        kept < 1024 * 1024,
        "{kept} bytes still held for a million samples ({recorded} right after recording them)"
    );
}
