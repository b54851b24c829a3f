//! The gate against a real Home Assistant (pinned, from PyPI, in the venv `scripts/ha-real.sh`
//! makes): HA's MQTT integration set up through its REST config flow against a real mosquitto,
//! then everything docs/mqtt.md promises an HA user — the entities, the open button pulsing the
//! relay with fresh request ids, a replay refused, a forced door shown as a problem that clears,
//! the device trigger firing an automation, availability following the last will.
//!
//! Run: `scripts/ha-real.sh` (HA 2025.4.4 in a Debian 13 root; not in CI, see docs/mqtt.md).
#![cfg(feature = "ha-real")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{free_port, wait_for, Broker, Gate, GateOpts, Subscriber};
use menshen::hw::sim::WorldOp;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ROOT: &str = "menshen/v1/site1/gate1/";

struct Ha {
    child: Child,
    base: String,
    token: String,
    dir: tempfile::TempDir,
}

impl Drop for Ha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ha/ha_api.py")
}

impl Ha {
    fn start(mqtt_port: u16) -> Ha {
        let hass = PathBuf::from(std::env::var("MENSHEN_HA_HASS").expect("MENSHEN_HA_HASS: run scripts/ha-real.sh"));
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        std::fs::write(
            dir.path().join("configuration.yaml"),
            format!(
                "homeassistant:\n  name: menshen-test\n  time_zone: UTC\n  latitude: 0\n  longitude: 0\n  \
                 elevation: 0\n  unit_system: metric\n  country: CN\n\
                 http:\n  server_host: 127.0.0.1\n  server_port: {port}\n\
                 api:\nconfig:\nonboarding:\nautomation: !include automations.yaml\n\
                 logger:\n  default: warning\n  logs:\n    homeassistant.components.mqtt: debug\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("automations.yaml"), "[]\n").unwrap();
        let log = std::fs::File::create(dir.path().join("ha.log")).unwrap();
        let child = Command::new(&hass)
            .args(["-c", dir.path().to_str().unwrap(), "--skip-pip"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("MENSHEN_HA_HASS: the hass command");
        let mut ha = Ha { child, base: format!("http://127.0.0.1:{port}"), token: String::new(), dir };
        assert!(
            wait_for(Duration::from_secs(180), || ha.raw(&["GET", "/api/onboarding"]).is_some()),
            "HA never answered:\n{}",
            ha.log()
        );
        let out = Command::new("python3").arg(api_script()).args([&ha.base, "onboard"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        ha.token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        // The MQTT integration, through the config flow a user clicks through.
        let flow = ha.call("POST", "/api/config/config_entries/flow", Some(json!({"handler": "mqtt"})));
        assert_eq!(flow["step_id"], "broker", "{flow}");
        let done = ha.call(
            "POST",
            &format!("/api/config/config_entries/flow/{}", flow["flow_id"].as_str().unwrap()),
            Some(json!({"broker": "127.0.0.1", "port": mqtt_port})),
        );
        assert_eq!(done["type"], "create_entry", "{done}");
        ha
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ha.log")).unwrap_or_default()
    }

    /// One REST call without a token check (for the first poll): the body, if HTTP < 400.
    fn raw(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("python3")
            .arg(api_script())
            .arg(&self.base)
            .arg(if self.token.is_empty() { "-" } else { &self.token })
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string());
        let mut args = vec![method, path];
        if let Some(b) = &body {
            args.push(b);
        }
        let text = self.raw(&args).unwrap_or_else(|| panic!("{method} {path} failed\n{}", self.log()));
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    fn state(&self, entity: &str) -> Value {
        self.raw(&["GET", &format!("/api/states/{entity}")])
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null)
    }

    fn template(&self, t: &str) -> String {
        self.call("POST", "/api/template", Some(json!({"template": t}))).as_str().unwrap_or_default().to_string()
    }
}

#[test]
fn a_real_home_assistant_sees_opens_and_watches_the_gate() {
    let port = free_port();
    let _broker = Broker::start(port);
    let mut gate = Gate::new(GateOpts { mqtt_port: port, pulse_ms: 300, ..GateOpts::default() });
    gate.edit_config(|t| {
        let ha = t["homeassistant"].as_table_mut().unwrap();
        ha.insert("enabled".into(), true.into());
        ha.insert("allow_unlock".into(), true.into());
    });
    assert!(gate.resident(&["add", "r-1", "--card", "H10301:7:12345"]).status.success());
    gate.start_sim();
    gate.start_daemon();
    let cmds = Subscriber::start(port, &format!("{ROOT}cmd/unlock"));
    let ha = Ha::start(port);

    // Discovery made these entities, on one device; no lock entity (a strike cannot stay unlocked).
    let e = |domain: &str| format!("{domain}.menshen_site1_gate1_");
    let button = format!("{}front_open", e("button"));
    let lock = format!("{}front_lock", e("binary_sensor"));
    let door = format!("{}front_door", e("binary_sensor"));
    let alarm = format!("{}front_alarm", e("binary_sensor"));
    let connectivity = format!("{}broker_connection", e("binary_sensor"));
    let access = format!("{}access", e("event"));
    let alarm_event = format!("{}alarm", e("event"));
    let camera = format!("{}camera", e("sensor"));
    let outbox = format!("{}outbox_depth", e("sensor"));
    let last = format!("{}last_decision", e("sensor"));
    let all = [&button, &lock, &door, &alarm, &connectivity, &access, &alarm_event, &camera, &outbox, &last];
    let ours = || -> Vec<String> {
        let states = ha.call("GET", "/api/states", None);
        let mut v: Vec<String> = states
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["entity_id"].as_str().unwrap().to_string())
            .filter(|id| id.contains("menshen_site1_gate1"))
            .collect();
        v.sort();
        v
    };
    assert!(
        wait_for(Duration::from_secs(30), || all.iter().all(|id| ha.state(id)["state"].is_string())),
        "entities: {:?}\n{}",
        ours(),
        ha.log()
    );
    assert!(!ours().iter().any(|id| id.starts_with("lock.")), "{:?}", ours());
    assert_eq!(ha.state(&lock)["state"], "off", "locked");
    assert_eq!(ha.state(&connectivity)["state"], "on");
    assert_eq!(ha.state(&alarm)["state"], "off");
    // From the summary published on connect (it is refreshed with every health message).
    assert!(ha.state(&outbox)["state"].as_str().unwrap().parse::<u64>().is_ok(), "{}", ha.state(&outbox));
    assert_eq!(ha.state(&camera)["state"], "disabled");
    // HA's birth message made the gate publish discovery again.
    assert!(
        wait_for(Duration::from_secs(30), || gate.log().contains("Home Assistant online: discovery republished")),
        "HA's birth message did not reach the gate\n{}",
        ha.log().lines().filter(|l| l.contains("birth") || l.contains("status")).collect::<Vec<_>>().join("\n")
    );
    let device = ha.template(&format!("{{{{ device_id('{button}') }}}}"));
    assert_eq!(ha.template(&format!("{{{{ device_attr('{device}', 'name') }}}}")), "Menshen site1/gate1");
    assert_eq!(ha.template(&format!("{{{{ device_id('{alarm}') }}}}")), device, "one device");

    // An automation on the device trigger "access granted at front", made as the UI makes it.
    let auto = json!({
        "alias": "granted at front",
        "trigger": [{"platform": "device", "domain": "mqtt", "device_id": device, "type": "access_granted",
                     "subtype": "front", "discovery_id": "menshen_site1_gate1 front_granted"}],
        "action": [{"event": "menshen_test_granted"}],
    });
    let saved = ha.call("POST", "/api/config/automation/config/menshen_granted", Some(auto));
    assert_eq!(saved["result"], "ok", "{saved}");
    let automation = "automation.granted_at_front";
    assert!(wait_for(Duration::from_secs(10), || ha.state(automation)["state"] == "on"), "{}", ha.state(automation));
    assert!(ha.state(automation)["attributes"]["last_triggered"].is_null());

    // A forced door (before any grant, whose shunt grace would authorise it): a problem in HA, the alarm event, then it clears when the door closes.
    gate.world(WorldOp::Door { door: "front".into(), open: true });
    assert!(wait_for(Duration::from_secs(10), || ha.state(&alarm)["state"] == "on"), "{}", ha.state(&alarm));
    assert_eq!(ha.state(&alarm)["attributes"]["forced"], true);
    assert_eq!(ha.state(&door)["state"], "on");
    assert!(wait_for(Duration::from_secs(5), || ha.state(&alarm_event)["attributes"]["event_type"] == "door_forced"));
    gate.world(WorldOp::Door { door: "front".into(), open: false });
    assert!(wait_for(Duration::from_secs(10), || ha.state(&alarm)["state"] == "off"), "{}", ha.state(&alarm));
    assert_eq!(ha.state(&door)["state"], "off");

    // The open button, pressed twice: two pulses, two fresh request ids, both at QoS 1.
    for n in 1..=2 {
        let before = gate.relay_writes("front");
        ha.call("POST", "/api/services/button/press", Some(json!({"entity_id": button})));
        assert!(
            wait_for(Duration::from_secs(5), || gate.relay_writes("front") >= before + 2),
            "press {n}\n{}",
            gate.log()
        );
        assert!(wait_for(Duration::from_secs(5), || gate.relay("front")["relay_energized"] == false));
    }
    let sent = cmds.all();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_ne!(sent[0].1["request_id"], sent[1].1["request_id"]);
    assert!(sent.iter().all(|(_, v, _)| v["door"] == "front" && v["expires_at"].is_i64()));
    // The first press's message, replayed: refused, nothing moves.
    let after = gate.relay_writes("front");
    let mut o = rumqttc::MqttOptions::new("replayer", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    std::thread::spawn(move || for _ in conn.iter() {});
    client.publish(format!("{ROOT}cmd/unlock"), rumqttc::QoS::AtLeastOnce, false, sent[0].1.to_string()).unwrap();
    assert!(wait_for(Duration::from_secs(5), || {
        gate.status().unwrap()["stats"]["command_rejections"]["duplicate_request"] == 1
    }));
    assert_eq!(gate.relay_writes("front"), after);

    // A swipe: the access event (no resident in it), the last decision, the automation fired.
    gate.swipe(7, 12345);
    assert!(wait_for(Duration::from_secs(10), || ha.state(&access)["attributes"]["event_type"] == "granted"));
    let attrs = ha.state(&access)["attributes"].clone();
    assert_eq!(attrs["door"], "front");
    assert!(!attrs.to_string().contains("r-1"), "HA's entity does not name the resident: {attrs}");
    assert!(wait_for(Duration::from_secs(5), || ha.state(&last)["state"] == "granted: granted (front)"));
    assert!(
        wait_for(Duration::from_secs(10), || ha.state(automation)["attributes"]["last_triggered"].is_string()),
        "the device trigger fired the automation\n{}",
        ha.log()
    );

    // The gate dies (SIGKILL): the broker's last will makes its entities unavailable.
    gate.signal_daemon("KILL");
    assert!(wait_for(Duration::from_secs(60), || ha.state(&lock)["state"] == "unavailable"), "{}", ha.state(&lock));
    assert_eq!(ha.state(&alarm)["state"], "unavailable");
    assert_eq!(ha.state(&connectivity)["state"], "off", "the connection sensor shows the will");
    println!("HA entities: {:?}", ours());
    let _ = client.disconnect();
}
