//! Home Assistant MQTT discovery (REQUIREMENTS M5): the retained configs a real HA would read,
//! and the unlock button's command template rendered by Jinja (as HA does) into a command the
//! gate accepts, while the LOCK payload renders into one it refuses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Broker, Gate, GateOpts, Subscriber};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Render an HA template with Jinja2, `value` bound and HA's `now()` provided.
fn render(template: &str, value: &str) -> String {
    let script = "import sys, datetime, jinja2\n\
                  env = jinja2.Environment()\n\
                  env.globals['now'] = datetime.datetime.now\n\
                  sys.stdout.write(env.from_string(sys.stdin.read()).render(value=sys.argv[1]))\n";
    let mut child = Command::new("python3")
        .args(["-c", script, value])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with jinja2 (scripts/setup-deps.sh installs python3-jinja2)");
    child.stdin.take().unwrap().write_all(template.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "jinja2 failed");
    String::from_utf8(out.stdout).unwrap()
}

fn configs(sub: &Subscriber) -> Vec<(String, Value)> {
    sub.all().into_iter().filter(|(t, _, r)| *r && t.ends_with("/config")).map(|(t, v, _)| (t, v)).collect()
}

#[test]
fn discovery_configs_and_the_unlock_button_work() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let ha = t["homeassistant"].as_table_mut().unwrap();
        ha.insert("enabled".into(), true.into());
        ha.insert("allow_unlock".into(), true.into());
    });
    gate.start_sim();
    gate.start_daemon();
    std::thread::sleep(Duration::from_millis(500));
    // A late subscriber (like HA starting after the gate) still gets every config: they are retained.
    let sub = Subscriber::start(port, "homeassistant/#");
    assert!(wait_for(Duration::from_secs(5), || configs(&sub).len() >= 3), "{:?}", sub.all());
    let cfgs = configs(&sub);
    let find = |kind: &str| {
        cfgs.iter().find(|(t, _)| t.starts_with(&format!("homeassistant/{kind}/"))).map(|(_, v)| v.clone())
    };
    let lock = find("lock").expect("a lock entity");
    let door = find("binary_sensor").expect("a door sensor");
    let event = find("event").expect("an access event entity");
    assert_eq!(lock["command_topic"], "menshen/v1/site1/gate1/cmd/unlock");
    assert_eq!(lock["state_topic"], "menshen/v1/site1/gate1/state/lock/front");
    assert_eq!(door["device_class"], "door");
    assert_eq!(door["state_topic"], "menshen/v1/site1/gate1/state/door/front");
    assert_eq!(event["state_topic"], "menshen/v1/site1/gate1/event/access");
    for v in [&lock, &door, &event] {
        assert_eq!(v["availability"][0]["topic"], "menshen/v1/site1/gate1/status");
        assert_eq!(v["device"]["identifiers"][0], "menshen_site1_gate1");
        assert!(v["unique_id"].as_str().unwrap().starts_with("menshen_site1_gate1"));
    }
    // HA renders the lock's value template over the retained state: LOCKED now.
    let state = Subscriber::start(port, "menshen/v1/site1/gate1/state/lock/front");
    assert!(wait_for(Duration::from_secs(5), || !state.all().is_empty()));
    assert_eq!(state.all()[0].1["state"], "LOCKED");

    // The UNLOCK button: the rendered template is a valid, expiring, unique command.
    let template = lock["command_template"].as_str().unwrap();
    let cmd = render(template, "UNLOCK");
    let v: Value = serde_json::from_str(&cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(v["request_id"].as_str().unwrap().starts_with("ha-"));
    let writes = gate.relay_writes("front");
    let mut o = rumqttc::MqttOptions::new("ha-test", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    std::thread::spawn(move || for _ in conn.iter() {});
    client.publish("menshen/v1/site1/gate1/cmd/unlock", rumqttc::QoS::AtLeastOnce, false, cmd.clone()).unwrap();
    assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == true), "{}", gate.log());
    assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == false));
    let after_unlock = gate.relay_writes("front");
    assert!(after_unlock > writes);
    // The same rendered command again (HA replaying a message): refused.
    client.publish("menshen/v1/site1/gate1/cmd/unlock", rumqttc::QoS::AtLeastOnce, false, cmd).unwrap();
    // LOCK renders `{}`: refused, nothing moves.
    let lock_cmd = render(template, "LOCK");
    assert_eq!(lock_cmd.trim(), "{}");
    client.publish("menshen/v1/site1/gate1/cmd/unlock", rumqttc::QoS::AtLeastOnce, false, lock_cmd).unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        let r = &gate.status().unwrap()["stats"]["command_rejections"];
        r["duplicate_request"] == 1 && r["missing_request_id"] == 1
    }));
    assert_eq!(gate.relay_writes("front"), after_unlock);
    let _ = client.disconnect();
}

#[test]
fn without_allow_unlock_the_lock_is_read_only() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, ..GateOpts::default() });
    gate.edit_config(|t| {
        t["homeassistant"].as_table_mut().unwrap().insert("enabled".into(), true.into());
    });
    gate.start_sim();
    gate.start_daemon();
    let sub = Subscriber::start(port, "homeassistant/#");
    assert!(wait_for(Duration::from_secs(5), || configs(&sub).len() >= 3));
    let cfgs = configs(&sub);
    assert!(!cfgs.iter().any(|(t, _)| t.starts_with("homeassistant/lock/")), "no lock entity with a command topic");
    assert!(cfgs.iter().all(|(_, v)| v.get("command_topic").is_none()));
    assert!(cfgs.iter().any(|(t, v)| t.ends_with("front_lock/config") && v["device_class"] == "lock"));
}
