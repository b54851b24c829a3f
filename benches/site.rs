#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a panic is a failed run
//! The site bench (issue 18): 20 real gate daemons (simulated chips) on one mosquitto, then on
//! two bridged mosquittos (10 gates on each, the BMS on the first), and a compound-sized roster.
//!
//! In each topology:
//! - a 1,000-resident roster (one payload, `_site`), and the card path on gate g0 at that size;
//! - the compound roster (default 50,000 residents and 60,000 cards) as a paged `roster.sync` on
//!   `_site` in pages of at most 64 KiB, all pages published at once: the time from the first
//!   page to each gate's `complete` reply (p50, p99, last gate), and the pages per second;
//! - RSS of every gate daemon at that size (/proc/PID/status VmRSS);
//! - the card path on gate g1 (no swipes before) at the compound size: p50/p99 of the decision
//!   (store lookup + policy) and of edge → relay, from the gate's own latency rings.
//!
//! Run: `cargo bench --bench site` (needs mosquitto; about two minutes on 2 cores). `GATES`,
//! `RESIDENTS`, `CARDS`, `PAGE_BYTES`, `SWIPES` change the sizes; `TOPOLOGY=one|bridged` runs one
//! of the two.

#[path = "../tests/common/mod.rs"]
mod common;

use common::site::{bridge_config, pages};
use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SITE: &str = "site1";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Resident `i`; the first `cards - residents` residents hold a second card.
fn resident(i: usize, residents: usize, cards: usize) -> Value {
    let mode = if i % 3 == 0 { "face_or_card" } else { "card" };
    let card = |n: usize| json!({"format": "H10301", "facility": 1 + n / 60_000, "number": 1 + n % 60_000});
    let mut cs = vec![card(i)];
    if i < cards.saturating_sub(residents) {
        cs.push(card(residents + i));
    }
    json!({"id": format!("r{i:06}"), "mode": mode, "cards": cs})
}

