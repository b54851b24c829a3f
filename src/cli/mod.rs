//! The command line: the daemon (`run`, `demo`), configuration checks, resident management on the
//! store for installers, the simulator's controls, and `status`.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

use crate::config::{self, LogFormat};
use crate::wiegand::{CardId, Format};

mod demo;
mod demo_bms;
#[cfg(feature = "osdp")]
mod osdp;
mod resident;
mod sim;
mod site;
mod tools;

pub use demo::{demo_config, demo_face, demo_script, DemoFace, DEMO_DIR, DEMO_FACE_ENROL, DEMO_FACE_SHOW};
pub use resident::resident_cmd;
pub use sim::{sim_cmd, sim_request};
pub use site::{gate_views, site_cmd, GateView};
pub use tools::{audit_verify, eval_cmd, face_probe, identity, tool_face_config, verify_receipt};

/// Default config path on an installed gate.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/menshen/menshen.toml";

/// Where `menshen demo` keeps its files (relative to the working directory).

#[derive(Debug, Parser)]
#[command(
    name = "menshen",
    version,
    about = "Menshen (门神): a gate access controller where face is optional, never required"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run a demo: the daemon on simulated hardware in ./menshen-demo, with sample residents and a
    /// scripted sequence of swipes; then it waits for your own `menshen sim ...` commands.
    Demo {
        /// Do not play the scripted swipes.
        #[arg(long)]
        no_script: bool,
        /// Stop after the script (and the BMS exchange) instead of waiting for Ctrl-C; exit
        /// non-zero if the exchange failed.
        #[arg(long, alias = "exit-after-script")]
        once: bool,
    },
    /// Validate a config file: exit 0, or 3 (unreadable), 4 (syntax, unknown key, wrong type),
    /// 5 (invalid value) with a message naming the key.
    CheckConfig { file: PathBuf },
    /// Print the default configuration.
    PrintDefaultConfig,
    /// Manage residents in the store (the daemon must be stopped; it holds the store).
    #[command(subcommand)]
    Resident(ResidentCmd),
    /// Drive the simulated hardware (cards, door, exit button, fire input) and read its state.
    #[command(subcommand)]
    Sim(SimCmd),
    /// Check the installation: config, GPIO lines, broker, clock, disk, store, watchdog. One line
    /// per check with a fix hint; exit 1 if any check fails.
    Doctor {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Minimum free space for the state directory.
        #[arg(long, default_value_t = 100)]
        min_free_mb: u64,
        /// Look for the systemd unit here instead of the standard places (repeatable).
        #[arg(long = "unit")]
        units: Vec<PathBuf>,
    },
    /// Wiring checks for installers (stop the daemon first: they claim the same lines).
    #[command(subcommand)]
    Test(TestCmd),
    /// Show a running daemon's counters and outbox depth.
    Status {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The whole site through the broker (from any machine, with its own MQTT login): every
    /// gate's state from its retained messages, and `_site` commands answered by every gate.
    #[command(subcommand)]
    Site(SiteCmd),
    /// Accuracy evaluations of the face pipeline.
    #[command(subcommand)]
    Eval(EvalCmd),
    /// Print the gate's identity: site, gate and the Ed25519 key that signs deletion receipts
    /// (the daemon also publishes it, retained, on `identity`).
    Identity {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check a deletion receipt (the receipt, or the `event/privacy` message carrying it) against
    /// the gate's published key: `--key ed25519:<hex>`, or else this gate's own key. Exit 0 if
    /// it verifies, 1 if not.
    VerifyReceipt {
        file: PathBuf,
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// The audit trail (append-only, hash-chained).
    #[command(subcommand)]
    Audit(AuditCmd),
    /// OSDP readers: set a reader's Secure Channel key (stop the daemon first: it holds the port).
    #[cfg(feature = "osdp")]
    #[command(subcommand)]
    Osdp(OsdpCmd),
    /// Run the face pipeline on image files and print what it sees (boxes, landmarks, liveness;
    /// never the embedding).
    FaceProbe {
        images: Vec<PathBuf>,
        /// ONNX Runtime library (default: $MENSHEN_ORT_LIB, the config's, target/menshen-runtime).
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// Model directory (default: $MENSHEN_MODELS_DIR, the config's, ../shared/models).
        #[arg(long)]
        models: Option<PathBuf>,
    },
}

/// `menshen osdp ...`
#[cfg(feature = "osdp")]
#[derive(Debug, Subcommand)]
pub enum OsdpCmd {
    /// Give a reader its own random Secure Channel key. A new reader is reached once with the
    /// public install key (SCBK-D, the reader in install mode); a reader that has a key already
    /// is reached with it, and its key is replaced (rotation). The key is written (0600) to the
    /// reader's `key_file` before the reader is told, and the reader is checked with it after.
    Install {
        #[arg(long)]
        reader: String,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// How long to wait for the reader at each step.
        #[arg(long, default_value_t = 20)]
        timeout_secs: u64,
    },
}

/// How `menshen site` reaches the broker: its own login, never a gate's.
#[derive(Debug, Clone, Args)]
pub struct SiteConn {
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    #[arg(long)]
    pub username: Option<String>,
    /// A file holding the password.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// TLS: the broker's CA (pinned).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    #[arg(long, requires = "ca_file")]
    pub client_cert_file: Option<PathBuf>,
    #[arg(long, requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,
    #[arg(long, default_value_t = 5_000)]
    pub connect_timeout_ms: u64,
    /// The longest wait for retained messages.
    #[arg(long, default_value_t = 5_000)]
    pub wait_ms: u64,
    /// Retained messages are all in once the broker has been quiet this long.
    #[arg(long, default_value_t = 500)]
    pub quiet_ms: u64,
    /// Replies come under this prefix (the gates' `mqtt.reply_topic_prefix`).
    #[arg(long, default_value = "bms/")]
    pub reply_prefix: String,
}

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    /// Every gate of the site: online, version, roster version, residents, templates, pending
    /// deletions, camera, outbox depth, last event, last seen. Read-only: retained topics only.
    /// Exit 0 when every gate is online, 2 when one is not (or none was found).
    Status {
        #[command(flatten)]
        conn: SiteConn,
        #[arg(long)]
        site: String,
        #[arg(long)]
        json: bool,
    },
    /// Send one command to every gate (`_site`) and wait until each has answered; exit 2 if
    /// some did not within the timeout.
    Command {
        #[command(flatten)]
        conn: SiteConn,
        #[arg(long)]
        site: String,
        /// The verb, e.g. `health.get` or `roster.sync`.
        verb: String,
        /// The command's JSON object (its request_id is added).
        #[arg(long, default_value = "{}")]
        payload: String,
        /// The gates that must answer (default: every gate shown online by `site status`).
        #[arg(long, value_delimiter = ',')]
        gates: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Check the whole chain; report the first broken record. Exit 0 if intact, 1 if not.
    Verify {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Check this file instead of the gate's (a copy handed to an auditor).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvalCmd {
    /// The standard LFW protocol: 10-fold accuracy on the 6,000 pairs of pairs.txt, and TAR at
    /// FAR 1e-3 / 1e-4 over all genuine and impostor pairs of its images.
    Lfw {
        /// The LFW directory (pairs.txt, images_deepfunneled/).
        #[arg(long, default_value = "../shared/data/lfw")]
        data: PathBuf,
        /// Parallel engines (one inference thread each).
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Detector input: the image's long side is scaled to this (320 is faster and measured
        /// at 99.10 % / 94.16 %; 640 is the default and the daemon's).
        #[arg(long, default_value_t = 640)]
        long_side: u32,
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        #[arg(long)]
        models: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Show no progress bar.
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TestCmd {
    /// Print every frame a reader sends (bits, length, format, parity) and diagnose swapped D0/D1,
    /// a missing common ground or a stuck line.
    Reader {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value = "front")]
        reader: String,
        /// Stop after this many frames.
        #[arg(long, default_value_t = usize::MAX)]
        count: usize,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// One JSON object per frame.
        #[arg(long)]
        json: bool,
    },
    /// Pulse a door's relay once for its configured time.
    Relay {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value = "front")]
        door: String,
    },
    /// Show every door contact, exit button and fire input, and each change.
    Inputs {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ResidentCmd {
    /// Add a resident with cards. A mode that admits face needs a card (Art. 10).
    Add {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        #[arg(long, default_value = "card")]
        mode: String,
        /// A card as FORMAT:FACILITY:NUMBER, e.g. H10301:7:12345 (repeatable).
        #[arg(long = "card")]
        cards: Vec<String>,
        /// Cards valid until (Unix ms or RFC 3339).
        #[arg(long)]
        card_valid_until: Option<String>,
        /// Resident valid from / until (Unix ms or RFC 3339).
        #[arg(long)]
        valid_from: Option<String>,
        #[arg(long)]
        valid_until: Option<String>,
    },
    /// List residents with masked cards.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change a resident's access mode.
    SetMode {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        mode: String,
    },
    /// Add a card to a resident.
    AddCard {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        card: String,
    },
    /// Remove a card (refused if its holder would be left with face only).
    RemoveCard {
        #[command(flatten)]
        store: StoreArgs,
        card: String,
    },
    /// Remove a resident and their cards.
    Remove {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
    /// Record the resident's separate consent to face recognition, against the published
    /// processing rules' version (`privacy.rules_version`, or the built-in rules).
    Consent {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        /// Days without face use after which the template is deleted (default
        /// `privacy.default_retention_days`; at most `privacy.max_retention_days`).
        #[arg(long)]
        retention_days: Option<u32>,
        /// How the consent was given (a short word: cli, paper, app, bms).
        #[arg(long, default_value = "cli")]
        channel: String,
        /// The resident is a minor: `--guardian` names who consented for them.
        #[arg(long)]
        minor: bool,
        /// The guardian's opaque reference (never a name).
        #[arg(long)]
        guardian: Option<String>,
    },
    /// Everything the gate holds about a resident, as JSON: mode, masked cards, consent, whether
    /// a face template exists and when it was last used. Never the template itself.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
    /// Withdraw the face consent: the face template is deleted in the same transaction.
    WithdrawConsent {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
    /// Enrol a face from photos (JPEG/PNG): quality-checked, refused if it matches another
    /// resident, refused without consent or with mode `card`; stored sealed, never as an image.
    EnrolFace {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
        /// Photos of the resident (repeatable).
        #[arg(long = "photo", required = true)]
        photos: Vec<PathBuf>,
        /// Good photos needed.
        #[arg(long, default_value_t = 1)]
        min_good: usize,
    },
}

#[derive(Debug, Args)]
pub struct SimTarget {
    /// The simulated chip's socket (default: from --config, else ./menshen-demo/sim.sock if it
    /// exists, else /run/menshen/sim.sock).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SimCmd {
    /// Serve the simulated GPIO chip (for `hardware.sim.embedded = false`).
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// What a released character-device output line does (the fake gpiochip's clients):
        /// `input`, as mainline kernels and Raspberry Pi OS with `dtparam=strict_gpiod` do (it
        /// turns into an input and rests at its pull), or `keep`, as Raspberry Pi OS does by
        /// default (it keeps its last level).
        #[arg(long, value_parser = ["input", "keep"], default_value = "input")]
        on_release: String,
    },
    /// Present a card.
    Swipe {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        reader: String,
        #[arg(long)]
        card: u64,
        #[arg(long)]
        facility: u64,
        #[arg(long)]
        format: Option<String>,
    },
    /// Send raw bits (e.g. a frame with a parity error), optionally with off-standard timing.
    Raw {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        reader: String,
        #[arg(long)]
        bits: String,
        #[arg(long)]
        pulse_us: Option<u64>,
        #[arg(long)]
        interval_us: Option<u64>,
    },
    /// Type on a keypad, e.g. `--keys '1234#'` (4-bit bursts; `--bits 8` or `--bits 26`).
    Keys {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        reader: String,
        #[arg(long)]
        keys: String,
        #[arg(long, value_parser = ["4", "8", "26"], default_value = "4")]
        bits: String,
        /// The key value the keypad sends for `*` (10 or 11).
        #[arg(long, default_value_t = 10)]
        star_key: u8,
        /// Wait this long between keys.
        #[arg(long)]
        gap_ms: Option<u64>,
    },
    /// Open or close the door (the contact bounces).
    Door {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        door: String,
        #[arg(value_parser = ["open", "close"])]
        action: String,
    },
    /// Press the request-to-exit button.
    Rex {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        door: String,
    },
    /// Raise or clear the fire input.
    Fire {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long, default_value = "front")]
        door: String,
        #[arg(value_parser = ["on", "off"])]
        action: String,
    },
    /// Force an input line (a stuck or cut line).
    Line {
        #[command(flatten)]
        target: SimTarget,
        #[arg(long)]
        pin: u8,
        #[arg(value_parser = ["high", "low"])]
        level: String,
    },
    /// Print every line and each relay with its recent transitions.
    State {
        #[command(flatten)]
        target: SimTarget,
    },
    /// The chip goes away (a board fault): clients of the character device are cut off.
    Unplug {
        #[command(flatten)]
        target: SimTarget,
    },
    /// The chip is back after `unplug`.
    Plug {
        #[command(flatten)]
        target: SimTarget,
    },
}

/// Parse FORMAT:FACILITY:NUMBER.
pub fn parse_card(s: &str) -> anyhow::Result<CardId> {
    let parts: Vec<&str> = s.split(':').collect();
    let [f, fac, num] = parts[..] else { bail!("card `{s}` must be FORMAT:FACILITY:NUMBER, e.g. H10301:7:12345") };
    let format: Format = f.parse().map_err(anyhow::Error::msg)?;
    let facility: u64 = fac.parse().with_context(|| format!("facility `{fac}`"))?;
    let number: u64 = num.parse().with_context(|| format!("card number `{num}`"))?;
    if format != Format::Raw {
        // Reject numbers the format cannot carry: such a card could never be read.
        crate::wiegand::encode(format, facility, number)?;
    }
    Ok(CardId { format, facility, number })
}

/// Parse Unix milliseconds or an RFC 3339 time.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    Ok(chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("`{s}` is neither Unix ms nor RFC 3339"))?
        .timestamp_millis())
}

/// Set up logging: human text or JSON lines, level from config (RUST_LOG overrides).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives(level)));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

/// The log filter for `log.level`. libosdp's own messages are off unless the level names them
/// (`"info,libosdp=info"`): it logs every retry of a refused reader, three lines a second, where
/// the gate says it once, as an alarm and in `health.osdp`.
pub fn log_directives(level: &str) -> String {
    if level.contains("libosdp") {
        level.to_string()
    } else {
        format!("{level},libosdp=off")
    }
}

#[cfg(test)]
mod log_tests {
    #[test]
    fn libosdp_is_quiet_unless_asked_for() {
        assert_eq!(super::log_directives("info"), "info,libosdp=off");
        assert_eq!(super::log_directives("debug,libosdp=debug"), "debug,libosdp=debug");
        for l in ["info", "warn,menshen=debug"] {
            assert!(tracing_subscriber::EnvFilter::try_new(super::log_directives(l)).is_ok());
        }
    }
}

mod run;
pub use run::run;
pub(crate) use run::runtime;
