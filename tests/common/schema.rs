//! The JSON Schemas of `docs/schemas/` (referenced by `docs/asyncapi.yaml`), applied to real
//! payloads so that the documentation and the code cannot drift apart.

use serde_json::Value;
use std::path::PathBuf;

pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/schemas")
}

pub fn load(name: &str) -> Value {
    let p = dir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Validate `instance` against schema file `name`; the error names every violation.
pub fn validate(name: &str, instance: &Value) -> Result<(), String> {
    let schema = load(name);
    let v = jsonschema::validator_for(&schema).unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"));
    let errors: Vec<String> = v.iter_errors(instance).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{name}: {}\n  instance: {instance}", errors.join("; ")))
    }
}

/// The schema for a message on `topic` (under `menshen/v1/{site}/{gate}/`), if it is one of ours.
pub fn for_topic(topic: &str) -> Option<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.len() < 5 || levels[0] != "menshen" {
        return None;
    }
    let rest = &levels[4..];
    Some(match rest {
        ["status"] => "status.json".into(),
        ["health"] => "health.json".into(),
        ["state", "lock", _] => "state-lock.json".into(),
        ["state", "door", _] => "state-door.json".into(),
        ["state", "alarm", _] => "state-alarm.json".into(),
        ["event", kind] => format!("event-{kind}.json"),
        ["cmd", verb] => format!("cmd-{verb}.json"),
        _ => return None,
    })
}

/// Every message and reply a BMS client saw must match its schema.
pub fn check_all(bms: &super::Bms) {
    let mut n = 0;
    for (topic, v, _) in bms.msgs.lock().unwrap().iter() {
        // Commands the tests sent on purpose may be bad; what the gate publishes must be right.
        if topic.contains("/cmd/") {
            continue;
        }
        if let Some(schema) = for_topic(topic) {
            validate(&schema, v).unwrap_or_else(|e| panic!("{topic}: {e}"));
            n += 1;
        }
    }
    for (_, v) in bms.replies.lock().unwrap().iter() {
        validate("reply.json", v).unwrap();
        n += 1;
    }
    assert!(n > 0, "nothing was checked");
}
