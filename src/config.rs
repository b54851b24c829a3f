//! Typed configuration: TOML in, validated [`Config`] out, with errors that name the key.
//!
//! Unknown keys are errors (a typo must not silently disable a door). `menshen check-config`
//! uses [`load`] and exits with [`ConfigError::exit_code`]; `menshen print-default-config`
//! prints [`DEFAULT_CONFIG`], which is also `config/menshen.toml`.

use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::door::{DoorParams, FailMode};
use crate::wiegand::{Format, Timing};

/// The shipped default configuration (simulated hardware, local broker).
pub const DEFAULT_CONFIG: &str = include_str!("../config/menshen.toml");

/// Exit code of `check-config` when the file cannot be read.
pub const EXIT_UNREADABLE: i32 = 3;
/// Exit code when the file is not valid TOML or has unknown keys or wrong types.
pub const EXIT_SYNTAX: i32 = 4;
/// Exit code when the values are well-formed but not acceptable.
pub const EXIT_INVALID: i32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Syntax(String),
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Unreadable { .. } => EXIT_UNREADABLE,
            ConfigError::Syntax(_) => EXIT_SYNTAX,
            ConfigError::Invalid { .. } => EXIT_INVALID,
        }
    }

    /// The key at fault, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gate: GateConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub hardware: HardwareConfig,
    #[serde(default, rename = "readers")]
    pub readers: Vec<ReaderConfig>,
    #[serde(default, rename = "doors")]
    pub doors: Vec<DoorConfig>,
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub homeassistant: HomeAssistantConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub face: FaceConfig,
}

/// The face runtime (ONNX Runtime and the models). The face path itself is not built yet; with
/// `enabled`, the daemon checks the runtime at start and refuses to start on a bad install.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaceConfig {
    #[serde(default)]
    pub enabled: bool,
    /// `libonnxruntime.so.1.31.1` as installed by `scripts/setup-runtime.sh --dest DIR` (DIR/lib).
    #[serde(default = "default_ort_lib")]
    pub onnxruntime_library: PathBuf,
    /// The model files (DIR/models), checked against the manifest's sha256.
    #[serde(default = "default_models_dir")]
    pub models_dir: PathBuf,
    /// Inference threads per session.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The camera; without it no frame is read (the runtime is still checked).
    #[serde(default)]
    pub camera: Option<CameraConfig>,
    /// The door the camera watches (default: the first door).
    #[serde(default)]
    pub door: Option<String>,
    /// The detector's input: the frame's long side is scaled to this.
    #[serde(default = "default_long_side")]
    pub detector_long_side: u32,
    /// Cosine similarity a match needs (0.53: FAR 1e-4 on LFW).
    #[serde(default = "default_match_threshold")]
    pub match_threshold: f32,
    /// How far the best resident must be ahead of the best other resident.
    #[serde(default = "default_match_margin")]
    pub match_margin: f32,
    /// Run the anti-spoofing ensemble; a face below `liveness_threshold` is `spoof_suspected`.
    #[serde(default = "default_true")]
    pub liveness: bool,
    #[serde(default = "default_liveness_threshold")]
    pub liveness_threshold: f32,
    /// For `face_and_card`: how long a face verdict waits for the card (and the card for the face).
    #[serde(default = "default_pair_window")]
    pub pair_window_ms: u64,
    #[serde(default)]
    pub agreement: crate::face::track::Agreement,
    #[serde(default)]
    pub quality: crate::face::quality::QualityGate,
}

/// Where frames come from.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CameraConfig {
    /// JPEG/PNG files of a directory, in name order, looping (the demo and tests; the list is
    /// read again at each loop).
    Files {
        dir: PathBuf,
        #[serde(default = "default_fps")]
        fps: f32,
    },
    /// An OpenCV `VideoCapture` URL or file: RTSP IP cameras, video files (needs a build with the
    /// `opencv` feature; without it the daemon reports the camera as `error`).
    Opencv { url: String },
    /// A V4L2 device (USB/CSI camera), reopened by path after an unplug.
    V4l2 {
        #[serde(default = "default_video_device")]
        device: PathBuf,
        #[serde(default = "default_cam_width")]
        width: u32,
        #[serde(default = "default_cam_height")]
        height: u32,
        #[serde(default = "default_pixel_format")]
        format: crate::face::v4l2::PixelFormat,
    },
}

