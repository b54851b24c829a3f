//! Crash loop (issue 6, short form): the daemon under mixed load is killed with SIGKILL at random
//! moments and restarted, round after round. The load: swipes on the simulated reader, face frames
//! from the camera, MQTT roster commands (`resident.upsert`, `resident.set_mode`), consents
//! (`consent.record`) and template deletions (`resident.set_mode` card, `consent.withdraw`,
//! `resident.remove`, one per round, on a face enrolled with the CLI while the daemon was down).
//! After each start the relay is in its safe state; at the end every acknowledged command is in the
//! store exactly as acknowledged, every event arrived, no sequence number was ever published with
//! two different contents, and every template is either still held or gone with exactly one
//! signed receipt (never gone without one, never receipted while still held); every acknowledged
//! deletion is gone. `CRASH_ROUNDS=N` (default 50) and `CRASH_SEED=S` change the run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use menshen::hw::sim::{self, WorldOp};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What one round sent, and which replies said `ok`.
#[derive(Default)]
struct Round {
    upsert: bool,
    mode: bool,
    consent: bool,
    /// The face enrolled (CLI, daemon down) this round, and how it is then deleted.
    face: Option<(String, &'static str)>,
    deletion: bool,
}

const DELETIONS: [&str; 3] = ["resident.set_mode", "consent.withdraw", "resident.remove"];

/// LFW people with a first photo, in a stable order: one new face per round.
fn people() -> Vec<PathBuf> {
    let dir = common::shared_models().join("../data/lfw/images_deepfunneled");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names.into_iter().map(|n| dir.join(&n).join(format!("{n}_0001.jpg"))).filter(|p| p.exists()).collect()
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    let rounds: u64 = std::env::var("CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(20_261_122);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let port = free_port();
    let bdir = tempfile::tempdir().unwrap();
    let _broker = Broker::start_persistent(port, bdir.path());
    let bms = Bms::connect_with(port, Some("bms-crash-loop"));
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 150, ..GateOpts::default() });
    // Face frames at 5 fps: a face, so the face path works while the kills land.
    let cam = gate.dir.path().join("camera");
    std::fs::create_dir_all(&cam).unwrap();
    std::fs::copy(common::shared_models().join("../data/smoke/George_W_Bush_0001.jpg"), cam.join("00.jpg")).unwrap();
    gate.enable_face(&cam, 5.0);
    gate.start_sim();
    let ok = |o: &std::process::Output| o.status.success();
    // A resident whose card opens the door, so kills also land in the middle of unlocks.
    let out = gate.resident(&["add", "known", "--card", "H10301:9:9"]);
    assert!(ok(&out), "{}", String::from_utf8_lossy(&out.stderr));
    let mut faces = people().into_iter();

    // The rules a consent refers to.
    gate.start_daemon();
    let rules = bms.command("site1", "gate1", "rules.get", json!({}), None);
    let (version, sha) = (rules["result"]["version"].clone(), rules["result"]["sha256"].clone());
    assert!(version.is_string() && sha.is_string(), "{rules}");
    assert!(gate.signal_daemon("TERM").success());

