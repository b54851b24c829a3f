//! Typed configuration: TOML in, validated [`Config`] out, with errors that name the key.
//!
//! Unknown keys are errors (a typo must not silently disable a door). `menshen check-config`
//! uses [`load`] and exits with [`ConfigError::exit_code`]; `menshen print-default-config`
//! prints [`DEFAULT_CONFIG`], which is also `config/menshen.toml`.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::door::{DoorParams, FailMode};
use crate::wiegand::{Format, Timing};

mod face;
mod validate;
pub use face::{redact_url, Agreement, CameraConfig, FaceConfig, PixelFormat, QualityGate};

/// The shipped default configuration (simulated hardware, local broker).
pub const DEFAULT_CONFIG: &str = include_str!("../../config/menshen.toml");

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

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gate: GateConfig,
    #[serde(default)]
    pub log: LogConfig,
    pub hardware: HardwareConfig,
    #[serde(default, rename = "readers")]
    pub readers: Vec<ReaderConfig>,
    /// OSDP readers on RS-485 serial ports (Secure Channel required unless `insecure`).
    #[serde(default, rename = "osdp_readers")]
    pub osdp_readers: Vec<OsdpReaderConfig>,
    #[serde(default, rename = "doors")]
    pub doors: Vec<DoorConfig>,
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub homeassistant: HomeAssistantConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    #[serde(default)]
    pub face: FaceConfig,
    #[serde(default)]
    pub keypad: KeypadConfig,
}

/// Optional Home Assistant MQTT discovery (REQUIREMENTS M5).
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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
    /// Where an OSDP reader's Secure Channel key lives (`key_file`, or `state_dir/osdp-NAME.key`).
    pub fn osdp_key_path(&self, r: &OsdpReaderConfig) -> PathBuf {
        r.key_file.clone().unwrap_or_else(|| self.gate.state_dir.join(format!("osdp-{}.key", r.name)))
    }
    pub fn osdp_reader(&self, name: &str) -> Option<&OsdpReaderConfig> {
        self.osdp_readers.iter().find(|r| r.name == name)
    }
    /// Every reader of `door` that cues can reach, Wiegand and OSDP: (name, has keys).
    pub fn door_readers<'a>(&'a self, door: &'a str) -> impl Iterator<Item = (&'a str, bool)> + 'a {
        let wiegand = self.readers.iter().filter(move |r| r.door == door).map(|r| (r.name.as_str(), r.has_keys()));
        let osdp = self.osdp_readers.iter().filter(move |r| r.door == door).map(|r| (r.name.as_str(), true));
        wiegand.chain(osdp)
    }
    pub fn pin_key_path(&self) -> PathBuf {
        self.keypad.pin_key_file.clone().unwrap_or_else(|| self.gate.state_dir.join("pin.key"))
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
pub const BUILTIN_RULES: &str = include_str!("../../config/processing-rules.md");
pub const BUILTIN_RULES_VERSION: &str = "builtin-2026-11";

/// TLS to the broker (rustls): the CA that signs the broker (pinned: no system roots), and an
/// optional client certificate.
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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
    /// Besides root and the daemon's own user, members of this group may use the admin socket
    /// (`menshen status`, `menshen resident …` while the daemon runs). The socket is 0660.
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// Local time offset for schedules, e.g. "+08:00".
    #[serde(default = "default_tz")]
    pub utc_offset: String,
    /// How long shutdown may take before tasks are abandoned.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// Outbox cap: beyond this many undelivered events an alarm is raised (D2).
    #[serde(default = "default_outbox_alarm")]
    pub outbox_alarm_depth: u64,
    /// While the store cannot be written (a full disk, an I/O error), at most this many events
    /// wait in memory; more are counted as lost (`events_lost`).
    #[serde(default = "default_events_held_max")]
    pub events_held_max: usize,
}

fn default_events_held_max() -> usize {
    10_000
}

