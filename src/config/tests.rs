use super::*;

#[test]
fn the_default_config_is_valid() {
    let cfg = parse(DEFAULT_CONFIG).unwrap();
    assert_eq!(cfg.topic_root(), "menshen/v1/site1/gate1/");
    assert_eq!(cfg.utc_offset_secs(), 8 * 3600);
    assert!(cfg.mqtt.username.is_none() && cfg.mqtt.password_file.is_none(), "no default credentials");
}

#[test]
fn the_packaged_board_config_is_the_default_on_rpi_hardware() {
    let board = include_str!("../../config/menshen.rpi.toml");
    let cfg = parse(board).unwrap();
    assert_eq!(cfg.hardware.backend, Backend::Gpiochip);
    // Only the backend line differs, so the two files cannot drift apart.
    let differing: Vec<_> = DEFAULT_CONFIG.lines().zip(board.lines()).filter(|(a, b)| a != b).collect();
    assert_eq!(differing.len(), 1, "{differing:?}");
    assert_eq!(DEFAULT_CONFIG.lines().count(), board.lines().count());
}

fn with(edit: impl Fn(&mut toml::Table)) -> Result<Config, ConfigError> {
    let mut t: toml::Table = toml::from_str(DEFAULT_CONFIG).unwrap();
    edit(&mut t);
    parse(&toml::to_string(&t).unwrap())
}

fn first<'a>(t: &'a mut toml::Table, arr: &str) -> &'a mut toml::Table {
    t[arr].as_array_mut().unwrap()[0].as_table_mut().unwrap()
}

#[test]
fn errors_name_the_key_and_have_distinct_codes() {
    type Edit = Box<dyn Fn(&mut toml::Table)>;
    let cases: Vec<(Edit, i32, &str)> = vec![
        (
            Box::new(|t| {
                first(t, "doors").insert("pulse_ms".into(), 0.into());
            }),
            EXIT_INVALID,
            "doors[0].pulse_ms",
        ),
        (
            Box::new(|t| {
                first(t, "readers").insert("door".into(), "nowhere".into());
            }),
            EXIT_INVALID,
            "readers[0].door",
        ),
        (
            Box::new(|t| {
                first(t, "readers").insert("d1_pin".into(), 17.into());
            }),
            EXIT_INVALID,
            "readers[0].d1_pin",
        ),
        (
            Box::new(|t| {
                first(t, "readers").insert("formats".into(), toml::Value::Array(vec!["H99999".into()]));
            }),
            EXIT_INVALID,
            "readers[0].formats[0]",
        ),
        (
            Box::new(|t| {
                first(t, "readers").insert("frame_gap_ms".into(), 5.into());
            }),
            EXIT_INVALID,
            "readers[0].frame_gap_ms",
        ),
        (
            Box::new(|t| {
                first(t, "readers").insert("star_key".into(), 12.into());
            }),
            EXIT_INVALID,
            "readers[0].star_key",
        ),
        (
            // A card reader cut at 4 bits would never read a card.
            Box::new(|t| {
                first(t, "readers").insert("key_bits".into(), 4.into());
            }),
            EXIT_INVALID,
            "readers[0].key_bits",
        ),
        (
            // The only reader of the door a keypad: no card reader left (P1).
            Box::new(|t| {
                first(t, "readers").insert("role".into(), "keys".into());
            }),
            EXIT_INVALID,
            "doors[0]",
        ),
        (
            Box::new(|t| {
                let mut kp = toml::Table::new();
                kp.insert("min_len".into(), 3.into());
                t.insert("keypad".into(), kp.into());
            }),
            EXIT_INVALID,
            "keypad.min_len",
        ),
        (
            Box::new(|t| {
                t["gate"].as_table_mut().unwrap().insert("site".into(), "a/b".into());
            }),
            EXIT_INVALID,
            "gate.site",
        ),
        (
            Box::new(|t| {
                t["gate"].as_table_mut().unwrap().insert("utc_offset".into(), "8".into());
            }),
            EXIT_INVALID,
            "gate.utc_offset",
        ),
        (
            Box::new(|t| {
                t["mqtt"].as_table_mut().unwrap().insert("inflight".into(), 0.into());
            }),
            EXIT_INVALID,
            "mqtt.inflight",
        ),
        (
            Box::new(|t| {
                t.remove("readers");
            }),
            EXIT_INVALID,
            "doors[0]",
        ),
    ];
    for (i, (edit, code, key)) in cases.into_iter().enumerate() {
        let err = with(edit).unwrap_err();
        assert_eq!(err.exit_code(), code, "case {i}: {err}");
        assert_eq!(err.key(), Some(key), "case {i}: {err}");
        assert!(err.to_string().contains(key), "case {i}: {err}");
    }
}

