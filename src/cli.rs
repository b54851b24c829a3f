//! The command line: the daemon (`run`, `demo`), configuration checks, resident management on the
//! store for installers, the simulator's controls, and `status`.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::wall_ms;
use crate::config::{self, Config, LogFormat};
use crate::hw::sim::{self, WorldOp};
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use crate::store::Store;
use crate::wiegand::{CardId, Format};

/// Default config path on an installed gate.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/menshen/menshen.toml";
/// Where `menshen demo` keeps its files (relative to the working directory).
pub const DEMO_DIR: &str = "menshen-demo";

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
        /// Stop after the script instead of waiting for Ctrl-C.
        #[arg(long)]
        exit_after_script: bool,
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

/// `menshen identity`.
pub fn identity(config_path: &Path) -> anyhow::Result<serde_json::Value> {
    let cfg = config::load(config_path)?;
    let signer = crate::privacy::Signer::load(&cfg.signing_key_path())?;
    Ok(signer.identity(&cfg.gate.site, &cfg.gate.gate))
}

/// `menshen verify-receipt`: Ok(message) if it verifies, Err(why) if not.
pub fn verify_receipt(file: &Path, key: Option<&str>, config_path: &Path) -> anyhow::Result<Result<String, String>> {
    use crate::privacy::receipt::{parse_public_key, Receipt};
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let public = match key {
        Some(k) => parse_public_key(k).ok_or_else(|| anyhow::anyhow!("--key: expected ed25519:<64 hex digits>"))?,
        None => {
            let cfg = config::load(config_path)?;
            crate::privacy::Signer::load(&cfg.signing_key_path())?.public_key()
        }
    };
    let r = match Receipt::from_json(&text) {
        Ok(r) => r,
        Err(e) => return Ok(Err(e.to_string())),
    };
    Ok(r.verify(&public)
        .map(|()| {
            format!(
                "valid: gate {}/{} destroyed the face template of {} ({}) at {} ms; receipt {}",
                r.site, r.gate, r.resident, r.why, r.deleted_at_ms, r.receipt_id
            )
        })
        .map_err(|e| e.to_string()))
}

/// `menshen audit verify`.
pub fn audit_verify(config_path: &Path, file: Option<&Path>) -> anyhow::Result<crate::privacy::audit::Verdict> {
    let path = match file {
        Some(f) => f.to_path_buf(),
        None => config::load(config_path)?.store_path().with_file_name("audit.jsonl"),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    Ok(crate::privacy::audit::verify_text(&text))
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

/// The face runtime paths for a tool: flags, then the environment and development locations.
pub fn tool_face_config(ort_lib: Option<PathBuf>, models: Option<PathBuf>) -> crate::config::FaceConfig {
    let mut f = crate::face::tools::locate(&crate::config::FaceConfig::default());
    if let Some(l) = ort_lib {
        f.onnxruntime_library = l;
    }
    if let Some(m) = models {
        f.models_dir = m;
    }
    f
}

pub fn eval_cmd(cmd: EvalCmd) -> anyhow::Result<()> {
    match cmd {
        EvalCmd::Lfw { data, jobs, long_side, ort_lib, models, json, quiet } => {
            let cfg = tool_face_config(ort_lib, models);
            let opts = crate::face::engine::DetectorOptions { long_side, ..Default::default() };
            let r = crate::face::tools::eval_lfw(&data, &cfg, opts, jobs, !quiet)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "LFW through the Rust pipeline ({} images, {} without a face, detector long side {}, {} jobs, {:.1} s)",
                    r.images, r.no_face, long_side, r.jobs, r.seconds
                );
                println!(
                    "  10-fold accuracy on {} pairs: {:.2} % ± {:.2}",
                    r.pairs,
                    r.accuracy_mean * 100.0,
                    r.accuracy_std * 100.0
                );
                println!("  all pairs: {} genuine, {} impostor", r.all_pairs_genuine, r.all_pairs_impostor);
                println!("  TAR at FAR 1e-3: {:.2} % (cosine > {:.3})", r.tar_at_far_1e3 * 100.0, r.threshold_far_1e3);
                println!("  TAR at FAR 1e-4: {:.2} % (cosine > {:.3})", r.tar_at_far_1e4 * 100.0, r.threshold_far_1e4);
                let o = &r.one_to_n;
                println!(
                    "  1:N ({} people enrolled, {} probes): rank-1 {:.2} %; fast search = exact scan on top-1 {}/{}, decision {}/{}, runner-up within the margin {}/{}",
                    o.gallery,
                    o.probes,
                    o.rank1 * 100.0,
                    o.same_top1,
                    o.probes,
                    o.same_decision,
                    o.probes,
                    o.same_runner_up_in_margin,
                    o.runner_up_in_margin
                );
            }
            Ok(())
        }
    }
}

