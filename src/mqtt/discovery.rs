//! Home Assistant MQTT discovery (REQUIREMENTS M5): a lock per door, a door sensor where there
//! is a contact, an event entity for access decisions.

use crate::config::Config;

/// Home Assistant discovery configs: (topic, retained payload) for each entity (M5).
pub fn discovery(cfg: &Config) -> Vec<(String, Vec<u8>)> {
    use serde_json::json;
    let ha = &cfg.homeassistant;
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
    let avail = json!([{
        "topic": format!("{root}status"),
        "value_template": "{{ value_json.state }}",
        "payload_available": "online",
        "payload_not_available": "offline",
    }]);
    let mut out = Vec::new();
    for d in &cfg.doors {
        let door = &d.name;
        let lock_state = format!("{root}state/lock/{door}");
        if ha.allow_unlock {
            // Only UNLOCK makes a command; anything else renders `{}`, which the gate refuses. Each
            // press gets a fresh request id and a 10 s expiry, so it can never be replayed.
            let template = format!(
                "{{% if value == 'UNLOCK' %}}{{\"door\":\"{door}\",\"request_id\":\"ha-{{{{ now().timestamp() }}}}-{{{{ range(1000000) | random }}}}\",\"expires_at\":{{{{ ((now().timestamp() + 10) * 1000) | int }}}}}}{{% else %}}{{}}{{% endif %}}"
            );
            let c = json!({
                "name": format!("{door} lock"),
                "unique_id": format!("{node}_{door}_lock"),
                "availability": avail,
                "state_topic": lock_state,
                "value_template": "{{ value_json.state }}",
                "state_locked": "LOCKED",
                "state_unlocked": "UNLOCKED",
                "command_topic": format!("{root}cmd/unlock"),
                "command_template": template,
                "payload_unlock": "UNLOCK",
                "payload_lock": "LOCK",
                "device": device,
            });
            out.push((format!("{}/lock/{node}/{door}/config", ha.discovery_prefix), c.to_string().into_bytes()));
        } else {
            let c = json!({
                "name": format!("{door} lock"),
                "unique_id": format!("{node}_{door}_lock"),
                "device_class": "lock",
                "availability": avail,
                "state_topic": lock_state,
                // HA's lock device class: ON means unlocked.
                "value_template": "{{ 'ON' if value_json.state == 'UNLOCKED' else 'OFF' }}",
                "device": device,
            });
            out.push((
                format!("{}/binary_sensor/{node}/{door}_lock/config", ha.discovery_prefix),
                c.to_string().into_bytes(),
            ));
        }
        if d.contact_pin.is_some() {
            let c = json!({
                "name": format!("{door} door"),
                "unique_id": format!("{node}_{door}_door"),
                "device_class": "door",
                "availability": avail,
                "state_topic": format!("{root}state/door/{door}"),
                "value_template": "{{ 'ON' if value_json.open else 'OFF' }}",
                "device": device,
            });
            out.push((
                format!("{}/binary_sensor/{node}/{door}_door/config", ha.discovery_prefix),
                c.to_string().into_bytes(),
            ));
        }
    }
    let c = json!({
        "name": "access",
        "unique_id": format!("{node}_access"),
        "availability": avail,
        "state_topic": format!("{root}event/access"),
        "event_types": ["granted", "denied"],
        "value_template": "{ \"event_type\": \"{{ value_json.decision }}\", \"reason\": \"{{ value_json.reason }}\", \"door\": \"{{ value_json.door }}\" }",
        "device": device,
    });
    out.push((format!("{}/event/{node}/access/config", ha.discovery_prefix), c.to_string().into_bytes()));
    out
}