fn default_admin_group() -> String {
    "menshen".into()
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

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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

#[derive(Debug, Clone, Copy, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Simulated GPIO, served on a local socket.
    Sim,
    /// The kernel's GPIO character device (`/dev/gpiochipN`, uAPI v2) through gpiocdev: every
    /// Linux board, every Raspberry Pi. `rpi`, this backend's name before 0.2, still reads.
    #[serde(alias = "rpi")]
    Gpiochip,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HardwareConfig {
    pub backend: Backend,
    /// The chip that a bare line number (`relay_pin = 22`) is an offset on: `gpiochip0`, or a
    /// path such as `/dev/gpiochip4`. A line may also name its chip (`"gpiochip1:5"`) or be
    /// found by its name (`"GPIO22"`, as `gpioinfo` lists it).
    #[serde(default = "default_chip")]
    pub chip: String,
    #[serde(default)]
    pub sim: SimConfig,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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

fn default_chip() -> String {
    "gpiochip0".into()
}

/// A GPIO line in the config: an offset on `hardware.chip` (`22`), an offset on a named chip
/// (`"gpiochip1:5"`, `"/dev/gpiochip4:17"`), or a line name (`"GPIO22"`, `"RELAY1"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(untagged)]
pub enum LineRef {
    Offset(u32),
    Named(String),
}

/// A [`LineRef`] taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineSpec<'a> {
    /// An offset on a chip (`None`: `hardware.chip`).
    At { chip: Option<&'a str>, offset: u32 },
    /// A line found by its name on whichever chip has it.
    Name(&'a str),
}

/// The kernel's limit on a line or chip name (GPIO_MAX_NAME_SIZE, with its NUL).
pub const GPIO_NAME_MAX: usize = 31;

impl LineRef {
    pub fn spec(&self) -> Result<LineSpec<'_>, String> {
        match self {
            LineRef::Offset(offset) => Ok(LineSpec::At { chip: None, offset: *offset }),
            LineRef::Named(s) => {
                if let Some((chip, offset)) = s.rsplit_once(':') {
                    let offset: u32 =
                        offset.parse().map_err(|_| format!("`{s}`: the offset after `:` must be a number"))?;
                    if !(chip.starts_with("gpiochip") || chip.starts_with('/')) {
                        return Err(format!("`{s}`: the chip before `:` must be gpiochipN or a /dev path"));
                    }
                    Ok(LineSpec::At { chip: Some(chip), offset })
                } else if s.is_empty() || s.len() > GPIO_NAME_MAX || s.chars().any(|c| c.is_control()) {
                    Err(format!("`{s}` is not a line name (1-{GPIO_NAME_MAX} printable characters)"))
                } else {
                    Ok(LineSpec::Name(s))
                }
            }
        }
    }

    /// The line number on the simulated chip: an offset, `GPIOn`, or `gpiochipC:o` (chip C's
    /// lines are numbered from C × 64, as the fake gpiochip numbers them).
    pub fn sim_pin(&self) -> Result<u8, String> {
        let n = match self.spec()? {
            LineSpec::At { chip: None, offset } => offset,
            LineSpec::At { chip: Some(chip), offset } => {
                let c: u32 = chip
                    .trim_start_matches("/dev/")
                    .strip_prefix("gpiochip")
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("`{self}`: the simulated chips are gpiochip0..gpiochip3"))?;
                if offset >= 64 {
                    return Err(format!("`{self}`: a simulated chip has 64 lines"));
                }
                c * 64 + offset
            }
            LineSpec::Name(name) => name
                .strip_prefix("GPIO")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("`{name}`: the simulated chip names its lines GPIO0..GPIO255"))?,
        };
        u8::try_from(n).map_err(|_| format!("`{self}`: the simulated chip has 256 lines"))
    }
}

impl std::fmt::Display for LineRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineRef::Offset(n) => f.pad(&n.to_string()),
            LineRef::Named(s) => f.pad(s),
        }
    }
}

impl From<String> for LineRef {
    fn from(s: String) -> LineRef {
        LineRef::Named(s)
    }
}

impl From<u32> for LineRef {
    fn from(n: u32) -> LineRef {
        LineRef::Offset(n)
    }
}