#[test]
fn line_names_are_checked() {
    let bad = |backend: &str, line: toml::Value| {
        let backend = backend.to_string();
        with(move |t| {
            t["hardware"].as_table_mut().unwrap().insert("backend".into(), backend.clone().into());
            first(t, "doors").insert("relay_pin".into(), line.clone());
        })
    };
    for line in ["gpiochip0:x", "", "spi0:3", "A_NAME_LONGER_THAN_THE_KERNEL_ALLOWS"] {
        let err = bad("gpiochip", line.into()).unwrap_err();
        assert_eq!(err.key(), Some("doors[0].relay_pin"), "{line}: {err}");
    }
    // Every form the kernel names a line by.
    for line in ["GPIO22", "RELAY1", "gpiochip1:5", "/dev/gpiochip4:17"] {
        let cfg = bad("gpiochip", line.into()).unwrap();
        assert_eq!(cfg.doors[0].relay_pin.to_string(), line);
    }
    // `rpi`, the backend's old name, is the same backend.
    assert_eq!(bad("rpi", 22.into()).unwrap().hardware.backend, Backend::Gpiochip);
    // The simulated chip resolves GPIOn and gpiochipC:o, and nothing it cannot have.
    assert_eq!(bad("sim", "GPIO22".into()).unwrap().doors[0].relay_pin.sim_pin(), Ok(22));
    assert_eq!(bad("sim", "gpiochip1:5".into()).unwrap().doors[0].relay_pin.sim_pin(), Ok(69));
    assert_eq!(bad("sim", "RELAY1".into()).unwrap_err().key(), Some("doors[0].relay_pin"));
    assert_eq!(bad("sim", 300.into()).unwrap_err().key(), Some("doors[0].relay_pin"));
}

#[test]
fn unknown_keys_and_wrong_types_are_syntax_errors() {
    let err = with(|t| {
        t["gate"].as_table_mut().unwrap().insert("sight".into(), "x".into());
    })
    .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_SYNTAX);
    assert!(err.to_string().contains("sight"), "{err}");
    let err = with(|t| {
        first(t, "doors").insert("pulse_ms".into(), "long".into());
    })
    .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_SYNTAX);
    assert!(err.to_string().contains("pulse_ms"), "{err}");
    let err = with(|t| {
        first(t, "doors").insert("fail_mode".into(), "sometimes".into());
    })
    .unwrap_err();
    assert_eq!(err.exit_code(), EXIT_SYNTAX);
    assert!(parse("not toml [").unwrap_err().exit_code() == EXIT_SYNTAX);
}

/// An OSDP reader table for `door`.
fn osdp_reader(name: &str, address: i64) -> toml::Value {
    let mut r = toml::Table::new();
    r.insert("name".into(), name.into());
    r.insert("door".into(), "front".into());
    r.insert("device".into(), "/dev/ttyUSB0".into());
    r.insert("address".into(), address.into());
    toml::Value::Table(r)
}

#[test]
fn osdp_readers_are_checked_and_count_as_a_doors_card_reader() {
    let cfg = with(|t| {
        t.insert("osdp_readers".into(), toml::Value::Array(vec![osdp_reader("lobby", 0)]));
    })
    .unwrap();
    let r = &cfg.osdp_readers[0];
    assert_eq!((r.baud, r.address, r.insecure, r.offline_alarm_ms), (9600, 0, false, 3000));
    assert_eq!(cfg.osdp_key_path(r), cfg.gate.state_dir.join("osdp-lobby.key"));
    // A door whose only reader is an OSDP reader still has a non-face way in (P1).
    with(|t| {
        t.remove("readers");
        t.insert("osdp_readers".into(), toml::Value::Array(vec![osdp_reader("lobby", 0)]));
    })
    .unwrap();
    type Edit = Box<dyn Fn(&mut toml::Table)>;
    let set = |k: &'static str, v: toml::Value| -> Edit {
        Box::new(move |t: &mut toml::Table| {
            let mut r = osdp_reader("lobby", 0);
            r.as_table_mut().unwrap().insert(k.into(), v.clone());
            t.insert("osdp_readers".into(), toml::Value::Array(vec![r]));
        })
    };
    let cases: Vec<(Edit, &str)> = vec![
        (set("address", 127.into()), "osdp_readers[0].address"),
        (set("baud", 1234.into()), "osdp_readers[0].baud"),
        (set("door", "nowhere".into()), "osdp_readers[0].door"),
        (set("offline_alarm_ms", 500.into()), "osdp_readers[0].offline_alarm_ms"),
        (set("formats", toml::Value::Array(vec!["H99999".into()])), "osdp_readers[0].formats[0]"),
        (set("name", "front".into()), "osdp_readers[0].name"),
        (
            Box::new(|t| {
                t.insert("osdp_readers".into(), toml::Value::Array(vec![osdp_reader("a", 5), osdp_reader("b", 5)]));
            }),
            "osdp_readers[1].device",
        ),
    ];
    for (i, (edit, key)) in cases.into_iter().enumerate() {
        let err = with(edit).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_INVALID, "case {i}: {err}");
        assert_eq!(err.key(), Some(key), "case {i}: {err}");
    }
}