/// Publish to `_site` and wait for a reply from each of `gates`; arrival time per gate.
fn site_send(bms: &Bms, verb: &str, payloads: &[Value], gates: usize, timeout: Duration) -> BTreeMap<String, Instant> {
    let corrs: Vec<String> = payloads.iter().map(|_| bms.corr()).collect();
    let topic = format!("menshen/v1/{SITE}/_site/cmd/{verb}");
    for (p, c) in payloads.iter().zip(&corrs) {
        bms.publish(&topic, p.to_string().into_bytes(), Some(c.as_bytes()), None, false);
    }
    let last = corrs.last().unwrap().as_bytes().to_vec();
    let mut done: BTreeMap<String, Instant> = BTreeMap::new();
    let end = Instant::now() + timeout;
    while done.len() < gates && Instant::now() < end {
        for (c, v) in bms.replies.lock().unwrap().iter() {
            if c.as_deref() == Some(&last[..]) {
                assert_eq!(v["ok"], true, "{v}");
                done.entry(v["gate"].as_str().unwrap().to_string()).or_insert_with(Instant::now);
            } else if v["ok"] != true && corrs.iter().any(|k| c.as_deref() == Some(k.as_bytes())) {
                panic!("a page was refused: {v}");
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(done.len(), gates, "only {} of {gates} gates finished {verb}", done.len());
    done
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Swipe `n` enrolled cards at gate `g`; (decide p50, p99, total p50, p99) in µs from its rings,
/// and how many of the swipes were granted (a frame the reader lost under the machine's load is
/// counted by the gate as a Wiegand rejection, not granted: reported, not hidden).
fn card_path(gate: &Gate, n: usize, residents: usize) -> (f64, f64, f64, f64, u64) {
    for k in 0..n {
        let i = (k * 7919) % residents;
        gate.swipe((1 + i / 60_000) as u64, (1 + i % 60_000) as u64);
        std::thread::sleep(Duration::from_millis(80));
    }
    let want = n as u64;
    wait_for(Duration::from_secs(10), || {
        gate.status().is_some_and(|s| s["stats"]["card_latency"]["total"]["n"].as_u64().unwrap_or(0) >= want)
    });
    let s = gate.status().unwrap();
    let l = &s["stats"]["card_latency"];
    let f = |hop: &str, q: &str| l[hop][q].as_f64().unwrap_or(f64::NAN);
    let granted = l["total"]["n"].as_u64().unwrap_or(0);
    (f("decide", "p50_us"), f("decide", "p99_us"), f("total", "p50_us"), f("total", "p99_us"), granted)
}

fn run(bridged: bool) {
    let (n_gates, residents, cards) = (env("GATES", 20), env("RESIDENTS", 50_000), env("CARDS", 60_000));
    let (page_bytes, swipes) = (env("PAGE_BYTES", 64 << 10), env("SWIPES", 100));
    let a = Broker::start(free_port());
    let mut brokers = vec![a];
    if bridged {
        let port = free_port();
        brokers.push(Broker::with_config(port, tempfile::tempdir().unwrap(), &bridge_config(port, brokers[0].port)));
    }
    let mut gates = Vec::new();
    for i in 0..n_gates {
        let port = brokers[if bridged && i >= n_gates / 2 { 1 } else { 0 }].port;
        let mut g = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 100, ..GateOpts::default() });
        g.edit_config(|t| {
            t["gate"].as_table_mut().unwrap().insert("gate".into(), format!("g{i}").into());
            t["log"].as_table_mut().unwrap().insert("level".into(), "info".into());
        });
        g.start_sim();
        g.start_daemon();
        gates.push(g);
    }
    let bms = Bms::connect(brokers[0].port);
    assert!(wait_for(Duration::from_secs(30), || (0..n_gates)
        .all(|i| bms.messages(&format!("/g{i}/summary")).iter().any(|v| v["gate"] == format!("g{i}")))));

    let small: Vec<Value> = (0..1_000).map(|i| resident(i, 1_000, 1_000)).collect();
    site_send(&bms, "roster.sync", &[json!({"version": 1, "residents": small})], n_gates, Duration::from_secs(60));
    let at_1k = card_path(&gates[0], swipes, 1_000);
    let rss_1k: Vec<f64> = gates.iter().map(|g| rss_kib(g.daemon_pid()) as f64 / 1024.0).collect();

    let big: Vec<Value> = (0..residents).map(|i| resident(i, residents, cards)).collect();
    let pages = pages(2, "v2", &big, page_bytes);
    let bytes: usize = pages.iter().map(|p| p.to_string().len()).sum();
    let t0 = Instant::now();
    let done = site_send(&bms, "roster.sync", &pages, n_gates, Duration::from_secs(600));
    let secs: Vec<f64> = done.values().map(|t| t.duration_since(t0).as_secs_f64()).collect();
    let last = secs.iter().cloned().fold(0.0, f64::max);
    for g in &gates {
        let s = g.status().unwrap();
        assert_eq!((s["roster_version"].as_u64(), s["residents"].as_u64()), (Some(2), Some(residents as u64)));
        assert_eq!(s["credentials"].as_u64(), Some(cards.max(residents) as u64));
    }
    let rss: Vec<f64> = gates.iter().map(|g| rss_kib(g.daemon_pid()) as f64 / 1024.0).collect();
    let store_mb = std::fs::read_dir(gates[0].dir.path().join("state"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "redb"))
        .map(|e| e.metadata().map_or(0, |m| m.len()))
        .sum::<u64>() as f64
        / 1e6;
    let at_50k = card_path(&gates[1], swipes, residents);

    let topo = if bridged { "two bridged mosquittos (10 + 10 gates, BMS on the first)" } else { "one mosquitto" };
    println!("\n== site bench: {n_gates} gates on {topo} ==");
    println!(
        "roster: {residents} residents, {} credentials, {} pages of <= {} KiB ({:.2} MB)",
        cards.max(residents),
        pages.len(),
        page_bytes >> 10,
        bytes as f64 / 1e6
    );
    println!(
        "time to apply (first page sent -> gate's complete reply): p50 {:.2} s  p99 {:.2} s  last gate {:.2} s",
        pct(&secs, 0.5),
        pct(&secs, 0.99),
        last
    );
    println!(
        "RSS per gate daemon at {residents}: p50 {:.1} MiB  max {:.1} MiB (at 1,000: p50 {:.1} MiB)",
        pct(&rss, 0.5),
        pct(&rss, 1.0),
        pct(&rss_1k, 0.5)
    );
    println!("store file at {residents}: {store_mb:.1} MB");
    println!("swipes granted: {} of {swipes} at 1,000, {} of {swipes} at {residents}", at_1k.4, at_50k.4);
    println!(
        "card decision (lookup + policy) at 1,000: p50 {:.1} us p99 {:.1} us; at {residents}: p50 {:.1} us p99 {:.1} us \
         (p99 ratio {:.2}x)",
        at_1k.0,
        at_1k.1,
        at_50k.0,
        at_50k.1,
        at_50k.1 / at_1k.1
    );
    println!(
        "card edge -> relay at 1,000: p50 {:.1} us p99 {:.1} us; at {residents}: p50 {:.1} us p99 {:.1} us",
        at_1k.2, at_1k.3, at_50k.2, at_50k.3
    );
    for g in gates.iter_mut() {
        g.signal_daemon("TERM");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let topology = std::env::var("TOPOLOGY").unwrap_or_else(|_| "both".into());
    if topology != "bridged" {
        run(false);
    }
    if topology != "one" {
        run(true);
    }
}