fn default_sim_socket() -> PathBuf {
    PathBuf::from("/run/menshen/sim.sock")
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReaderConfig {
    pub name: String,
    /// The door this reader opens.
    pub door: String,
    /// Formats this reader sends (see REQUIREMENTS A2).
    pub formats: Vec<String>,
    /// The data lines (see [`LineRef`]: on a Raspberry Pi, BCM numbers on gpiochip0).
    pub d0_pin: LineRef,
    pub d1_pin: LineRef,
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
    /// The reader's LEDs and beeper (optional: a reader without these wires shows nothing).
    #[serde(default)]
    pub feedback: FeedbackConfig,
    /// What the reader's frames are: `cards` (default), `keys` (a keypad: 4- and 8-bit key
    /// bursts, and 26-bit frames as a whole PIN) or `both` (4- and 8-bit frames are keys, every
    /// other length a card, so a 26-bit frame is always a card). Frames are never guessed.
    #[serde(default)]
    pub role: ReaderRole,
    /// The key value this keypad sends for `*` (10, as ESPHome and most HID keypads, or 11);
    /// `#` is the other one.
    #[serde(default = "default_star_key")]
    pub star_key: u8,
    /// A `keys` reader whose keypad sends every key in this many bits (4 or 8) and never a whole
    /// PIN: each key is decided at its last bit instead of after the frame gap (`frame_gap_ms`),
    /// so `#` opens about 25 ms sooner. Unset: wait for the gap (needed for 26-bit PIN frames).
    #[serde(default)]
    pub key_bits: Option<u8>,
}

/// An OSDP reader: the gate is the control panel on a serial port (a USB RS-485 adapter).
/// Card reads and key presses take the same decision path as a Wiegand reader's; the reader's
/// LED and beeper are driven by OSDP commands.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OsdpReaderConfig {
    pub name: String,
    /// The door this reader opens.
    pub door: String,
    /// The serial port (`/dev/ttyUSB0`, better a `/dev/serial/by-id/...` path).
    pub device: PathBuf,
    #[serde(default = "default_osdp_baud")]
    pub baud: u32,
    /// The reader's OSDP address (0–126).
    #[serde(default)]
    pub address: u8,
    /// Formats taken from the reader's card reads (as a Wiegand reader's `formats`).
    #[serde(default = "default_osdp_formats")]
    pub formats: Vec<String>,
    /// Plain mode: no Secure Channel. Cards and PINs then cross the wire readable and forgeable
    /// (as on Wiegand); `doctor` and `health` flag it. Default false: Secure Channel required.
    #[serde(default)]
    pub insecure: bool,
    /// The reader's Secure Channel key (0600, written by `menshen osdp install`); default
    /// `state_dir/osdp-NAME.key`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A reader not usable (offline, or without Secure Channel) for this long raises an alarm.
    #[serde(default = "default_osdp_alarm_ms")]
    pub offline_alarm_ms: u64,
}

fn default_osdp_baud() -> u32 {
    9600
}
fn default_osdp_formats() -> Vec<String> {
    vec!["H10301".into()]
}
fn default_osdp_alarm_ms() -> u64 {
    3000
}

impl OsdpReaderConfig {
    pub fn parsed_formats(&self) -> Vec<Format> {
        self.formats.iter().filter_map(|f| f.parse().ok()).collect()
    }
}

/// What a reader's frames are (see [`ReaderConfig::role`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReaderRole {
    #[default]
    Cards,
    Keys,
    Both,
}

fn default_star_key() -> u8 {
    10
}

/// PIN entry on keypads, and wrong-PIN limits (the same for every keypad of the gate).
#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeypadConfig {
    /// PINs are `min_len..=max_len` digits (checked when a PIN is set, and at `#`).
    #[serde(default = "default_pin_min")]
    pub min_len: u8,
    #[serde(default = "default_pin_max")]
    pub max_len: u8,
    /// Submit as soon as this many digits are typed, without `#` (unset: wait for `#`).
    #[serde(default)]
    pub submit_len: Option<u8>,
    /// A longer pause between keys discards what was typed (`pin_timeout`).
    #[serde(default = "default_inter_key")]
    pub inter_key_ms: u64,
    /// `card_and_pin`: how long after the card the PIN may come (then `pin_timeout`).
    #[serde(default = "default_card_pin_window")]
    pub card_pin_window_ms: u64,
    /// `max_wrong` wrong PINs within `wrong_window_secs` lock PIN entry at that reader (and for
    /// that card's holder) for `lockout_secs`, with a `pin_lockout` alarm. Cards and faces are
    /// never locked out.
    #[serde(default = "default_max_wrong")]
    pub max_wrong: u32,
    #[serde(default = "default_wrong_window")]
    pub wrong_window_secs: u64,
    #[serde(default = "default_lockout")]
    pub lockout_secs: u64,
    /// The PIN key (32 bytes, created 0600 on first use; a systemd credential `menshen-pin-key`
    /// takes precedence); default `<state_dir>/pin.key`. PINs are stored only as a keyed hash
    /// under it: lose it, and every PIN must be set again.
    #[serde(default)]
    pub pin_key_file: Option<PathBuf>,
}

