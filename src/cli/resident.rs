//! `menshen resident …`: the roster and consent (through the running daemon, or on the store when
//! none runs) and face enrolment from photos (with the daemon stopped).

use std::path::{Path, PathBuf};

use super::{parse_card, parse_time, ResidentCmd};
use crate::clock::wall_ms;
use crate::config;
use crate::daemon::AdminRouted as Routed;
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use crate::resident_ops::{self, ResidentOp};

/// Enrol from photos. The checks that guard the template (consent, mode) run twice: before any
/// image is looked at, and again in the store's transaction that writes the sealed template.
pub(super) fn enrol_face(
    config_path: &Path,
    id: &str,
    photos: &[PathBuf],
    min_good: usize,
    now: i64,
) -> anyhow::Result<()> {
    use crate::face::{engine, enrol, image::Rgb};
    let cfg = config::load(config_path)?;
    let s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
    let rid = ResidentId::new(id).map_err(anyhow::Error::msg)?;
    let resident = s.resident(&rid)?.ok_or_else(|| anyhow::anyhow!("no resident `{id}`"))?;
    if !resident.mode.admits_face() {
        anyhow::bail!(crate::store::StoreError::FaceOff(id.to_string()));
    }
    if s.face_consent(&rid)?.is_none() {
        anyhow::bail!(crate::store::StoreError::NoConsent(id.to_string()));
    }
    let privacy = crate::privacy::shred::Privacy::open(&cfg)?;
    // The configured runtime (face.onnxruntime_library, face.models_dir): the one the daemon
    // uses, unless MENSHEN_ORT_LIB / MENSHEN_MODELS_DIR say otherwise.
    let (face, tried) = crate::runtime::configured_paths(&cfg.face);
    let rt = crate::runtime::load(&face).map_err(|e| anyhow::anyhow!("{e}\n  {tried}\n  fix: {}", e.hint()))?;
    let options = engine::DetectorOptions { long_side: cfg.face.detector_long_side, ..Default::default() };
    let mut eng = engine::Engine::new(rt, options)?;
    let (gallery, unusable) = crate::privacy::open_gallery(&s, &privacy.keyring, eng.dim())?;
    if let Some((owner, why)) = unusable.first() {
        anyhow::bail!("the stored template of `{owner}` is unusable: {why}");
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
    crate::privacy::store_template(&s, &privacy.keyring, &rid, &template, now)?;
    println!("face of {id} enrolled from {} photo(s); template sealed in the store (no image kept)", photos.len());
    Ok(())
}

/// Run a resident command: through the running daemon's admin socket when there is one (the
/// daemon holds the store), else on the store itself, then carrying any deletion it caused to the
/// end (keys destroyed, receipts signed into the outbox, published when the daemon next runs).
/// The same transaction, guard, audit and output either way.
pub fn resident_cmd(cmd: ResidentCmd) -> anyhow::Result<()> {
    let now = wall_ms();
    let (config_path, op) = match cmd {
        ResidentCmd::EnrolFace { store, id, photos, min_good } => {
            return enrol_face(&store.config, &id, &photos, min_good, now);
        }
        other => to_op(other)?,
    };
    let cfg = config::load(&config_path)?;
    match crate::daemon::admin_resident(&cfg, &op)? {
        Routed::Done(text) => {
            if !text.is_empty() {
                println!("{text}");
            }
            return Ok(());
        }
        Routed::Failed(error) => anyhow::bail!(error),
        Routed::NoDaemon => {}
    }
    let mut s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
    let uid = rustix::process::getuid().as_raw();
    let done = resident_ops::execute(&s, &cfg, &op, &resident_ops::cli_actor(uid), now)?;
    if !done.text.is_empty() {
        println!("{}", done.text);
    }
    if op.writes() && !s.pending_deletions()?.is_empty() {
        let privacy = crate::privacy::shred::Privacy::open(&cfg)?;
        for r in privacy.settle(&s, wall_ms(), true)? {
            println!("face template of {} deleted ({}); key destroyed; receipt {}", r.resident, r.why, r.receipt_id);
        }
        s.compact()?;
    }
    Ok(())
}

/// The command line's words as a [`ResidentOp`] (checked here, on the caller's side).
fn to_op(cmd: ResidentCmd) -> anyhow::Result<(PathBuf, ResidentOp)> {
    let id = |s: &str| ResidentId::new(s).map_err(anyhow::Error::msg);
    Ok(match cmd {
        ResidentCmd::Add { store, id: rid, mode, cards, card_valid_until, valid_from, valid_until } => {
            let rid = id(&rid)?;
            let mode: AccessMode = mode.parse().map_err(anyhow::Error::msg)?;
            let validity = Validity {
                valid_from_ms: valid_from.as_deref().map(parse_time).transpose()?,
                valid_until_ms: valid_until.as_deref().map(parse_time).transpose()?,
            };
            let card_validity = Validity {
                valid_from_ms: None,
                valid_until_ms: card_valid_until.as_deref().map(parse_time).transpose()?,
            };
            let credentials = cards
                .iter()
                .map(|c| {
                    Ok(Credential {
                        credential: CredentialKind::Card(parse_card(c)?),
                        resident: rid.clone(),
                        validity: card_validity,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let resident = Resident { id: rid, mode, validity, schedule: None };
            (store.config, ResidentOp::Add { resident, credentials })
        }
        ResidentCmd::List { store } => (store.config, ResidentOp::List),
        ResidentCmd::SetMode { store, id: rid, mode } => {
            (store.config, ResidentOp::SetMode { id: id(&rid)?, mode: mode.parse().map_err(anyhow::Error::msg)? })
        }
        ResidentCmd::AddCard { store, id: rid, card } => {
            (store.config, ResidentOp::AddCard { id: id(&rid)?, card: parse_card(&card)? })
        }
        ResidentCmd::RemoveCard { store, card } => (store.config, ResidentOp::RemoveCard { card: parse_card(&card)? }),
        ResidentCmd::Remove { store, id: rid } => (store.config, ResidentOp::Remove { id: id(&rid)? }),
        ResidentCmd::Consent { store, id: rid, retention_days, channel, minor, guardian } => {
            let request =
                crate::privacy::ConsentRequest { channel, retention_days, minor, guardian, shown_rules: None };
            (store.config, ResidentOp::Consent { id: id(&rid)?, request })
        }
        ResidentCmd::WithdrawConsent { store, id: rid } => {
            (store.config, ResidentOp::WithdrawConsent { id: id(&rid)? })
        }
        ResidentCmd::Export { store, id: rid } => (store.config, ResidentOp::Export { id: id(&rid)? }),
        ResidentCmd::EnrolFace { .. } => anyhow::bail!("enrol-face is not a store command"),
    })
}
