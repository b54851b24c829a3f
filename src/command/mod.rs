//! BMS commands: the pure parser and validator (REQUIREMENTS M1, M3). No I/O.
//!
//! A command arrives as an MQTT publish on `menshen/v1/{site}/{gate}/cmd/{verb}` (or the
//! site-wide `menshen/v1/{site}/_site/cmd/{verb}`). [`parse`] turns it into a [`Request`] or a
//! [`CmdError`] with a stable code; nothing here touches the store or the door, so every refusal
//! is, by construction, a refusal with no state change. The executor (`api`) then checks what
//! needs the store (unknown resident, the Art. 10 guard, repeated request ids).
//!
//! Replay rules (M3): a retained command is refused (a broker hands retained messages to every
//! new subscriber, so acting on one would replay it); a command past its `expires_at` is refused;
//! an `unlock` must carry an expiry (MQTT 5 message expiry or `expires_at`) no further ahead than
//! the configured maximum, and its request id is remembered durably for longer than that, so no
//! unlock can ever be replayed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::model::{AccessMode, ResidentId};
use crate::wiegand::CardId;

mod args;
mod json;
mod reply;

pub use args::*;
pub use json::parse_strict;
pub use reply::{reply_json, CmdError, ErrorCode};

/// Where commands for this gate and for the whole site arrive.
pub const SITE_SCOPE: &str = "_site";

/// The command verbs (the last topic level).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verb {
    #[serde(rename = "unlock")]
    Unlock,
    #[serde(rename = "resident.upsert")]
    ResidentUpsert,
    #[serde(rename = "resident.remove")]
    ResidentRemove,
    #[serde(rename = "resident.set_mode")]
    ResidentSetMode,
    #[serde(rename = "credential.add")]
    CredentialAdd,
    #[serde(rename = "credential.remove")]
    CredentialRemove,
    #[serde(rename = "roster.sync")]
    RosterSync,
    #[serde(rename = "roster.batch")]
    RosterBatch,
    #[serde(rename = "rules.get")]
    RulesGet,
    #[serde(rename = "health.get")]
    HealthGet,
    #[serde(rename = "events.backfill")]
    EventsBackfill,
    #[serde(rename = "consent.record")]
    ConsentRecord,
    #[serde(rename = "consent.withdraw")]
    ConsentWithdraw,
    #[serde(rename = "face.enrol")]
    FaceEnrol,
}

impl Verb {
    pub const ALL: [Verb; 14] = [
        Verb::Unlock,
        Verb::ResidentUpsert,
        Verb::ResidentRemove,
        Verb::ResidentSetMode,
        Verb::CredentialAdd,
        Verb::CredentialRemove,
        Verb::RosterSync,
        Verb::RosterBatch,
        Verb::RulesGet,
        Verb::HealthGet,
        Verb::EventsBackfill,
        Verb::ConsentRecord,
        Verb::ConsentWithdraw,
        Verb::FaceEnrol,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Verb::Unlock => "unlock",
            Verb::ResidentUpsert => "resident.upsert",
            Verb::ResidentRemove => "resident.remove",
            Verb::ResidentSetMode => "resident.set_mode",
            Verb::CredentialAdd => "credential.add",
            Verb::CredentialRemove => "credential.remove",
            Verb::RosterSync => "roster.sync",
            Verb::RosterBatch => "roster.batch",
            Verb::RulesGet => "rules.get",
            Verb::HealthGet => "health.get",
            Verb::EventsBackfill => "events.backfill",
            Verb::ConsentRecord => "consent.record",
            Verb::ConsentWithdraw => "consent.withdraw",
            Verb::FaceEnrol => "face.enrol",
        }
    }

    pub fn from_name(s: &str) -> Option<Verb> {
        Verb::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// Limits from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub max_depth: usize,
    /// The longest remote unlock.
    pub unlock_max_ms: u64,
    /// How far ahead an unlock's expiry may be (and the least time request ids are kept).
    pub max_command_lifetime_ms: u64,
    /// Replies go only under this topic prefix (`mqtt.reply_topic_prefix`).
    pub reply_topic_prefix: String,
    /// The largest page of a paged `roster.sync`.
    pub roster_page_max_bytes: usize,
    /// How many digits a PIN may have (`keypad.min_len`, `keypad.max_len`).
    pub pin_len: (u8, u8),
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1 << 20,
            max_depth: 16,
            unlock_max_ms: 30_000,
            max_command_lifetime_ms: 300_000,
            reply_topic_prefix: "bms/".into(),
            roster_page_max_bytes: 256 << 10,
            pin_len: (4, 8),
        }
    }
}

