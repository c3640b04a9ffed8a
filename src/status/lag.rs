//! The lag loop: every `METRICS_LAG_INTERVAL_SECONDS` it reads the offsets stored
//! in the DWH and the broker's watermarks and sets the lag gauges. It runs on its
//! own task with its own clients, so it goes on (and the lag grows) while a
//! table's consumer is stuck, say on a stopped database: then the last offsets
//! read from the DWH stand, and the watermarks still move.
//!
//! Three views of one partition:
//! - `consumer_lag_records`: high watermark minus the DWH's stored offset, all
//!   that is not yet in the DWH;
//! - `buffer_lag_records`: of that, what this process fetched and holds in memory
//!   (fetched, not yet committed in the DWH); the rest is not fetched yet;
//! - `consumer_lag_seconds`: now minus the Kafka timestamp of the last record
//!   this process wrote, while records wait (0 when caught up).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::report::{self, BrokerView};
use super::stall::Watch;
use crate::catalogue::Table;
use crate::config::Config;
use crate::ingest::IngestStatus;
use crate::kafka;
use crate::store::{Dwh, StoredOffset};
use crate::telemetry::events::{StallCleared, TableStalled, TableStateSeen};
use crate::telemetry::metrics::metrics;
use crate::telemetry::Event as _;

/// Runs the loop until `shutdown`; `ingest` is this process's ingest role, whose
/// progress feeds the buffer and seconds gauges. With `watch` (the process runs
/// the ingest role), each reading also runs the watchdog over the tables it
/// ingests.
pub async fn run(
    config: Config,
    dwh: Dwh,
    ingest: Arc<IngestStatus>,
    watch: bool,
    archive: bool,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let archive_group = archive.then(|| crate::archive::group_id(&config));
    let mut stored: Option<Vec<StoredOffset>> = None;
    let mut broker: Option<BrokerView> = None;
    let mut stalls = Watch::default();
    loop {
        let m = metrics();
        match dwh.stored_offsets(&config.kafka.group_id).await {
            Ok(offsets) => {
                stored = Some(offsets);
                m.dwh_up.get_or_create(&Vec::new()).set(1);
            }
            Err(e) => {
                tracing::debug!(error = %e, "lag: cannot read the stored offsets; keeping the last ones");
                m.dwh_up.get_or_create(&Vec::new()).set(0);
                m.lag_probe_failures
                    .get_or_create(&vec![("source", "dwh".into())])
                    .inc();
            }
        }
        let (c, group) = (config.clone(), archive_group.clone());
        match tokio::task::spawn_blocking(move || report::read_broker(&c, group.as_deref(), report::Stalls::Skip)).await
        {
            Ok(Ok(view)) => {
                broker = Some(view);
                m.kafka_up.get_or_create(&Vec::new()).set(1);
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "lag: cannot read the watermarks; keeping the last ones");
                m.kafka_up.get_or_create(&Vec::new()).set(0);
                m.lag_probe_failures
                    .get_or_create(&vec![("source", "kafka".into())])
                    .inc();
            }
            Err(e) => tracing::warn!(error = %e, "lag: the broker query task failed"),
        }
        if let Some(application) = config.appmetrica.application_id {
            windows(&dwh, application).await;
        }
        if let (Some(stored), Some(broker)) = (&stored, &broker) {
            publish(&config, &ingest, stored, broker, archive_group.is_some());
            if watch {
                watchdog(&config, &ingest, &mut stalls, stored, broker);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// The watchdog: marks each table this process ingests stalled, or no longer,
/// by [`Watch`] over every partition of its topic (whichever instance of the
/// group holds it: a stalled table is the group's), and sets the state gauge of
/// each. A stalled table is not ready (`/health/ready`); its records landing
/// clear it.
fn watchdog(config: &Config, ingest: &IngestStatus, watch: &mut Watch, stored: &[StoredOffset], broker: &BrokerView) {
    let now = std::time::Instant::now();
    for &table in &config.kafka.ingest_tables {
        let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
        let marks = broker.watermarks.get(&topic).map(Vec::as_slice).unwrap_or_default();
        let stalls: Vec<String> = marks
            .iter()
            .filter_map(|&(partition, range)| {
                let at = stored
                    .iter()
                    .find(|o| o.topic == topic && o.partition == partition)
                    .map(|o| o.next_offset);
                let why = watch.observe((&topic, partition), at, range, now, config.kafka.stall_after)?;
                Some(format!("partition {partition}: {why}"))
            })
            .collect();
        let reason = (!stalls.is_empty()).then(|| stalls.join("; "));
        let last_error = ingest.last_error(&topic);
        let cause = reason.as_ref().map(|r| match &last_error {
            Some(e) => format!("{r}; last error: {e}"),
            None => r.clone(),
        });
        if ingest.set_stalled(&topic, cause) {
            match &reason {
                Some(reason) => TableStalled {
                    table,
                    topic: &topic,
                    reason,
                    last_error: last_error.as_deref(),
                }
                .emit(),
                None => StallCleared { table, topic: &topic }.emit(),
            }
        }
        TableStateSeen {
            table,
            state: ingest.state(&topic).name(),
        }
        .emit();
    }
}

/// Sets the AppMetrica windows gauge, by state.
async fn windows(dwh: &Dwh, application: i64) {
    let Ok(windows) = dwh.windows(application).await else {
        return;
    };
    let mut by_state: HashMap<&str, i64> = ["pending", "running", "done", "failed"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for w in &windows {
        *by_state.entry(w.status.as_str()).or_default() += 1;
    }
    for (state, count) in by_state {
        metrics()
            .appmetrica_windows
            .get_or_create(&vec![("state", state.to_owned())])
            .set(count);
    }
}

/// Sets the lag gauges from one reading.
fn publish(config: &Config, ingest: &IngestStatus, stored: &[StoredOffset], broker: &BrokerView, archive: bool) {
    let m = metrics();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let stored: HashMap<(&str, i32), i64> = stored
        .iter()
        .map(|o| ((o.topic.as_str(), o.partition), o.next_offset))
        .collect();
    let progress = ingest.progress();
    // Sums (records) and maxima (seconds) per label set: with partition labels
    // off, a table's partitions fold into one series.
    let mut lag: HashMap<Vec<(&'static str, String)>, i64> = HashMap::new();
    let mut seconds: HashMap<Vec<(&'static str, String)>, f64> = HashMap::new();
    let mut buffered: HashMap<Vec<(&'static str, String)>, i64> = HashMap::new();
    let mut archived: HashMap<Vec<(&'static str, String)>, i64> = HashMap::new();
    for table in Table::ALL {
        let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
        let Some(marks) = broker.watermarks.get(&topic) else {
            continue;
        };
        for &(partition, range) in marks {
            let labels = m.partition(table, partition);
            let at = stored.get(&(topic.as_str(), partition)).copied();
            let behind = report::lag(at, range);
            *lag.entry(labels.clone()).or_default() += behind;
            let mine = progress.get(&(table, partition)).copied().unwrap_or_default();
            let late = match mine.written_at {
                Some(ts) if behind > 0 => ((now_ms - ts).max(0) as f64) / 1000.0,
                _ => 0.0,
            };
            let slot = seconds.entry(labels.clone()).or_default();
            *slot = slot.max(late);
            let held = match (mine.fetched, at) {
                (Some(fetched), Some(at)) => (fetched - at).max(0),
                _ => 0,
            };
            *buffered.entry(labels.clone()).or_default() += held;
            if archive {
                let committed = broker.archived.get(&(topic.clone(), partition)).copied();
                *archived.entry(labels).or_default() += report::lag(committed, range);
            }
        }
    }
    for (labels, value) in lag {
        m.consumer_lag.get_or_create(&labels).set(value);
    }
    for (labels, value) in seconds {
        m.consumer_lag_seconds.get_or_create(&labels).set(value);
    }
    for (labels, value) in buffered {
        m.buffer_lag.get_or_create(&labels).set(value);
    }
    for (labels, value) in archived {
        m.archive_lag.get_or_create(&labels).set(value);
    }
}
