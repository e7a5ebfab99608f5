//! How the services connect to Postgres.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use rustix::process::{PidfdFlags, PidfdGetfdFlags, getpid, pidfd_getfd, pidfd_open};
use taskfactory_runtime::config::DatabaseArgs;
use taskfactory_runtime::db;

/// This process's TCP sockets whose peer is `port`, and whether each has `TCP_NODELAY`. Each
/// descriptor is looked at through a copy of it (`pidfd_getfd`), so nothing here can close or
/// misuse the one sqlx owns.
fn sockets_to(port: u16) -> anyhow::Result<Vec<bool>> {
    let this = pidfd_open(getpid(), PidfdFlags::empty())
        .context("pidfd_open (Linux 5.3 or later) to look at this process's sockets")?;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let copy = match pidfd_getfd(&this, fd, PidfdGetfdFlags::empty()) {
            Ok(copy) => copy,
            Err(rustix::io::Errno::BADF) => continue, // closed since the listing
            Err(error) => {
                return Err(error).context(
                    "pidfd_getfd (Linux 5.6 or later; a seccomp profile may refuse it without \
                     CAP_SYS_PTRACE) to look at this process's sockets",
                );
            }
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

/// A large statement (a batch of fires, runs or tasks) can be sent in more than one segment;
/// with Nagle's algorithm on, the last one waits for the server's delayed ACK, 40 ms on Linux.
/// sqlx 0.9.0 stopped setting `TCP_NODELAY` (sqlx issue #4335): inserting a batch of about 100
/// fires took 50 ms (10 ms in `psql`), and schedules at 2,000 fires/s ran 90 ms late.
#[tokio::test]
async fn every_connection_to_postgres_sends_without_delay() -> anyhow::Result<()> {
    let db = taskfactory_tests::TestDb::create().await?;
    let args = DatabaseArgs::new(db.url());
    let main = db::connect_and_migrate(&args, Duration::from_secs(10)).await?;
    let other = db::another_pool(&args, 2)?;
    let held = (main.acquire().await?, other.acquire().await?);
    // As sqlx resolves it (the URL, else PGPORT, else 5432); a Unix socket has no Nagle to fear.
    let options = main.connect_options();
    anyhow::ensure!(
        options.get_socket().is_none() && !options.get_host().starts_with('/'),
        "the test database is reached over a Unix socket; this test needs TCP"
    );
    let port = options.get_port();
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