/// An MQTT publish as the link received it.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation: Option<Vec<u8>>,
    /// MQTT 5 message expiry interval (seconds remaining).
    pub expiry_secs: Option<u32>,
}

/// Where and how to reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub topic: String,
    /// Echoed as MQTT 5 correlation data.
    pub correlation: Option<Vec<u8>>,
}

/// The most residents one roster snapshot may hold.
pub const MAX_ROSTER: usize = 100_000;
/// The most pages of one paged `roster.sync`.
pub const MAX_PAGES: u32 = 10_000;
/// The most entries (upserts and removals) of one `roster.batch`.
pub const MAX_BATCH: usize = 10_000;
/// A sync id: 1-64 of A-Z a-z 0-9 - _ . :
fn valid_sync_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}
/// The most events one backfill request re-sends.
pub const MAX_BACKFILL: usize = 10_000;

/// A validated command.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Unlock {
        door: String,
        duration_ms: Option<u64>,
    },
    ResidentUpsert(ResidentSpec),
    ResidentRemove(ResidentId),
    SetMode {
        resident: ResidentId,
        mode: AccessMode,
    },
    CredentialAdd {
        resident: ResidentId,
        card: CardSpec,
    },
    CredentialRemove(CardId),
    /// Set a resident's PIN or duress PIN (replacing the one they had).
    PinSet {
        resident: ResidentId,
        pin: PinSpec,
    },
    PinRemove {
        resident: ResidentId,
        duress: bool,
    },
    RosterSync {
        version: u64,
        residents: Vec<ResidentSpec>,
        /// Set for one page of a paged sync.
        paging: Option<Paging>,
    },
    /// Upserts and removals in one transaction: all or nothing.
    RosterBatch {
        upserts: Vec<ResidentSpec>,
        removes: Vec<ResidentId>,
    },
    RulesGet,
    HealthGet,
    EventsBackfill {
        from_seq: u64,
        limit: usize,
    },
    ConsentRecord(ConsentArgs),
    ConsentWithdraw(ResidentId),
    /// Enrol a resident's face from this gate's own camera: the frames never leave the gate.
    FaceEnrol {
        resident: ResidentId,
        frames: usize,
        timeout_ms: u64,
    },
}

/// A command ready to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub verb: Verb,
    pub request_id: String,
    pub reply: Option<ReplyTo>,
    /// Came in on the site-wide topic.
    pub site_wide: bool,
    pub command: Command,
}

/// What [`parse`] could learn before refusing, so the refusal can still be answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub verb: Option<Verb>,
    pub request_id: Option<String>,
    pub reply: Option<ReplyTo>,
    pub error: CmdError,
}

/// Is `t` a topic we may publish a reply to? Under `prefix` (`mqtt.reply_topic_prefix`: the
/// broker's ACL lets the gate write there, so a reply is never refused), no wildcards, no NUL,
/// and never a command topic (a forged response topic must not turn a reply into somebody's
/// command).
pub fn valid_reply_topic(t: &str, prefix: &str) -> bool {
    if t.is_empty() || t.len() > 512 || t.contains(['+', '#', '\0']) || !t.starts_with(prefix) {
        return false;
    }
    let levels: Vec<&str> = t.split('/').collect();
    !(levels.len() >= 5 && levels[0] == "menshen" && levels[4] == "cmd")
}

/// The most bytes of MQTT 5 correlation data: its request id (`cdx:` + 2 hex digits a byte)
/// then fits the 128 characters of a request id.
pub const MAX_CORRELATION: usize = 62;

/// Request ids made from correlation data start with these; a payload `request_id` may not, so
/// the two namespaces never meet (`\xca\xfe` is `cdx:cafe`, never `cafe`).
const CORRELATION_PREFIXES: [&str; 2] = ["cd:", "cdx:"];

fn valid_request_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic())
}

/// The request id that correlation data stands for: `cd:` + the text when it is printable
/// ASCII, else `cdx:` + hex; `None` when it is empty or over [`MAX_CORRELATION`] bytes.
pub fn correlation_request_id(c: &[u8]) -> Option<String> {
    if c.is_empty() || c.len() > MAX_CORRELATION {
        return None;
    }
    Some(match std::str::from_utf8(c) {
        Ok(s) if s.chars().all(|ch| ch.is_ascii_graphic()) => format!("cd:{s}"),
        _ => format!("cdx:{}", crate::digest::hex(c)),
    })
}

