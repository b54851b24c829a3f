#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The README's demo (`menshen demo --once`): the whole gate on simulated hardware with its own
//! broker, what a BMS sees, and the scripted BMS exchange that ends in a verified deletion receipt.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn demo(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let models = common::shared_models();
    let mut c = Command::new(common::BIN);
    c.arg("demo").args(args).current_dir(cwd);
    c.env("MENSHEN_ORT_LIB", root.join("target/menshen-runtime/lib/libonnxruntime.so.1.31.1"));
    c.env("MENSHEN_MODELS_DIR", &models);
    c.env("MENSHEN_DATA_DIR", models.join("../data"));
    c.env("MENSHEN_MOSQUITTO", common::mosquitto_bin());
    c.env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// The `BMS ◀ <suffix>` lines of the demo's output, parsed.
fn bms_lines<'a>(out: &'a str, suffix: &str) -> Vec<&'a str> {
    let prefix = format!("  BMS ◀ {suffix} ");
    out.lines().filter_map(|l| l.strip_prefix(prefix.as_str())).collect()
}

#[test]
fn the_demo_shows_the_gate_and_what_the_bms_sees_then_ends_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(dir.path(), &["--once"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let all = format!("{stdout}\n--- stderr\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{all}");

    // The decisions reach the BMS as events, with the door's retained state beside them.
    let access = bms_lines(&stdout, "event/access");
    let card_grant = access.iter().any(|l| l.contains(r#""decision":"granted""#) && l.contains(r#""method":"card""#));
    let face_grant = access.iter().any(|l| l.contains(r#""decision":"granted""#) && l.contains(r#""method":"face""#));
    assert!(card_grant, "no card grant on event/access:\n{all}");
    assert!(face_grant, "no face grant on event/access:\n{all}");
    for reason in ["unknown_card", "parity_error", "credential_expired", "mode_requires_face"] {
        assert!(access.iter().any(|l| l.contains(reason)), "no denial {reason}:\n{all}");
    }
    assert!(bms_lines(&stdout, "event/alarm").iter().any(|l| l.contains("door_forced")), "{all}");
    assert!(bms_lines(&stdout, "event/door").iter().any(|l| l.contains(r#""cause":"daemon_start""#)), "{all}");
    assert!(bms_lines(&stdout, "status").iter().any(|l| l.contains(r#""state":"online""#)), "{all}");
    assert!(bms_lines(&stdout, "state/lock/front").iter().any(|l| l.contains("UNLOCKED")), "{all}");

    // The scripted exchange: every command answered ok, and the receipt that follows face off.
    let replies = bms_lines(&stdout, "reply");
    for verb in ["rules.get", "consent.record", "resident.set_mode"] {
        let r = replies.iter().find(|l| l.contains(&format!(r#""command":"{verb}""#)));
        assert!(r.is_some_and(|l| l.contains(r#""ok":true"#)), "{verb} not answered ok:\n{all}");
    }
    let privacy = bms_lines(&stdout, "event/privacy");
    assert!(privacy.iter().any(|l| l.contains("consent_recorded") && l.contains("r-1002")), "{all}");
    assert!(privacy.iter().any(|l| l.contains("template_deleted") && l.contains("r-1004")), "{all}");
    assert!(stdout.contains("receipt valid: gate site1/gate1 destroyed the face template of r-1004"), "{all}");

    // The receipt the demo saved verifies with the CLI, and a changed byte does not.
    let receipt = dir.path().join("menshen-demo/receipt-r-1004.json");
    let cfg = dir.path().join("menshen-demo/menshen.toml");
    let verify =
        |f: &Path| Command::new(common::BIN).arg("verify-receipt").arg(f).arg("--config").arg(&cfg).output().unwrap();
    let ok = verify(&receipt);
    assert!(ok.status.success(), "{ok:?}");
    let text = std::fs::read_to_string(&receipt).unwrap().replace("r-1004", "r-1005");
    let forged = dir.path().join("forged.json");
    std::fs::write(&forged, text).unwrap();
    assert_eq!(verify(&forged).status.code(), Some(1));

    // The demo's broker went with it: its port no longer answers.
    let port: u16 = stdout
        .split("own on 127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|p| p.parse().ok())
        .expect("the demo names its broker's port");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "the demo left mosquitto running on {port}");
}

#[test]
fn without_photos_or_a_broker_the_demo_says_what_is_off_and_how_to_turn_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = demo(
        dir.path(),
        &["--once", "--no-script"],
        &[("MENSHEN_DATA_DIR", "/nonexistent"), ("MENSHEN_MOSQUITTO", "")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    let face_off = stdout.lines().find(|l| l.starts_with("Face part off")).expect("a face-off line");
    assert!(face_off.contains("MENSHEN_DEMO_PHOTOS") && face_off.contains("never shipped"), "{face_off}");
    let bms_off = stdout.lines().find(|l| l.starts_with("BMS view off")).expect("a BMS-off line");
    assert!(bms_off.contains("apt-get install mosquitto"), "{bms_off}");
    assert!(!stdout.contains("BMS ◀"), "{stdout}");
}
