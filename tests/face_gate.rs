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

/// `face.enrol` over MQTT: the resident stands in front of this gate's camera; the template is
/// made, sealed and stored on the gate; nothing biometric goes out; the resident is then
/// recognised. Refused without consent, for a face that matches someone else (without naming
/// them), with no face in view (saying why), while another enrolment runs, and site-wide; other
/// commands are answered meanwhile.
#[test]
fn a_resident_enrols_at_the_gate_camera_over_mqtt() {
    use common::Bms;
    use serde_json::json;
    use std::time::Instant;
    let broker = Broker::start(common::free_port());
    let mut gate = Gate::new(GateOpts { mqtt_port: broker.port, pulse_ms: 300, ..Default::default() });
    let cam = gate.dir.path().join("camera");
    gate.enable_face(&cam, 8.0);
    ok(gate.resident(&["add", "alice", "--mode", "face_or_card", "--card", "H10301:7:1001"]));
    ok(gate.resident(&["consent", "alice"]));
    let mut a = vec!["enrol-face".to_string(), "alice".into()];
    for p in ["Colin_Powell_0040", "Colin_Powell_0049"].map(lfw) {
        a.extend(["--photo".to_string(), p.display().to_string()]);
    }
    ok(gate.resident(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    ok(gate.resident(&["add", "dave", "--mode", "face_or_card", "--card", "H10301:7:1004"]));
    ok(gate.resident(&["add", "frank", "--mode", "face_or_card", "--card", "H10301:7:1006"]));
    ok(gate.resident(&["consent", "frank"]));
    // The camera first sees an empty scene: a plain grey frame.
    let grey = gate.dir.path().join("grey.png");
    image_grey(&grey);
    show(&cam, std::slice::from_ref(&grey));
    let sub = Subscriber::start(broker.port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect(broker.port);
    assert!(wait_for(Duration::from_secs(30), || gate.status().is_some_and(|s| s["camera"] == "ok")), "{}", gate.log());
    let send = |verb: &str, payload: Value| -> String {
        let corr = bms.corr();
        let topic = format!("menshen/v1/site1/gate1/cmd/{verb}");
        bms.publish(&topic, payload.to_string().into_bytes(), Some(corr.as_bytes()), None, false);
        corr
    };
    let reply = |corr: &str, secs: u64| -> Value {
        bms.reply_within(corr.as_bytes(), Duration::from_secs(secs))
            .unwrap_or_else(|| panic!("no reply within {secs} s; log:\n{}", gate.log()))
    };

    // No consent yet: refused before the camera is used.
    let r = reply(&send("face.enrol", json!({"resident": "dave"})), 10);
    assert_eq!((r["ok"].as_bool(), r["code"].as_str()), (Some(false), Some("invalid_value")), "{r}");
    assert!(r["message"].as_str().unwrap().contains("consent"), "{r}");
    let rules = bms.command("site1", "gate1", "rules.get", json!({}), None);
    let consent = json!({"resident": "dave", "rules_version": rules["result"]["version"], "rules_sha256": rules["result"]["sha256"]});
    assert_eq!(bms.command("site1", "gate1", "consent.record", consent, None)["ok"], true);

    // No face in view: it fails at its timeout and says why; a second enrolment meanwhile is busy,
    // other commands are answered at once, and a site-wide enrolment is refused.
    let t0 = Instant::now();
    let first = send("face.enrol", json!({"resident": "dave", "timeout_ms": 3000}));
    std::thread::sleep(Duration::from_millis(200));
    let second = reply(&send("face.enrol", json!({"resident": "frank"})), 10);
    assert_eq!(second["code"], "busy", "{second}");
    let health = bms.command("site1", "gate1", "health.get", json!({}), None);
    assert_eq!(health["ok"], true);
    assert!(t0.elapsed() < Duration::from_millis(2500), "health.get waited for the enrolment: {:?}", t0.elapsed());
    let corr = bms.corr();
    bms.publish(
        "menshen/v1/site1/_site/cmd/face.enrol",
        json!({"resident": "dave"}).to_string().into_bytes(),
        Some(corr.as_bytes()),
        None,
        false,
    );
    let site_wide = reply(&corr, 10);
    assert_eq!(site_wide["ok"], false, "{site_wide}");
    let nothing = reply(&first, 15);
    assert_eq!(
        (nothing["ok"].as_bool(), nothing["code"].as_str()),
        (Some(false), Some("enrolment_failed")),
        "{nothing}"
    );
    assert!(nothing["message"].as_str().unwrap().contains("no face"), "{nothing}");

    // Alice's face cannot become Frank's, and the reply does not say whose it is.
    show(&cam, &["Colin_Powell_0095", "Colin_Powell_0133"].map(lfw));
    let dup = reply(&send("face.enrol", json!({"resident": "frank", "frames": 2})), 20);
    assert_eq!(dup["code"], "enrolment_failed", "{dup}");
    assert!(dup["message"].as_str().unwrap().contains("another enrolled resident"), "{dup}");
    assert!(!dup.to_string().contains("alice"), "the reply names who the face belongs to: {dup}");

    // Dave in front of the camera: enrolled, nothing biometric in the reply or the event.
    show(&cam, &["Tony_Blair_0018", "Tony_Blair_0032", "Tony_Blair_0048"].map(lfw));
    std::thread::sleep(Duration::from_secs(2)); // he steps up to the camera before the operator starts
    let done = reply(&send("face.enrol", json!({"resident": "dave", "frames": 2})), 20);
    assert_eq!(done["ok"], true, "{done}");
    let result = done["result"].as_object().unwrap();
    assert_eq!(result.keys().cloned().collect::<Vec<_>>(), ["frames_seen", "key_id", "resident"], "{done}");
    assert_eq!(result["key_id"].as_str().unwrap().len(), 32, "{done}");
    let enrolled =
        sub.wait_events("privacy", Duration::from_secs(10), |e| e.iter().any(|e| e["privacy"] == "template_enrolled"));
    let ev = enrolled.iter().find(|e| e["privacy"] == "template_enrolled").unwrap();
    assert_eq!(ev["resident"], "dave");
    common::schema::validate("event-privacy.json", ev).unwrap();
    common::schema::validate("reply.json", &done).unwrap();
    // And the gate now knows him: his face opens the door (face_or_card).
    let ev = sub.wait_events("access", Duration::from_secs(60), |e| e.iter().any(|e| e["resident"] == "dave"));
    let d = ev.iter().find(|e| e["resident"] == "dave").unwrap_or_else(|| panic!("log:\n{}", gate.log()));
    assert_eq!((d["method"].as_str(), d["decision"].as_str()), (Some("face"), Some("granted")), "{d}");
    // Nothing biometric went out on any topic.
    for (topic, msg, _) in sub.all() {
        for k in ["embedding", "template", "image", "jpeg", "score"] {
            assert!(msg.get(k).is_none(), "{topic} carries {k}");
        }
    }
    assert_eq!(gate.signal_daemon("TERM").code(), Some(0));
    let export: Value = serde_json::from_slice(&gate.resident(&["export", "dave"]).stdout).unwrap();
    assert_eq!(export["face_template"]["stored"], true, "{export}");
    let frank: Value = serde_json::from_slice(&gate.resident(&["export", "frank"]).stdout).unwrap();
    assert_eq!(frank["face_template"]["stored"], false, "{frank}");
}

/// A 320×240 mid-grey PNG: a camera frame with no face.
fn image_grey(path: &Path) {
    let img = image::RgbImage::from_pixel(320, 240, image::Rgb([128, 128, 128]));
    img.save(path).unwrap();
}
