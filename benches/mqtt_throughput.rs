#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is a failed run
//! Durable event throughput to a real mosquitto (REQUIREMENTS D1, D2, issue 4).
//!
//! Every event is committed to the redb store with fdatasync (`Durability::Immediate`) before the
//! MQTT link may publish it, exactly as the outbox stage does; the link publishes at QoS 1 and
//! removes an event after the broker's PUBACK. Measured in one run:
//!
//! 1. sustained rate with one fdatasync per event (the worst case: events trickle in one by one);
//! 2. sustained rate with group commit (events arrive together, e.g. a burst of swipes on several
//!    readers; the outbox stage commits whatever is queued, here 32 at a time);
//! 3. the drain time of a 10-minute backlog at 10 events/s (6,000 events stored while the broker
//!    was unreachable), from the link starting to the last PUBACK.
//!
//! A subscriber checks that every event reached the broker. Run: `cargo bench --bench
//! mqtt_throughput` (needs mosquitto; `EVENTS=N` changes the count of runs 1 and 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use menshen::bus::StateBoard;
use menshen::clock::MonoTime;
use menshen::daemon::stages::{link, StageCtx};
use menshen::events::NewEvent;
use menshen::stats::Stats;
use menshen::store::Store;

fn config(port: u16, dir: &std::path::Path) -> menshen::config::Config {
    let mut t: toml::Table = toml::from_str(menshen::config::DEFAULT_CONFIG).unwrap();
    t["gate"].as_table_mut().unwrap().insert("state_dir".into(), dir.display().to_string().into());
    let m = t["mqtt"].as_table_mut().unwrap();
    m.insert("port".into(), i64::from(port).into());
    m.insert("health_interval_secs".into(), 0.into());
    menshen::config::parse(&toml::to_string(&t).unwrap()).unwrap()
}

fn event(i: u64) -> NewEvent {
    NewEvent::system(1_800_000_000_000 + i as i64, "bench", Some(format!("event {i}")))
}

struct Link {
    stats: Arc<Stats>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_link(cfg: &Arc<menshen::config::Config>, store: &Arc<Store>) -> Link {
    let stats = Arc::new(Stats::default());
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let (commands, _cmd_rx) = mpsc::channel(16);
    let (_out_tx, outgoing) = mpsc::channel(16);
    // The link's own alarms (none in this bench: the broker refuses nothing).
    let (events, _alarms) = mpsc::channel(16);
    let ctx = StageCtx {
        name: "mqtt".into(),
        cfg: cfg.clone(),
        store: store.clone(),
        stats: stats.clone(),
        started: MonoTime::now(),
        shutdown: stop.clone(),
    };
    let io = link::LinkIo { wake: wake.clone(), board: Arc::new(StateBoard::default()), commands, outgoing, events };
    let task = tokio::spawn(link::run(ctx, io));
    Link { stats, wake, stop, task }
}

async fn wait_delivered(stats: &Stats, n: u64, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if stats.events_delivered.load(Ordering::Relaxed) >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Store `n` events in commits of `batch` (each commit fdatasynced), waking the link after each.
async fn produce(store: &Arc<Store>, link: &Link, n: u64, batch: u64, start: u64) {
    let mut i = 0;
    while i < n {
        let k = batch.min(n - i);
        let st = store.clone();
        let builders: Vec<_> = (i..i + k)
            .map(|j| {
                let e = event(start + j);
                move |seq: u64| e.to_json(seq, "site1", "gate1", false)
            })
            .collect();
        tokio::task::spawn_blocking(move || st.append_events(builders)).await.unwrap().unwrap();
        link.wake.notify_one();
        i += k;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::var("EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let port = common::free_port();
    let broker = common::Broker::start(port);
    let sub = common::Subscriber::start(port, "menshen/v1/site1/gate1/event/#");
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(config(port, dir.path()));
    let fs = std::process::Command::new("stat").args(["-f", "-c", "%T"]).arg(dir.path()).output().unwrap();
    println!(
        "store on {} ({}), mosquitto on loopback, QoS 1, inflight {}",
        dir.path().display(),
        String::from_utf8_lossy(&fs.stdout).trim(),
        cfg.mqtt.inflight
    );

    let mut total = 0u64;
    for (label, batch) in [("one fdatasync per event", 1u64), ("group commit of 32", 32)] {
        let store = Arc::new(Store::open(&dir.path().join(format!("b{batch}.redb"))).unwrap());
        let link = start_link(&cfg, &store);
        assert!(common::wait_for(Duration::from_secs(10), || link.stats.mqtt_online.load(Ordering::Relaxed)));
        let t = Instant::now();
        produce(&store, &link, n, batch, total).await;
        let stored = t.elapsed();
        assert!(wait_delivered(&link.stats, n, Duration::from_secs(120)).await, "not all delivered");
        let el = t.elapsed();
        total += n;
        println!(
            "{label:<26} {n} events: stored in {:.2} s, all PUBACKed in {:.2} s → {:.0} durable events/s delivered",
            stored.as_secs_f64(),
            el.as_secs_f64(),
            n as f64 / el.as_secs_f64()
        );
        link.stop.cancel();
        let _ = link.task.await;
        assert_eq!(store.outbox_depth().unwrap(), 0);
    }

    // A 10-minute backlog at 10 events/s, stored while the broker was unreachable.
    let backlog = 6_000u64;
    let store = Arc::new(Store::open(&dir.path().join("backlog.redb")).unwrap());
    let t = Instant::now();
    let idle = Link {
        stats: Arc::new(Stats::default()),
        wake: Arc::new(Notify::new()),
        stop: CancellationToken::new(),
        task: tokio::spawn(async {}),
    };
    produce(&store, &idle, backlog, 10, total).await; // 10 events/s: one commit per second's worth
    println!("backlog: {backlog} events stored in {:.2} s (commits of 10)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let link = start_link(&cfg, &store);
    assert!(wait_delivered(&link.stats, backlog, Duration::from_secs(120)).await);
    let drain = t.elapsed();
    total += backlog;
    println!(
        "backlog: 10 min at 10 events/s ({backlog}) drained in {:.2} s from connect → {:.0} events/s",
        drain.as_secs_f64(),
        backlog as f64 / drain.as_secs_f64()
    );
    link.stop.cancel();
    let _ = link.task.await;
    assert!(common::wait_for(Duration::from_secs(30), || sub.events("system").len() as u64 >= total));
    println!("subscriber received {} events (expected {total})", sub.events("system").len());
    drop(broker);
}