pub fn face_probe(images: Vec<PathBuf>, ort_lib: Option<PathBuf>, models: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = tool_face_config(ort_lib, models);
    let mut eng = crate::face::tools::engine(&cfg, crate::face::engine::DetectorOptions::default())?;
    for path in images {
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let frame = crate::face::image::Rgb::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let faces = eng.detect(&frame)?;
        let mut out = Vec::new();
        for f in &faces {
            let live = eng.liveness(&frame, f)?;
            let (yaw, roll) = crate::face::quality::pose(f);
            out.push(serde_json::json!({
                "box": f.bbox, "score": f.score, "landmarks": f.landmarks,
                "real_probability": live, "yaw": yaw, "roll_deg": roll,
            }));
        }
        println!("{}", serde_json::json!({"image": path, "width": frame.width, "height": frame.height, "faces": out}));
    }
    Ok(())
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

/// Enrol from photos. The checks that guard the template (consent, mode) run twice: before any
/// image is looked at, and again in the store's transaction that writes the sealed template.
fn enrol_face(config_path: &Path, id: &str, photos: &[PathBuf], min_good: usize, now: i64) -> anyhow::Result<()> {
    use crate::face::{engine, enrol, image::Rgb, matcher::Gallery};
    let cfg = config::load(config_path)?;
    let s = Store::open(&cfg.store_path())?;
    let rid = ResidentId::new(id).map_err(anyhow::Error::msg)?;
    let resident = s.resident(&rid)?.ok_or_else(|| anyhow::anyhow!("no resident `{id}`"))?;
    if !resident.mode.admits_face() {
        anyhow::bail!(crate::store::StoreError::FaceOff(id.to_string()));
    }
    if s.face_consent(&rid)?.is_none() {
        anyhow::bail!(crate::store::StoreError::NoConsent(id.to_string()));
    }
    let privacy = crate::privacy::shred::Privacy::open(&cfg)?;
    let face = crate::face::tools::locate(&cfg.face);
    let options = engine::DetectorOptions { long_side: cfg.face.detector_long_side, ..Default::default() };
    let mut eng = crate::face::tools::engine(&face, options)?;
    let mut gallery = Gallery::new(eng.dim());
    for (owner, blob) in s.templates()? {
        gallery.add(&owner, &privacy.keyring.open_template(&owner, &blob)?)?;
    }
    let mut frames = Vec::new();
    for p in photos {
        let bytes = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        frames.push(Rgb::decode(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?);
    }
    let rules = enrol::EnrolRules {
        min_good,
        min_agreement: 0.4,
        quality: cfg.face.quality,
        match_threshold: cfg.face.match_threshold,
    };
    let template = enrol::enrol(&mut eng, &frames, id, &gallery, &rules)?;
    let (key_id, sealed) = privacy.keyring.seal(id, &template)?;
    if let Err(e) = s.put_template(&rid, &key_id, &sealed, now) {
        // The data key was written first: it goes with the refused template.
        privacy.keyring.destroy(&key_id)?;
        return Err(e.into());
    }
    println!("face of {id} enrolled from {} photo(s); template sealed in the store (no image kept)", photos.len());
    Ok(())
}

fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let cfg = config::load(&args.config)?;
    Ok(Store::open(&cfg.store_path())?)
}

/// Run a resident command, then carry any deletion it caused to the end: keys destroyed,
/// receipts signed into the outbox (published when the daemon next runs).
pub fn resident_cmd(cmd: ResidentCmd) -> anyhow::Result<()> {
    let config_path = match &cmd {
        ResidentCmd::Add { store, .. }
        | ResidentCmd::List { store }
        | ResidentCmd::SetMode { store, .. }
        | ResidentCmd::AddCard { store, .. }
        | ResidentCmd::RemoveCard { store, .. }
        | ResidentCmd::Remove { store, .. }
        | ResidentCmd::Consent { store, .. }
        | ResidentCmd::WithdrawConsent { store, .. }
        | ResidentCmd::Export { store, .. }
        | ResidentCmd::EnrolFace { store, .. } => store.config.clone(),
    };
    resident_cmd_inner(cmd)?;
    let cfg = config::load(&config_path)?;
    let mut s = Store::open(&cfg.store_path())?;
    if !s.pending_deletions()?.is_empty() {
        let privacy = crate::privacy::shred::Privacy::open(&cfg)?;
        for r in privacy.settle(&s, wall_ms(), true)? {
            println!("face template of {} deleted ({}); key destroyed; receipt {}", r.resident, r.why, r.receipt_id);
        }
        s.compact()?;
    }
    Ok(())
}

fn resident_cmd_inner(cmd: ResidentCmd) -> anyhow::Result<()> {
    let now = wall_ms();
    match cmd {
        ResidentCmd::Add { store, id, mode, cards, card_valid_until, valid_from, valid_until } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let mode: AccessMode = mode.parse().map_err(anyhow::Error::msg)?;
            let validity = Validity {
                valid_from_ms: valid_from.as_deref().map(parse_time).transpose()?,
                valid_until_ms: valid_until.as_deref().map(parse_time).transpose()?,
            };
            let card_validity = Validity {
                valid_from_ms: None,
                valid_until_ms: card_valid_until.as_deref().map(parse_time).transpose()?,
            };
            let creds = cards
                .iter()
                .map(|c| {
                    Ok(Credential {
                        credential: CredentialKind::Card(parse_card(c)?),
                        resident: id.clone(),
                        validity: card_validity,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let r = Resident { id: id.clone(), mode, validity, schedule: None };
            s.add_resident(&r, &creds, now)?;
            println!("added resident {id} (mode {mode}, {} card(s))", creds.len());
        }
        ResidentCmd::List { store } => {
            let s = open_store(&store)?;
            let creds = s.credentials()?;
            for r in s.residents()? {
                let cards: Vec<String> = creds
                    .iter()
                    .filter(|c| c.resident == r.id)
                    .map(|c| match c.credential {
                        CredentialKind::Card(card) => card.masked(),
                    })
                    .collect();
                println!("{}\t{}\t{}", r.id, r.mode, cards.join(","));
            }
        }
        ResidentCmd::SetMode { store, id, mode } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let mode: AccessMode = mode.parse().map_err(anyhow::Error::msg)?;
            let before = s.set_mode(&id, mode, now)?;
            println!("resident {id}: mode {before} -> {mode}");
        }
        ResidentCmd::AddCard { store, id, card } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let c = Credential {
                credential: CredentialKind::Card(parse_card(&card)?),
                resident: id.clone(),
                validity: Validity::default(),
            };
            s.add_credential(&c, now)?;
            println!("resident {id}: card added");
        }
        ResidentCmd::RemoveCard { store, card } => {
            let s = open_store(&store)?;
            let key = parse_card(&card)?.key();
            let c = s.remove_credential(&key, now)?;
            println!("card removed from resident {}", c.resident);
        }
        ResidentCmd::Remove { store, id } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let n = s.remove_resident(&id, now)?;
            println!("resident {id} removed with {n} card(s)");
        }
        ResidentCmd::Consent { store, id, retention_days, channel, minor, guardian } => {
            let cfg = config::load(&store.config)?;
            let s = Store::open(&cfg.store_path())?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let req = crate::privacy::ConsentRequest { channel, retention_days, minor, guardian, shown_rules: None };
            let c = crate::privacy::consent_for(&cfg, &req, now).map_err(anyhow::Error::msg)?;
            s.record_face_consent(&id, &c, None, now)?;
            println!(
                "face consent of {id} recorded (rules {}, sha256 {}…, template kept at most {} days without use)",
                c.rules_version,
                &c.rules_sha256[..12],
                c.retention_days
            );
        }
        ResidentCmd::Export { store, id } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&crate::privacy::export(&s, &id)?)?);
        }
        ResidentCmd::WithdrawConsent { store, id } => {
            let s = open_store(&store)?;
            let id = ResidentId::new(&id).map_err(anyhow::Error::msg)?;
            let deleted = s.withdraw_face_consent(&id, None, now)?;
            println!("face consent of {id} withdrawn; template {}", if deleted { "deleted" } else { "none stored" });
        }
        ResidentCmd::EnrolFace { store, id, photos, min_good } => {
            enrol_face(&store.config, &id, &photos, min_good, now)?
        }
    }
    Ok(())
}