impl CameraConfig {
    /// For messages: the source, with any credentials in a URL hidden.
    pub fn describe(&self) -> String {
        match self {
            CameraConfig::Files { dir, fps } => format!("files in {} at {fps} fps", dir.display()),
            CameraConfig::Opencv { url } => format!("OpenCV {}", redact_url(url)),
            CameraConfig::V4l2 { device, width, height, format } => {
                format!("V4L2 {} {width}x{height} {format:?}", device.display())
            }
        }
    }
}

/// `rtsp://user:pass@host/…` → `rtsp://***@host/…`: credentials never reach a log or a message.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(a), Some(b)) if b > a => format!("{}://***@{}", &url[..a], &url[b + 1..]),
        _ => url.to_string(),
    }
}

fn default_video_device() -> PathBuf {
    "/dev/video0".into()
}
fn default_cam_width() -> u32 {
    640
}
fn default_cam_height() -> u32 {
    480
}
fn default_pixel_format() -> crate::face::v4l2::PixelFormat {
    crate::face::v4l2::PixelFormat::Mjpeg
}

fn default_fps() -> f32 {
    5.0
}
fn default_long_side() -> u32 {
    640
}
fn default_match_threshold() -> f32 {
    0.53
}
fn default_match_margin() -> f32 {
    0.05
}
fn default_liveness_threshold() -> f32 {
    0.5
}
fn default_pair_window() -> u64 {
    10_000
}

impl Default for FaceConfig {
    fn default() -> Self {
        FaceConfig {
            enabled: false,
            onnxruntime_library: default_ort_lib(),
            models_dir: default_models_dir(),
            threads: default_threads(),
            camera: None,
            door: None,
            detector_long_side: default_long_side(),
            match_threshold: default_match_threshold(),
            match_margin: default_match_margin(),
            liveness: true,
            liveness_threshold: default_liveness_threshold(),
            pair_window_ms: default_pair_window(),
            agreement: Default::default(),
            quality: Default::default(),
        }
    }
}

fn default_ort_lib() -> PathBuf {
    "/opt/menshen/runtime/lib/libonnxruntime.so.1.31.1".into()
}
fn default_models_dir() -> PathBuf {
    "/opt/menshen/runtime/models".into()
}
fn default_threads() -> usize {
    1
}

/// Optional Home Assistant MQTT discovery (REQUIREMENTS M5).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_ha_prefix")]
    pub discovery_prefix: String,
    /// Offer an unlock button in Home Assistant (off: the lock is shown read-only).
    #[serde(default)]
    pub allow_unlock: bool,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig { enabled: false, discovery_prefix: default_ha_prefix(), allow_unlock: false }
    }
}

fn default_ha_prefix() -> String {
    "homeassistant".into()
}

/// The published processing rules (REQUIREMENTS P4) and the privacy keys and periods.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// The rules text; without it, the built-in template (`config/processing-rules.md`) is used.
    #[serde(default)]
    pub rules_file: Option<PathBuf>,
    /// The version the rules text is known by (consents name it).
    #[serde(default)]
    pub rules_version: Option<String>,
    /// The device key that wraps each template's data key (32 bytes, created 0600 on first use;
    /// a systemd credential `menshen-device-key` takes precedence); default
    /// `<state_dir>/device.key`.
    #[serde(default, alias = "template_key_file")]
    pub device_key_file: Option<PathBuf>,
    /// The Ed25519 seed that signs deletion receipts (created 0600 on first use; a systemd
    /// credential `menshen-signing-key` takes precedence); default `<state_dir>/signing.key`.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// The retention a consent gets when it names none (days without face use).
    #[serde(default = "default_retention")]
    pub default_retention_days: u32,
    /// The longest retention a consent may name (at most 3650).
    #[serde(default = "default_retention")]
    pub max_retention_days: u32,
    /// How long audit records are kept (default 3 years).
    #[serde(default = "default_audit_retention")]
    pub audit_retention_days: u32,
}

fn default_retention() -> u32 {
    365
}
fn default_audit_retention() -> u32 {
    1095
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            rules_file: None,
            rules_version: None,
            device_key_file: None,
            signing_key_file: None,
            default_retention_days: default_retention(),
            max_retention_days: default_retention(),
            audit_retention_days: default_audit_retention(),
        }
    }
}

