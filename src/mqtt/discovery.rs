//! Home Assistant MQTT discovery (REQUIREMENTS M5): the retained configs that make one HA device
//! per gate. Per door: the lock's state, an `open` button that pulses the strike (only with
//! `allow_unlock`), the door contact, and a `problem` sensor for the door's standing alarms. Per
//! gate: access and alarm `event` entities, device triggers for automations, and diagnostics.
//! Docs: docs/mqtt.md, "Home Assistant".

use serde_json::{json, Value};

use crate::config::Config;
use crate::events::alarm_codes;

/// Every discovery message at QoS 1: HA subscribes to the states and sends the button's command
/// at the QoS the config names (its default is 0, which could lose an unlock).
const QOS: u8 = 1;

/// A press of the `open` button: a fresh request id (the time in microseconds, plus a random
/// number for two presses rendered in the same microsecond or a clock stepped back) and a
/// 10-second expiry, so a replayed message is refused (`duplicate_request`, then `expired`).
/// Written for HA's sandboxed Jinja (`ImmutableSandboxedEnvironment`: no range over 100,000).
pub fn open_command_template(door: &str) -> String {
    format!(
        concat!(
            "{{\"door\":\"{door}\",",
            "\"request_id\":\"ha-{door}-{{{{ (now().timestamp() * 1000000) | int }}}}-{{{{ range(100000) | random }}}}\",",
            "\"expires_at\":{{{{ ((now().timestamp() + 10) * 1000) | int }}}}}}"
        ),
        door = door
    )
}