fn default_pin_min() -> u8 {
    4
}
fn default_pin_max() -> u8 {
    8
}
fn default_inter_key() -> u64 {
    5_000
}
fn default_card_pin_window() -> u64 {
    10_000
}
fn default_max_wrong() -> u32 {
    5
}
fn default_wrong_window() -> u64 {
    60
}
fn default_lockout() -> u64 {
    300
}

impl Default for KeypadConfig {
    fn default() -> Self {
        KeypadConfig {
            min_len: default_pin_min(),
            max_len: default_pin_max(),
            submit_len: None,
            inter_key_ms: default_inter_key(),
            card_pin_window_ms: default_card_pin_window(),
            max_wrong: default_max_wrong(),
            wrong_window_secs: default_wrong_window(),
            lockout_secs: default_lockout(),
            pin_key_file: None,
        }
    }
}

impl KeypadConfig {
    pub fn entry(&self) -> crate::keypad::PinParams {
        crate::keypad::PinParams {
            min_len: self.min_len,
            max_len: self.max_len,
            submit_len: self.submit_len,
            inter_key: Duration::from_millis(self.inter_key_ms),
        }
    }

    pub fn guard(&self) -> crate::keypad::GuardParams {
        crate::keypad::GuardParams {
            max_wrong: self.max_wrong,
            window: Duration::from_secs(self.wrong_window_secs),
            lockout: Duration::from_secs(self.lockout_secs),
        }
    }
}

/// A reader's feedback lines: Wiegand readers take their green LED, red LED and beeper as
/// inputs, usually pulled to ground to light or sound (`active_level = "low"`).
#[derive(Debug, Clone, Default, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    #[serde(default)]
    pub green_pin: Option<LineRef>,
    #[serde(default)]
    pub red_pin: Option<LineRef>,
    #[serde(default)]
    pub beeper_pin: Option<LineRef>,
    /// Default `low`.
    #[serde(default)]
    pub active_level: Option<ActiveLevel>,
    /// Patterns: a list of `[outputs, ms]` steps, e.g. `[["green+beep", 150], ["green", 850]]`
    /// (outputs: `green`, `red`, `beep` joined by `+`, or `off`). Unset: the built-in pattern.
    #[serde(default)]
    pub granted: Option<Vec<crate::feedback::StepSpec>>,
    #[serde(default)]
    pub denied: Option<Vec<crate::feedback::StepSpec>>,
    #[serde(default)]
    pub face_waiting: Option<Vec<crate::feedback::StepSpec>>,
    #[serde(default)]
    pub pin_entry: Option<Vec<crate::feedback::StepSpec>>,
    #[serde(default)]
    pub lockout: Option<Vec<crate::feedback::StepSpec>>,
}

impl FeedbackConfig {
    pub fn active_high(&self) -> bool {
        self.active_level == Some(ActiveLevel::High)
    }

    pub fn pattern(&self, cue: crate::feedback::Cue) -> Option<&Vec<crate::feedback::StepSpec>> {
        use crate::feedback::Cue;
        match cue {
            Cue::Granted => self.granted.as_ref(),
            Cue::Denied => self.denied.as_ref(),
            Cue::FaceWaiting => self.face_waiting.as_ref(),
            Cue::PinEntry => self.pin_entry.as_ref(),
            Cue::Lockout => self.lockout.as_ref(),
        }
    }