impl Config {
    /// The rules version consents are recorded against.
    pub fn rules_version(&self) -> String {
        self.privacy.rules_version.clone().unwrap_or_else(|| BUILTIN_RULES_VERSION.to_string())
    }
    pub fn device_key_path(&self) -> PathBuf {
        self.privacy.device_key_file.clone().unwrap_or_else(|| self.gate.state_dir.join("device.key"))
    }
    pub fn signing_key_path(&self) -> PathBuf {
        self.privacy.signing_key_file.clone().unwrap_or_else(|| self.gate.state_dir.join("signing.key"))
    }
    /// The data keys, one file each.
    pub fn keyring_dir(&self) -> PathBuf {
        self.gate.state_dir.join("keys")
    }
}

/// The built-in processing rules template and its version.
pub const BUILTIN_RULES: &str = include_str!("../config/processing-rules.md");
pub const BUILTIN_RULES_VERSION: &str = "builtin-2026-11";

/// TLS to the broker (rustls): the CA that signs the broker (pinned: no system roots), and an
/// optional client certificate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateConfig {
    /// Site (compound) id, part of every topic.
    pub site: String,
    /// Gate id, part of every topic.
    pub gate: String,
    /// Where the store lives (`/var/lib/menshen` under systemd).
    pub state_dir: PathBuf,
    /// The admin socket `menshen status` talks to; default `<state_dir>/admin.sock`. Set it when
    /// the state directory is on a filesystem without sockets.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Local time offset for schedules, e.g. "+08:00".
    #[serde(default = "default_tz")]
    pub utc_offset: String,
    /// How long shutdown may take before tasks are abandoned.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// Outbox cap: beyond this many undelivered events an alarm is raised (D2).
    #[serde(default = "default_outbox_alarm")]
    pub outbox_alarm_depth: u64,
}

fn default_tz() -> String {
    "+08:00".into()
}
fn default_grace() -> u64 {
    5_000
}
fn default_outbox_alarm() -> u64 {
    1_000_000
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: default_level() }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Simulated GPIO, served on a local socket.
    Sim,
    /// Raspberry Pi GPIO through rppal (gpiochip character device).
    Rpi,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HardwareConfig {
    pub backend: Backend,
    #[serde(default)]
    pub sim: SimConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The simulated GPIO chip's socket (`menshen sim ...` talks to it).
    #[serde(default = "default_sim_socket")]
    pub socket: PathBuf,
    /// Serve the simulated chip inside the daemon (demo); otherwise `menshen sim serve` runs it,
    /// so that it outlives the daemon as real hardware does (tests).
    #[serde(default = "yes")]
    pub embedded: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { socket: default_sim_socket(), embedded: true }
    }
}

fn default_sim_socket() -> PathBuf {
    PathBuf::from("/run/menshen/sim.sock")
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    pub name: String,
    /// The door this reader opens.
    pub door: String,
    /// Formats this reader sends (see REQUIREMENTS A2).
    pub formats: Vec<String>,
    /// BCM GPIO numbers of the data lines.
    pub d0_pin: u8,
    pub d1_pin: u8,
    #[serde(default = "default_gap")]
    pub frame_gap_ms: u64,
    #[serde(default = "yes")]
    pub early_complete: bool,
    #[serde(default = "default_pulse_min")]
    pub pulse_min_us: u64,
    #[serde(default = "default_pulse_max")]
    pub pulse_max_us: u64,
    #[serde(default = "default_interval_min")]
    pub interval_min_us: u64,
}

fn default_gap() -> u64 {
    25
}
fn default_pulse_min() -> u64 {
    10
}
fn default_pulse_max() -> u64 {
    2_000
}
fn default_interval_min() -> u64 {
    200
}

impl ReaderConfig {
    pub fn parsed_formats(&self) -> Vec<Format> {
        // Validated at load: every entry parses.
        self.formats.iter().filter_map(|f| f.parse().ok()).collect()
    }

    pub fn timing(&self) -> Timing {
        Timing {
            pulse_min: Duration::from_micros(self.pulse_min_us),
            pulse_max: Duration::from_micros(self.pulse_max_us),
            interval_min: Duration::from_micros(self.interval_min_us),
            frame_gap: Duration::from_millis(self.frame_gap_ms),
        }
    }
}

