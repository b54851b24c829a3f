//! The published JSON Schemas (docs/schemas, referenced by docs/asyncapi.yaml) agree with the
//! code: the parser accepts what the schemas accept and refuses what they refuse, events built by
//! the code validate, and nothing is left undocumented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::schema::{load, validate};
use menshen::command::{self, ErrorCode, Inbound, Limits, Verb};
use menshen::events::{GateAlarm, NewEvent};
use menshen::policy::{Decision, Reason};
use menshen::wiegand::{encode, CardId, Format};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000_000;

fn parse(verb: &str, payload: &Value) -> Result<command::Request, ErrorCode> {
    let inb = Inbound {
        topic: format!("menshen/v1/s/g/cmd/{verb}"),
        payload: payload.to_string().into_bytes(),
        response_topic: Some("bms/r".into()),
        correlation: Some(b"c".to_vec()),
        expiry_secs: Some(10),
        ..Inbound::default()
    };
    command::parse(&inb, "s", "g", &Limits::default(), NOW).map_err(|r| r.error.code)
}

#[test]
fn error_codes_in_the_docs_are_the_codes_in_the_code() {
    let documented: Vec<String> = serde_json::from_value(load("error-codes.json")).unwrap();
    let code: Vec<String> = ErrorCode::ALL.iter().map(|c| c.code().to_string()).collect();
    assert_eq!(documented, code);
    let reply = load("reply.json");
    let enumerated: Vec<String> = serde_json::from_value(reply["properties"]["code"]["enum"].clone()).unwrap();
    assert_eq!(enumerated, code);
}

#[test]
fn every_command_and_schema_is_in_the_asyncapi_document() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/asyncapi.yaml")).unwrap();
    for v in Verb::ALL {
        assert!(doc.contains(&format!("address: menshen/v1/{{site}}/{{gate}}/cmd/{}", v.name())), "{}", v.name());
    }
    for e in std::fs::read_dir(common::schema::dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name != "error-codes.json" {
            assert!(doc.contains(&format!("./schemas/{name}")), "{name} is not referenced");
        }
    }
}

#[test]
fn good_commands_pass_both_the_schema_and_the_parser() {
    let exp = NOW + 10_000;
    let good = [
        ("unlock", json!({"door": "front", "duration_ms": 3000, "request_id": "a", "expires_at": exp})),
        ("unlock", json!({"door": "front"})),
        (
            "resident.upsert",
            json!({"resident": {"id": "r1", "mode": "face_or_card",
            "validity": {"valid_from_ms": 0, "valid_until_ms": NOW * 2},
            "schedule": {"windows": [{"days": ["mon", "sat"], "start": "07:00", "end": "24:00"}]},
            "cards": [{"format": "H10306", "facility": 300, "number": 4000, "validity": {"valid_until_ms": NOW * 2}}]}}),
        ),
        ("resident.remove", json!({"resident": "r1", "reply_to": "bms/x", "request_id": "q-1"})),
        ("resident.set_mode", json!({"resident": "r1", "mode": "face_and_card"})),
        (
            "credential.add",
            json!({"resident": "r1", "card": {"format": "C1k35s", "facility": 4000, "number": 1_000_000}}),
        ),
        ("credential.remove", json!({"card": {"format": "H10301", "facility": 1, "number": 2}})),
        ("roster.sync", json!({"version": 7, "residents": [{"id": "a", "mode": "card"}]})),
        ("roster.sync", json!({"version": 7, "sync_id": "v7:a", "page": 2, "pages": 3, "residents": []})),
        (
            "roster.batch",
            json!({"upserts": [{"id": "a", "mode": "card", "cards": [{"format": "H10301", "facility": 1, "number": 2}]}],
                   "removes": ["b"]}),
        ),
        ("roster.batch", json!({"removes": ["b"], "request_id": "batch-1"})),
        ("rules.get", json!({})),
        ("health.get", json!({"request_id": "h"})),
        ("events.backfill", json!({"from_seq": 10, "limit": 100})),
        (
            "consent.record",
            json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "ab".repeat(32), "channel": "app",
                   "retention_days": 90, "minor": true, "guardian": "g-1"}),
        ),
        ("consent.record", json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "AB".repeat(32)})),
        ("consent.withdraw", json!({"resident": "r1", "request_id": "w-1"})),
        ("face.enrol", json!({"resident": "r1"})),
        ("face.enrol", json!({"resident": "r1", "frames": 5, "timeout_ms": 15000, "request_id": "e-1"})),
    ];
    for (verb, p) in good {
        validate(&format!("cmd-{verb}.json"), &p).unwrap();
        parse(verb, &p).unwrap_or_else(|c| panic!("{verb} {p}: parser refused with {c:?}"));
    }
}

