//! The MQTT command API against a real mosquitto and the real daemon on the simulated chip:
//! every command's success path, a table of bad inputs (each refused with its code, the roster
//! unchanged and the relay untouched), and replays that must never move the relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Bms, Broker, Gate, GateOpts};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::time::Duration;

const SITE: &str = "site1";
const GATE: &str = "gate1";

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn up(port: u16) -> (Broker, Gate, Bms) {
    let broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 400, ..GateOpts::default() });
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect(port);
    // The gate is subscribed once its retained online status is out.
    assert!(
        wait_for(Duration::from_secs(10), || bms.retained("/status").iter().any(|v| v["state"] == "online")),
        "gate never came online; log:\n{}",
        gate.log()
    );
    std::thread::sleep(Duration::from_millis(200));
    (broker, gate, bms)
}

fn ok(reply: &Value) -> &Value {
    assert_eq!(reply["ok"], true, "{reply}");
    &reply["result"]
}

fn granted_for(bms: &Bms, card: u64) -> bool {
    bms.messages("/event/access").iter().any(|e| e["card"]["number"] == card && e["decision"] == "granted")
}

#[test]
fn every_command_succeeds_over_mqtt5_and_mqtt311() {
    let port = free_port();
    let (_broker, gate, bms) = up(port);
    let cmd = |verb: &str, p: Value| bms.command(SITE, GATE, verb, p, None);

    // resident.upsert with a card: the card opens the door.
    let r = cmd(
        "resident.upsert",
        json!({"resident": {"id": "r1", "mode": "card",
        "cards": [{"format": "H10301", "facility": 7, "number": 100}]}}),
    );
    assert_eq!(ok(&r)["created"], true);
    assert_eq!(r["command"], "resident.upsert");
    assert_eq!((r["site"].as_str(), r["gate"].as_str()), (Some(SITE), Some(GATE)));
    gate.swipe(7, 100);
    assert!(wait_for(Duration::from_secs(5), || granted_for(&bms, 100)), "{}", gate.log());

    // credential.add, then the second card opens too.
    ok(&cmd("credential.add", json!({"resident": "r1", "card": {"format": "H10301", "facility": 7, "number": 101}})));
    gate.swipe(7, 101);
    assert!(wait_for(Duration::from_secs(5), || granted_for(&bms, 101)));

    // resident.set_mode: the resident's own choice, confirmed by a privacy event.
    let r = cmd("resident.set_mode", json!({"resident": "r1", "mode": "face_or_card"}));
    assert_eq!(ok(&r)["previous_mode"], "card");
    assert!(wait_for(Duration::from_secs(5), || bms
        .messages("/event/privacy")
        .iter()
        .any(|e| e["privacy"] == "mode_changed" && e["resident"] == "r1" && e["to_mode"] == "face_or_card")));

    // credential.remove: one card goes, the other still opens.
    let r = cmd("credential.remove", json!({"card": {"format": "H10301", "facility": 7, "number": 101}}));
    assert_eq!(ok(&r)["resident"], "r1");
    let before = bms.messages("/event/access").len();
    gate.swipe(7, 101);
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() > before));
    assert!(bms.messages("/event/access").iter().any(|e| e["card"]["number"] == 101 && e["reason"] == "unknown_card"));

    // unlock: the relay moves for the asked duration; the event names the request.
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == false));
    let writes = gate.relay_writes("front");
    let r = bms.command(SITE, GATE, "unlock", json!({"door": "front", "duration_ms": 600}), Some(10));
    assert_eq!(ok(&r)["duration_ms"], 600);
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == true));
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == false));
    assert!(gate.relay_writes("front") >= writes + 2, "{writes} -> {}", gate.relay("front"));
    assert!(wait_for(Duration::from_secs(5), || bms
        .messages("/event/access")
        .iter()
        .any(|e| e["reason"] == "remote_unlock" && e["method"] == "remote" && e["request_id"] == r["request_id"])));
    // The retained lock state follows.
    assert!(bms.messages("/state/lock/front").iter().any(|v| v["state"] == "UNLOCKED"));
    assert_eq!(bms.messages("/state/lock/front").last().unwrap()["state"], "LOCKED");

    // rules.get: version, text and its SHA-256.
    let r = cmd("rules.get", json!({}));
    let res = ok(&r);
    let sha: String =
        Sha256::digest(res["text"].as_str().unwrap().as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(res["sha256"], sha);
    assert!(res["version"].as_str().unwrap().starts_with("builtin"));

    // health.get: the numbers an operator needs.
    let r = cmd("health.get", json!({}));
    let h = ok(&r);
    for k in ["uptime_s", "outbox_depth", "store_bytes", "camera", "rejected", "events_delivered"] {
        assert!(!h[k].is_null(), "health lacks {k}: {h}");
    }
    assert!(h["store_bytes"].as_u64().unwrap() > 0);
    common::schema::validate("health.json", h).unwrap();

    // roster.sync: a full snapshot replaces the roster atomically; the same snapshot again is fine.
    let snap = json!({"version": 5, "residents": [
        {"id": "r2", "mode": "face_or_card", "cards": [{"format": "H10301", "facility": 7, "number": 200}]},
        {"id": "r3", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 300}]}]});
    let r = cmd("roster.sync", snap.clone());
    assert_eq!(ok(&r)["residents"], 2);
    let fp = gate.fingerprint();
    let r = cmd("roster.sync", snap);
    assert_eq!(ok(&r)["residents"], 2);
    assert_eq!(gate.fingerprint(), fp, "the same snapshot twice: the same roster");
    assert_eq!(gate.status().unwrap()["roster_version"], 5);
    let before = bms.messages("/event/access").len();
    gate.swipe(7, 100);
    gate.swipe(7, 300);
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/event/access").len() >= before + 2));
    let acc = bms.messages("/event/access");
    assert!(acc[before..].iter().any(|e| e["card"]["number"] == 100 && e["reason"] == "unknown_card"), "r1 gone");
    assert!(acc[before..].iter().any(|e| e["card"]["number"] == 300 && e["decision"] == "granted"));

    // resident.remove.
    let r = cmd("resident.remove", json!({"resident": "r3"}));
    assert_eq!(ok(&r)["credentials_removed"], 1);

    // events.backfill: stored events come again, marked backfill, with their ids.
    let first: Vec<Value> = bms.messages("/event/access");
    let r = cmd("events.backfill", json!({"from_seq": 1, "limit": 5}));
    let res = ok(&r).clone();
    assert_eq!(res["count"], 5);
    assert_eq!(res["first_seq"], 1);
    assert!(wait_for(Duration::from_secs(5), || bms
        .msgs
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, v, _)| t.contains("/event/") && v["backfill"] == true && v["seq"].as_u64().unwrap() <= 5)
        .count()
        >= 5));
    let again =
        bms.msgs.lock().unwrap().iter().find(|(_, v, _)| v["seq"] == 1 && v["backfill"] == true).unwrap().1.clone();
    let orig =
        bms.msgs.lock().unwrap().iter().find(|(_, v, _)| v["seq"] == 1 && v["backfill"] == false).map(|m| m.1.clone());
    if let Some(o) = orig {
        assert_eq!(o["id"], again["id"], "a re-sent event keeps its id");
    }
    assert!(!first.is_empty());

    // Site-wide: a roster command on menshen/v1/{site}/_site/cmd/ reaches this gate.
    let r = bms.command(SITE, "_site", "resident.upsert", json!({"resident": {"id": "site-r", "mode": "card"}}), None);
    assert_eq!(ok(&r)["resident"], "site-r");
    // ... but an unlock is per gate.
    let r = bms.command(SITE, "_site", "unlock", json!({"door": "front"}), Some(5));
    assert_eq!(r["code"], "invalid_value");

    // MQTT 3.1.1 fallback: request_id and reply_to in the payload.
    let mut o = rumqttc::MqttOptions::new(format!("bms311-{}", free_port()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::Client::new(o, 100);
    client.subscribe("bms/311/replies", rumqttc::QoS::AtLeastOnce).unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let g = got.clone();
    let suback = std::sync::Arc::new(std::sync::Mutex::new(false));
    let s = suback.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => *s.lock().unwrap() = true,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    g.lock().unwrap().push(serde_json::from_slice(&p.payload).unwrap_or(Value::Null))
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    assert!(wait_for(Duration::from_secs(5), || *suback.lock().unwrap()));
    let p = json!({"request_id": "v311-1", "reply_to": "bms/311/replies", "resident": "site-r", "mode": "card"});
    client
        .publish(
            format!("menshen/v1/{SITE}/{GATE}/cmd/resident.set_mode"),
            rumqttc::QoS::AtLeastOnce,
            false,
            p.to_string(),
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(5), || !got.lock().unwrap().is_empty()), "{}", gate.log());
    let r = got.lock().unwrap()[0].clone();
    assert_eq!(r["request_id"], "v311-1");
    assert_eq!(r["ok"], true, "{r}");
    let _ = client.disconnect();

    // Every reply and event seen so far is valid against the published schemas.
    common::schema::check_all(&bms);
}