fn sim_socket(t: &SimTarget) -> anyhow::Result<PathBuf> {
    if let Some(s) = &t.socket {
        return Ok(s.clone());
    }
    if let Some(c) = &t.config {
        return Ok(config::load(c)?.hardware.sim.socket);
    }
    let demo = Path::new(DEMO_DIR).join("sim.sock");
    if demo.exists() {
        return Ok(demo);
    }
    Ok(config::parse(config::DEFAULT_CONFIG)?.hardware.sim.socket)
}

pub fn sim_request(t: &SimTarget, op: WorldOp) -> anyhow::Result<serde_json::Value> {
    let socket = sim_socket(t)?;
    sim::request(&socket, &op).map_err(anyhow::Error::msg)
}

pub fn sim_cmd(cmd: SimCmd) -> anyhow::Result<serde_json::Value> {
    let (t, op) = match cmd {
        SimCmd::Serve { .. } => unreachable!("handled by the runtime"),
        SimCmd::Swipe { target, reader, card, facility, format } => {
            (target, WorldOp::Swipe { reader, facility, card, format })
        }
        SimCmd::Raw { target, reader, bits, pulse_us, interval_us } => {
            (target, WorldOp::Raw { reader, bits, pulse_us, interval_us })
        }
        SimCmd::Door { target, door, action } => (target, WorldOp::Door { door, open: action == "open" }),
        SimCmd::Rex { target, door } => (target, WorldOp::Rex { door, hold_ms: None }),
        SimCmd::Fire { target, door, action } => (target, WorldOp::Fire { door, active: action == "on" }),
        SimCmd::Line { target, pin, level } => (target, WorldOp::Line { pin, high: level == "high" }),
        SimCmd::State { target } => (target, WorldOp::State),
    };
    sim_request(&t, op)
}