/// The discovery topic and retained payload of every entity and device trigger (M5). An empty
/// payload removes an entity an earlier version published.
pub fn discovery(cfg: &Config) -> Vec<(String, Vec<u8>)> {
    let ha = &cfg.homeassistant;
    let prefix = &ha.discovery_prefix;
    let root = cfg.topic_root();
    let (site, gate) = (&cfg.gate.site, &cfg.gate.gate);
    let node = format!("menshen_{site}_{gate}");
    let device = json!({
        "identifiers": [node],
        "name": format!("Menshen {site}/{gate}"),
        "manufacturer": "Menshen",
        "model": "gate controller",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let origin = json!({"name": "Menshen", "sw_version": env!("CARGO_PKG_VERSION")});
    let avail = json!([{
        "topic": format!("{root}status"),
        "value_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]);
    let mut out = Vec::new();
    let mut push = |component: &str, object: &str, mut c: Value, available: bool| {
        if let Some(o) = c.as_object_mut() {
            o.insert("qos".into(), QOS.into());
            o.insert("device".into(), device.clone());
            o.insert("origin".into(), origin.clone());
            if available {
                o.insert("availability".into(), avail.clone());
            }
        }
        out.push((format!("{prefix}/{component}/{node}/{object}/config"), c.to_string().into_bytes()));
    };
    for d in &cfg.doors {
        let door = &d.name;
        // A strike is momentary: HA's `lock` entity would offer lock and unlock, which a strike
        // cannot honour, so the lock is a read-only sensor and `open` is a button.
        push(
            "binary_sensor",
            &format!("{door}_lock"),
            json!({
                "name": format!("{door} lock"),
                "unique_id": format!("{node}_{door}_lock"),
                "device_class": "lock",
                "state_topic": format!("{root}state/lock/{door}"),
                // HA's lock device class: ON means unlocked.
                "value_template": "{{ 'ON' if value_json.state == 'UNLOCKED' else 'OFF' }}",
            }),
            true,
        );
        if ha.allow_unlock {
            push(
                "button",
                &format!("{door}_open"),
                json!({
                    "name": format!("{door} open"),
                    "unique_id": format!("{node}_{door}_open"),
                    "icon": "mdi:door-open",
                    "command_topic": format!("{root}cmd/unlock"),
                    "command_template": open_command_template(door),
                    "payload_press": "PRESS",
                    "retain": false,
                }),
                true,
            );
        }
        if d.contact_pin.is_some() {
            push(
                "binary_sensor",
                &format!("{door}_door"),
                json!({
                    "name": format!("{door} door"),
                    "unique_id": format!("{node}_{door}_door"),
                    "device_class": "door",
                    "state_topic": format!("{root}state/door/{door}"),
                    "value_template": "{{ 'ON' if value_json.open else 'OFF' }}",
                }),
                true,
            );
        }
        let alarm_state = format!("{root}state/alarm/{door}");
        push(
            "binary_sensor",
            &format!("{door}_alarm"),
            json!({
                "name": format!("{door} alarm"),
                "unique_id": format!("{node}_{door}_alarm"),
                "device_class": "problem",
                "state_topic": alarm_state,
                "value_template": "{{ 'ON' if value_json.problem else 'OFF' }}",
                "json_attributes_topic": alarm_state,
                "json_attributes_template":
                    "{{ {'forced': value_json.forced, 'held_open': value_json.held_open, 'fire_release': value_json.fire_release} | tojson }}",
            }),
            true,
        );
        for decision in ["granted", "denied"] {
            push(
                "device_automation",
                &format!("{door}_{decision}"),
                json!({
                    "automation_type": "trigger",
                    "topic": format!("{root}event/access"),
                    "type": format!("access_{decision}"),
                    "subtype": door,
                    "value_template": "{{ value_json.decision ~ ':' ~ value_json.door }}",
                    "payload": format!("{decision}:{door}"),
                }),
                false,
            );
        }
    }
    // Access decisions, without the resident (P8): the event's attributes are the decision, its
    // reason, the method and the door.
    push(
        "event",
        "access",
        json!({
            "name": "access",
            "unique_id": format!("{node}_access"),
            "state_topic": format!("{root}event/access"),
            "event_types": ["granted", "denied"],
            "value_template": "{{ {'event_type': value_json.decision, 'reason': value_json.reason, 'method': value_json.method, 'door': value_json.door} | tojson }}",
        }),
        true,
    );
    let codes = alarm_codes();
    push(
        "event",
        "alarm",
        json!({
            "name": "alarm",
            "unique_id": format!("{node}_alarm"),
            "state_topic": format!("{root}event/alarm"),
            "event_types": codes,
            "value_template": "{{ {'event_type': value_json.alarm, 'door': value_json.door | default(''), 'reader': value_json.reader | default(''), 'detail': value_json.detail | default('')} | tojson }}",
        }),
        true,
    );
    for code in &codes {
        push(
            "device_automation",
            &format!("alarm_{code}"),
            json!({
                "automation_type": "trigger",
                "topic": format!("{root}event/alarm"),
                "type": "alarm",
                "subtype": code,
                "value_template": "{{ value_json.alarm }}",
                "payload": code,
            }),
            false,
        );
    }
    // Diagnostics. Connectivity has no availability: it is the availability, shown.
    push(
        "binary_sensor",
        "connectivity",
        json!({
            "name": "broker connection",
            "unique_id": format!("{node}_connectivity"),
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": format!("{root}status"),
            "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
        }),
        false,
    );
    let summary = format!("{root}summary");
    for (object, name, template, extra) in [
        ("camera", "camera", "{{ value_json.camera }}", json!({"icon": "mdi:cctv"})),
        (
            "outbox_depth",
            "outbox depth",
            "{{ value_json.outbox_depth }}",
            json!({"state_class": "measurement", "unit_of_measurement": "events"}),
        ),
        ("roster_version", "roster version", "{{ value_json.roster_version }}", json!({})),
    ] {
        let mut c = json!({
            "name": name,
            "unique_id": format!("{node}_{object}"),
            "entity_category": "diagnostic",
            "state_topic": summary,
            "value_template": template,
        });
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        push("sensor", object, c, true);
    }
    push(
        "sensor",
        "last_decision",
        json!({
            "name": "last decision",
            "unique_id": format!("{node}_last_decision"),
            "entity_category": "diagnostic",
            "state_topic": format!("{root}event/access"),
            "value_template": "{{ value_json.decision }}: {{ value_json.reason }} ({{ value_json.door }})",
        }),
        true,
    );
    // The `lock` entity that earlier builds published (its LOCK button did nothing): removed.
    for d in &cfg.doors {
        out.push((format!("{prefix}/lock/{node}/{}/config", d.name), Vec::new()));
    }
    out
}

/// Home Assistant's birth topic: on `online` the discovery configs are published again.
pub fn ha_status_topic(cfg: &Config) -> String {
    format!("{}/status", cfg.homeassistant.discovery_prefix)
}