    /// The configured lines: green, red, beeper (in that order, those that are set).
    pub fn lines(&self) -> Vec<(&'static str, &LineRef)> {
        [("green", &self.green_pin), ("red", &self.red_pin), ("beeper", &self.beeper_pin)]
            .into_iter()
            .filter_map(|(k, l)| l.as_ref().map(|l| (k, l)))
            .collect()
    }
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

    pub fn role(&self) -> crate::keypad::Role {
        match self.role {
            ReaderRole::Cards => crate::keypad::Role::Cards,
            ReaderRole::Keys => crate::keypad::Role::Keys,
            ReaderRole::Both => crate::keypad::Role::Both,
        }
    }

    pub fn star_hash(&self) -> crate::keypad::StarHash {
        if self.star_key == 11 {
            crate::keypad::StarHash::HashTen
        } else {
            crate::keypad::StarHash::StarTen
        }
    }

    /// The reader reads cards (its role is `cards` or `both`).
    pub fn reads_cards(&self) -> bool {
        self.role != ReaderRole::Keys
    }

    /// The reader has keys (`keys` or `both`).
    pub fn has_keys(&self) -> bool {
        self.role != ReaderRole::Cards
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
#[derive(Debug, Clone, Copy, serde::Serialize, Deserialize, PartialEq, Eq)]
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

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DoorConfig {
    pub name: String,
    pub relay_pin: LineRef,
    /// `true`: the relay is energized by driving the pin high.
    #[serde(default = "yes")]
    pub relay_active_high: bool,
    pub fail_mode: FailMode,
    #[serde(default = "default_pulse_ms")]
    pub pulse_ms: u64,
    #[serde(default)]
    pub contact_pin: Option<LineRef>,
    #[serde(default = "default_open_level")]
    pub contact_open_level: ActiveLevel,
    #[serde(default)]
    pub rex_pin: Option<LineRef>,
    #[serde(default = "default_low")]
    pub rex_active_level: ActiveLevel,
    #[serde(default)]
    pub fire_pin: Option<LineRef>,
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

#[derive(Debug, Clone, serde::Serialize, Deserialize, PartialEq)]
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
    /// Replies go only to topics under this prefix (the broker's ACL must let the gate write
    /// there); any other reply topic is refused (`invalid_reply_to`) before anything is sent.
    #[serde(default = "default_reply_prefix")]
    pub reply_topic_prefix: String,
    /// TCP_NODELAY on the broker connection. Leave it on: off only measures what Nagle's
    /// algorithm costs a command's round trip (`cargo bench --bench command_round_trip`).
    #[serde(default = "default_true")]
    pub tcp_nodelay: bool,
    /// The broker keeps this gate's session (its subscriptions and the QoS 1 commands sent
    /// while it is away) this long after a disconnect, so a gate that was offline applies the
    /// site's roster changes when it comes back (docs/site.md). 0: a clean session every time.
    #[serde(default = "default_session_expiry")]
    pub session_expiry_secs: u32,
    /// The largest page of a paged `roster.sync` (a page is refused with `payload_too_large`
    /// above it); the BMS sizes pages under its broker's packet limit and this.
    #[serde(default = "default_page_max")]
    pub roster_page_max_bytes: usize,
    /// A half-received paged `roster.sync` is discarded after this long without a page.
    #[serde(default = "default_sync_timeout")]
    pub roster_sync_timeout_secs: u64,
}

fn default_session_expiry() -> u32 {
    7 * 24 * 3600
}
fn default_page_max() -> usize {
    256 << 10
}
fn default_sync_timeout() -> u64 {
    600
}

fn default_reply_prefix() -> String {
    "bms/".into()
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
pub(super) fn default_true() -> bool {
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
    /// A stable hash of the effective configuration (its canonical JSON), for the audit trail:
    /// the same settings give the same fingerprint on every build and run.
    pub fn fingerprint(&self) -> u64 {
        crate::digest::sha256_u64(&serde_json::to_vec(self).unwrap_or_default())
    }
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
            reply_topic_prefix: self.mqtt.reply_topic_prefix.clone(),
            roster_page_max_bytes: self.mqtt.roster_page_max_bytes,
            pin_len: (self.keypad.min_len, self.keypad.max_len),
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

pub use validate::validate;

#[cfg(test)]
mod tests;
