#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! A site: eight real gate daemons (simulated chips) and a BMS on (a) one mosquitto and (b) two
//! mosquittos joined by a bridge, gates on either side and the BMS on one. A paged roster of
//! 3,000 residents goes to every gate through `_site`; swipes at two gates during the sync are
//! decided on the old roster until the switch; a gate killed during the sync catches up from
//! its persistent session when it comes back; `menshen site status` shows it offline meanwhile;
//! `menshen site command` knows when every gate has answered; M3's replay rules hold across the
//! bridge.

mod common;

use common::site::{bridge_config, pages};
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;

const SITE: &str = "site1";
const GATES: usize = 8;
const RESIDENTS: usize = 3_000;
/// The page size a managed broker accepts (many cap packets at 128–256 KB).
const PAGE_BYTES: usize = 64 << 10;

struct Site {
    /// The BMS's broker first; in the bridged site, the second broker (bridged to the first).
    brokers: Vec<Broker>,
    gates: Vec<Gate>,
    bms: Bms,
}

fn gate_port(site: &Site, i: usize) -> u16 {
    // Gates 0..4 on the BMS's broker, 4..8 on the bridged one (when there is one).
    site.brokers[if i < GATES / 2 { 0 } else { site.brokers.len() - 1 }].port
}

fn start_site(bridged: bool) -> Site {
    let a = Broker::start(free_port());
    let mut brokers = vec![a];
    if bridged {
        let port = free_port();
        let b = Broker::with_config(port, tempfile::tempdir().unwrap(), &bridge_config(port, brokers[0].port));
        brokers.push(b);
    }
    let bms = Bms::connect(brokers[0].port);
    let mut site = Site { brokers, gates: Vec::new(), bms };
    for i in 0..GATES {
        let port = gate_port(&site, i);
        let mut g = Gate::new(GateOpts { mqtt_port: port, ..GateOpts::default() });
        g.edit_config(|t| {
            t["gate"].as_table_mut().unwrap().insert("gate".into(), format!("g{i}").into());
        });
        g.start_sim();
        g.start_daemon();
        site.gates.push(g);
    }
    // Every gate's retained summary has reached the BMS's broker (across the bridge too).
    let ok = wait_for(Duration::from_secs(20), || {
        (0..GATES).all(|i| site.bms.messages(&format!("/g{i}/summary")).iter().any(|v| v["gate"] == format!("g{i}")))
    });
    assert!(ok, "not every gate published its summary");
    site
}

/// Replies to one `_site` command, by gate.
fn replies(bms: &Bms, corr: &str) -> BTreeMap<String, Value> {
    bms.replies
        .lock()
        .unwrap()
        .iter()
        .filter(|(c, _)| c.as_deref() == Some(corr.as_bytes()))
        .map(|(_, v)| (v["gate"].as_str().unwrap_or("?").to_string(), v.clone()))
        .collect()
}

/// Send a `_site` command and wait until the gates `expect` all answered; their replies.
fn site_command(bms: &Bms, verb: &str, payload: &Value, expect: &[String]) -> BTreeMap<String, Value> {
    let corr = bms.corr();
    let topic = format!("menshen/v1/{SITE}/_site/cmd/{verb}");
    bms.publish(&topic, payload.to_string().into_bytes(), Some(corr.as_bytes()), None, false);
    let ok = wait_for(Duration::from_secs(30), || {
        let r = replies(bms, &corr);
        expect.iter().all(|g| r.contains_key(g))
    });
    let r = replies(bms, &corr);
    assert!(ok, "{verb}: only {:?} of {expect:?} answered", r.keys().collect::<Vec<_>>());
    r
}

fn resident(i: usize) -> Value {
    let mode = if i % 3 == 0 { "face_or_card" } else { "card" };
    json!({"id": format!("r{i:05}"), "mode": mode,
           "cards": [{"format": "H10301", "facility": 20 + (i / 60_000), "number": 1 + i % 60_000}]})
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("g{i}")).collect()
}

/// Swipe a card at gate `i`; the access decision the BMS then sees from that gate.
fn swipe_decision(site: &Site, i: usize, facility: u64, number: u64) -> String {
    let gate = format!("g{i}");
    let matching = |bms: &Bms| -> Vec<Value> {
        bms.events()
            .into_iter()
            .filter(|e| {
                e["type"] == "access"
                    && e["gate"] == gate.as_str()
                    && e["card"]["number"] == number
                    && e["card"]["facility"] == facility
            })
            .collect()
    };
    let before = matching(&site.bms).len();
    site.gates[i].swipe(facility, number);
    let seen = wait_for(Duration::from_secs(10), || matching(&site.bms).len() > before);
    assert!(seen, "no access event from {gate} for card {facility}/{number}");
    matching(&site.bms).last().unwrap()["decision"].as_str().unwrap_or("").to_string()
}