#[test]
fn bad_commands_fail_both_the_schema_and_the_parser() {
    let bad = [
        ("unlock", json!({"door": "front", "open": true})),
        ("unlock", json!({"duration_ms": 5})),
        ("resident.upsert", json!({"resident": {"id": "r 1", "mode": "card"}})),
        ("resident.upsert", json!({"resident": {"id": "r1", "mode": "face"}})),
        ("resident.set_mode", json!({"resident": "r1", "mode": 3})),
        ("credential.add", json!({"resident": "r1", "card": {"format": "H10301", "facility": 1, "number": -1}})),
        ("roster.sync", json!({"residents": []})),
        // Paging is all three fields or none; a sync id is a short plain token.
        ("roster.sync", json!({"version": 7, "sync_id": "s", "page": 0, "residents": []})),
        ("roster.sync", json!({"version": 7, "sync_id": "a b", "page": 0, "pages": 1, "residents": []})),
        ("roster.batch", json!({"upserts": [{"id": "a", "mode": "card"}], "remove": ["b"]})),
        ("roster.batch", json!({"removes": ["bad id"]})),
        ("health.get", json!({"verbose": true})),
        ("events.backfill", json!({"from_seq": 1, "limit": 0})),
        ("rules.get", json!({"request_id": ""})),
        // No consent can be irrevocable, unlimited, or a minor's without a guardian.
        (
            "consent.record",
            json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "ab".repeat(32), "irrevocable": true}),
        ),
        (
            "consent.record",
            json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "ab".repeat(32), "retention_days": 0}),
        ),
        (
            "consent.record",
            json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "ab".repeat(32), "retention_days": 100000}),
        ),
        (
            "consent.record",
            json!({"resident": "r1", "rules_version": "v1", "rules_sha256": "ab".repeat(32), "minor": true}),
        ),
        ("consent.record", json!({"resident": "r1", "rules_version": "v1"})),
        ("consent.withdraw", json!({"resident": "r1", "also_delete_cards": true})),
        // An enrolment takes frames from this gate's camera only: no image can be sent with it.
        ("face.enrol", json!({"resident": "r1", "image": "/9j/4AAQ"})),
        ("face.enrol", json!({"resident": "r1", "frames": 0})),
        ("face.enrol", json!({"resident": "r1", "timeout_ms": 600000})),
    ];
    for (verb, p) in bad {
        assert!(validate(&format!("cmd-{verb}.json"), &p).is_err(), "schema accepted {verb} {p}");
        assert!(parse(verb, &p).is_err(), "parser accepted {verb} {p}");
    }
}

#[test]
fn events_built_by_the_code_match_their_schemas() {
    let bits = encode(Format::H10301, 7, 12345).unwrap();
    let card = CardId { format: Format::H10301, facility: 7, number: 12345 };
    let evs = [
        NewEvent::access_card(
            NOW,
            Decision { granted: true, reason: Reason::Granted },
            "front",
            "front",
            Some("r1"),
            Some(card),
            bits,
            None,
        ),
        NewEvent::access_card(
            NOW,
            Decision { granted: false, reason: Reason::ParityError },
            "front",
            "front",
            None,
            None,
            bits,
            Some(menshen::wiegand::Rejection::ParityError),
        ),
        NewEvent::exit_request(NOW, "front"),
        NewEvent::remote_unlock(NOW, "front", "req-1", 3000),
        NewEvent::door(NOW, "front", menshen::door::DoorEvent::Opened),
        NewEvent::door(NOW, "front", menshen::door::DoorEvent::Forced),
        NewEvent::door_at_start(NOW, "front", false),
        NewEvent::alarm(
            NOW,
            GateAlarm::PublishRefused,
            None,
            Some("the broker refused event seq 4 (NotAuthorized)".into()),
        ),
        NewEvent::alarm(NOW, GateAlarm::ReaderLineStuck, Some("front"), None),
        NewEvent::mode_changed(NOW, "r1", "card", "face_or_card", Some("req-2")),
        NewEvent::consent(NOW, "consent_recorded", "r1", Some("req-3")),
        NewEvent::template_deleted(NOW, &{
            let d = menshen::store::PendingDeletion {
                resident: "r1".into(),
                key_id: "0f".repeat(16),
                why: "face_turned_off".into(),
                at_ms: NOW,
            };
            let dir = tempfile::tempdir().unwrap();
            let p = menshen::privacy::shred::Privacy::open_at(
                &dir.path().join("keys"),
                &dir.path().join("device.key"),
                &dir.path().join("signing.key"),
                "s",
                "g",
            )
            .unwrap();
            p.receipt(&d, NOW)
        }),
        NewEvent::system(NOW, "roster_changed", Some("x".into())),
    ];
    for (i, e) in evs.iter().enumerate() {
        let v: Value = serde_json::from_slice(&e.to_json(i as u64 + 1, "s", "g", false)).unwrap();
        let kind = v["type"].as_str().unwrap().to_string();
        validate(&format!("event-{kind}.json"), &v).unwrap();
        // No biometric can sneak in: the schemas forbid unknown fields.
        let mut leaked = v.clone();
        leaked["embedding"] = json!([0.1, 0.2]);
        assert!(validate(&format!("event-{kind}.json"), &leaked).is_err());
    }
}