/// Which level of an input line means "active" (door open, button pressed, fire).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActiveLevel {
    High,
    Low,
}

impl ActiveLevel {
    pub fn is_active(self, high: bool) -> bool {
        match self {
            ActiveLevel::High => high,
            ActiveLevel::Low => !high,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoorConfig {
    pub name: String,
    pub relay_pin: u8,
    /// `true`: the relay is energized by driving the pin high.
    #[serde(default = "yes")]
    pub relay_active_high: bool,
    pub fail_mode: FailMode,
    #[serde(default = "default_pulse_ms")]
    pub pulse_ms: u64,
    #[serde(default)]
    pub contact_pin: Option<u8>,
    #[serde(default = "default_open_level")]
    pub contact_open_level: ActiveLevel,
    #[serde(default)]
    pub rex_pin: Option<u8>,
    #[serde(default = "default_low")]
    pub rex_active_level: ActiveLevel,
    #[serde(default)]
    pub fire_pin: Option<u8>,
    #[serde(default = "default_low")]
    pub fire_active_level: ActiveLevel,
    #[serde(default = "default_debounce")]
    pub debounce_ms: u64,
    #[serde(default = "default_held")]
    pub held_open_secs: u64,
}

fn default_pulse_ms() -> u64 {
    3_000
}
fn default_open_level() -> ActiveLevel {
    ActiveLevel::High
}
fn default_low() -> ActiveLevel {
    ActiveLevel::Low
}
fn default_debounce() -> u64 {
    50
}
fn default_held() -> u64 {
    30
}

impl DoorConfig {
    pub fn params(&self) -> DoorParams {
        DoorParams {
            fail_mode: self.fail_mode,
            pulse: Duration::from_millis(self.pulse_ms),
            debounce: Duration::from_millis(self.debounce_ms),
            held_open: Duration::from_secs(self.held_open_secs),
            shunt_grace: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Defaults to `menshen-{site}-{gate}`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (never the password itself in the config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Publishes in flight at once (mosquitto's receive-maximum is 20).
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    #[serde(default = "default_backoff_min")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Commands larger than this are refused with `payload_too_large`.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Deeper JSON nesting is refused with `too_deep`.
    #[serde(default = "default_max_depth")]
    pub max_json_depth: usize,
    /// The longest remote unlock a command may ask for.
    #[serde(default = "default_unlock_max")]
    pub unlock_max_ms: u64,
    /// How far ahead an unlock's expiry may lie.
    #[serde(default = "default_cmd_lifetime")]
    pub max_command_lifetime_ms: u64,
    /// Request ids remembered (at least for a day, however many).
    #[serde(default = "default_keep")]
    pub request_keep: u64,
    /// Delivered events kept for `events.backfill`.
    #[serde(default = "default_keep")]
    pub journal_keep: u64,
    /// Period of the `health` message (0: off).
    #[serde(default = "default_health")]
    pub health_interval_secs: u64,
    /// Also take commands from `menshen/v1/{site}/_site/cmd/#`.
    #[serde(default = "default_true")]
    pub site_commands: bool,
}

fn default_max_payload() -> usize {
    1 << 20
}
fn default_max_depth() -> usize {
    16
}
fn default_unlock_max() -> u64 {
    30_000
}
fn default_cmd_lifetime() -> u64 {
    300_000
}
fn default_keep() -> u64 {
    10_000
}
fn default_health() -> u64 {
    60
}
fn default_true() -> bool {
    true
}

fn default_keep_alive() -> u64 {
    15
}
fn default_inflight() -> u16 {
    20
}
fn default_backoff_min() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    30_000
}

impl Config {
    pub fn topic_root(&self) -> String {
        format!("menshen/v1/{}/{}/", self.gate.site, self.gate.gate)
    }

    pub fn reader(&self, name: &str) -> Option<&ReaderConfig> {
        self.readers.iter().find(|r| r.name == name)
    }

    pub fn door(&self, name: &str) -> Option<&DoorConfig> {
        self.doors.iter().find(|d| d.name == name)
    }

    pub fn store_path(&self) -> PathBuf {
        self.gate.state_dir.join("menshen.redb")
    }

    /// The command limits for [`crate::command::parse`].
    pub fn limits(&self) -> crate::command::Limits {
        crate::command::Limits {
            max_payload_bytes: self.mqtt.max_payload_bytes,
            max_depth: self.mqtt.max_json_depth,
            unlock_max_ms: self.mqtt.unlock_max_ms,
            max_command_lifetime_ms: self.mqtt.max_command_lifetime_ms,
        }
    }

    /// The processing rules: (version, text).
    pub fn rules(&self) -> Result<(String, String), String> {
        match &self.privacy.rules_file {
            None => Ok((
                self.privacy.rules_version.clone().unwrap_or_else(|| BUILTIN_RULES_VERSION.into()),
                BUILTIN_RULES.into(),
            )),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|e| format!("privacy.rules_file {}: {e}", p.display()))?;
                Ok((self.privacy.rules_version.clone().unwrap_or_default(), text))
            }
        }
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.gate.admin_socket.clone().unwrap_or_else(|| self.gate.state_dir.join("admin.sock"))
    }

    /// The configured UTC offset in seconds (validated at load).
    pub fn utc_offset_secs(&self) -> i32 {
        parse_offset(&self.gate.utc_offset).unwrap_or(0)
    }
}

fn parse_offset(s: &str) -> Option<i32> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m >= 60 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

fn check_id(key: &str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("`{v}` must be 1-64 characters of A-Z, a-z, 0-9, `-`, `_` (it is part of MQTT topics)"),
        ))
    }
}

/// The BCM GPIO numbers a Raspberry Pi header exposes.
pub const GPIO_PINS: std::ops::RangeInclusive<u8> = 0..=27;

/// Parse and validate TOML text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
    validate(&cfg)?;
    Ok(cfg)
}