/// Set up logging: human text or JSON lines, level from config (RUST_LOG overrides).
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => b.try_init(),
        LogFormat::Json => b.json().flatten_event(true).try_init(),
    };
}

/// Run the daemon until SIGTERM/SIGINT, or until a stage fails.
pub async fn run_daemon(cfg: Arc<Config>, ready: Option<tokio::sync::oneshot::Sender<()>>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let app = App::build(cfg.clone(), shutdown.clone()).await?;
    // Relays are in their safe state now; a bad face runtime stops the start here, loudly.
    if cfg.face.enabled {
        let face = cfg.face.clone();
        match tokio::task::spawn_blocking(move || crate::runtime::load(&face)).await? {
            Ok(rt) => tracing::info!(models = ?rt, "face runtime checked and loaded"),
            Err(e) => {
                tracing::error!(error = %e, fix = e.hint(), "face runtime unusable");
                return Err(e.into());
            }
        }
    }
    let running = app.spawn();
    running.notify_ready();
    if let Some(r) = ready {
        let _ = r.send(());
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let failed = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break None; }
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break None; }
            _ = check.tick() => if let Some(stage) = running.failed_stage() { break Some(stage); }
        }
    };
    running.shutdown().await?;
    if let Some(stage) = failed {
        bail!("stage `{stage}` stopped unexpectedly");
    }
    Ok(())
}

