//! Error codes, refusals and reply payloads.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Verb;

/// Stable error codes of command replies (documented in `docs/asyncapi.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    RetainedCommand,
    UnknownCommand,
    PayloadTooLarge,
    InvalidUtf8,
    InvalidJson,
    DuplicateKey,
    TooDeep,
    NotAnObject,
    UnknownField,
    MissingField,
    WrongType,
    InvalidValue,
    MissingRequestId,
    InvalidRequestId,
    InvalidReplyTo,
    InvalidCorrelationData,
    Expired,
    ExpiryRequired,
    ExpiryTooFar,
    DuplicateRequest,
    UnknownResident,
    UnknownDoor,
    UnknownCredential,
    CredentialTaken,
    FaceOnlyRefused,
    StaleVersion,
    VersionConflict,
    PageOutOfOrder,
    DuplicatePage,
    UnknownSync,
    Busy,
    FaceUnavailable,
    EnrolmentFailed,
    InternalError,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 34] = [
        ErrorCode::RetainedCommand,
        ErrorCode::UnknownCommand,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidUtf8,
        ErrorCode::InvalidJson,
        ErrorCode::DuplicateKey,
        ErrorCode::TooDeep,
        ErrorCode::NotAnObject,
        ErrorCode::UnknownField,
        ErrorCode::MissingField,
        ErrorCode::WrongType,
        ErrorCode::InvalidValue,
        ErrorCode::MissingRequestId,
        ErrorCode::InvalidRequestId,
        ErrorCode::InvalidReplyTo,
        ErrorCode::InvalidCorrelationData,
        ErrorCode::Expired,
        ErrorCode::ExpiryRequired,
        ErrorCode::ExpiryTooFar,
        ErrorCode::DuplicateRequest,
        ErrorCode::UnknownResident,
        ErrorCode::UnknownDoor,
        ErrorCode::UnknownCredential,
        ErrorCode::CredentialTaken,
        ErrorCode::FaceOnlyRefused,
        ErrorCode::StaleVersion,
        ErrorCode::VersionConflict,
        ErrorCode::PageOutOfOrder,
        ErrorCode::DuplicatePage,
        ErrorCode::UnknownSync,
        ErrorCode::Busy,
        ErrorCode::FaceUnavailable,
        ErrorCode::EnrolmentFailed,
        ErrorCode::InternalError,
    ];

    pub fn code(self) -> &'static str {
        match self {
            ErrorCode::RetainedCommand => "retained_command",
            ErrorCode::UnknownCommand => "unknown_command",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::DuplicateKey => "duplicate_key",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::NotAnObject => "not_an_object",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::WrongType => "wrong_type",
            ErrorCode::InvalidValue => "invalid_value",
            ErrorCode::MissingRequestId => "missing_request_id",
            ErrorCode::InvalidRequestId => "invalid_request_id",
            ErrorCode::InvalidReplyTo => "invalid_reply_to",
            ErrorCode::InvalidCorrelationData => "invalid_correlation_data",
            ErrorCode::Expired => "expired",
            ErrorCode::ExpiryRequired => "expiry_required",
            ErrorCode::ExpiryTooFar => "expiry_too_far",
            ErrorCode::DuplicateRequest => "duplicate_request",
            ErrorCode::UnknownResident => "unknown_resident",
            ErrorCode::UnknownDoor => "unknown_door",
            ErrorCode::UnknownCredential => "unknown_credential",
            ErrorCode::CredentialTaken => "credential_taken",
            ErrorCode::FaceOnlyRefused => "face_only_refused",
            ErrorCode::StaleVersion => "stale_version",
            ErrorCode::VersionConflict => "version_conflict",
            ErrorCode::PageOutOfOrder => "page_out_of_order",
            ErrorCode::DuplicatePage => "duplicate_page",
            ErrorCode::UnknownSync => "unknown_sync",
            ErrorCode::Busy => "busy",
            ErrorCode::FaceUnavailable => "face_unavailable",
            ErrorCode::EnrolmentFailed => "enrolment_failed",
            ErrorCode::InternalError => "internal_error",
        }
    }
}

/// A refused command: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmdError {
    pub code: ErrorCode,
    pub message: String,
}

impl CmdError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CmdError {
        CmdError { code, message: message.into() }
    }
}

impl std::fmt::Display for CmdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.code(), self.message)
    }
}

/// A reply payload: `{request_id, command, site, gate, ok, result | code + message}`.
pub fn reply_json(
    site: &str,
    gate: &str,
    verb: Option<Verb>,
    request_id: Option<&str>,
    outcome: &Result<Value, CmdError>,
) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("request_id".into(), request_id.map_or(Value::Null, |s| Value::String(s.into())));
    m.insert("command".into(), verb.map_or(Value::Null, |v| Value::String(v.name().into())));
    m.insert("site".into(), Value::String(site.into()));
    m.insert("gate".into(), Value::String(gate.into()));
    match outcome {
        Ok(result) => {
            m.insert("ok".into(), Value::Bool(true));
            m.insert("result".into(), result.clone());
        }
        Err(e) => {
            m.insert("ok".into(), Value::Bool(false));
            m.insert("code".into(), Value::String(e.code.code().into()));
            m.insert("message".into(), Value::String(e.message.clone()));
        }
    }
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}