/// The deepest nesting of arrays and objects in `bytes` (JSON text), without parsing it, so a
/// hostile payload cannot exhaust the parser's stack.
pub fn json_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Map a serde error to a code (its message says which rule was broken), said in JSON's terms.
fn shape_error(e: &serde_json::Error) -> CmdError {
    let msg = e.to_string();
    let code = if msg.starts_with("unknown field") {
        ErrorCode::UnknownField
    } else if msg.starts_with("missing field") {
        ErrorCode::MissingField
    } else if msg.starts_with("invalid type") {
        ErrorCode::WrongType
    } else {
        ErrorCode::InvalidValue
    };
    CmdError::new(code, json::plain(&msg))
}

fn args<T: serde::de::DeserializeOwned>(rest: Map<String, Value>) -> Result<T, CmdError> {
    serde_json::from_value(Value::Object(rest)).map_err(|e| shape_error(&e))
}

/// The verb and scope of a command topic, if it is one of ours.
pub fn topic_verb(topic: &str, site: &str, gate: &str) -> Option<(String, bool)> {
    let mut it = topic.splitn(6, '/');
    let (a, b, s, g, c, verb) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if a != "menshen" || b != "v1" || s != site || c != "cmd" {
        return None;
    }
    if g == gate {
        Some((verb.to_string(), false))
    } else if g == SITE_SCOPE {
        Some((verb.to_string(), true))
    } else {
        None
    }
}