/// The demo's config: simulated chip embedded, state and socket under ./menshen-demo.
pub fn demo_config(dir: &Path) -> anyhow::Result<String> {
    let mut t: toml::Table = toml::from_str(config::DEFAULT_CONFIG)?;
    let abs = std::env::current_dir()?.join(dir);
    t["gate"]
        .as_table_mut()
        .context("gate")?
        .insert("state_dir".into(), abs.join("state").display().to_string().into());
    let hw = t["hardware"].as_table_mut().context("hardware")?;
    hw.insert("backend".into(), "sim".into());
    hw["sim"].as_table_mut().context("sim")?.insert("socket".into(), abs.join("sim.sock").display().to_string().into());
    if let Some(face) = demo_face() {
        let mut f = toml::Table::new();
        f.insert("enabled".into(), true.into());
        f.insert("onnxruntime_library".into(), face.runtime.onnxruntime_library.display().to_string().into());
        f.insert("models_dir".into(), face.runtime.models_dir.display().to_string().into());
        let mut cam = toml::Table::new();
        cam.insert("kind".into(), "files".into());
        cam.insert("dir".into(), abs.join("camera").display().to_string().into());
        cam.insert("fps".into(), 5.0.into());
        f.insert("camera".into(), cam.into());
        t.insert("face".into(), f.into());
    }
    Ok(toml::to_string(&t)?)
}

/// What the demo needs for its face part: the runtime, the models and LFW photos (found as the
/// tests find them). Without them the demo is card-only.
pub struct DemoFace {
    pub runtime: config::FaceConfig,
    pub lfw: PathBuf,
}

