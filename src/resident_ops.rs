//! The installer's resident and consent commands (`menshen resident …`) as data, and the one
//! function that carries them out on a store. The CLI calls it on the store itself when no
//! daemon runs; the daemon's admin socket calls it on the daemon's store. Either way it is the
//! same guarded transaction (the Art. 10 guard is in the store), the request id is claimed in it,
//! the audit records say `cli uid=N`, and the printed text is the same.

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::events::NewEvent;
use crate::model::{AccessMode, Credential, CredentialKind, Resident, ResidentId};
use crate::store::{Claim, OpOutcome, RosterOp, Store};
use crate::wiegand::CardId;

/// One resident command, parsed and checked on the caller's side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResidentOp {
    Add { resident: Resident, credentials: Vec<Credential> },
    List,
    SetMode { id: ResidentId, mode: AccessMode },
    AddCard { id: ResidentId, card: CardId },
    RemoveCard { card: CardId },
    Remove { id: ResidentId },
    Consent { id: ResidentId, request: crate::privacy::ConsentRequest },
    WithdrawConsent { id: ResidentId },
    Export { id: ResidentId },
}

impl ResidentOp {
    /// Whether it changes the store (a read needs no request id and writes no audit record).
    pub fn writes(&self) -> bool {
        !matches!(self, ResidentOp::List | ResidentOp::Export { .. })
    }
}

/// What a command did: the text the CLI prints, and the events a running daemon publishes for it
/// (the same as for the MQTT command that does the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Done {
    pub text: String,
    #[serde(skip)]
    pub events: Vec<NewEvent>,
}

/// Who asks: `cli uid=N`.
pub fn cli_actor(uid: u32) -> String {
    format!("cli uid={uid}")
}

/// Carry out `op` on `store`. `by` goes into the audit records; errors are the store's, worded
/// for the installer.
pub fn execute(store: &Store, cfg: &Config, op: &ResidentOp, by: &str, now: i64) -> anyhow::Result<Done> {
    let request_id = format!("cli-{}", ulid::Ulid::new());
    let claim = Some(Claim { request_id: &request_id, now_ms: now, by });
    let rid = Some(request_id.as_str());
    let changed = |what: String| NewEvent::roster_changed(now, &what, &request_id);
    let done = |text: String, events: Vec<NewEvent>| Ok(Done { text, events });
    match op {
        ResidentOp::Add { resident, credentials } => {
            let op = RosterOp::Add { resident: resident.clone(), credentials: credentials.clone() };
            store.apply(op, claim, now)?;
            done(
                format!("added resident {} (mode {}, {} card(s))", resident.id, resident.mode, credentials.len()),
                vec![changed(format!("resident.add {}", resident.id))],
            )
        }
        ResidentOp::List => {
            let creds = store.credentials()?;
            let mut lines = Vec::new();
            for r in store.residents()? {
                let cards: Vec<String> = creds
                    .iter()
                    .filter(|c| c.resident == r.id)
                    .map(|c| match c.credential {
                        CredentialKind::Card(card) => card.masked(),
                        other => other.masked(),
                    })
                    .collect();
                lines.push(format!("{}\t{}\t{}", r.id, r.mode, cards.join(",")));
            }
            done(lines.join("\n"), Vec::new())
        }
        ResidentOp::SetMode { id, mode } => {
            match store.apply(RosterOp::SetMode { id: id.clone(), mode: *mode }, claim, now)? {
                OpOutcome::ModeChanged { before } => done(
                    format!("resident {id}: mode {before} -> {mode}"),
                    vec![NewEvent::mode_changed(now, id.as_str(), before.name(), mode.name(), rid)],
                ),
                _ => done(format!("resident {id}: already mode {mode}, nothing changed"), Vec::new()),
            }
        }
        ResidentOp::AddCard { id, card } => {
            let c = Credential {
                credential: CredentialKind::Card(*card),
                resident: id.clone(),
                validity: Default::default(),
            };
            store.apply(RosterOp::AddCredential(c), claim, now)?;
            done(format!("resident {id}: card added"), vec![changed(format!("credential.add {id} {}", card.masked()))])
        }
        ResidentOp::RemoveCard { card } => {
            let key = CredentialKind::Card(*card).key();
            let holder = match store.apply(RosterOp::RemoveCredential(key.clone()), claim, now)? {
                OpOutcome::CredentialRemoved(c) => c.resident,
                _ => anyhow::bail!(crate::store::StoreError::NoCredential(key)),
            };
            done(
                format!("card removed from resident {holder}"),
                vec![changed(format!("credential.remove {holder} {}", card.masked()))],
            )
        }
        ResidentOp::Remove { id } => {
            let n = match store.apply(RosterOp::RemoveResident(id.clone()), claim, now)? {
                OpOutcome::ResidentRemoved { credentials } => credentials,
                _ => 0,
            };
            done(format!("resident {id} removed with {n} card(s)"), vec![changed(format!("resident.remove {id}"))])
        }
        ResidentOp::Consent { id, request } => {
            let c = crate::privacy::consent_for(cfg, request, now).map_err(anyhow::Error::msg)?;
            store.record_face_consent(id, &c, claim, now)?;
            done(
                format!(
                    "face consent of {id} recorded (rules {}, sha256 {}…, template kept at most {} days without use)",
                    c.rules_version,
                    &c.rules_sha256[..12],
                    c.retention_days
                ),
                vec![NewEvent::consent(now, "consent_recorded", id.as_str(), rid)],
            )
        }
        ResidentOp::WithdrawConsent { id } => {
            let w = store.withdraw_face_consent(id, claim, now)?;
            if w.withdrawn {
                let t = if w.template_deleted { "deleted" } else { "none stored" };
                done(
                    format!("face consent of {id} withdrawn; template {t}"),
                    vec![NewEvent::consent(now, "consent_withdrawn", id.as_str(), rid)],
                )
            } else {
                done(format!("{id} had no face consent: nothing changed"), Vec::new())
            }
        }
        ResidentOp::Export { id } => {
            done(serde_json::to_string_pretty(&crate::privacy::export(store, id)?)?, Vec::new())
        }
    }
}