/// Parse and validate one command publish at wall time `now_ms`.
pub fn parse(inb: &Inbound, site: &str, gate: &str, limits: &Limits, now_ms: i64) -> Result<Request, Box<Refusal>> {
    // The reply path first, so that even a refusal can be answered.
    let mut reply =
        inb.response_topic.as_ref().map(|t| ReplyTo { topic: t.clone(), correlation: inb.correlation.clone() });
    let refuse = |verb: Option<Verb>, rid: Option<String>, reply: Option<ReplyTo>, error: CmdError| {
        Box::new(Refusal { verb, request_id: rid, reply, error })
    };
    let corr_id = match inb.correlation.as_deref() {
        None => None,
        Some(c) => match correlation_request_id(c) {
            Some(id) => Some(id),
            None => {
                // Answered (the BMS matches the reply by its correlation data), but no id is made
                // from it and nothing is stored.
                let verb = topic_verb(&inb.topic, site, gate).and_then(|(v, _)| Verb::from_name(&v));
                let e = CmdError::new(
                    ErrorCode::InvalidCorrelationData,
                    format!(
                        "correlation data must be 1 to {MAX_CORRELATION} bytes (it stands for the request id); got {}",
                        c.len()
                    ),
                );
                return Err(refuse(
                    verb,
                    None,
                    reply.filter(|r| valid_reply_topic(&r.topic, &limits.reply_topic_prefix)),
                    e,
                ));
            }
        },
    };

    let Some((verb_s, site_wide)) = topic_verb(&inb.topic, site, gate) else {
        return Err(refuse(None, corr_id, reply, CmdError::new(ErrorCode::UnknownCommand, "not a command topic")));
    };
    let verb = Verb::from_name(&verb_s);
    if inb.retain {
        let e = CmdError::new(
            ErrorCode::RetainedCommand,
            "retained commands are refused: a broker re-delivers them to every new subscriber",
        );
        return Err(refuse(verb, corr_id, reply, e));
    }
    let Some(verb) = verb else {
        let shown: String = verb_s.chars().take(64).collect();
        return Err(refuse(
            None,
            corr_id,
            reply,
            CmdError::new(ErrorCode::UnknownCommand, format!("no command `{shown}`")),
        ));
    };
    if inb.payload.len() > limits.max_payload_bytes {
        let e = CmdError::new(
            ErrorCode::PayloadTooLarge,
            format!("payload of {} bytes is over the limit of {}", inb.payload.len(), limits.max_payload_bytes),
        );
        return Err(refuse(Some(verb), corr_id, reply, e));
    }
    let text = match std::str::from_utf8(&inb.payload) {
        Ok(t) => t,
        Err(e) => {
            let e = CmdError::new(ErrorCode::InvalidUtf8, format!("payload is not UTF-8: {e}"));
            return Err(refuse(Some(verb), corr_id, reply, e));
        }
    };
    let depth = json_depth(text.as_bytes());
    if depth > limits.max_depth {
        let e = CmdError::new(
            ErrorCode::TooDeep,
            format!("nesting depth {depth} is over the limit of {}", limits.max_depth),
        );
        return Err(refuse(Some(verb), corr_id, reply, e));
    }
    let value: Value = match parse_strict(text) {
        Ok(v) => v,
        Err(e) => {
            let msg = e.to_string();
            let code =
                if msg.starts_with(json::DUPLICATE_KEY) { ErrorCode::DuplicateKey } else { ErrorCode::InvalidJson };
            return Err(refuse(Some(verb), corr_id, reply, CmdError::new(code, msg)));
        }
    };
    let Value::Object(mut obj) = value else {
        let e = CmdError::new(ErrorCode::NotAnObject, "a command payload is a JSON object");
        return Err(refuse(Some(verb), corr_id, reply, e));
    };

    // Envelope fields, common to every command.
    let request_id = match obj.remove("request_id") {
        None => None,
        Some(Value::String(s)) if CORRELATION_PREFIXES.iter().any(|p| s.starts_with(p)) => {
            let e = CmdError::new(
                ErrorCode::InvalidRequestId,
                "request_id may not start with `cd:` or `cdx:`: those are the ids made from correlation data",
            );
            return Err(refuse(Some(verb), corr_id, reply, e));
        }
        Some(Value::String(s)) if valid_request_id(&s) => Some(s),
        Some(Value::String(_)) => {
            let e = CmdError::new(ErrorCode::InvalidRequestId, "request_id: 1-128 printable ASCII characters");
            return Err(refuse(Some(verb), corr_id, reply, e));
        }
        Some(_) => {
            let e = CmdError::new(ErrorCode::WrongType, "request_id must be a string");
            return Err(refuse(Some(verb), corr_id, reply, e));
        }
    };
    let rid = request_id.clone().or(corr_id.clone());
    match obj.remove("reply_to") {
        None => {}
        Some(Value::String(t)) if reply.is_none() => reply = Some(ReplyTo { topic: t, correlation: None }),
        // MQTT 5's response topic wins over the payload field.
        Some(Value::String(_)) => {}
        Some(_) => {
            let e = CmdError::new(ErrorCode::WrongType, "reply_to must be a string");
            return Err(refuse(Some(verb), rid, reply, e));
        }
    }
    if let Some(r) = &reply {
        if !valid_reply_topic(&r.topic, &limits.reply_topic_prefix) {
            let e = CmdError::new(
                ErrorCode::InvalidReplyTo,
                format!(
                    "the reply topic must be a plain topic name (no wildcards) under `{}` (mqtt.reply_topic_prefix) \
                     and outside any cmd/ tree",
                    limits.reply_topic_prefix
                ),
            );
            return Err(refuse(Some(verb), rid, None, e));
        }
    }
    let expires_at = match obj.remove("expires_at") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(t) => Some(t),
            None => {
                let e = CmdError::new(ErrorCode::WrongType, "expires_at must be an integer (Unix ms)");
                return Err(refuse(Some(verb), rid, reply, e));
            }
        },
    };
    let Some(request_id) = rid else {
        let e = CmdError::new(
            ErrorCode::MissingRequestId,
            "every command needs a request_id (or MQTT 5 correlation data): it is how replays are refused",
        );
        return Err(refuse(Some(verb), None, reply, e));
    };
    let rid = Some(request_id.clone());
    if let Some(t) = expires_at {
        if t <= now_ms {
            let e = CmdError::new(ErrorCode::Expired, format!("expired {} ms ago", now_ms - t));
            return Err(refuse(Some(verb), rid, reply, e));
        }
    }
    if verb == Verb::Unlock {
        let lifetime = limits.max_command_lifetime_ms as i64;
        let from_expiry = inb.expiry_secs.map(|s| i64::from(s) * 1000);
        let from_field = expires_at.map(|t| t - now_ms);
        match (from_expiry, from_field) {
            (None, None) => {
                let e = CmdError::new(
                    ErrorCode::ExpiryRequired,
                    "an unlock must carry an expiry: MQTT 5 message expiry or expires_at (Unix ms)",
                );
                return Err(refuse(Some(verb), rid, reply, e));
            }
            (a, b) => {
                let ahead = a.into_iter().chain(b).min().unwrap_or(0);
                if ahead > lifetime {
                    let e = CmdError::new(
                        ErrorCode::ExpiryTooFar,
                        format!("an unlock may live at most {lifetime} ms; this one {ahead} ms"),
                    );
                    return Err(refuse(Some(verb), rid, reply, e));
                }
            }
        }
    }

    let command = verb_args(verb, obj, limits, inb.payload.len())
        .map_err(|e| refuse(Some(verb), rid.clone(), reply.clone(), e))?;
    Ok(Request { verb, request_id, reply, site_wide, command })
}

