//! What the bench reads of processes: CPU seconds, peak and current memory, and
//! which process listens on a port, through `procfs` (which takes the clock
//! tick rate from the system, not an assumed 100 Hz).

use std::collections::BTreeMap;

use procfs::process::{FDTarget, Process};
use sqlx::Connection as _;

use crate::config::{Backend, DatabaseUrl};

/// `(user, system)` CPU seconds of process `pid` so far.
pub(super) fn cpu_seconds(pid: i32) -> Option<(f64, f64)> {
    let stat = Process::new(pid).ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second() as f64;
    Some((stat.utime as f64 / ticks, stat.stime as f64 / ticks))
}

/// `(user, system)` CPU seconds of this process so far.
pub(super) fn own_cpu_seconds() -> Option<(f64, f64)> {
    cpu_seconds(std::process::id() as i32)
}

/// The CPU seconds (user + system) so far of each of the scratch database's
/// `dwh-helper` backends, by process id; `None` off PostgreSQL or when the
/// server's processes are not on this machine.
pub(super) async fn postgres_backends_cpu(url: &DatabaseUrl) -> Option<BTreeMap<i32, f64>> {
    if url.backend() != Backend::Postgres {
        return None;
    }
    let mut conn = sqlx::PgConnection::connect(url.expose()).await.ok()?;
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'dwh-helper'",
    )
    .fetch_all(&mut conn)
    .await
    .ok()?;
    let seconds: BTreeMap<i32, f64> = pids
        .into_iter()
        .filter_map(|pid| cpu_seconds(pid).map(|(user, system)| (pid, user + system)))
        .collect();
    (!seconds.is_empty()).then_some(seconds)
}

/// The peak resident set size of process `pid` (Linux `VmHWM`), in MiB.
pub(super) fn peak_rss_mib(pid: u32) -> Option<f64> {
    let kib = Process::new(pid as i32).ok()?.status().ok()?.vmhwm?;
    Some(kib as f64 / 1024.0)
}

/// The resident set size of process `pid` now (Linux `VmRSS`), in MiB.
pub(super) fn rss_mib(pid: u32) -> Option<f64> {
    let kib = Process::new(pid as i32).ok()?.status().ok()?.vmrss?;
    Some(kib as f64 / 1024.0)
}

/// The process on this machine listening on the port of the first of
/// `bootstrap`'s servers (from `/proc/net/tcp*` and each process's sockets), if
/// there is one that this user may look at.
pub(super) fn listener_pid(bootstrap: &str) -> Option<u32> {
    let port: u16 = bootstrap.split(',').next()?.trim().rsplit_once(':')?.1.parse().ok()?;
    let inodes: Vec<u64> = [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.state == procfs::net::TcpState::Listen && entry.local_address.port() == port)
        .map(|entry| entry.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    procfs::process::all_processes().ok()?.flatten().find_map(|process| {
        let listens = process
            .fd()
            .ok()?
            .flatten()
            .any(|fd| matches!(fd.target, FDTarget::Socket(inode) if inodes.contains(&inode)));
        listens.then_some(process.pid as u32)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_listening_on_a_port_is_found() {
        let me = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = me.local_addr().expect("address").port();
        assert_eq!(
            super::listener_pid(&format!("127.0.0.1:{port}")),
            Some(std::process::id())
        );
        drop(me);
        assert_eq!(
            super::listener_pid(&format!("127.0.0.1:{port}")),
            None,
            "nobody listens once it is closed"
        );
    }

    #[test]
    fn cpu_and_memory_of_this_process_are_read() {
        // Burn some CPU so that at least a tick is counted, whatever the tick rate.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (user, system) = super::own_cpu_seconds().expect("cpu");
        assert!(user + system > 0.0, "{user} + {system}");
        // Now first: the peak, read after, is at least what was resident then.
        let now = super::rss_mib(std::process::id()).expect("now");
        let peak = super::peak_rss_mib(std::process::id()).expect("peak");
        assert!(now > 1.0 && peak >= now, "peak {peak} MiB, now {now} MiB");
    }
}