    let mut acked: BTreeMap<u64, Round> = BTreeMap::new();
    let (mut enrol_secs, mut refused_photos) = (0.0, 0);
    let t0 = Instant::now();
    for round in 0..rounds {
        // While the daemon is down: a new face, with its consent (the CLI acknowledges by exiting 0).
        let mut r = Round::default();
        let fid = format!("fc-{round}");
        let te = Instant::now();
        let added = gate.resident(&["add", &fid, "--mode", "face_or_card", "--card", &format!("H10301:60:{round}")]);
        assert!(ok(&added), "{}", String::from_utf8_lossy(&added.stderr));
        assert!(ok(&gate.resident(&["consent", &fid, "--retention-days", "30"])));
        for photo in faces.by_ref() {
            // A photo the quality gate refuses (no face, blur, ...) is skipped for the next person.
            if ok(&gate.resident(&["enrol-face", &fid, "--photo", photo.to_str().unwrap(), "--min-good", "1"])) {
                r.face = Some((fid.clone(), DELETIONS[round as usize % DELETIONS.len()]));
                break;
            }
            refused_photos += 1;
        }
        assert!(r.face.is_some(), "ran out of LFW photos");
        enrol_secs += te.elapsed().as_secs_f64();

        gate.start_daemon();
        let relay = gate.relay("front");
        assert_eq!(relay["relay_energized"], false, "round {round}: the relay must start in its safe state");
        let socket = gate.socket.clone();
        let swipes = rng.gen_range(1..6u64);
        let swiper = std::thread::spawn(move || {
            for n in 0..swipes {
                let (facility, card) = if n % 2 == 0 { (9, 9) } else { (8, 1000 + n) };
                let _ = sim::request(&socket, &WorldOp::Swipe { reader: "front".into(), facility, card, format: None });
            }
        });
        let id = format!("cr-{round}");
        let topic = |verb: &str| format!("menshen/v1/site1/gate1/cmd/{verb}");
        let send = |verb: &str, corr: &str, payload: Value| {
            bms.publish(&topic(verb), payload.to_string().into_bytes(), Some(corr.as_bytes()), None, false);
        };
        let up = json!({"resident": {"id": id, "mode": "card", "cards": [{"format": "H10301", "facility": 50, "number": round}]}});
        send("resident.upsert", &format!("up-{round}"), up);
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        send("resident.set_mode", &format!("mode-{round}"), json!({"resident": id, "mode": "face_or_card"}));
        send(
            "consent.record",
            &format!("consent-{round}"),
            json!({"resident": id, "rules_version": version, "rules_sha256": sha, "retention_days": 60}),
        );
        let (fid, how) = r.face.clone().unwrap();
        let del = match how {
            "resident.set_mode" => json!({"resident": fid, "mode": "card"}),
            _ => json!({"resident": fid}),
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
        send(how, &format!("del-{round}"), del);
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..600)));
        gate.signal_daemon("KILL");
        swiper.join().unwrap();
        let acked_ok = |c: &str| {
            bms.replies.lock().unwrap().iter().any(|(k, v)| k.as_deref() == Some(c.as_bytes()) && v["ok"] == true)
        };
        r.upsert = acked_ok(&format!("up-{round}"));
        r.mode = acked_ok(&format!("mode-{round}"));
        r.consent = acked_ok(&format!("consent-{round}"));
        r.deletion = acked_ok(&format!("del-{round}"));
        acked.insert(round, r);
    }
    let loop_secs = t0.elapsed().as_secs_f64();

    // A last start settles the deletions and drains everything; then a clean stop.
    gate.start_daemon();
    assert_eq!(gate.relay("front")["relay_energized"], false);
    assert!(
        wait_for(Duration::from_secs(60), || {
            let st = gate.status().unwrap();
            st["outbox_depth"] == 0 && st["deletions_pending"] == 0
        }),
        "{}",
        gate.log()
    );
    let last = gate.status().unwrap()["next_seq"].as_u64().unwrap() - 1;
    assert!(bms.all_events_arrived(last, Duration::from_secs(30)), "not every event arrived");
    let identity = bms.messages("/identity").pop().expect("the identity is published");
    let receipt_key = menshen::privacy::receipt::parse_public_key(identity["receipt_key"].as_str().unwrap()).unwrap();
    let st = gate.signal_daemon("TERM");
    assert!(st.success());

    // No seq with two contents; no id on two seqs.
    let all = bms.events();
    let by_seq = common::events_by_seq(&all);
    let mut by_id: HashMap<String, u64> = HashMap::new();
    for v in &all {
        let (seq, id) = (v["seq"].as_u64().unwrap(), v["id"].as_str().unwrap().to_string());
        assert_eq!(*by_id.entry(id).or_insert(seq), seq, "one id, two seqs");
    }
    // Receipts: each verifies against the published key; one per template (one receipt id per
    // key id, even when a kill repeated the deletion).
    let mut receipts: HashMap<String, (String, String)> = HashMap::new(); // resident -> (key id, receipt id)
    for v in by_seq.values().filter(|v| v["privacy"] == "template_deleted") {
        let parsed = menshen::privacy::Receipt::from_json(&v.to_string()).unwrap();
        parsed.verify(&receipt_key).unwrap_or_else(|e| panic!("receipt does not verify: {e}: {v}"));
        let r = &v["receipt"];
        let (res, kid, rid) =
            (r["resident"].as_str().unwrap(), r["key_id"].as_str().unwrap(), r["receipt_id"].as_str().unwrap());
        let prev = receipts.insert(res.to_string(), (kid.to_string(), rid.to_string()));
        assert!(prev.is_none(), "{res}: two receipts for one template: {prev:?} and {kid}/{rid}");
    }

    // Every acknowledged command is in the store as acknowledged.
    let listed = gate.resident_modes();
    let export = |id: &str| -> Option<Value> {
        let o = gate.resident(&["export", id]);
        ok(&o).then(|| serde_json::from_slice(&o.stdout).unwrap())
    };
    let keys_dir = gate.dir.path().join("state/keys");
    let key_files: HashSet<String> = std::fs::read_dir(&keys_dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    let (mut ups, mut modes, mut consents, mut deletions, mut held) = (0, 0, 0, 0, 0);
    for (round, r) in &acked {
        let id = format!("cr-{round}");
        if r.mode {
            modes += 1;
            assert_eq!(
                listed.get(&id).map(String::as_str),
                Some("face_or_card"),
                "{id}: acknowledged mode change lost"
            );
        }
        if r.upsert {
            ups += 1;
            assert!(listed.contains_key(&id), "{id}: acknowledged upsert lost");
        }
        if r.consent {
            consents += 1;
            let e = export(&id).unwrap_or_else(|| panic!("{id}: acknowledged consent, resident gone"));
            assert_eq!(e["face_consent"]["retention_days"], 60, "{id}: acknowledged consent lost: {e}");
            assert_eq!(e["face_consent"]["rules_version"], version, "{id}: {e}");
        }
        let (fid, how) = r.face.clone().unwrap();
        // The template is held, or gone with exactly one receipt; never gone silently.
        let stored = export(&fid).is_some_and(|e| e["face_template"]["stored"] == true);
        let receipt = receipts.get(&fid);
        assert!(stored != receipt.is_some(), "{fid}: template stored {stored}, receipt {receipt:?}");
        if let Some((kid, _)) = receipt {
            assert!(!key_files.iter().any(|f| f.starts_with(kid.as_str())), "{fid}: receipted, key file {kid} kept");
        } else {
            held += 1;
        }
        if r.deletion {
            deletions += 1;
            assert!(!stored, "{fid}: acknowledged deletion ({how}) left the template");
            match how {
                "resident.remove" => assert!(!listed.contains_key(&fid), "{fid}: acknowledged removal lost"),
                "resident.set_mode" => assert_eq!(listed.get(&fid).map(String::as_str), Some("card"), "{fid}"),
                _ => assert!(export(&fid).unwrap()["face_consent"].is_null(), "{fid}: acknowledged withdrawal lost"),
            }
        }
    }
    let audit = gate.cli(&["audit", "verify", "--config", gate.config.to_str().unwrap()]);
    assert!(ok(&audit), "the audit chain broke: {}", String::from_utf8_lossy(&audit.stdout));
    eprintln!(
        "crash loop: {rounds} rounds (seed {seed}) in {loop_secs:.1} s ({enrol_secs:.1} s of CLI enrolment, \
         {refused_photos} photos refused by the quality gate); acknowledged and present: {ups} upserts, {modes} \
         mode changes, {consents} consents, {deletions} deletions; {} receipts, all valid, one per template; \
         {held} templates still held (deletion never reached the gate); {} events (seq 1..={last}) delivered, \
         {} messages with duplicates, none conflicting",
        receipts.len(),
        by_seq.len(),
        all.len()
    );
    assert!(ups > 0 && modes > 0 && consents > 0 && deletions > 0, "the loop never got a command through");
}
