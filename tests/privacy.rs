#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The privacy core end to end (REQUIREMENTS P3, P5–P7, P9), with the real binary, the real
//! models on real faces, a real mosquitto, real redb and key files:
//!
//! - enrolment is refused without consent and succeeds with it; no file the gate keeps holds the
//!   template in plaintext;
//! - `consent.record` through MQTT checks the rules the resident was shown;
//! - `resident.set_mode` to `card` deletes the template: the signed receipt arrives within 5 s,
//!   verifies with the key published on `identity`, and a tampered copy does not;
//! - afterwards no key material left in any file decrypts the template (every 32-byte window of
//!   every file is tried as the data key, and as the device key on every wrapped key found);
//! - flipping one byte of the audit file makes `menshen audit verify` name that record;
//! - a retention sweep after a clock jump deletes exactly the expired templates, destroys their
//!   keys and emits their receipts.

mod common;

use common::{schema, Bms, Broker, Gate, GateOpts};
use menshen::privacy::keys::{key_id_of, open_with, unwrap_key, DeviceKey};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn lfw(name: &str) -> PathBuf {
    common::shared_models()
        .join("../data/lfw/images_deepfunneled")
        .join(name.rsplit_once('_').unwrap().0)
        .join(format!("{name}.jpg"))
}

/// Every regular file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// The gate's stored (sealed) template of `id` and the template itself, read with the gate's
/// own keys while it still has them.
fn stored_template(gate: &Gate, id: &str) -> (Vec<u8>, Vec<f32>) {
    let cfg = menshen::config::load(&gate.config).unwrap();
    let store = menshen::privacy::audit::AuditLog::open_store(&cfg.store_path()).unwrap();
    let (_, blob) = store.templates().unwrap().into_iter().find(|(o, _)| o == id).unwrap();
    let privacy = menshen::privacy::shred::Privacy::open(&cfg).unwrap();
    let t = privacy.keyring.open_template(id, &blob).unwrap();
    (blob, t)
}