/// `menshen site status --json` against the BMS's broker.
fn site_status(site: &Site) -> Value {
    let out = std::process::Command::new(BIN)
        .args(["site", "status", "--json", "--site", SITE, "--port", &site.brokers[0].port.to_string()])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("site status: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    // Exit 0 only when every gate is online (for monitoring), 2 otherwise.
    let all = v["gates"].as_array().is_some_and(|g| !g.is_empty() && g.iter().all(|g| g["state"] == "online"));
    assert_eq!(out.status.code(), Some(if all { 0 } else { 2 }), "{v}");
    v
}

fn gate_line<'a>(status: &'a Value, gate: &str) -> &'a Value {
    status["gates"].as_array().unwrap().iter().find(|g| g["gate"] == gate).unwrap_or(&Value::Null)
}

fn run_site(bridged: bool) {
    let mut site = start_site(bridged);
    let all = names(0..GATES);

    // The old roster, version 1, through `_site` in one payload.
    let old = json!({"version": 1, "residents": [
        {"id": "r-old", "mode": "card", "cards": [{"format": "H10301", "facility": 10, "number": 1}]}]});
    for (g, r) in site_command(&site.bms, "roster.sync", &old, &all) {
        assert_eq!(r["ok"], true, "{g}: {r}");
    }

    // Version 2: 3,000 residents in pages of at most 64 KiB.
    let snapshot: Vec<Value> = (0..RESIDENTS).map(resident).collect();
    let pages = pages(2, "v2-site", &snapshot, PAGE_BYTES);
    assert!(pages.len() >= 4, "the roster needs several pages ({})", pages.len());
    for p in &pages {
        assert!(p.to_string().len() <= PAGE_BYTES);
    }
    let last = pages.len() - 1;
    let killed = GATES - 1; // on the bridged broker in the bridged site
    for (n, p) in pages.iter().enumerate() {
        let expect = if n <= 1 { all.clone() } else { names(0..killed) };
        let rs = site_command(&site.bms, "roster.sync", &p.clone(), &expect);
        for (g, r) in &rs {
            assert_eq!(r["ok"], true, "{g} page {n}: {r}");
            assert_eq!(r["result"]["complete"], n == last, "{g} page {n}: {r}");
        }
        if n == 1 {
            // Mid-sync: two gates, one on each broker, still decide on the old roster.
            for g in [0, GATES / 2] {
                assert_eq!(swipe_decision(&site, g, 10, 1), "granted", "old card, old roster");
                assert_eq!(swipe_decision(&site, g, 20, 2), "denied", "new card before the switch");
            }
            // A gate dies mid-sync (SIGKILL: no goodbye, the broker publishes its will).
            site.gates[killed].signal_daemon("KILL");
            let ok = wait_for(Duration::from_secs(10), || gate_line(&site_status(&site), "g7")["state"] == "offline");
            assert!(ok, "the killed gate is not shown offline: {}", site_status(&site));
            let st = site_status(&site);
            assert_eq!(st["online"], GATES - 1, "{st}");
            let line = gate_line(&st, "g7");
            assert!(line["last_seen_ms"].as_i64().is_some(), "{line}");
            assert_eq!(line["roster_sync"]["next_page"], 2, "{line}");
        }
    }
    for g in [0, GATES / 2] {
        assert_eq!(swipe_decision(&site, g, 10, 1), "denied", "old card after the switch");
        assert_eq!(swipe_decision(&site, g, 20, 3), "granted", "new card after the switch");
    }

    // The killed gate comes back: its session held the pages sent meanwhile.
    site.gates[killed].start_daemon();
    let g7 = &site.gates[killed];
    let ok = wait_for(Duration::from_secs(30), || {
        g7.status().is_some_and(|s| s["roster_version"] == 2 && s["residents"] == RESIDENTS as u64)
    });
    assert!(ok, "the restarted gate did not catch up: {:?}\n{}", g7.status(), g7.log());
    let reference = site.gates[0].fingerprint();
    for g in &site.gates {
        assert_eq!(g.fingerprint(), reference, "every gate holds the same roster");
    }

    // The site at a glance: all online, all at version 2.
    let ok = wait_for(Duration::from_secs(10), || {
        let st = site_status(&site);
        st["online"] == GATES && (0..GATES).all(|i| gate_line(&st, &format!("g{i}"))["roster_version"] == 2)
    });
    assert!(ok, "{}", site_status(&site));
    for i in 0..GATES {
        for v in site.bms.messages(&format!("/g{i}/summary")) {
            common::schema::validate("summary.json", &v).unwrap_or_else(|e| panic!("{e}: {v}"));
        }
    }
    let line = gate_line(&site_status(&site), "g3").clone();
    assert_eq!((line["residents"].as_u64(), line["templates"].as_u64()), (Some(RESIDENTS as u64), Some(0)));
    assert_eq!(line["camera"], "disabled");

    // `menshen site command`: the helper waits for every gate the status shows online.
    let out = std::process::Command::new(BIN)
        .args(["site", "command", "health.get", "--json", "--site", SITE])
        .args(["--port", &site.brokers[0].port.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["expected"].as_u64(), v["answered"].as_u64()), (Some(GATES as u64), Some(GATES as u64)), "{v}");

    // Bad input at one gate (across the bridge when bridged): a page out of order, counted.
    let far = site.gates.len() - 2;
    let page = json!({"version": 3, "sync_id": "v3", "page": 1, "pages": 2, "residents": []});
    let r = site.bms.command(SITE, &format!("g{far}"), "roster.sync", page, None);
    assert_eq!(r["code"], "unknown_sync", "{r}");
    let page0 = json!({"version": 3, "sync_id": "v3", "page": 0, "pages": 3, "residents": [resident(1)]});
    assert_eq!(site.bms.command(SITE, &format!("g{far}"), "roster.sync", page0, None)["ok"], true);
    let page2 = json!({"version": 3, "sync_id": "v3", "page": 2, "pages": 3, "residents": []});
    let r = site.bms.command(SITE, &format!("g{far}"), "roster.sync", page2, None);
    assert_eq!(r["code"], "page_out_of_order", "{r}");
    let h = site.bms.command(SITE, &format!("g{far}"), "health.get", json!({}), None);
    let rejected = &h["result"]["rejected"]["commands"];
    assert_eq!((rejected["unknown_sync"].as_u64(), rejected["page_out_of_order"].as_u64()), (Some(1), Some(1)), "{h}");
    assert_eq!(h["result"]["roster_sync"]["next_page"], 1, "{h}");
    common::schema::validate("health.json", &h["result"]).unwrap();

    // A batch with one face-only entry is refused whole; a good one is one transaction.
    let before = site.gates[far].fingerprint();
    let bad = json!({"upserts": [resident(5), {"id": "r-face-only", "mode": "face_or_card"}], "removes": ["r00001"]});
    let r = site.bms.command(SITE, &format!("g{far}"), "roster.batch", bad, None);
    assert_eq!(r["code"], "face_only_refused", "{r}");
    assert!(r["message"].as_str().unwrap().contains("nothing in the batch was applied"), "{r}");
    assert_eq!(site.gates[far].fingerprint(), before, "a refused batch changes nothing");
    let good = json!({"upserts": [{"id": "r-new", "mode": "card",
        "cards": [{"format": "H10301", "facility": 30, "number": 1}]}], "removes": ["r00001"]});
    let r = site.bms.command(SITE, &format!("g{far}"), "roster.batch", good, None);
    assert_eq!((r["ok"].as_bool(), r["result"]["upserts"].as_u64()), (Some(true), Some(1)), "{r}");
    assert_eq!(site.gates[far].status().unwrap()["residents"], RESIDENTS as u64, "one added, one removed");
    assert_eq!(swipe_decision(&site, far, 30, 1), "granted");

    // M3 across the bridge: a retained unlock is refused, an expired one too; replies come back.
    let target = format!("g{far}");
    let before = site.gates[far].relay_writes("front");
    let topic = format!("menshen/v1/{SITE}/{target}/cmd/unlock");
    let corr = site.bms.corr();
    let body = json!({"door": "front", "request_id": "retained-1"}).to_string().into_bytes();
    site.bms.publish(&topic, body, Some(corr.as_bytes()), Some(30), true);
    let r = site.bms.reply_for(corr.as_bytes()).expect("a reply to the retained unlock");
    assert_eq!(r["code"], "retained_command", "{r}");
    site.bms.publish(&topic, Vec::new(), None, None, true); // clear the retained message
    let expired = json!({"door": "front", "expires_at": 1_000});
    let r = site.bms.command(SITE, &target, "unlock", expired, Some(30));
    assert_eq!(r["code"], "expired", "{r}");
    let ok = json!({"door": "front"});
    assert_eq!(site.bms.command(SITE, &target, "unlock", ok, Some(30))["ok"], true);
    assert!(wait_for(Duration::from_secs(5), || site.gates[far].relay_writes("front") > before));

    for g in site.gates.iter_mut() {
        g.signal_daemon("TERM");
    }
}

#[test]
fn a_site_of_eight_gates_on_one_broker() {
    run_site(false);
}

#[test]
fn a_site_of_eight_gates_on_two_bridged_brokers() {
    run_site(true);
}