pub fn demo_face() -> Option<DemoFace> {
    let f = crate::face::tools::locate(&config::FaceConfig::default());
    let mut runtime = f.clone();
    runtime.onnxruntime_library = f.onnxruntime_library.canonicalize().ok()?;
    runtime.models_dir = f.models_dir.canonicalize().ok()?;
    let data =
        std::env::var_os("MENSHEN_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| runtime.models_dir.join("../data"));
    let lfw = data.join("lfw/images_deepfunneled");
    lfw.join("Colin_Powell").is_dir().then_some(DemoFace { runtime, lfw })
}

/// The demo's face resident r-1004 (face_or_card): consent, then enrolment from two LFW photos.
pub const DEMO_FACE_ENROL: [&str; 2] = ["Colin_Powell_0040", "Colin_Powell_0049"];
/// Other photos of the same person, played by the demo camera.
pub const DEMO_FACE_SHOW: [&str; 2] = ["Colin_Powell_0095", "Colin_Powell_0133"];

pub fn demo_enrol(cfg_path: &Path, face: &DemoFace) -> anyhow::Result<()> {
    let cfg = config::load(cfg_path)?;
    let rid = ResidentId::new("r-1004").map_err(anyhow::Error::msg)?;
    {
        let s = Store::open(&cfg.store_path())?;
        if s.templates()?.iter().any(|(id, _)| id == "r-1004") {
            return Ok(());
        }
        if s.resident(&rid)?.is_none() {
            let c = CardId { format: Format::H10301, facility: 7, number: 44444 };
            let cred = Credential {
                credential: CredentialKind::Card(c),
                resident: rid.clone(),
                validity: Validity::default(),
            };
            let r = Resident {
                id: rid.clone(),
                mode: AccessMode::FaceOrCard,
                validity: Validity::default(),
                schedule: None,
            };
            s.add_resident(&r, &[cred], wall_ms())?;
        }
        let req = crate::privacy::ConsentRequest { channel: "cli".into(), ..Default::default() };
        let c = crate::privacy::consent_for(&cfg, &req, wall_ms()).map_err(anyhow::Error::msg)?;
        s.record_face_consent(&rid, &c, None, wall_ms())?;
    }
    let photos: Vec<PathBuf> =
        DEMO_FACE_ENROL.iter().map(|n| face.lfw.join("Colin_Powell").join(format!("{n}.jpg"))).collect();
    enrol_face(cfg_path, "r-1004", &photos, 2, wall_ms())
}

/// Put these frames in front of the demo camera (a grey frame when empty: no face).
pub fn demo_show(camera: &Path, frames: &[PathBuf]) -> anyhow::Result<()> {
    let tmp = camera.with_extension("next");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    if frames.is_empty() {
        image::RgbImage::from_pixel(640, 480, image::Rgb([120, 120, 120])).save(tmp.join("00.jpg"))?;
    }
    for (i, f) in frames.iter().enumerate() {
        std::fs::copy(f, tmp.join(format!("{i:02}.jpg")))?;
    }
    let _ = std::fs::remove_dir_all(camera);
    std::fs::rename(&tmp, camera)?;
    Ok(())
}

/// Seed the demo residents (once).
pub fn seed_demo(cfg: &Config) -> anyhow::Result<()> {
    let s = Store::open(&cfg.store_path())?;
    let now = wall_ms();
    let card = |f, n| CardId { format: Format::H10301, facility: f, number: n };
    let add = |id: &str, mode, cards: Vec<(CardId, Validity)>| -> anyhow::Result<()> {
        let rid = ResidentId::new(id).map_err(anyhow::Error::msg)?;
        if s.resident(&rid)?.is_some() {
            return Ok(());
        }
        let creds: Vec<_> = cards
            .into_iter()
            .map(|(c, v)| Credential { credential: CredentialKind::Card(c), resident: rid.clone(), validity: v })
            .collect();
        s.add_resident(&Resident { id: rid, mode, validity: Validity::default(), schedule: None }, &creds, now)?;
        Ok(())
    };
    add("r-1001", AccessMode::Card, vec![(card(7, 12345), Validity::default())])?;
    add("r-1002", AccessMode::FaceAndCard, vec![(card(7, 22222), Validity::default())])?;
    add(
        "r-1003",
        AccessMode::Card,
        vec![(card(7, 33333), Validity { valid_from_ms: None, valid_until_ms: Some(now - 86_400_000) })],
    )?;
    Ok(())
}

/// The demo script: what each step shows.
pub fn demo_script() -> Vec<(&'static str, WorldOp)> {
    let swipe = |fac, card| WorldOp::Swipe { reader: "front".into(), facility: fac, card, format: None };
    let mut parity = crate::wiegand::encode(Format::H10301, 7, 12345).map(|b| b.to_string()).unwrap_or_default();
    // Flip the last bit: a parity error.
    if let Some(last) = parity.pop() {
        parity.push(if last == '1' { '0' } else { '1' });
    }
    vec![
        ("resident r-1001 (mode card) swipes card 7:12345 -> granted, relay pulses", swipe(7, 12345)),
        ("an unknown card 7:55555 -> denied unknown_card", swipe(7, 55555)),
        (
            "a frame with a parity error -> denied parity_error",
            WorldOp::Raw { reader: "front".into(), bits: parity, pulse_us: None, interval_us: None },
        ),
        ("resident r-1003's expired card -> denied credential_expired", swipe(7, 33333)),
        ("resident r-1002 (face_and_card) shows only the card -> denied mode_requires_face", swipe(7, 22222)),
        (
            "the exit button -> granted exit_request (then we wait for the relock)",
            WorldOp::Rex { door: "front".into(), hold_ms: None },
        ),
        ("the door opened without a grant -> alarm door_forced", WorldOp::Door { door: "front".into(), open: true }),
        ("the door closes", WorldOp::Door { door: "front".into(), open: false }),
    ]
}
