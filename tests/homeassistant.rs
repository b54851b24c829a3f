//! Home Assistant MQTT discovery (REQUIREMENTS M5): the retained configs a real HA reads, with
//! every template rendered the way HA renders it — Jinja's `ImmutableSandboxedEnvironment`, which
//! refuses a `range` over 100,000 — against the gate's real messages. The run against Home
//! Assistant itself is `scripts/ha-real.sh` (docs/mqtt.md, "Home Assistant").
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Broker, Gate, GateOpts, Subscriber};
use menshen::hw::sim::WorldOp;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROOT: &str = "menshen/v1/site1/gate1/";

/// Render `(template, value)` pairs as HA does: a sandboxed environment, `value` and (when it is
/// JSON) `value_json` bound, `now()` time-zone aware. Each result is the text or the error.
fn render_all(pairs: &[(String, String)]) -> Vec<Result<String, String>> {
    let script = r#"
import sys, json, datetime
from jinja2.sandbox import ImmutableSandboxedEnvironment
env = ImmutableSandboxedEnvironment()
env.globals['now'] = lambda: datetime.datetime.now(datetime.timezone.utc).astimezone()
out = []
for template, value in json.load(sys.stdin):
    ctx = {'value': value}
    try:
        ctx['value_json'] = json.loads(value)
    except ValueError:
        pass
    try:
        out.append({'ok': env.from_string(template).render(**ctx)})
    except Exception as e:
        out.append({'err': type(e).__name__ + ': ' + str(e)})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with jinja2 (scripts/setup-deps.sh installs python3-jinja2)");
    child.stdin.take().unwrap().write_all(serde_json::to_string(pairs).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the render script failed");
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|r| match r.get("ok") {
            Some(s) => Ok(s.as_str().unwrap().to_string()),
            None => Err(r["err"].as_str().unwrap().to_string()),
        })
        .collect()
}

fn render(template: &str, value: &str) -> String {
    render_all(&[(template.into(), value.into())]).remove(0).unwrap_or_else(|e| panic!("{template}: {e}"))
}

/// The retained discovery configs, by topic (the last one seen for each).
fn configs(sub: &Subscriber) -> HashMap<String, Value> {
    sub.all().into_iter().filter(|(t, v, _)| t.ends_with("/config") && !v.is_null()).map(|(t, v, _)| (t, v)).collect()
}

/// The last payload seen on a topic, as text.
fn last_on(sub: &Subscriber, topic: &str) -> Option<String> {
    sub.all().into_iter().rev().find(|(t, _, _)| t == topic).map(|(_, v, _)| v.to_string())
}

fn gate_with_ha(port: u16, allow_unlock: bool) -> Gate {
    let gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let ha = t["homeassistant"].as_table_mut().unwrap();
        ha.insert("enabled".into(), true.into());
        ha.insert("allow_unlock".into(), allow_unlock.into());
    });
    gate
}