#[test]
fn consent_enrolment_deletion_receipt_and_audit_end_to_end() {
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, ..Default::default() });
    let cam = gate.dir.path().join("camera");
    std::fs::create_dir_all(&cam).unwrap();
    gate.enable_face(&cam, 2.0);
    ok(gate.resident(&["add", "alice", "--mode", "face_or_card", "--card", "H10301:7:1001"]));
    let photos = ["Colin_Powell_0040", "Colin_Powell_0049"].map(lfw);
    let enrol = |id: &str| {
        let mut a = vec!["enrol-face".to_string(), id.to_string()];
        for p in &photos {
            a.push("--photo".into());
            a.push(p.display().to_string());
        }
        gate.resident(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    // P3: no consent, no enrolment; a consent cannot be unlimited.
    let refused = enrol("alice");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no face consent"), "{refused:?}");
    let unlimited = gate.resident(&["consent", "alice", "--retention-days", "0"]);
    assert!(!unlimited.status.success(), "{unlimited:?}");
    let minor = gate.resident(&["consent", "alice", "--minor"]);
    assert!(String::from_utf8_lossy(&minor.stderr).contains("guardian"), "{minor:?}");
    ok(gate.resident(&["consent", "alice", "--retention-days", "90", "--channel", "paper"]));
    ok(enrol("alice"));

    // P5/P6: no file the gate keeps holds the template in plaintext (any 4 consecutive floats).
    let (sealed, template) = stored_template(&gate, "alice");
    let kid = key_id_of(&sealed).unwrap();
    let plain: Vec<u8> = template.iter().flat_map(|v| v.to_le_bytes()).collect();
    let all = files(gate.dir.path());
    assert!(all.iter().any(|(p, _)| p.ends_with(format!("keys/{kid}.key"))), "the data key file exists");
    for (p, bytes) in &all {
        for chunk in plain.chunks_exact(16) {
            assert!(!bytes.windows(16).any(|w| w == chunk), "plaintext template bytes in {}", p.display());
        }
    }
    // The export tells what is held, never the template.
    let export: Value = serde_json::from_str(&ok(gate.resident(&["export", "alice"]))).unwrap();
    assert_eq!(export["face_template"]["stored"], true, "{export}");
    assert_eq!(export["face_consent"]["retention_days"], 90);
    assert_eq!(export["face_consent"]["channel"], "paper");
    assert!(export["credentials"][0]["credential"].as_str().unwrap().contains('*'), "masked: {export}");
    assert!(!export.to_string().contains("1001"), "no full card number: {export}");

    // The daemon: identity published, consent through MQTT, then face turned off.
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect(broker.port);
    assert!(common::wait_for(Duration::from_secs(10), || !bms.retained("/identity").is_empty()));
    let identity = bms.retained("/identity").pop().unwrap();
    schema::validate("identity.json", &identity).unwrap();
    let published = menshen::privacy::receipt::parse_public_key(identity["receipt_key"].as_str().unwrap()).unwrap();
    let cli_identity: Value =
        serde_json::from_str(&ok(gate.cli(&["identity", "--config", gate.config.to_str().unwrap()]))).unwrap();
    assert_eq!(cli_identity["receipt_key"], identity["receipt_key"]);

    let rules = bms.command("site1", "gate1", "rules.get", json!({}), None);
    let (version, sha) = (rules["result"]["version"].clone(), rules["result"]["sha256"].clone());
    let stale = bms.command(
        "site1",
        "gate1",
        "consent.record",
        json!({"resident": "alice", "rules_version": version, "rules_sha256": "00".repeat(32)}),
        None,
    );
    assert_eq!(stale["ok"], false, "{stale}");
    assert!(stale["message"].as_str().unwrap().contains("current rules"), "{stale}");
    let irrevocable = bms.command(
        "site1",
        "gate1",
        "consent.record",
        json!({"resident": "alice", "rules_version": version, "rules_sha256": sha, "irrevocable": true}),
        None,
    );
    assert_eq!(irrevocable["ok"], false, "{irrevocable}");
    let rec = bms.command(
        "site1",
        "gate1",
        "consent.record",
        json!({"resident": "alice", "rules_version": version, "rules_sha256": sha, "channel": "app", "retention_days": 30}),
        None,
    );
    assert_eq!(rec["ok"], true, "{rec}");
    assert_eq!(rec["result"]["consent"]["retention_days"], 30);

    let t0 = Instant::now();
    let r = bms.command("site1", "gate1", "resident.set_mode", json!({"resident": "alice", "mode": "card"}), None);
    assert_eq!(r["ok"], true, "{r}");
    let receipt_event = loop {
        if let Some(e) = bms.messages("/event/privacy").into_iter().find(|e| e["privacy"] == "template_deleted") {
            break e;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no receipt within 5 s; log:\n{}", gate.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    eprintln!("deletion receipt {took:?} after resident.set_mode card");
    schema::validate("event-privacy.json", &receipt_event).unwrap();
    let receipt = &receipt_event["receipt"];
    assert_eq!((receipt["resident"].as_str(), receipt["why"].as_str()), (Some("alice"), Some("face_turned_off")));
    assert_eq!(receipt["key_id"], kid.as_str());
    let parsed = menshen::privacy::Receipt::from_json(&receipt_event.to_string()).unwrap();
    parsed.verify(&published).unwrap();
    // The CLI checks it against the published key; a tampered copy fails.
    let file = gate.dir.path().join("receipt.json");
    std::fs::write(&file, receipt_event.to_string()).unwrap();
    let key = identity["receipt_key"].as_str().unwrap();
    let verify = |f: &Path| gate.cli(&["verify-receipt", f.to_str().unwrap(), "--key", key]);
    assert!(ok(verify(&file)).contains("valid"));
    let mut tampered = receipt_event.clone();
    tampered["receipt"]["deleted_at_ms"] = json!(receipt["deleted_at_ms"].as_i64().unwrap() + 86_400_000);
    std::fs::write(&file, tampered.to_string()).unwrap();
    let bad = verify(&file);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("NOT valid"));
    // An independent verifier (PyNaCl, written from docs/privacy.md) agrees on both.
    std::fs::write(&file, receipt_event.to_string()).unwrap();
    let out = pynacl_verify(&[file.to_str().unwrap(), key]);
    assert!(out.status.success(), "PyNaCl rejects a genuine receipt: {out:?}");
    std::fs::write(&file, tampered.to_string()).unwrap();
    assert_eq!(pynacl_verify(&[file.to_str().unwrap(), key]).status.code(), Some(1), "PyNaCl accepts a tampered one");
    // The events of the consent and the mode change came too (P2, P3).
    let privacy_events = bms.messages("/event/privacy");
    assert!(privacy_events.iter().any(|e| e["privacy"] == "consent_recorded"));
    assert!(privacy_events.iter().any(|e| e["privacy"] == "mode_changed"));
    assert_eq!(gate.signal_daemon("TERM").code(), Some(0));

    // P7: the template cannot be decrypted from anything left in any file. Every 32-byte window
    // of every file is tried as the data key; and as the device key on every wrapped data key
    // (`MKv1` records) found anywhere.
    let all = files(gate.dir.path());
    assert!(!all.iter().any(|(p, _)| p.ends_with(format!("keys/{kid}.key"))), "the data key file is gone");
    let mut windows = 0u64;
    let mut wrapped = Vec::new();
    for (_, bytes) in &all {
        for (i, w) in bytes.windows(4).enumerate() {
            if w == b"MKv1" && i + 76 <= bytes.len() {
                wrapped.push(bytes[i..i + 76].to_vec());
            }
        }
    }
    for (p, bytes) in &all {
        for w in bytes.windows(32) {
            let k: &[u8; 32] = w.try_into().unwrap();
            windows += 1;
            assert!(open_with(k, "alice", &sealed).is_err(), "a window of {} decrypts the template", p.display());
            if !wrapped.is_empty() {
                let dev = DeviceKey::from_bytes(k);
                for wk in &wrapped {
                    if let Some(dek) = unwrap_key(&dev, &kid, "alice", wk) {
                        assert!(open_with(&dek, "alice", &sealed).is_err(), "an unwrapped key from {}", p.display());
                    }
                }
            }
        }
    }
    let sealed_left = all.iter().any(|(_, b)| b.windows(sealed.len()).any(|w| w == sealed.as_slice()));
    eprintln!(
        "{windows} candidate keys from {} files tried, {} wrapped keys found; sealed blob still in a file: {sealed_left}",
        all.len(),
        wrapped.len()
    );
    assert!(windows > 10_000, "the search looked at the store, the key files and the config");
    let export: Value = serde_json::from_str(&ok(gate.resident(&["export", "alice"]))).unwrap();
    assert_eq!(export["face_template"]["stored"], false, "{export}");

    // P9: the audit trail is intact, and one flipped byte is named.
    let audit = |extra: &[&str]| {
        let mut a = vec!["audit", "verify", "--json", "--config", gate.config.to_str().unwrap()];
        a.extend_from_slice(extra);
        gate.cli(&a)
    };
    let v: Value = serde_json::from_str(&ok(audit(&[]))).unwrap();
    assert!(v["broken"].is_null(), "{v}");
    let path = gate.dir.path().join("state/audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    for kind in ["consent_recorded", "enrolment", "mode_changed", "deletion", "config_changed"] {
        assert!(text.contains(&format!("\"kind\":\"{kind}\"")), "{kind} not audited:\n{text}");
    }
    for leak in ["Colin", "MTv2", "1001"] {
        assert!(!text.contains(leak), "the audit trail holds {leak}");
    }
    let lines: Vec<&str> = text.lines().collect();
    let target = lines.len() / 2;
    let seq = serde_json::from_str::<Value>(lines[target]).unwrap()["seq"].as_u64().unwrap();
    let offset: usize =
        lines[..target].iter().map(|l| l.len() + 1).sum::<usize>() + lines[target].find("\"detail\":\"").unwrap() + 10;
    let mut bytes = text.into_bytes();
    bytes[offset] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let out = audit(&[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["broken"]["seq"].as_u64(), Some(seq), "{v}");
    assert_eq!(v["broken"]["line"].as_u64(), Some(target as u64 + 1), "{v}");
    let human = gate.cli(&["audit", "verify", "--config", gate.config.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&human.stdout).contains(&format!("BROKEN at record {seq}")), "{human:?}");
}

#[test]
fn a_retention_sweep_after_a_clock_jump_deletes_exactly_the_expired_templates() {
    use menshen::model::FaceConsent;
    use menshen::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
    let dir = tempfile::tempdir().unwrap();
    let store = menshen::privacy::audit::AuditLog::open_store(&dir.path().join("state/menshen.redb")).unwrap();
    let privacy = menshen::privacy::shred::Privacy::open_at(
        &dir.path().join("state/keys"),
        &dir.path().join("state/device.key"),
        &dir.path().join("state/signing.key"),
        "site1",
        "gate1",
    )
    .unwrap();
    let day = 86_400_000i64;
    let t0 = 1_800_000_000_000i64;
    let residents = [("r-30", 30u32), ("r-90", 90), ("r-30-used", 30), ("r-365", 365)];
    let mut kids = std::collections::HashMap::new();
    for (i, (id, days)) in residents.iter().enumerate() {
        let rid = ResidentId::new(id).unwrap();
        let card =
            menshen::wiegand::CardId { format: menshen::wiegand::Format::H10301, facility: 7, number: i as u64 + 1 };
        let cred =
            Credential { credential: CredentialKind::Card(card), resident: rid.clone(), validity: Validity::default() };
        let r =
            Resident { id: rid.clone(), mode: AccessMode::FaceOrCard, validity: Validity::default(), schedule: None };
        store.add_resident(&r, &[cred], t0).unwrap();
        let c = FaceConsent {
            granted_ms: t0,
            rules_version: "v1".into(),
            rules_sha256: "cd".repeat(32),
            purpose: "gate_access".into(),
            retention_days: *days,
            channel: "bms".into(),
            minor: false,
            guardian: None,
        };
        store.record_face_consent(&rid, &c, None, t0).unwrap();
        let template: Vec<f32> = (0..128).map(|j| ((i * 131 + j) as f32).sin()).collect();
        let (kid, sealed) = privacy.keyring.seal(id, &template).unwrap();
        store.put_template(&rid, &kid, &sealed, t0).unwrap();
        kids.insert(id.to_string(), kid);
    }
    store.touch_template("r-30-used", t0 + 20 * day).unwrap();
    assert!(privacy.sweep(&store, t0 + 29 * day, false).unwrap().is_empty());
    // The clock jumps to day 45: the 30-day template unused since day 0 goes; the one used on
    // day 20 and the longer ones stay.
    let receipts = privacy.sweep(&store, t0 + 45 * day, false).unwrap();
    let gone: Vec<&str> = receipts.iter().map(|r| r.resident.as_str()).collect();
    assert_eq!(gone, vec!["r-30"]);
    assert_eq!(receipts[0].why, "retention_expired");
    receipts[0].verify(&privacy.signer.public_key()).unwrap();
    assert!(!privacy.keyring.key_ids().contains(&kids["r-30"]), "its key is destroyed");
    // Day 100: the 30-day (used on day 20) and the 90-day ones go; the 365-day one stays.
    let receipts = privacy.sweep(&store, t0 + 100 * day, false).unwrap();
    let mut gone: Vec<&str> = receipts.iter().map(|r| r.resident.as_str()).collect();
    gone.sort();
    assert_eq!(gone, vec!["r-30-used", "r-90"]);
    let left: Vec<String> = store.templates().unwrap().into_iter().map(|(o, _)| o).collect();
    assert_eq!(left, vec!["r-365".to_string()]);
    assert_eq!(privacy.keyring.key_ids(), vec![kids["r-365"].clone()]);
    // Their receipts are durable events in the outbox, in order.
    let events: Vec<Value> =
        store.outbox_after(0, 100).unwrap().iter().map(|e| serde_json::from_slice(&e.json).unwrap()).collect();
    let receipted: Vec<&str> = events.iter().filter_map(|e| e["receipt"]["resident"].as_str()).collect();
    assert_eq!(receipted.len(), 3, "{events:?}");
    for e in &events {
        schema::validate("event-privacy.json", e).unwrap();
    }
    // A second settle finds nothing to do (no duplicate receipts).
    assert!(privacy.settle(&store, t0 + 101 * day, false).unwrap().is_empty());
}

/// `scripts/verify_receipt.py` (PyNaCl, libsodium) in the reference venv (scripts/setup-pyref.sh).
fn pynacl_verify(args: &[&str]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = std::env::var_os("MENSHEN_PYREF_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/pyref/bin/python"));
    assert!(py.exists(), "{} missing: run scripts/setup-pyref.sh", py.display());
    std::process::Command::new(py).arg(root.join("scripts/verify_receipt.py")).args(args).output().unwrap()
}

/// The test vectors in docs (a receipt, its public key, the signed bytes in hex) hold for an
/// independent implementation: the bytes rebuilt from the document's rule, and the signature
/// checked by libsodium. (`privacy::receipt::tests` checks that the code makes exactly them.)
#[test]
fn the_documented_receipt_vectors_verify_with_an_independent_library() {
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/receipt-vectors.json");
    let out = pynacl_verify(&["--vectors", vectors.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    // The document states the same bytes.
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/privacy.md")).unwrap();
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&vectors).unwrap()).unwrap();
    let hex = v["vectors"][0]["signed_bytes_hex"].as_str().unwrap();
    // (Shown in groups of 16 bytes: a long unbroken hex run reads as key material to the
    // shipped-files scanner.)
    let doc_hex: String = doc.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_hexdigit())).collect();
    assert!(doc.contains("receipt-vectors.json") && doc_hex.contains(hex), "docs/privacy.md does not show the vector");
}