/// One bad input: how to send it and the code it must get.
struct Bad {
    name: &'static str,
    verb: &'static str,
    payload: Vec<u8>,
    expiry: Option<u32>,
    retain: bool,
    correlation: bool,
    code: &'static str,
}

fn bad(name: &'static str, verb: &'static str, payload: &str, code: &'static str) -> Bad {
    Bad { name, verb, payload: payload.as_bytes().to_vec(), expiry: None, retain: false, correlation: true, code }
}

/// A bad input given as bytes, with an MQTT 5 message expiry or without correlation data.
fn bad_bytes(
    name: &'static str,
    verb: &'static str,
    payload: Vec<u8>,
    expiry: Option<u32>,
    correlation: bool,
    code: &'static str,
) -> Bad {
    Bad { name, verb, payload, expiry, retain: false, correlation, code }
}

#[test]
fn bad_inputs_get_an_error_reply_and_change_nothing() {
    let port = free_port();
    let (_broker, gate, bms) = up(port);
    // A roster to protect: a face_or_card resident with one card, a card resident.
    ok(&bms.command(
        SITE,
        GATE,
        "roster.sync",
        json!({"version": 3, "residents": [
        {"id": "f1", "mode": "face_or_card", "cards": [{"format": "H10301", "facility": 1, "number": 1}]},
        {"id": "c1", "mode": "card", "cards": [{"format": "H10301", "facility": 1, "number": 2}]}]}),
        None,
    ));
    let fp = gate.fingerprint();
    let writes = gate.relay_writes("front");
    let past = now_ms() - 1_000;
    let far = now_ms() + 3_600_000;
    let deep = format!("{{\"door\":{}1{}}}", "[".repeat(40), "]".repeat(40));
    let mut table = vec![
        bad("unknown command", "open.sesame", "{}", "unknown_command"),
        bad("invalid JSON", "health.get", "{\"request_id\":", "invalid_json"),
        bad("empty payload", "resident.remove", "", "invalid_json"),
        bad("not an object", "resident.remove", "[\"f1\"]", "not_an_object"),
        bad("a string", "resident.remove", "\"f1\"", "not_an_object"),
        bad("unknown field", "resident.remove", r#"{"resident":"c1","force":true}"#, "unknown_field"),
        bad(
            "unknown nested field",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":1,"number":9,"pin":1}}"#,
            "unknown_field",
        ),
        bad("missing field", "resident.set_mode", r#"{"resident":"c1"}"#, "missing_field"),
        bad("missing card", "credential.add", r#"{"resident":"c1"}"#, "missing_field"),
        bad("wrong type: mode number", "resident.set_mode", r#"{"resident":"c1","mode":1}"#, "wrong_type"),
        bad("wrong type: resident number", "resident.remove", r#"{"resident":42}"#, "wrong_type"),
        bad(
            "wrong type: facility string",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":"1","number":3}}"#,
            "wrong_type",
        ),
        bad(
            "negative number",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":1,"number":-3}}"#,
            "invalid_value",
        ),
        bad("unknown mode", "resident.set_mode", r#"{"resident":"c1","mode":"face_only"}"#, "invalid_value"),
        bad("bad resident id", "resident.remove", r#"{"resident":"../etc"}"#, "invalid_value"),
        bad(
            "card out of range",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":256,"number":3}}"#,
            "invalid_value",
        ),
        bad(
            "unknown format",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H99999","facility":1,"number":3}}"#,
            "invalid_value",
        ),
        bad(
            "raw card",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"Raw","facility":26,"number":3}}"#,
            "invalid_value",
        ),
        bad("too deep", "unlock", &deep, "too_deep"),
        bad("unknown resident", "resident.set_mode", r#"{"resident":"ghost","mode":"card"}"#, "unknown_resident"),
        bad(
            "unknown resident for a card",
            "credential.add",
            r#"{"resident":"ghost","card":{"format":"H10301","facility":1,"number":3}}"#,
            "unknown_resident",
        ),
        bad(
            "unknown credential",
            "credential.remove",
            r#"{"card":{"format":"H10301","facility":9,"number":9}}"#,
            "unknown_credential",
        ),
        bad(
            "card of another resident",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":1,"number":1}}"#,
            "credential_taken",
        ),
        bad(
            "Art. 10: last card of a face user",
            "credential.remove",
            r#"{"card":{"format":"H10301","facility":1,"number":1}}"#,
            "face_only_refused",
        ),
        bad(
            "Art. 10: face mode without a card",
            "resident.upsert",
            r#"{"resident":{"id":"n1","mode":"face_and_card"}}"#,
            "face_only_refused",
        ),
        bad(
            "Art. 10: cards emptied",
            "resident.upsert",
            r#"{"resident":{"id":"f1","mode":"face_or_card","cards":[]}}"#,
            "face_only_refused",
        ),
        bad(
            "Art. 10: roster with a face-only resident",
            "roster.sync",
            r#"{"version":9,"residents":[{"id":"x","mode":"face_or_card"}]}"#,
            "face_only_refused",
        ),
        bad("stale roster version", "roster.sync", r#"{"version":2,"residents":[]}"#, "stale_version"),
        bad("same version, other content", "roster.sync", r#"{"version":3,"residents":[]}"#, "version_conflict"),
        bad(
            "duplicate resident in roster",
            "roster.sync",
            r#"{"version":9,"residents":[{"id":"a","mode":"card"},{"id":"a","mode":"card"}]}"#,
            "invalid_value",
        ),
        bad(
            "bad validity window",
            "resident.upsert",
            r#"{"resident":{"id":"v","mode":"card","validity":{"valid_from_ms":10,"valid_until_ms":5}}}"#,
            "invalid_value",
        ),
        bad("expired command", "resident.remove", &format!(r#"{{"resident":"c1","expires_at":{past}}}"#), "expired"),
        bad("expires_at not a number", "resident.remove", r#"{"resident":"c1","expires_at":"soon"}"#, "wrong_type"),
        bad("unlock without expiry", "unlock", r#"{"door":"front"}"#, "expiry_required"),
        bad(
            "unlock expiring too late",
            "unlock",
            &format!(r#"{{"door":"front","expires_at":{far}}}"#),
            "expiry_too_far",
        ),
        bad(
            "unlock of an unknown door",
            "unlock",
            &format!(r#"{{"door":"back","expires_at":{}}}"#, now_ms() + 20_000),
            "unknown_door",
        ),
        bad(
            "unlock too long",
            "unlock",
            &format!(r#"{{"door":"front","duration_ms":600000,"expires_at":{}}}"#, now_ms() + 20_000),
            "invalid_value",
        ),
        bad(
            "unlock of zero ms",
            "unlock",
            &format!(r#"{{"door":"front","duration_ms":0,"expires_at":{}}}"#, now_ms() + 20_000),
            "invalid_value",
        ),
        bad("backfill limit too large", "events.backfill", r#"{"from_seq":1,"limit":1000000}"#, "invalid_value"),
        bad("request_id not a string", "health.get", r#"{"request_id":5}"#, "wrong_type"),
        bad("request_id with spaces", "health.get", r#"{"request_id":"a b"}"#, "invalid_request_id"),
        // The `cd:` and `cdx:` prefixes are reserved for ids made from correlation data.
        bad("request_id in the correlation namespace", "health.get", r#"{"request_id":"cd:x"}"#, "invalid_request_id"),
        bad(
            "request_id in the binary correlation namespace",
            "health.get",
            r#"{"request_id":"cdx:ca"}"#,
            "invalid_request_id",
        ),
        // A BMS-side validator may read the first `door`, the gate the last: refused.
        bad("duplicate key", "resident.remove", r#"{"resident":"c1","resident":"f1"}"#, "duplicate_key"),
        bad(
            "duplicate nested key",
            "credential.add",
            r#"{"resident":"c1","card":{"format":"H10301","facility":1,"facility":2,"number":9}}"#,
            "duplicate_key",
        ),
        bad("fields where none are taken", "health.get", r#"{"verbose":true}"#, "unknown_field"),
        bad("wrong type: from_seq string", "events.backfill", r#"{"from_seq":"1"}"#, "wrong_type"),
        bad("wrong type: card number list", "credential.remove", r#"{"card":[1,2]}"#, "wrong_type"),
    ];
    table.extend([
        bad_bytes(
            "invalid UTF-8",
            "resident.remove",
            b"{\"resident\":\"\xff\xfe\"}".to_vec(),
            None,
            true,
            "invalid_utf8",
        ),
        bad_bytes(
            "oversize payload",
            "roster.sync",
            format!("{{\"version\":10,\"residents\":[],\"pad\":\"{}\"}}", "x".repeat(1 << 20)).into_bytes(),
            None,
            true,
            "payload_too_large",
        ),
        bad_bytes(
            "unlock with too long a message expiry",
            "unlock",
            br#"{"door":"front"}"#.to_vec(),
            Some(3_600),
            true,
            "expiry_too_far",
        ),
        bad_bytes(
            "no request id at all",
            "resident.remove",
            br#"{"resident":"c1","reply_to":"placeholder"}"#.to_vec(),
            None,
            false,
            "missing_request_id",
        ),
    ]);
    assert!(table.len() >= 25);

    for b in &table {
        let topic = format!("menshen/v1/{SITE}/{GATE}/cmd/{}", b.verb);
        let corr = bms.corr();
        let payload = if b.correlation {
            b.payload.clone()
        } else {
            String::from_utf8(b.payload.clone()).unwrap().replace("placeholder", &bms.reply_topic).into_bytes()
        };
        let c = b.correlation.then_some(corr.as_bytes());
        bms.publish(&topic, payload, c, b.expiry, b.retain);
        let reply = if b.correlation {
            bms.reply_for(corr.as_bytes())
        } else {
            let mut found = None;
            wait_for(Duration::from_secs(10), || {
                found = bms.replies.lock().unwrap().iter().rev().find(|(c, _)| c.is_none()).map(|(_, v)| v.clone());
                found.is_some()
            });
            found
        };
        let reply = reply.unwrap_or_else(|| panic!("{}: no reply; log:\n{}", b.name, gate.log()));
        assert_eq!(reply["ok"], false, "{}: {reply}", b.name);
        assert_eq!(reply["code"], b.code, "{}: {reply}", b.name);
        let message = reply["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{}", b.name);
        // Said in the BMS's terms: field names and JSON types, never the parser's Rust wording.
        for serde_ism in
            ["invalid type:", "u64", "u32", "i64", "string or map", "there are no fields", "struct ", "variant "]
        {
            assert!(!message.contains(serde_ism), "{}: `{serde_ism}` in {message:?}", b.name);
        }
        assert_eq!(gate.fingerprint(), fp, "{}: the roster changed", b.name);
        assert_eq!(gate.relay_writes("front"), writes, "{}: the relay moved", b.name);
    }
    // Counted by code.
    let st = gate.status().unwrap();
    let counted: u64 =
        st["stats"]["command_rejections"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(counted >= table.len() as u64, "{st}");
    // Still healthy afterwards: a good command works.
    ok(&bms.command(SITE, GATE, "health.get", json!({}), None));
    common::schema::check_all(&bms);
}

#[test]
fn replayed_or_retained_unlocks_never_move_the_relay() {
    let port = free_port();
    let broker = Broker::start(port);
    let bms = Bms::connect(port);
    // A retained unlock waiting on the broker before the gate subscribes.
    let exp = now_ms() + 60_000;
    bms.publish(
        &format!("menshen/v1/{SITE}/{GATE}/cmd/unlock"),
        format!(r#"{{"door":"front","request_id":"retained-1","expires_at":{exp}}}"#).into_bytes(),
        Some(b"retained-1"),
        None,
        true,
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 400, ..GateOpts::default() });
    gate.start_sim();
    gate.start_daemon();
    let r = bms.reply_for(b"retained-1").expect("the retained unlock is answered");
    assert_eq!(r["code"], "retained_command", "{r}");
    let writes0 = gate.relay_writes("front");
    assert_eq!(gate.relay("front")["relay_energized"], false);

    // A fresh unlock works once.
    let body = |id: &str| {
        format!(r#"{{"door":"front","duration_ms":300,"request_id":"{id}","expires_at":{}}}"#, now_ms() + 30_000)
    };
    let topic = format!("menshen/v1/{SITE}/{GATE}/cmd/unlock");
    bms.publish(&topic, body("u-1").into_bytes(), Some(b"c-1"), None, false);
    assert_eq!(bms.reply_for(b"c-1").unwrap()["ok"], true);
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == true));
    assert!(wait_for(Duration::from_secs(3), || gate.relay("front")["relay_energized"] == false));
    let writes1 = gate.relay_writes("front");
    assert!(writes1 > writes0);

    // The same request id again (a replay, even with a fresh expiry): refused, relay untouched.
    bms.publish(&topic, body("u-1").into_bytes(), Some(b"c-2"), None, false);
    assert_eq!(bms.reply_for(b"c-2").unwrap()["code"], "duplicate_request");
    // An expired one: refused.
    let old = format!(r#"{{"door":"front","request_id":"u-old","expires_at":{}}}"#, now_ms() - 5_000);
    bms.publish(&topic, old.into_bytes(), Some(b"c-3"), None, false);
    assert_eq!(bms.reply_for(b"c-3").unwrap()["code"], "expired");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.relay_writes("front"), writes1, "no replay moved the relay");

    // The request-id window survives a SIGKILL and restart.
    gate.signal_daemon("KILL");
    gate.start_daemon();
    assert!(wait_for(Duration::from_secs(10), || bms
        .messages("/status")
        .last()
        .is_some_and(|v| v["state"] == "online")));
    std::thread::sleep(Duration::from_millis(300));
    let w = gate.relay_writes("front");
    bms.publish(&topic, body("u-1").into_bytes(), Some(b"c-4"), None, false);
    assert_eq!(bms.reply_for(b"c-4").unwrap()["code"], "duplicate_request");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gate.relay_writes("front"), w, "a replay after restart did not move the relay");
    assert_eq!(gate.relay("front")["relay_energized"], false);
    drop(broker);
}

#[test]
fn login_and_the_brokers_receive_maximum_are_respected() {
    // A broker that wants a login; the gate asks for 100 in flight, mosquitto allows 20 (MQTT 5).
    let port = free_port();
    let _broker = Broker::start_with_login(port, "gate1", "pw-for-this-test");
    let mut gate = Gate::new(GateOpts { mqtt_port: port, ..GateOpts::default() });
    let pw = gate.dir.path().join("mqtt-password");
    std::fs::write(&pw, "pw-for-this-test\n").unwrap();
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    gate.edit_config(|t| {
        let m = t["mqtt"].as_table_mut().unwrap();
        m.insert("inflight".into(), 100.into());
        m.insert("username".into(), "gate1".into());
        m.insert("password_file".into(), pw.display().to_string().into());
    });
    gate.start_sim();
    gate.start_daemon();
    assert!(
        wait_for(Duration::from_secs(10), || gate.status().unwrap()["stats"]["mqtt_connects"] == 1),
        "{}",
        gate.log()
    );
    assert_eq!(gate.status().unwrap()["stats"]["mqtt_inflight"], 20);
    // Events still flow with the smaller window.
    for n in 0..30 {
        gate.swipe(3, n);
    }
    assert!(wait_for(Duration::from_secs(10), || gate.status().unwrap()["stats"]["events_delivered"]
        .as_u64()
        .unwrap()
        >= 30));
    assert_eq!(gate.status().unwrap()["outbox_depth"], 0);
}

#[test]
fn health_is_published_periodically() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, ..GateOpts::default() });
    gate.edit_config(|t| {
        t["mqtt"].as_table_mut().unwrap().insert("health_interval_secs".into(), 1.into());
    });
    gate.start_sim();
    gate.start_daemon();
    let bms = Bms::connect(port);
    // A refused command shows up in the counters of the next health message.
    let r = bms.command(SITE, GATE, "resident.remove", json!({"resident": "nobody"}), None);
    assert_eq!(r["code"], "unknown_resident");
    let counted = || {
        bms.messages("/health")
            .iter()
            .any(|h| h["rejected"]["commands"]["unknown_resident"] == 1 && h["mqtt_connected"] == true)
    };
    assert!(wait_for(Duration::from_secs(5), counted), "{:?}", bms.messages("/health"));
    assert!(wait_for(Duration::from_secs(5), || bms.messages("/health").len() >= 2), "not periodic");
    common::schema::check_all(&bms);
}

/// Correlation data (MQTT 5) stands in for a request id: at most 62 bytes, so that its id
/// (`cd:` + the text, or `cdx:` + hex for bytes that are not printable ASCII) fits the 128
/// characters every schema allows, in a namespace of its own.
#[test]
fn correlation_data_is_bounded_and_kept_apart_from_request_ids() {
    let port = free_port();
    let (_broker, gate, bms) = up(port);
    ok(&bms.command(SITE, GATE, "resident.upsert", json!({"resident": {"id": "c1", "mode": "card"}}), None));
    let topic = format!("menshen/v1/{SITE}/{GATE}/cmd/resident.set_mode");
    let size = |g: &Gate| std::fs::metadata(g.dir.path().join("state/menshen.redb")).unwrap().len();
    let before = size(&gate);

    // Printable correlation data: `cd:` + the text.
    let r = bms.command(SITE, GATE, "health.get", json!({}), None);
    assert!(r["request_id"].as_str().unwrap().starts_with("cd:req-"), "{r}");
    // The longest accepted: 62 bytes.
    let longest = "k".repeat(62);
    bms.publish(&topic, br#"{"resident":"c1","mode":"card"}"#.to_vec(), Some(longest.as_bytes()), None, false);
    let r = bms.reply_for(longest.as_bytes()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["request_id"], format!("cd:{longest}"));

    // Forty commands with 60,000 bytes of random correlation data each: refused, nothing stored.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for i in 0..40 {
        let corr: Vec<u8> = (0..60_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let upsert = format!("menshen/v1/{SITE}/{GATE}/cmd/resident.upsert");
        let p = json!({"resident": {"id": format!("big-{i}"), "mode": "card"}});
        bms.publish(&upsert, p.to_string().into_bytes(), Some(&corr), None, false);
        let r = bms.reply_for(&corr).unwrap_or_else(|| panic!("no reply to an oversize correlation data"));
        assert_eq!((r["ok"].as_bool(), r["code"].as_str()), (Some(false), Some("invalid_correlation_data")), "{r}");
        assert!(r["request_id"].is_null(), "no id is made from refused correlation data");
        assert!(r["message"].as_str().unwrap().contains("62"), "{r}");
    }
    for i in [0, 39] {
        let r = bms.command(SITE, GATE, "resident.remove", json!({"resident": format!("big-{i}")}), None);
        assert_eq!(r["code"], "unknown_resident", "an oversize command was carried out: {r}");
    }
    assert!(size(&gate) < before + 1_000_000, "the store grew from {before} to {} bytes", size(&gate));

    // Binary correlation data gets `cdx:` + hex; the same hex as a request_id is another id.
    bms.publish(&topic, br#"{"resident":"c1","mode":"card"}"#.to_vec(), Some(b"\xca\xfe"), None, false);
    let r = bms.reply_for(b"\xca\xfe").unwrap();
    assert_eq!(r["request_id"], "cdx:cafe", "{r}");
    let r = bms.command(
        SITE,
        GATE,
        "resident.set_mode",
        json!({"request_id": "cafe", "resident": "c1", "mode": "card"}),
        None,
    );
    assert_eq!(r["ok"], true, "`cafe` was taken by correlation data: {r}");
    assert_eq!(r["request_id"], "cafe");
    common::schema::check_all(&bms);
}

/// A command that would change nothing answers ok with `changed: false` and writes no event and
/// no audit record: a BMS that retries (with a new request id) leaves no trail of non-changes.
#[test]
fn a_command_that_changes_nothing_says_so_and_leaves_no_event_or_audit_record() {
    let port = free_port();
    let (_broker, gate, bms) = up(port);
    let cmd = |verb: &str, p: Value| bms.command(SITE, GATE, verb, p, None);
    ok(&cmd(
        "resident.upsert",
        json!({"resident": {"id": "r1", "mode": "card", "cards": [{"format": "H10301", "facility": 7, "number": 5}]}}),
    ));
    let audit =
        || std::fs::read_to_string(gate.dir.path().join("state/audit.jsonl")).unwrap_or_default().lines().count();
    // A real change first: it is an event and an audit record, and says `changed: true`.
    let r = cmd("resident.set_mode", json!({"resident": "r1", "mode": "face_or_card"}));
    assert_eq!(ok(&r)["changed"], true, "{r}");
    assert!(wait_for(Duration::from_secs(5), || bms
        .messages("/event/privacy")
        .iter()
        .any(|e| e["privacy"] == "mode_changed")));
    let (events, records) = (gate.status().unwrap()["next_seq"].as_u64().unwrap(), audit());
    assert!(records > 0);

    for _ in 0..5 {
        let r = cmd("resident.set_mode", json!({"resident": "r1", "mode": "face_or_card"}));
        assert_eq!(ok(&r)["changed"], false, "{r}");
        assert_eq!(ok(&r)["previous_mode"], "face_or_card", "{r}");
    }
    // Withdrawing a consent that was never given.
    for _ in 0..3 {
        let r = cmd("consent.withdraw", json!({"resident": "r1"}));
        assert_eq!(ok(&r)["changed"], false, "{r}");
        assert_eq!(ok(&r)["template_deleted"], false, "{r}");
    }
    // Nothing new: no event, no audit record (a health.get is neither).
    ok(&cmd("health.get", json!({})));
    assert_eq!(gate.status().unwrap()["next_seq"].as_u64().unwrap(), events, "events were written");
    assert_eq!(audit(), records, "audit records were written");
    assert!(!bms.messages("/event/privacy").iter().any(|e| e["privacy"] == "consent_withdrawn"));
    assert_eq!(bms.messages("/event/privacy").iter().filter(|e| e["privacy"] == "mode_changed").count(), 1);
}
