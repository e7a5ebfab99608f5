//! How the services connect to Postgres.

use std::net::SocketAddr;
use std::time::Duration;

use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
use taskfactory_runtime::config::DatabaseArgs;
use taskfactory_runtime::db;

/// This process's TCP sockets whose peer is `port`, and whether each has `TCP_NODELAY`. Each
/// descriptor is looked at through a copy of it (`pidfd_getfd`), so nothing here can close or
/// misuse the one sqlx owns.
fn sockets_to(port: u16) -> anyhow::Result<Vec<bool>> {
    let this = pidfd_open(getpid(), PidfdFlags::empty())?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(copy) = pidfd_getfd(&this, fd, PidfdGetfdFlags::empty()) else {
            continue; // closed since the listing
        };
        let peer = rustix::net::getpeername(&copy)
            .ok()
            .flatten()
            .and_then(|addr| SocketAddr::try_from(addr).ok());
        if peer.is_some_and(|peer| peer.port() == port) {
            found.push(rustix::net::sockopt::tcp_nodelay(&copy)?);
        }
    }
    Ok(found)
}

/// A statement of many rows (a batch of fires, runs or tasks) is sent in more than one segment;
/// with Nagle's algorithm on, the last one waits for the server's delayed ACK, 40 ms on Linux.
/// sqlx 0.9.0 stopped setting `TCP_NODELAY` (sqlx issue #4335): every batch of 100 fires took
/// 50 ms instead of 5, and schedules at 2,000 fires/s ran 90 ms late.
#[tokio::test]
async fn every_connection_to_postgres_sends_without_delay() -> anyhow::Result<()> {
    let db = taskfactory_tests::TestDb::create().await?;
    let args = DatabaseArgs::new(db.url());
    let main = db::connect_and_migrate(&args, Duration::from_secs(10)).await?;
    let other = db::another_pool(&args, 2)?;
    let held = (main.acquire().await?, other.acquire().await?);
    let port = url::Url::parse(&db.url())?.port().unwrap_or(5432);
    let sockets = sockets_to(port)?;
    drop(held);
    assert!(
        sockets.len() >= 2,
        "expected the two pools' connections, found {} sockets to port {port}",
        sockets.len()
    );
    assert!(
        sockets.iter().all(|&nodelay| nodelay),
        "connections without TCP_NODELAY: {sockets:?}"
    );
    Ok(())
}