/// Every resident checked, none twice.
fn unique_residents(residents: &[ResidentSpec]) -> Result<(), CmdError> {
    let mut seen = std::collections::HashSet::new();
    for r in residents {
        r.check()?;
        if !seen.insert(&r.id) {
            return Err(CmdError::new(ErrorCode::InvalidValue, format!("resident {} appears twice", r.id)));
        }
    }
    Ok(())
}

fn verb_args(verb: Verb, obj: Map<String, Value>, limits: &Limits, payload_len: usize) -> Result<Command, CmdError> {
    Ok(match verb {
        Verb::Unlock => {
            let a: UnlockArgs = args(obj)?;
            if let Some(d) = a.duration_ms {
                if d == 0 || d > limits.unlock_max_ms {
                    return Err(CmdError::new(
                        ErrorCode::InvalidValue,
                        format!("duration_ms must be 1..={} (got {d})", limits.unlock_max_ms),
                    ));
                }
            }
            Command::Unlock { door: a.door, duration_ms: a.duration_ms }
        }
        Verb::ResidentUpsert => {
            let a: UpsertArgs = args(obj)?;
            a.resident.check()?;
            Command::ResidentUpsert(a.resident)
        }
        Verb::ResidentRemove => Command::ResidentRemove(args::<ResidentArgs>(obj)?.resident),
        Verb::ResidentSetMode => {
            let a: SetModeArgs = args(obj)?;
            Command::SetMode { resident: a.resident, mode: a.mode }
        }
        Verb::CredentialAdd => {
            let a: CredentialAddArgs = args(obj)?;
            match (a.card, a.pin) {
                (Some(card), None) => {
                    card.check()?;
                    Command::CredentialAdd { resident: a.resident, card }
                }
                (None, Some(pin)) => {
                    let (min, max) = limits.pin_len;
                    let n = pin.pin.0.len();
                    if !(usize::from(min)..=usize::from(max)).contains(&n) {
                        let msg = format!("pin.pin must be {min} to {max} digits (keypad.min_len, keypad.max_len)");
                        return Err(CmdError::new(ErrorCode::InvalidValue, msg));
                    }
                    pin.validity
                        .validate()
                        .map_err(|e| CmdError::new(ErrorCode::InvalidValue, format!("pin validity: {e}")))?;
                    Command::PinSet { resident: a.resident, pin }
                }
                (None, None) => {
                    return Err(CmdError::new(ErrorCode::MissingField, "credential.add needs `card` or `pin`"))
                }
                (Some(_), Some(_)) => {
                    return Err(CmdError::new(ErrorCode::InvalidValue, "credential.add takes one of `card` or `pin`"))
                }
            }
        }
        Verb::CredentialRemove => match args::<CredentialRemoveArgs>(obj)? {
            CredentialRemoveArgs { card: Some(c), resident: None, pin: None } => {
                Command::CredentialRemove(CardId { format: c.format, facility: c.facility, number: c.number })
            }
            CredentialRemoveArgs { card: None, resident: Some(resident), pin: Some(slot) } => {
                Command::PinRemove { resident, duress: slot == PinSlot::Duress }
            }
            _ => {
                let msg = "credential.remove takes `card`, or `resident` with `pin` (\"pin\" or \"duress\")";
                return Err(CmdError::new(ErrorCode::InvalidValue, msg));
            }
        },
        Verb::RosterSync => {
            let a: RosterArgs = args(obj)?;
            let paging = match (a.sync_id, a.page, a.pages) {
                (None, None, None) => None,
                (Some(sync_id), Some(page), Some(pages)) => {
                    if !valid_sync_id(&sync_id) {
                        return Err(CmdError::new(ErrorCode::InvalidValue, "sync_id: 1-64 of A-Z a-z 0-9 - _ . :"));
                    }
                    if pages == 0 || pages > MAX_PAGES || page >= pages {
                        return Err(CmdError::new(
                            ErrorCode::InvalidValue,
                            format!("pages must be 1..={MAX_PAGES} and page 0..pages (got page {page} of {pages})"),
                        ));
                    }
                    if payload_len > limits.roster_page_max_bytes {
                        return Err(CmdError::new(
                            ErrorCode::PayloadTooLarge,
                            format!(
                                "a roster.sync page may be at most {} bytes (mqtt.roster_page_max_bytes); this one is {payload_len}",
                                limits.roster_page_max_bytes
                            ),
                        ));
                    }
                    Some(Paging { sync_id, page, pages })
                }
                _ => {
                    return Err(CmdError::new(
                        ErrorCode::MissingField,
                        "a paged roster.sync names sync_id, page and pages (all three)",
                    ))
                }
            };
            if a.residents.len() > MAX_ROSTER {
                return Err(CmdError::new(ErrorCode::InvalidValue, format!("at most {MAX_ROSTER} residents")));
            }
            unique_residents(&a.residents)?;
            Command::RosterSync { version: a.version, residents: a.residents, paging }
        }
        Verb::RosterBatch => {
            let a: BatchArgs = args(obj)?;
            let n = a.upserts.len() + a.removes.len();
            if n == 0 || n > MAX_BATCH {
                return Err(CmdError::new(
                    ErrorCode::InvalidValue,
                    format!("a batch holds 1..={MAX_BATCH} upserts and removals (got {n})"),
                ));
            }
            unique_residents(&a.upserts)?;
            let mut seen: std::collections::HashSet<&ResidentId> = a.upserts.iter().map(|r| &r.id).collect();
            for id in &a.removes {
                if !seen.insert(id) {
                    return Err(CmdError::new(
                        ErrorCode::InvalidValue,
                        format!("resident {id} appears twice in the batch"),
                    ));
                }
            }
            Command::RosterBatch { upserts: a.upserts, removes: a.removes }
        }
        Verb::RulesGet => {
            args::<Empty>(obj)?;
            Command::RulesGet
        }
        Verb::HealthGet => {
            args::<Empty>(obj)?;
            Command::HealthGet
        }
        Verb::ConsentRecord => {
            let a: ConsentArgs = args(obj)?;
            if a.retention_days == Some(0) || a.retention_days.is_some_and(|d| d > crate::model::MAX_RETENTION_DAYS) {
                return Err(CmdError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "retention_days must be 1..={}: a consent is never unlimited",
                        crate::model::MAX_RETENTION_DAYS
                    ),
                ));
            }
            if a.minor && a.guardian.is_none() {
                return Err(CmdError::new(ErrorCode::InvalidValue, "a minor's consent names the guardian who gave it"));
            }
            Command::ConsentRecord(a)
        }
        Verb::ConsentWithdraw => Command::ConsentWithdraw(args::<ResidentArgs>(obj)?.resident),
        Verb::FaceEnrol => {
            let a: FaceEnrolArgs = args(obj)?;
            let frames = a.frames.unwrap_or(3);
            let timeout_ms = a.timeout_ms.unwrap_or(10_000);
            if !ENROL_FRAMES.contains(&frames) || !ENROL_TIMEOUT_MS.contains(&timeout_ms) {
                return Err(CmdError::new(
                    ErrorCode::InvalidValue,
                    format!(
                        "frames must be {}..={} and timeout_ms {}..={}",
                        ENROL_FRAMES.start(),
                        ENROL_FRAMES.end(),
                        ENROL_TIMEOUT_MS.start(),
                        ENROL_TIMEOUT_MS.end()
                    ),
                ));
            }
            Command::FaceEnrol { resident: a.resident, frames: frames as usize, timeout_ms }
        }
        Verb::EventsBackfill => {
            let a: BackfillArgs = args(obj)?;
            let limit = a.limit.unwrap_or(1_000);
            if limit == 0 || limit > MAX_BACKFILL {
                return Err(CmdError::new(ErrorCode::InvalidValue, format!("limit must be 1..={MAX_BACKFILL}")));
            }
            Command::EventsBackfill { from_seq: a.from_seq, limit }
        }
    })
}

#[cfg(test)]
mod tests;
