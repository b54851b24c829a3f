//! `menshen resident …`: the roster and face enrolment from photos, with the daemon stopped.

use std::path::{Path, PathBuf};

use super::{parse_card, parse_time, ResidentCmd, StoreArgs};
use crate::clock::wall_ms;
use crate::config;
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId, Validity};
use crate::store::Store;

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

fn open_store(args: &StoreArgs) -> anyhow::Result<Store> {
    let cfg = config::load(&args.config)?;
    Ok(crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?)
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
    let mut s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
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
            let s = crate::privacy::audit::AuditLog::open_store(&cfg.store_path())?;
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
            let w = s.withdraw_face_consent(&id, None, now)?;
            if w.withdrawn {
                let t = if w.template_deleted { "deleted" } else { "none stored" };
                println!("face consent of {id} withdrawn; template {t}");
            } else {
                println!("{id} had no face consent: nothing changed");
            }
        }
        ResidentCmd::EnrolFace { store, id, photos, min_good } => {
            enrol_face(&store.config, &id, &photos, min_good, now)?
        }
    }
    Ok(())
}