/// Read, parse and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable { path: path.to_path_buf(), source })?;
    parse(&text)
}

/// Check everything types cannot: ranges, references, uniqueness, wiring, and the Art. 10 rule
/// that no door can be face-only (every door needs a card reader).
pub fn validate(cfg: &Config) -> Result<(), ConfigError> {
    check_id("gate.site", &cfg.gate.site)?;
    check_id("gate.gate", &cfg.gate.gate)?;
    if cfg.gate.gate.starts_with('_') {
        return Err(invalid("gate.gate", "gate ids starting with `_` are reserved (`_site` addresses every gate)"));
    }
    let m = &cfg.mqtt;
    if !(256..=64 << 20).contains(&m.max_payload_bytes) {
        return Err(invalid("mqtt.max_payload_bytes", "must be 256..=67108864"));
    }
    if !(2..=64).contains(&m.max_json_depth) {
        return Err(invalid("mqtt.max_json_depth", "must be 2..=64"));
    }
    if !(100..=600_000).contains(&m.unlock_max_ms) {
        return Err(invalid("mqtt.unlock_max_ms", "must be 100..=600000"));
    }
    if !(1_000..=3_600_000).contains(&m.max_command_lifetime_ms) {
        return Err(invalid("mqtt.max_command_lifetime_ms", "must be 1000..=3600000"));
    }
    if m.request_keep < 100 {
        return Err(invalid("mqtt.request_keep", "must be at least 100"));
    }
    if let Some(t) = &m.tls {
        if t.client_cert_file.is_some() != t.client_key_file.is_some() {
            return Err(invalid("mqtt.tls.client_key_file", "client_cert_file and client_key_file go together"));
        }
    }
    if m.password_file.is_some() && m.username.is_none() {
        return Err(invalid("mqtt.username", "a password_file needs a username"));
    }
    let p = &cfg.privacy;
    if p.max_retention_days == 0 || p.max_retention_days > crate::store::MAX_RETENTION_DAYS {
        return Err(invalid("privacy.max_retention_days", "must be 1..=3650: no consent is unlimited"));
    }
    if p.default_retention_days == 0 || p.default_retention_days > p.max_retention_days {
        return Err(invalid("privacy.default_retention_days", "must be 1..=max_retention_days"));
    }
    if p.audit_retention_days < 365 {
        return Err(invalid("privacy.audit_retention_days", "audit records are kept at least a year"));
    }
    if cfg.privacy.rules_file.is_some() && cfg.privacy.rules_version.as_deref().unwrap_or("").is_empty() {
        return Err(invalid("privacy.rules_version", "a rules_file needs its version (consents name it)"));
    }
    if !(1..=16).contains(&cfg.face.threads) {
        return Err(invalid("face.threads", "must be 1..=16"));
    }
    let f = &cfg.face;
    if !(64..=1920).contains(&f.detector_long_side) {
        return Err(invalid("face.detector_long_side", "must be 64..=1920"));
    }
    if !(0.3..=0.95).contains(&f.match_threshold) {
        return Err(invalid("face.match_threshold", "must be 0.3..=0.95 (0.53 is FAR 1e-4 on LFW)"));
    }
    if !(0.0..=0.5).contains(&f.match_margin) {
        return Err(invalid("face.match_margin", "must be 0..=0.5"));
    }
    if !(0.0..=1.0).contains(&f.liveness_threshold) {
        return Err(invalid("face.liveness_threshold", "must be 0..=1"));
    }
    if !(1..=30).contains(&f.agreement.frames) {
        return Err(invalid("face.agreement.frames", "must be 1..=30"));
    }
    if let Some(d) = &f.door {
        if !cfg.doors.iter().any(|x| &x.name == d) {
            return Err(invalid("face.door", format!("no door `{d}`")));
        }
    }
    match &f.camera {
        Some(CameraConfig::Files { fps, .. }) if !(0.1..=60.0).contains(fps) => {
            return Err(invalid("face.camera.fps", "must be 0.1..=60"));
        }
        Some(CameraConfig::V4l2 { width, height, .. })
            if !(160..=4096).contains(width) || !(120..=4096).contains(height) || width % 2 != 0 =>
        {
            return Err(invalid("face.camera.width", "width 160..=4096 (even) and height 120..=4096"));
        }
        _ => {}
    }
    if cfg.homeassistant.discovery_prefix.is_empty() || cfg.homeassistant.discovery_prefix.contains(['+', '#']) {
        return Err(invalid("homeassistant.discovery_prefix", "a plain topic prefix"));
    }
    if parse_offset(&cfg.gate.utc_offset).is_none() {
        return Err(invalid("gate.utc_offset", format!("`{}` is not an offset like +08:00", cfg.gate.utc_offset)));
    }
    if !(100..=60_000).contains(&cfg.gate.shutdown_grace_ms) {
        return Err(invalid("gate.shutdown_grace_ms", "must be 100..=60000"));
    }
    if cfg.gate.outbox_alarm_depth == 0 {
        return Err(invalid("gate.outbox_alarm_depth", "must be at least 1"));
    }
    if cfg.log.level.parse::<tracing_subscriber::filter::LevelFilter>().is_err() {
        return Err(invalid(
            "log.level",
            format!("`{}` is not one of off, error, warn, info, debug, trace", cfg.log.level),
        ));
    }
    if cfg.doors.is_empty() {
        return Err(invalid("doors", "at least one door is needed"));
    }
    let mut pins: HashSet<u8> = HashSet::new();
    let mut claim = |key: String, pin: u8| -> Result<(), ConfigError> {
        if cfg.hardware.backend == Backend::Rpi && !GPIO_PINS.contains(&pin) {
            return Err(invalid(key, format!("GPIO {pin} does not exist on a Raspberry Pi header (0-27)")));
        }
        if !pins.insert(pin) {
            return Err(invalid(key, format!("GPIO {pin} is used twice")));
        }
        Ok(())
    };
    let mut names = HashSet::new();
    for (i, d) in cfg.doors.iter().enumerate() {
        let k = |f: &str| format!("doors[{i}].{f}");
        check_id(&k("name"), &d.name)?;
        if !names.insert(d.name.clone()) {
            return Err(invalid(k("name"), format!("door `{}` is defined twice", d.name)));
        }
        claim(k("relay_pin"), d.relay_pin)?;
        for (f, p) in [("contact_pin", d.contact_pin), ("rex_pin", d.rex_pin), ("fire_pin", d.fire_pin)] {
            if let Some(p) = p {
                claim(k(f), p)?;
            }
        }
        if !(100..=60_000).contains(&d.pulse_ms) {
            return Err(invalid(k("pulse_ms"), "must be 100..=60000 (a relay pulse of 0.1 s to 60 s)"));
        }
        if !(1..=1_000).contains(&d.debounce_ms) {
            return Err(invalid(k("debounce_ms"), "must be 1..=1000"));
        }
        if !(1..=3_600).contains(&d.held_open_secs) {
            return Err(invalid(k("held_open_secs"), "must be 1..=3600"));
        }
    }
    let mut rnames = HashSet::new();
    for (i, r) in cfg.readers.iter().enumerate() {
        let k = |f: &str| format!("readers[{i}].{f}");
        check_id(&k("name"), &r.name)?;
        if !rnames.insert(r.name.clone()) {
            return Err(invalid(k("name"), format!("reader `{}` is defined twice", r.name)));
        }
        if cfg.door(&r.door).is_none() {
            return Err(invalid(k("door"), format!("no door named `{}`", r.door)));
        }
        if r.formats.is_empty() {
            return Err(invalid(k("formats"), "list at least one format"));
        }
        let mut seen = HashSet::new();
        for (j, f) in r.formats.iter().enumerate() {
            let parsed: Format = f.parse().map_err(|e: String| invalid(format!("readers[{i}].formats[{j}]"), e))?;
            if !seen.insert(parsed) {
                return Err(invalid(format!("readers[{i}].formats[{j}]"), format!("{parsed} is listed twice")));
            }
        }
        claim(k("d0_pin"), r.d0_pin)?;
        claim(k("d1_pin"), r.d1_pin)?;
        let longest_interval = 20_000u64; // µs, the Wiegand standard's maximum bit interval
        if !(21..=1_000).contains(&r.frame_gap_ms) || r.frame_gap_ms * 1_000 <= longest_interval {
            return Err(invalid(k("frame_gap_ms"), "must be 21..=1000 (longer than the 20 ms maximum bit interval)"));
        }
        if r.pulse_min_us == 0 || r.pulse_min_us >= r.pulse_max_us {
            return Err(invalid(k("pulse_min_us"), "must be at least 1 and below pulse_max_us"));
        }
        if r.pulse_max_us > 100_000 {
            return Err(invalid(k("pulse_max_us"), "must be at most 100000"));
        }
        if r.interval_min_us <= r.pulse_min_us {
            return Err(invalid(k("interval_min_us"), "must be above pulse_min_us"));
        }
    }
    // P1 at the site level: every door must have a non-face way in.
    for (i, d) in cfg.doors.iter().enumerate() {
        if !cfg.readers.iter().any(|r| r.door == d.name) {
            return Err(invalid(
                format!("doors[{i}]"),
                format!(
                    "door `{}` has no card reader: face can never be the only way in (SPC 2021 Art. 10, REQUIREMENTS P1)",
                    d.name
                ),
            ));
        }
    }
    let m = &cfg.mqtt;
    if m.enabled {
        if m.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must not be 0"));
        }
        if m.password_file.is_some() && m.username.is_none() {
            return Err(invalid("mqtt.password_file", "a password needs a username"));
        }
    }
    if !(5..=600).contains(&m.keep_alive_secs) {
        return Err(invalid("mqtt.keep_alive_secs", "must be 5..=600"));
    }
    if !(1..=1_000).contains(&m.inflight) {
        return Err(invalid("mqtt.inflight", "must be 1..=1000"));
    }
    if m.backoff_min_ms == 0 || m.backoff_min_ms > m.backoff_max_ms {
        return Err(invalid("mqtt.backoff_min_ms", "must be at least 1 and at most backoff_max_ms"));
    }
    if let Some(id) = &m.client_id {
        if id.is_empty() || id.len() > 64 {
            return Err(invalid("mqtt.client_id", "must be 1-64 characters"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        let board = include_str!("../config/menshen.rpi.toml");
        let cfg = parse(board).unwrap();
        assert_eq!(cfg.hardware.backend, Backend::Rpi);
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
    fn rpi_pins_are_checked() {
        let err = with(|t| {
            t["hardware"].as_table_mut().unwrap().insert("backend".into(), "rpi".into());
            first(t, "doors").insert("relay_pin".into(), 40.into());
        })
        .unwrap_err();
        assert_eq!(err.key(), Some("doors[0].relay_pin"));
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
}
