use super::*;

const NOW: i64 = 1_800_000_000_000;

fn inb(verb: &str, payload: &str) -> Inbound {
    Inbound {
        topic: format!("menshen/v1/s/g/cmd/{verb}"),
        payload: payload.as_bytes().to_vec(),
        response_topic: Some("bms/replies".into()),
        correlation: Some(b"c-1".to_vec()),
        ..Inbound::default()
    }
}

fn code(i: &Inbound) -> ErrorCode {
    parse(i, "s", "g", &Limits::default(), NOW).unwrap_err().error.code
}

#[test]
fn a_good_unlock_parses_with_correlation_as_request_id() {
    let mut i = inb("unlock", r#"{"door":"front","duration_ms":3000}"#);
    i.expiry_secs = Some(10);
    let r = parse(&i, "s", "g", &Limits::default(), NOW).unwrap();
    assert_eq!(r.request_id, "cd:c-1", "correlation data has its own namespace");
    assert_eq!(r.command, Command::Unlock { door: "front".into(), duration_ms: Some(3000) });
    assert_eq!(r.reply.unwrap().correlation.unwrap(), b"c-1");
}

#[test]
fn mqtt311_fallback_uses_payload_fields() {
    let mut i = inb("health.get", r#"{"request_id":"r-9","reply_to":"bms/r"}"#);
    i.response_topic = None;
    i.correlation = None;
    let r = parse(&i, "s", "g", &Limits::default(), NOW).unwrap();
    assert_eq!(r.request_id, "r-9");
    assert_eq!(r.reply, Some(ReplyTo { topic: "bms/r".into(), correlation: None }));
}

#[test]
fn site_wide_topic_is_accepted_and_marked() {
    let mut i = inb("rules.get", "{}");
    i.topic = "menshen/v1/s/_site/cmd/rules.get".into();
    assert!(parse(&i, "s", "g", &Limits::default(), NOW).unwrap().site_wide);
    i.topic = "menshen/v1/s/other/cmd/rules.get".into();
    assert_eq!(code(&i), ErrorCode::UnknownCommand);
}

#[test]
fn refusals_have_their_codes() {
    let mut retained = inb("health.get", "{}");
    retained.retain = true;
    assert_eq!(code(&retained), ErrorCode::RetainedCommand);
    assert_eq!(code(&inb("open.sesame", "{}")), ErrorCode::UnknownCommand);
    let mut bad_utf8 = inb("health.get", "{}");
    bad_utf8.payload = vec![b'{', 0xff, b'}'];
    assert_eq!(code(&bad_utf8), ErrorCode::InvalidUtf8);
    assert_eq!(code(&inb("health.get", "{")), ErrorCode::InvalidJson);
    assert_eq!(code(&inb("health.get", "[1]")), ErrorCode::NotAnObject);
    assert_eq!(code(&inb("health.get", &format!("{}{}", "[".repeat(40), "]".repeat(40)))), ErrorCode::TooDeep);
    assert_eq!(code(&inb("health.get", r#"{"x":1}"#)), ErrorCode::UnknownField);
    assert_eq!(code(&inb("resident.set_mode", r#"{"resident":"r1"}"#)), ErrorCode::MissingField);
    assert_eq!(code(&inb("resident.set_mode", r#"{"resident":"r1","mode":7}"#)), ErrorCode::WrongType);
    assert_eq!(code(&inb("resident.set_mode", r#"{"resident":"r1","mode":"face"}"#)), ErrorCode::InvalidValue);
    assert_eq!(code(&inb("resident.remove", r#"{"resident":"a b"}"#)), ErrorCode::InvalidValue);
    let mut big = inb("health.get", "{}");
    big.payload = vec![b' '; Limits::default().max_payload_bytes + 1];
    assert_eq!(code(&big), ErrorCode::PayloadTooLarge);
    let mut no_id = inb("health.get", "{}");
    no_id.correlation = None;
    assert_eq!(code(&no_id), ErrorCode::MissingRequestId);
    assert_eq!(code(&inb("health.get", r#"{"request_id":""}"#)), ErrorCode::InvalidRequestId);
    assert_eq!(code(&inb("health.get", &format!(r#"{{"expires_at":{}}}"#, NOW - 1))), ErrorCode::Expired);
    assert_eq!(code(&inb("unlock", r#"{"door":"front"}"#)), ErrorCode::ExpiryRequired);
    assert_eq!(
        code(&inb("unlock", &format!(r#"{{"door":"f","expires_at":{}}}"#, NOW + 3_600_000))),
        ErrorCode::ExpiryTooFar
    );
    let mut long = inb("unlock", r#"{"door":"f","duration_ms":3600000}"#);
    long.expiry_secs = Some(5);
    assert_eq!(code(&long), ErrorCode::InvalidValue);
    let mut forged = inb("health.get", "{}");
    forged.response_topic = Some("menshen/v1/s/g2/cmd/unlock".into());
    assert_eq!(code(&forged), ErrorCode::InvalidReplyTo);
    assert_eq!(
        code(&inb("credential.add", r#"{"resident":"r","card":{"format":"H10301","facility":300,"number":1}}"#)),
        ErrorCode::InvalidValue,
        "facility out of range for 26-bit"
    );
    let dup = r#"{"version":1,"residents":[{"id":"a","mode":"card"},{"id":"a","mode":"card"}]}"#;
    assert_eq!(code(&inb("roster.sync", dup)), ErrorCode::InvalidValue);
}

#[test]
fn depth_scan_ignores_brackets_in_strings() {
    assert_eq!(json_depth(br#"{"a":"[[[[[[","b":[1,{"c":2}]}"#), 3);
    assert_eq!(json_depth(br#"{"a":"\"[["}"#), 1);
}

#[test]
fn replies_carry_ok_or_code_and_message() {
    let ok: Value =
        serde_json::from_slice(&reply_json("s", "g", Some(Verb::HealthGet), Some("r"), &Ok(Value::Null))).unwrap();
    assert_eq!(ok["ok"], true);
    let e = CmdError::new(ErrorCode::Busy, "later");
    let bad: Value = serde_json::from_slice(&reply_json("s", "g", None, None, &Err(e))).unwrap();
    assert_eq!(bad["ok"], false);
    assert_eq!(bad["code"], "busy");
    assert_eq!(bad["message"], "later");
}

#[test]
fn error_codes_are_unique_snake_case() {
    let mut seen = std::collections::HashSet::new();
    for c in ErrorCode::ALL {
        assert!(seen.insert(c.code()));
        assert_eq!(serde_json::to_value(c).unwrap(), Value::String(c.code().into()));
    }
}

#[test]
fn correlation_data_is_bounded_and_names_its_own_ids() {
    assert_eq!(correlation_request_id(b"c-1").as_deref(), Some("cd:c-1"));
    assert_eq!(correlation_request_id(b"\xca\xfe").as_deref(), Some("cdx:cafe"));
    assert_eq!(correlation_request_id(b"a b").as_deref(), Some("cdx:612062"), "a space is not printable ASCII");
    assert_eq!(correlation_request_id(b""), None);
    let longest = correlation_request_id(&[0xff; MAX_CORRELATION]).unwrap();
    assert_eq!(longest.len(), 128, "the longest id fits the schema's 128 characters");
    assert_eq!(correlation_request_id(&[0xff; MAX_CORRELATION + 1]), None);
    // Over the limit: answered (with the correlation data echoed), no id made, nothing parsed.
    let mut i = inb("health.get", "{}");
    i.correlation = Some(vec![7; 60_000]);
    let r = parse(&i, "s", "g", &Limits::default(), NOW).unwrap_err();
    assert_eq!((r.error.code, r.request_id, r.verb), (ErrorCode::InvalidCorrelationData, None, Some(Verb::HealthGet)));
    assert_eq!(r.reply.unwrap().correlation.unwrap().len(), 60_000);
    // A payload id may not enter the correlation namespace.
    for id in ["cd:c-1", "cdx:cafe"] {
        let mut i = inb("health.get", &format!(r#"{{"request_id":"{id}"}}"#));
        i.correlation = None;
        assert_eq!(code(&i), ErrorCode::InvalidRequestId, "{id}");
    }
}

#[test]
fn replies_go_only_under_the_configured_prefix() {
    for (topic, ok) in [
        ("bms/replies", true),
        ("bms/a/replies", true),
        ("$SYS/broker/x", false),
        ("other/replies", false),
        ("bms/+/replies", false),
        ("menshen/v1/s/g/cmd/unlock", false),
    ] {
        let mut i = inb("health.get", "{}");
        i.response_topic = Some(topic.into());
        let got = parse(&i, "s", "g", &Limits::default(), NOW);
        assert_eq!(got.is_ok(), ok, "{topic}: {got:?}");
        if let Err(r) = got {
            assert_eq!(r.error.code, ErrorCode::InvalidReplyTo);
            assert_eq!(r.reply, None, "never answered on a topic it may not use");
        }
    }
}

#[test]
fn a_key_twice_is_refused_with_its_own_code() {
    assert_eq!(code(&inb("resident.remove", r#"{"resident":"a","resident":"b"}"#)), ErrorCode::DuplicateKey);
    assert_eq!(
        code(&inb("resident.remove", r#"{"resident":"a","request_id":"x","request_id":"y"}"#)),
        ErrorCode::DuplicateKey
    );
}

#[test]
fn a_roster_sync_page_parses_and_bad_paging_is_refused() {
    let r = parse(
        &inb(
            "roster.sync",
            r#"{"version":3,"sync_id":"v3-a","page":1,"pages":4,"residents":[{"id":"a","mode":"card"}]}"#,
        ),
        "s",
        "g",
        &Limits::default(),
        NOW,
    )
    .unwrap();
    let Command::RosterSync { version: 3, paging: Some(p), residents } = r.command else { panic!("not a page") };
    assert_eq!((p.sync_id.as_str(), p.page, p.pages, residents.len()), ("v3-a", 1, 4, 1));
    // Two of the three paging fields: refused, naming all three.
    assert_eq!(
        code(&inb("roster.sync", r#"{"version":3,"sync_id":"x","page":0,"residents":[]}"#)),
        ErrorCode::MissingField
    );
    assert_eq!(
        code(&inb("roster.sync", r#"{"version":3,"sync_id":"x","page":4,"pages":4,"residents":[]}"#)),
        ErrorCode::InvalidValue,
        "page past the last"
    );
    assert_eq!(
        code(&inb("roster.sync", r#"{"version":3,"sync_id":"a b","page":0,"pages":1,"residents":[]}"#)),
        ErrorCode::InvalidValue
    );
    // A page over mqtt.roster_page_max_bytes, though under max_payload_bytes.
    let limits = Limits { roster_page_max_bytes: 1024, ..Limits::default() };
    let big: Vec<String> = (0..40).map(|i| format!(r#"{{"id":"resident-{i:04}","mode":"card"}}"#)).collect();
    let paged = format!(r#"{{"version":3,"sync_id":"x","page":0,"pages":1,"residents":[{}]}}"#, big.join(","));
    let e = parse(&inb("roster.sync", &paged), "s", "g", &limits, NOW).unwrap_err();
    assert_eq!(e.error.code, ErrorCode::PayloadTooLarge, "{}", e.error.message);
    // The same residents in one unpaged payload are within max_payload_bytes.
    let whole = format!(r#"{{"version":3,"residents":[{}]}}"#, big.join(","));
    assert!(parse(&inb("roster.sync", &whole), "s", "g", &limits, NOW).is_ok());
}

#[test]
fn a_roster_batch_parses_and_refuses_empty_or_repeated_entries() {
    let ok = r#"{"upserts":[{"id":"a","mode":"face_or_card","cards":[{"format":"H10301","facility":1,"number":2}]}],"removes":["b"]}"#;
    let r = parse(&inb("roster.batch", ok), "s", "g", &Limits::default(), NOW).unwrap();
    assert!(
        matches!(r.command, Command::RosterBatch { ref upserts, ref removes } if upserts.len() == 1 && removes.len() == 1)
    );
    assert_eq!(code(&inb("roster.batch", "{}")), ErrorCode::InvalidValue, "an empty batch");
    assert_eq!(
        code(&inb("roster.batch", r#"{"upserts":[{"id":"a","mode":"card"}],"removes":["a"]}"#)),
        ErrorCode::InvalidValue
    );
    assert_eq!(code(&inb("roster.batch", r#"{"upserts":[],"extra":1}"#)), ErrorCode::UnknownField);
}