#[test]
fn every_template_renders_in_the_sandbox_and_the_open_button_works() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = gate_with_ha(port, true);
    let added = gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    let msgs = Subscriber::start(port, "menshen/v1/#");
    gate.start_sim();
    gate.start_daemon();
    // A late subscriber (like HA starting after the gate) still gets every config: they are retained.
    assert!(wait_for(Duration::from_secs(10), || last_on(&msgs, &format!("{ROOT}summary")).is_some()));
    let sub = Subscriber::start(port, "homeassistant/#");
    // One door with a contact: lock, open, door, alarm, 2 triggers; the gate: 2 events, an alarm
    // trigger per alarm code, connectivity, 4 diagnostic sensors.
    let codes = menshen::events::alarm_codes();
    let expected = 6 + 2 + codes.len() + 1 + 4;
    assert!(wait_for(Duration::from_secs(5), || configs(&sub).len() >= expected), "{:?}", configs(&sub).keys());
    let cfgs = configs(&sub);
    assert_eq!(cfgs.len(), expected, "{:?}", cfgs.keys());
    let node = "homeassistant/{kind}/menshen_site1_gate1";
    let get = |kind: &str, object: &str| {
        let topic = format!("{}/{object}/config", node.replace("{kind}", kind));
        cfgs.get(&topic).cloned().unwrap_or_else(|| panic!("no {topic}"))
    };
    assert!(
        !cfgs.keys().any(|t| t.starts_with("homeassistant/lock/")),
        "no lock entity: a strike cannot stay unlocked"
    );
    let mut unique = HashSet::new();
    for (topic, c) in &cfgs {
        assert_eq!(c["qos"], 1, "{topic}: HA must send and subscribe at QoS 1");
        assert_eq!(c["device"]["identifiers"][0], "menshen_site1_gate1", "{topic}");
        if c.get("automation_type").is_none() {
            assert!(unique.insert(c["unique_id"].as_str().unwrap().to_string()), "{topic}: unique_id repeated");
            let has_avail = c.get("availability").is_some();
            assert_eq!(has_avail, !topic.ends_with("/connectivity/config"), "{topic}");
        }
        assert!(c.get("command_topic").is_none() || topic.starts_with("homeassistant/button/"), "{topic}");
    }

    // A forced door: the alarm event, and the problem sensor on, then off when the door closes.
    gate.world(WorldOp::Door { door: "front".into(), open: true });
    assert!(!msgs.wait_events("alarm", Duration::from_secs(10), |e| !e.is_empty()).is_empty(), "{}", gate.log());
    let alarm = get("binary_sensor", "front_alarm");
    assert_eq!(alarm["device_class"], "problem");
    let alarm_topic = alarm["state_topic"].as_str().unwrap().to_string();
    assert_eq!(alarm_topic, format!("{ROOT}state/alarm/front"));
    let problem =
        |sub: &Subscriber| last_on(sub, &alarm_topic).map(|p| render(alarm["value_template"].as_str().unwrap(), &p));
    assert!(wait_for(Duration::from_secs(5), || problem(&msgs).as_deref() == Some("ON")), "{:?}", problem(&msgs));
    let attrs: Value = serde_json::from_str(&render(
        alarm["json_attributes_template"].as_str().unwrap(),
        &last_on(&msgs, &alarm_topic).unwrap(),
    ))
    .unwrap();
    assert_eq!(attrs, json!({"forced": true, "held_open": false, "fire_release": false}));
    let door = get("binary_sensor", "front_door");
    let door_open = last_on(&msgs, door["state_topic"].as_str().unwrap()).unwrap();
    assert_eq!(render(door["value_template"].as_str().unwrap(), &door_open), "ON");
    let alarm_event = last_on(&msgs, &format!("{ROOT}event/alarm")).unwrap();
    gate.world(WorldOp::Door { door: "front".into(), open: false });
    assert!(wait_for(Duration::from_secs(5), || problem(&msgs).as_deref() == Some("OFF")), "the problem clears");

    // A granted swipe: the access event entity, the last-decision sensor, the device triggers.
    gate.swipe(7, 12345);
    assert!(!msgs.wait_events("access", Duration::from_secs(10), |e| !e.is_empty()).is_empty());
    let access_event = last_on(&msgs, &format!("{ROOT}event/access")).unwrap();
    assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == false));

    // Every template of every config renders in the sandbox over the topic it reads.
    let status = last_on(&msgs, &format!("{ROOT}status")).unwrap();
    let mut pairs = Vec::new();
    let mut what = Vec::new();
    for (topic, c) in &cfgs {
        let read = c.get("state_topic").or(c.get("topic")).and_then(Value::as_str);
        if let (Some(t), Some(read)) = (c["value_template"].as_str(), read) {
            let payload = last_on(&msgs, read).unwrap_or_else(|| panic!("{topic}: nothing seen on {read}"));
            pairs.push((t.to_string(), payload));
            what.push(format!("{topic} value_template"));
        }
        if let (Some(t), Some(read)) = (c["json_attributes_template"].as_str(), c["json_attributes_topic"].as_str()) {
            pairs.push((t.to_string(), last_on(&msgs, read).unwrap()));
            what.push(format!("{topic} json_attributes_template"));
        }
        if let Some(t) = c["availability"][0]["value_template"].as_str() {
            pairs.push((t.to_string(), status.clone()));
            what.push(format!("{topic} availability"));
        }
        if let Some(t) = c["command_template"].as_str() {
            pairs.push((t.to_string(), c["payload_press"].as_str().unwrap().to_string()));
            what.push(format!("{topic} command_template"));
        }
    }
    let rendered: HashMap<String, String> = what
        .into_iter()
        .zip(render_all(&pairs))
        .map(|(w, r)| {
            let text = r.unwrap_or_else(|e| panic!("{w}: {e}"));
            (w, text)
        })
        .collect();
    assert!(rendered.len() >= expected, "{}", rendered.len());
    let r = |kind: &str, object: &str, key: &str| {
        rendered[&format!("{}/{object}/config {key}", node.replace("{kind}", kind))].clone()
    };
    assert_eq!(r("binary_sensor", "front_lock", "value_template"), "OFF", "locked again after the pulse");
    assert_eq!(r("binary_sensor", "front_door", "availability"), "online");
    assert_eq!(r("binary_sensor", "connectivity", "value_template"), "ON");
    assert!(r("sensor", "outbox_depth", "value_template").parse::<u64>().is_ok());
    assert!(!r("sensor", "camera", "value_template").is_empty());
    assert_eq!(r("sensor", "last_decision", "value_template"), "granted: granted (front)");
    // The access event: its type is one HA knows, and it does not name the resident (P8).
    let ev: Value = serde_json::from_str(&r("event", "access", "value_template")).unwrap();
    assert_eq!(ev, json!({"event_type": "granted", "reason": "granted", "method": "card", "door": "front"}));
    assert!(access_event.contains("r-1"), "the raw event carries the opaque id; the entity does not");
    let alarm_cfg = get("event", "alarm");
    let ev: Value = serde_json::from_str(&render(alarm_cfg["value_template"].as_str().unwrap(), &alarm_event)).unwrap();
    assert_eq!(ev["event_type"], "door_forced");
    assert_eq!(ev["door"], "front");
    let types: Vec<&str> = alarm_cfg["event_types"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(types, codes);
    // Device triggers: the granted one fires on this event, the denied one does not; one alarm
    // trigger matches the forced door.
    let fires = |c: &Value, payload: &str| render(c["value_template"].as_str().unwrap(), payload) == c["payload"];
    assert!(fires(&get("device_automation", "front_granted"), &access_event));
    assert!(!fires(&get("device_automation", "front_denied"), &access_event));
    let matching: Vec<String> = codes
        .iter()
        .filter(|code| fires(&get("device_automation", &format!("alarm_{code}")), &alarm_event))
        .map(|c| c.to_string())
        .collect();
    assert_eq!(matching, ["door_forced"]);

    // The test's environment is HA's sandbox: the earlier template's range(1000000) fails here.
    let old = render_all(&[("{{ range(1000000) | random }}".into(), "UNLOCK".into())]).remove(0);
    assert!(old.unwrap_err().contains("OverflowError"), "the sandbox's MAX_RANGE applies");

    // The open button: two presses render two fresh request ids, and each pulses the relay.
    let button = get("button", "front_open");
    assert_eq!(button["command_topic"], format!("{ROOT}cmd/unlock"));
    let template = button["command_template"].as_str().unwrap();
    let presses = render_all(&[(template.into(), "PRESS".into()), (template.into(), "PRESS".into())]);
    let presses: Vec<String> = presses.into_iter().map(Result::unwrap).collect();
    let ids: Vec<Value> =
        presses.iter().map(|p| serde_json::from_str::<Value>(p).unwrap()["request_id"].clone()).collect();
    assert_ne!(ids[0], ids[1], "every press is a new request");
    assert!(ids.iter().all(|id| id.as_str().unwrap().starts_with("ha-front-")));
    let mut o = rumqttc::MqttOptions::new("ha-test", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    std::thread::spawn(move || for _ in conn.iter() {});
    for cmd in &presses {
        let before = gate.relay_writes("front");
        client.publish(format!("{ROOT}cmd/unlock"), rumqttc::QoS::AtLeastOnce, false, cmd.clone()).unwrap();
        assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == true), "{}", gate.log());
        assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == false));
        assert!(gate.relay_writes("front") >= before + 2);
    }
    // A press replayed (the same message again): refused, nothing moves.
    let after = gate.relay_writes("front");
    client.publish(format!("{ROOT}cmd/unlock"), rumqttc::QoS::AtLeastOnce, false, presses[0].clone()).unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        gate.status().unwrap()["stats"]["command_rejections"]["duplicate_request"] == 1
    }));
    assert_eq!(gate.relay_writes("front"), after);

    // Home Assistant comes back online: the gate publishes discovery again.
    let live =
        |sub: &Subscriber| sub.all().iter().filter(|(t, v, r)| t.ends_with("/config") && !r && !v.is_null()).count();
    assert_eq!(live(&sub), 0);
    client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "online").unwrap();
    assert!(wait_for(Duration::from_secs(5), || live(&sub) >= expected), "{}", live(&sub));
    // Anything else on the birth topic is ignored (the marker after it shows it was handled).
    let seen = live(&sub);
    client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "offline").unwrap();
    client.publish("homeassistant/status", rumqttc::QoS::AtLeastOnce, false, "online").unwrap();
    assert!(wait_for(Duration::from_secs(3), || gate.log().contains("discovery not repeated")), "{}", gate.log());
    assert_eq!(live(&sub), seen, "a second online within 5 s is not repeated");
    let _ = client.disconnect();
}

#[test]
fn without_allow_unlock_nothing_can_command_the_gate() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = gate_with_ha(port, false);
    gate.start_sim();
    gate.start_daemon();
    let sub = Subscriber::start(port, "homeassistant/#");
    // The same as with the button, less the button.
    let expected = 5 + 2 + menshen::events::alarm_codes().len() + 1 + 4;
    assert!(wait_for(Duration::from_secs(5), || configs(&sub).len() >= expected));
    let cfgs = configs(&sub);
    assert_eq!(cfgs.len(), expected, "{:?}", cfgs.keys());
    assert!(!cfgs.keys().any(|t| t.starts_with("homeassistant/button/")), "no open button");
    assert!(cfgs.values().all(|v| v.get("command_topic").is_none()));
    assert!(cfgs.iter().any(|(t, v)| t.ends_with("front_lock/config") && v["device_class"] == "lock"));
    assert!(cfgs.iter().any(|(t, v)| t.ends_with("front_alarm/config") && v["device_class"] == "problem"));
}
