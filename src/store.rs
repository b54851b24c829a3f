//! The durable store: residents, credentials and the event outbox in one redb file, with a
//! schema version.
//!
//! Durability bar (REQUIREMENTS D1): whatever is acknowledged is on disk first. Every write that
//! anyone is told about commits with `Durability::Immediate` (redb fdatasyncs the file before
//! `commit` returns). Only outbox removals after a broker PUBACK commit with `Durability::None`:
//! losing one re-sends an event with the same id (at-least-once), never loses one. Why redb and
//! not sled: `docs/decisions/0001-storage-engine.md`.
//!
//! Every write that can change a resident's mode or credentials runs the Art. 10 guard
//! ([`crate::policy::guard`]) on the state it would produce, inside the same transaction, and
//! aborts if it fails: no way in (CLI, MQTT, roster sync) can store a face-only resident.

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;

use crate::model::{AccessMode, Credential, Resident, ResidentId};
use crate::policy::{guard, GuardError};
use crate::privacy::audit::{AuditEntry, AuditLog};
use crate::wiegand::CardId;

/// Bumped when the layout of a table changes; a newer file is refused, an older one migrated.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const RESIDENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("residents");
const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Delivered events, kept (newest `journal_keep`) so the BMS can ask for them again.
const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// Command request ids already seen (id → wall ms), and their arrival order for pruning.
const REQUESTS: TableDefinition<&str, i64> = TableDefinition::new("requests");
const REQUEST_LOG: TableDefinition<u64, &str> = TableDefinition::new("request_log");
/// Face consents: resident id → [`FaceConsent`] (JSON). Separate from every other record (Art. 2:
/// separate consent).
const CONSENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("face_consents");
/// Face templates, sealed (encrypted and bound to the resident id; see `privacy`): resident id →
/// blob. Never an image. The invariant kept by every write: a template exists only for a resident
/// who exists, whose mode admits face, and who has a face consent.
const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("face_templates");
/// Per template: resident id → [`TemplateMeta`] (JSON): its data key id, when enrolled, last used.
const TEMPLATE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("face_template_meta");
/// Templates deleted whose data key is still to be destroyed and receipted: key id →
/// [`PendingDeletion`] (JSON). Written in the deleting transaction; emptied by `privacy::shred`.
const DELETIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_deletions");
/// Audit records written with their change, waiting to be moved to the audit file: seq → JSON.
const AUDIT_PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_pending");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is in use by another process (is the daemon running? stop it, or use the MQTT API)")]
    Locked,
    #[error("the store was written by a newer Menshen (schema {found}, this build knows {SCHEMA_VERSION})")]
    NewerSchema { found: u64 },
    #[error("storage error: {0}")]
    Db(String),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error("no resident `{0}`")]
    NoResident(String),
    #[error("no credential `{0}`")]
    NoCredential(String),
    #[error("credential is already held by resident `{0}`")]
    CredentialTaken(String),
    #[error("resident `{0}` already exists")]
    ResidentExists(String),
    #[error("invalid resident: {0}")]
    InvalidResident(String),
    #[error("request id `{0}` was seen before: a command is carried out once")]
    DuplicateRequest(String),
    #[error("roster version {offered} is older than the applied version {applied}")]
    StaleVersion { offered: u64, applied: u64 },
    #[error("roster version {0} was applied with different content: a new snapshot needs a new version")]
    VersionConflict(u64),
    #[error("resident `{0}` has no face consent: record their separate consent first (SPC 2021 Art. 2)")]
    NoConsent(String),
    #[error("resident `{0}` has mode `card`: face is off for them, so no template may be stored")]
    FaceOff(String),
    #[error("invalid consent: {0}")]
    InvalidConsent(String),
}

/// A resident's separate consent to face recognition (REQUIREMENTS P3, SPC Art. 2, PIPL Art. 29):
/// for face processing alone, naming the published rules they were shown. There is no field that
/// could make it irrevocable or unlimited: it can always be withdrawn, and the template it covers
/// is deleted after `retention_days` without face use.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaceConsent {
    pub granted_ms: i64,
    pub rules_version: String,
    /// SHA-256 of the rules text shown (hex).
    #[serde(default)]
    pub rules_sha256: String,
    /// Always `gate_access`: recognition at this gate, nothing else (P8).
    #[serde(default = "default_purpose")]
    pub purpose: String,
    /// Days without face use after which the template is deleted.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// How it was given: `bms`, `cli`, `paper`, `app`, ... (a short word).
    #[serde(default)]
    pub channel: String,
    /// The resident is a minor: their guardian consents (PIPL Art. 31).
    #[serde(default)]
    pub minor: bool,
    /// For a minor: the guardian who consented (an opaque reference, never a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guardian: Option<String>,
}

/// The longest retention a consent may name (10 years); there is no unlimited consent.
pub const MAX_RETENTION_DAYS: u32 = 3650;
const DAY_MS: i64 = 86_400_000;

impl FaceConsent {
    /// What every stored consent must be (P3).
    pub fn validate(&self) -> Result<(), String> {
        let word = |s: &str| {
            !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        };
        if self.rules_version.is_empty() || self.rules_version.len() > 64 {
            return Err("rules_version must name the published rules (1-64 characters)".into());
        }
        if self.rules_sha256.len() != 64 || !self.rules_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("rules_sha256 must be the 64-digit SHA-256 of the rules text".into());
        }
        if self.purpose != "gate_access" {
            return Err(format!("purpose `{}`: the only purpose is `gate_access` (P8)", self.purpose));
        }
        if self.retention_days == 0 || self.retention_days > MAX_RETENTION_DAYS {
            return Err(format!(
                "retention_days must be 1..={MAX_RETENTION_DAYS} (got {}): a consent is never unlimited",
                self.retention_days
            ));
        }
        if !word(&self.channel) {
            return Err("channel must be a short word (bms, cli, paper, app)".into());
        }
        match (&self.guardian, self.minor) {
            (Some(g), _) => {
                ResidentId::new(g).map_err(|e| format!("guardian: {e}"))?;
            }
            (None, true) => return Err("a minor's consent is given by a guardian: name the guardian".into()),
            (None, false) => {}
        }
        Ok(())
    }
}

fn default_purpose() -> String {
    "gate_access".into()
}
fn default_retention_days() -> u32 {
    365
}

/// Bookkeeping of one stored template (no biometric data).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TemplateMeta {
    pub key_id: String,
    pub enrolled_ms: i64,
    pub last_used_ms: i64,
}

/// A template deleted from the store whose key is still to be destroyed and receipted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingDeletion {
    pub resident: String,
    pub key_id: String,
    /// `face_turned_off`, `consent_withdrawn`, `resident_removed`, `retention_expired`.
    pub why: String,
    pub at_ms: i64,
}

/// A change to the roster: the one unit of change for the CLI and the MQTT commands alike.
#[derive(Debug, Clone, PartialEq)]
pub enum RosterOp {
    /// Insert or replace a resident; with `credentials`, their cards become exactly those.
    Upsert {
        resident: Resident,
        credentials: Option<Vec<Credential>>,
    },
    SetMode {
        id: ResidentId,
        mode: AccessMode,
    },
    AddCredential(Credential),
    /// Remove a credential by key.
    RemoveCredential(String),
    RemoveResident(ResidentId),
    /// Replace the whole roster with a snapshot (atomic, idempotent per version).
    Sync {
        version: u64,
        digest: u64,
        residents: Vec<(Resident, Vec<Credential>)>,
    },
    /// Change nothing: only claim the request id.
    Nothing,
}

/// What a [`RosterOp`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutcome {
    Done,
    ModeChanged { before: AccessMode },
    CredentialRemoved(Credential),
    ResidentRemoved { credentials: usize },
    Synced { residents: usize, credentials: usize, removed: usize },
}

/// A command's request id to record in the same transaction as its change (M3).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub request_id: &'a str,
    pub now_ms: i64,
}

struct Tables<'t> {
    residents: redb::Table<'t, &'static str, &'static [u8]>,
    creds: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
    consents: redb::Table<'t, &'static str, &'static [u8]>,
    templates: redb::Table<'t, &'static str, &'static [u8]>,
    template_meta: redb::Table<'t, &'static str, &'static [u8]>,
    deletions: redb::Table<'t, &'static str, &'static [u8]>,
    /// Audit records of this transaction (written with it).
    audit: Vec<AuditEntry>,
    now_ms: i64,
}

/// Delete one template in the caller's transaction: the row and its bookkeeping go, a pending
/// deletion (to destroy its key and sign the receipt) and an audit record are written.
/// Take group and other access away from `path` (set `mode`) if it has any: the store holds
/// card numbers and sealed templates, whatever umask the daemon was started with. A file owned
/// by another user is left as it is, with a warning.
fn private(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(m) = std::fs::metadata(path) else { return };
    if m.permissions().mode() & 0o077 != 0 {
        if let Err(error) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!(%error, path = %path.display(), "cannot make the store private: other users may read it");
        }
    }
}

fn delete_template_in(t: &mut Tables<'_>, id: &str, why: &str) -> Result<bool, StoreError> {
    let Some(blob) = t.templates.remove(id)?.map(|v| v.value().to_vec()) else { return Ok(false) };
    t.template_meta.remove(id)?;
    let key_id = crate::privacy::keys::key_id_of(&blob).unwrap_or_default();
    if !key_id.is_empty() {
        let p = PendingDeletion { resident: id.to_string(), key_id: key_id.clone(), why: why.into(), at_ms: t.now_ms };
        t.deletions.insert(key_id.as_str(), encode(&p).as_slice())?;
    }
    t.audit.push(AuditEntry::new(t.now_ms, "deletion", Some(id), format!("face template and its key {key_id}: {why}")));
    let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
    t.meta.insert("templates_generation", g + 1)?;
    Ok(true)
}

/// Delete every template that the invariant no longer allows (resident gone, mode `card`, no
/// consent), in the caller's transaction. Returns the resident ids whose template went.
fn enforce_template_invariant(t: &mut Tables<'_>) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    for row in t.templates.iter()? {
        let (k, _) = row?;
        ids.push(k.value().to_string());
    }
    let mut gone = Vec::new();
    for id in ids {
        let why = match t.residents.get(id.as_str())? {
            Some(v) => {
                let r: Resident = decode("residents", v.value())?;
                if !r.mode.admits_face() {
                    Some("face_turned_off")
                } else if t.consents.get(id.as_str())?.is_none() {
                    Some("consent_withdrawn")
                } else {
                    None
                }
            }
            None => Some("resident_removed"),
        };
        if let Some(why) = why {
            delete_template_in(t, &id, why)?;
            gone.push(id);
        }
    }
    // A removed resident's consent goes with them.
    let mut orphans = Vec::new();
    for row in t.consents.iter()? {
        let (k, _) = row?;
        orphans.push(k.value().to_string());
    }
    for id in orphans {
        if t.residents.get(id.as_str())?.is_none() {
            t.consents.remove(id.as_str())?;
            t.audit.push(AuditEntry::new(t.now_ms, "consent_withdrawn", Some(&id), "resident removed"));
        }
    }
    Ok(gone)
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked,
            other => StoreError::Db(other.to_string()),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { table, detail: e.to_string() })
}

fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising plain structs of strings and numbers to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// One event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub seq: u64,
    pub json: Vec<u8>,
}

/// The store.
pub struct Store {
    db: Database,
    path: std::path::PathBuf,
    /// The audit file beside the store (`audit.jsonl`).
    audit: AuditLog,
    /// Request ids younger than this are never forgotten (at least the longest command lifetime).
    request_min_age_ms: i64,
    /// Beyond this many remembered request ids, the oldest (past the minimum age) are pruned.
    request_keep: u64,
    /// How many delivered events stay available for `events.backfill`.
    journal_keep: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Open (or create) the store file, creating its directory if needed.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let created = !dir.exists();
            crate::durable::create_dir_all(dir).map_err(|e| StoreError::Db(format!("{}: {e}", dir.display())))?;
            if created {
                // The roster holds personal data: the state directory is the daemon's alone
                // (systemd's StateDirectoryMode=0700 does the same for the packaged service).
                private(dir, 0o700);
            }
        }
        let new = !path.exists();
        let db = Database::create(path)?;
        if new {
            // The new file's name must survive a power cut too, not only its contents.
            crate::durable::sync_parent(path).map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
        }
        private(path, 0o600);
        let store = Store {
            db,
            audit: AuditLog::new(&path.with_file_name("audit.jsonl")),
            path: path.to_path_buf(),
            request_min_age_ms: 24 * 3600 * 1000,
            request_keep: 10_000,
            journal_keep: 10_000,
        };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => return Err(StoreError::NewerSchema { found: v }),
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    meta.insert("next_seq", 1)?;
                }
            }
            tx.open_table(RESIDENTS)?;
            tx.open_table(CREDENTIALS)?;
            tx.open_table(OUTBOX)?;
            tx.open_table(JOURNAL)?;
            tx.open_table(REQUESTS)?;
            tx.open_table(REQUEST_LOG)?;
            tx.open_table(CONSENTS)?;
            tx.open_table(TEMPLATES)?;
            tx.open_table(TEMPLATE_META)?;
            tx.open_table(DELETIONS)?;
            tx.open_table(AUDIT_PENDING)?;
        }
        tx.commit()?;
        self.flush_audit();
        Ok(())
    }

    /// The audit file.
    pub fn audit_path(&self) -> &Path {
        self.audit.path()
    }

    /// Move audit records from the store to the audit file (after each change, and at open). A
    /// failure is logged and retried at the next change: the records stay in the store.
    pub fn flush_audit(&self) {
        let run = || -> Result<usize, StoreError> {
            let pending: Vec<(u64, AuditEntry)> = {
                let tx = self.db.begin_read()?;
                let t = tx.open_table(AUDIT_PENDING)?;
                let mut out = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    out.push((k.value(), decode("audit_pending", v.value())?));
                }
                out
            };
            if pending.is_empty() {
                return Ok(0);
            }
            let n = self.audit.append(&pending).map_err(|e| StoreError::Db(format!("audit file: {e}")))?;
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(AUDIT_PENDING)?;
                for (k, _) in &pending {
                    t.remove(*k)?;
                }
            }
            tx.commit()?;
            Ok(n)
        };
        if let Err(error) = run() {
            tracing::error!(%error, "audit records not yet moved to the audit file (kept in the store; retried)");
        }
    }

    /// Audit a configuration change: `fingerprint` is a hash of the effective configuration;
    /// when it differs from the one last seen, a `config_changed` record is written. Returns
    /// whether it changed.
    pub fn note_config(&self, fingerprint: u64, now_ms: i64) -> Result<bool, StoreError> {
        self.mutate(now_ms, None, |t| {
            let before = t.meta.get("config_fingerprint")?.map(|v| v.value());
            if before == Some(fingerprint) {
                return Ok((false, Vec::new()));
            }
            t.meta.insert("config_fingerprint", fingerprint)?;
            let was = before.map_or("none".to_string(), |b| format!("{b:016x}"));
            t.audit.push(AuditEntry::new(
                now_ms,
                "config_changed",
                None,
                format!("fingerprint {fingerprint:016x} (was {was})"),
            ));
            Ok((true, Vec::new()))
        })
    }

    /// Drop audit records older than `before_ms` from the audit file.
    pub fn prune_audit(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.audit.prune(before_ms).map_err(|e| StoreError::Db(format!("audit file: {e}")))
    }

    /// Retention of request ids and delivered events (from the configuration).
    pub fn set_retention(&mut self, request_min_age_ms: i64, request_keep: u64, journal_keep: u64) {
        self.request_min_age_ms = request_min_age_ms;
        self.request_keep = request_keep;
        self.journal_keep = journal_keep;
    }

    /// The size of the store file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The applied roster version (0: none yet).
    pub fn roster_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("roster_version")?.map(|v| v.value()).unwrap_or(0))
    }

    /// A SHA-256 over the whole roster (residents, credentials, version): equal fingerprints,
    /// equal rosters. `menshen status` shows it, so a test or an operator can see "nothing changed".
    pub fn fingerprint(&self) -> Result<String, StoreError> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.roster_version()?.to_be_bytes());
        for r in self.residents()? {
            h.update(encode(&r));
        }
        for c in self.credentials()? {
            h.update(encode(&c));
        }
        Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// How many request ids are remembered.
    pub fn remembered_requests(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(REQUESTS)?.len()?)
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("schema_version")?.map(|v| v.value()).unwrap_or(0))
    }

    // ---- residents and credentials -------------------------------------------------------

    pub fn resident(&self, id: &ResidentId) -> Result<Option<Resident>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESIDENTS)?;
        t.get(id.as_str())?.map(|v| decode("residents", v.value())).transpose()
    }

    pub fn residents(&self) -> Result<Vec<Resident>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RESIDENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("residents", v.value())?);
        }
        Ok(out)
    }

    pub fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CREDENTIALS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("credentials", v.value())?);
        }
        Ok(out)
    }

    pub fn credentials_of(&self, id: &ResidentId) -> Result<Vec<Credential>, StoreError> {
        Ok(self.credentials()?.into_iter().filter(|c| &c.resident == id).collect())
    }

    /// The credential for a card and its holder, if enrolled.
    pub fn lookup_card(&self, card: &CardId) -> Result<Option<(Credential, Resident)>, StoreError> {
        let tx = self.db.begin_read()?;
        let creds = tx.open_table(CREDENTIALS)?;
        let Some(v) = creds.get(card.key().as_str())? else {
            return Ok(None);
        };
        let cred: Credential = decode("credentials", v.value())?;
        let residents = tx.open_table(RESIDENTS)?;
        let Some(r) = residents.get(cred.resident.as_str())? else {
            return Err(StoreError::Corrupt { table: "credentials", detail: "credential without resident".into() });
        };
        let resident: Resident = decode("residents", r.value())?;
        Ok(Some((cred, resident)))
    }

    /// Run `f` in one durable write transaction over the roster; it reports which residents it
    /// touched, and the guard checks each of them before the commit. A `claim` records the
    /// command's request id in the same transaction (refused if seen before), so a command is
    /// carried out once or not at all.
    fn mutate<T>(
        &self,
        now_ms: i64,
        claim: Option<Claim<'_>>,
        f: impl FnOnce(&mut Tables<'_>) -> Result<(T, Vec<ResidentId>), StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.db.begin_write()?;
        let out = {
            let mut t = Tables {
                residents: tx.open_table(RESIDENTS)?,
                creds: tx.open_table(CREDENTIALS)?,
                meta: tx.open_table(META)?,
                consents: tx.open_table(CONSENTS)?,
                templates: tx.open_table(TEMPLATES)?,
                template_meta: tx.open_table(TEMPLATE_META)?,
                deletions: tx.open_table(DELETIONS)?,
                audit: Vec::new(),
                now_ms,
            };
            if let Some(c) = claim {
                self.claim_in(&tx, &mut t.meta, c)?;
            }
            let (out, touched) = f(&mut t)?;
            // Turning face off (mode `card`, removal, a sync without the resident) deletes the
            // template in the same transaction as the change: at once, never later.
            for id in enforce_template_invariant(&mut t)? {
                tracing::info!(resident = %id, "face template deleted (face turned off, consent withdrawn or resident removed)");
            }
            if !touched.is_empty() {
                let mut by_holder: std::collections::HashMap<ResidentId, Vec<Credential>> =
                    std::collections::HashMap::new();
                for row in t.creds.iter()? {
                    let (_, v) = row?;
                    let c: Credential = decode("credentials", v.value())?;
                    by_holder.entry(c.resident.clone()).or_default().push(c);
                }
                for id in touched {
                    if let Some(v) = t.residents.get(id.as_str())? {
                        let r: Resident = decode("residents", v.value())?;
                        guard(&r, by_holder.get(&id).map_or(&[][..], Vec::as_slice), now_ms)?;
                    }
                }
            }
            if !t.audit.is_empty() {
                let mut pending = tx.open_table(AUDIT_PENDING)?;
                let mut n = t.meta.get("next_audit")?.map(|v| v.value()).unwrap_or(1);
                for e in &t.audit {
                    pending.insert(n, encode(e).as_slice())?;
                    n += 1;
                }
                t.meta.insert("next_audit", n)?;
            }
            (out, !t.audit.is_empty())
        };
        tx.commit()?;
        if out.1 {
            self.flush_audit();
        }
        Ok(out.0)
    }

    fn claim_in(
        &self,
        tx: &redb::WriteTransaction,
        meta: &mut redb::Table<&str, u64>,
        c: Claim<'_>,
    ) -> Result<(), StoreError> {
        let mut ids = tx.open_table(REQUESTS)?;
        let mut log = tx.open_table(REQUEST_LOG)?;
        if ids.get(c.request_id)?.is_some() {
            return Err(StoreError::DuplicateRequest(c.request_id.to_string()));
        }
        let n = meta.get("next_request")?.map(|v| v.value()).unwrap_or(1);
        ids.insert(c.request_id, c.now_ms)?;
        log.insert(n, c.request_id)?;
        meta.insert("next_request", n + 1)?;
        // Prune the oldest beyond the cap, but never one younger than the minimum age.
        let mut excess = ids.len()?.saturating_sub(self.request_keep);
        let mut drop_log = Vec::new();
        if excess > 0 {
            for row in log.iter()? {
                if excess == 0 {
                    break;
                }
                let (k, v) = row?;
                let id = v.value().to_string();
                let ts = ids.get(id.as_str())?.map(|t| t.value()).unwrap_or(i64::MIN);
                if ts > c.now_ms - self.request_min_age_ms {
                    break;
                }
                drop_log.push((k.value(), id));
                excess -= 1;
            }
        }
        for (k, id) in drop_log {
            log.remove(k)?;
            ids.remove(id.as_str())?;
        }
        Ok(())
    }

    /// Apply a roster change, recording `claim` in the same durable transaction.
    pub fn apply(&self, op: RosterOp, claim: Option<Claim<'_>>, now_ms: i64) -> Result<OpOutcome, StoreError> {
        match &op {
            RosterOp::Upsert { resident, credentials } => {
                resident.validate().map_err(StoreError::InvalidResident)?;
                for c in credentials.iter().flatten() {
                    c.validity.validate().map_err(StoreError::InvalidResident)?;
                }
            }
            RosterOp::AddCredential(c) => c.validity.validate().map_err(StoreError::InvalidResident)?,
            RosterOp::Sync { residents, .. } => {
                for (r, cs) in residents {
                    r.validate().map_err(StoreError::InvalidResident)?;
                    for c in cs {
                        c.validity.validate().map_err(StoreError::InvalidResident)?;
                    }
                }
            }
            _ => {}
        }
        self.mutate(now_ms, claim, |t| match op {
            RosterOp::Nothing => Ok((OpOutcome::Done, Vec::new())),
            RosterOp::Upsert { resident, credentials } => {
                let before = t.residents.get(resident.id.as_str())?.map(|v| decode::<Resident>("residents", v.value()));
                match before.transpose()? {
                    None => t.audit.push(AuditEntry::new(
                        now_ms,
                        "resident_added",
                        Some(resident.id.as_str()),
                        format!("mode {}", resident.mode.name()),
                    )),
                    Some(b) if b.mode != resident.mode => t.audit.push(AuditEntry::new(
                        now_ms,
                        "mode_changed",
                        Some(resident.id.as_str()),
                        format!("{} -> {}", b.mode.name(), resident.mode.name()),
                    )),
                    Some(_) => {}
                }
                t.residents.insert(resident.id.as_str(), encode(&resident).as_slice())?;
                if let Some(cs) = credentials {
                    remove_credentials_of(&mut t.creds, &resident.id)?;
                    for c in &cs {
                        put_credential(&mut t.creds, &resident, c)?;
                    }
                }
                Ok((OpOutcome::Done, vec![resident.id]))
            }
            RosterOp::SetMode { id, mode } => {
                let mut r: Resident = match t.residents.get(id.as_str())? {
                    Some(v) => decode("residents", v.value())?,
                    None => return Err(StoreError::NoResident(id.to_string())),
                };
                let before = r.mode;
                r.mode = mode;
                t.residents.insert(id.as_str(), encode(&r).as_slice())?;
                t.audit.push(AuditEntry::new(
                    now_ms,
                    "mode_changed",
                    Some(id.as_str()),
                    format!("{} -> {}", before.name(), mode.name()),
                ));
                Ok((OpOutcome::ModeChanged { before }, vec![id]))
            }
            RosterOp::AddCredential(c) => {
                let r: Resident = match t.residents.get(c.resident.as_str())? {
                    Some(v) => decode("residents", v.value())?,
                    None => return Err(StoreError::NoResident(c.resident.to_string())),
                };
                put_credential(&mut t.creds, &r, &c)?;
                t.audit.push(AuditEntry::new(
                    now_ms,
                    "credential_added",
                    Some(c.resident.as_str()),
                    c.credential.masked(),
                ));
                Ok((OpOutcome::Done, vec![c.resident]))
            }
            RosterOp::RemoveCredential(key) => {
                let c: Credential = match t.creds.remove(key.as_str())? {
                    Some(v) => decode("credentials", v.value())?,
                    None => return Err(StoreError::NoCredential(key)),
                };
                let holder = c.resident.clone();
                t.audit.push(AuditEntry::new(
                    now_ms,
                    "credential_removed",
                    Some(holder.as_str()),
                    c.credential.masked(),
                ));
                Ok((OpOutcome::CredentialRemoved(c), vec![holder]))
            }
            RosterOp::RemoveResident(id) => {
                if t.residents.remove(id.as_str())?.is_none() {
                    return Err(StoreError::NoResident(id.to_string()));
                }
                let n = remove_credentials_of(&mut t.creds, &id)?;
                t.audit.push(AuditEntry::new(
                    now_ms,
                    "resident_removed",
                    Some(id.as_str()),
                    format!("{n} credentials"),
                ));
                Ok((OpOutcome::ResidentRemoved { credentials: n }, Vec::new()))
            }
            RosterOp::Sync { version, digest, residents } => {
                let applied = t.meta.get("roster_version")?.map(|v| v.value()).unwrap_or(0);
                let applied_digest = t.meta.get("roster_digest")?.map(|v| v.value());
                if version < applied {
                    return Err(StoreError::StaleVersion { offered: version, applied });
                }
                if version == applied && applied_digest.is_some_and(|d| d != digest) {
                    return Err(StoreError::VersionConflict(version));
                }
                let before = t.residents.len()?;
                let mut old_modes = std::collections::HashMap::new();
                for row in t.residents.iter()? {
                    let (k, v) = row?;
                    let r: Resident = decode("residents", v.value())?;
                    old_modes.insert(k.value().to_string(), r.mode);
                }
                for (r, _) in &residents {
                    if let Some(m) = old_modes.get(r.id.as_str()).filter(|m| **m != r.mode) {
                        t.audit.push(AuditEntry::new(
                            now_ms,
                            "mode_changed",
                            Some(r.id.as_str()),
                            format!("{} -> {} (roster.sync {version})", m.name(), r.mode.name()),
                        ));
                    }
                }
                t.residents.retain(|_, _| false)?;
                t.creds.retain(|_, _| false)?;
                let mut touched = Vec::with_capacity(residents.len());
                let mut n_creds = 0;
                for (r, cs) in &residents {
                    t.residents.insert(r.id.as_str(), encode(r).as_slice())?;
                    for c in cs {
                        put_credential(&mut t.creds, r, c)?;
                        n_creds += 1;
                    }
                    touched.push(r.id.clone());
                }
                t.meta.insert("roster_version", version)?;
                t.meta.insert("roster_digest", digest)?;
                let removed = before.saturating_sub(residents.len() as u64) as usize;
                t.audit.push(AuditEntry::new(
                    now_ms,
                    "roster_synced",
                    None,
                    format!("version {version}: {} residents, {n_creds} credentials", residents.len()),
                ));
                Ok((OpOutcome::Synced { residents: residents.len(), credentials: n_creds, removed }, touched))
            }
        })
    }

    /// Add a resident with their credentials atomically (a face mode needs its card in the same
    /// transaction). Fails if the resident exists or a credential is held by someone else.
    pub fn add_resident(&self, r: &Resident, credentials: &[Credential], now_ms: i64) -> Result<(), StoreError> {
        r.validate().map_err(StoreError::InvalidResident)?;
        self.mutate(now_ms, None, |t| {
            if t.residents.get(r.id.as_str())?.is_some() {
                return Err(StoreError::ResidentExists(r.id.to_string()));
            }
            t.residents.insert(r.id.as_str(), encode(r).as_slice())?;
            for c in credentials {
                put_credential(&mut t.creds, r, c)?;
            }
            t.audit.push(AuditEntry::new(
                now_ms,
                "resident_added",
                Some(r.id.as_str()),
                format!("mode {}", r.mode.name()),
            ));
            Ok(((), vec![r.id.clone()]))
        })
    }

    /// Insert or replace a resident record (their credentials stay).
    pub fn upsert_resident(&self, r: &Resident, now_ms: i64) -> Result<(), StoreError> {
        self.apply(RosterOp::Upsert { resident: r.clone(), credentials: None }, None, now_ms).map(|_| ())
    }

    /// Change a resident's access mode (P2); returns the previous mode.
    pub fn set_mode(&self, id: &ResidentId, mode: AccessMode, now_ms: i64) -> Result<AccessMode, StoreError> {
        match self.apply(RosterOp::SetMode { id: id.clone(), mode }, None, now_ms)? {
            OpOutcome::ModeChanged { before } => Ok(before),
            _ => Ok(mode),
        }
    }

    pub fn add_credential(&self, c: &Credential, now_ms: i64) -> Result<(), StoreError> {
        self.apply(RosterOp::AddCredential(c.clone()), None, now_ms).map(|_| ())
    }

    /// Remove a credential by key; refused if its holder would be left face-only.
    pub fn remove_credential(&self, key: &str, now_ms: i64) -> Result<Credential, StoreError> {
        match self.apply(RosterOp::RemoveCredential(key.to_string()), None, now_ms)? {
            OpOutcome::CredentialRemoved(c) => Ok(c),
            _ => Err(StoreError::NoCredential(key.to_string())),
        }
    }

    /// Remove a resident and every credential they hold.
    pub fn remove_resident(&self, id: &ResidentId, now_ms: i64) -> Result<usize, StoreError> {
        match self.apply(RosterOp::RemoveResident(id.clone()), None, now_ms)? {
            OpOutcome::ResidentRemoved { credentials } => Ok(credentials),
            _ => Ok(0),
        }
    }

    // ---- face consent and templates -----------------------------------------------------

    /// Record a resident's separate face consent (durable before it returns). Checked here so
    /// that no path can store a consent that is bundled, unlimited or without its rules.
    pub fn record_face_consent(
        &self,
        id: &ResidentId,
        c: &FaceConsent,
        claim: Option<Claim<'_>>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        c.validate().map_err(StoreError::InvalidConsent)?;
        self.mutate(now_ms, claim, |t| {
            if t.residents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            t.consents.insert(id.as_str(), encode(c).as_slice())?;
            let guardian = c.guardian.as_deref().map(|g| format!(", guardian {g}")).unwrap_or_default();
            t.audit.push(AuditEntry::new(
                now_ms,
                "consent_recorded",
                Some(id.as_str()),
                format!(
                    "rules {} (sha256 {}), purpose {}, retention {} days, channel {}{guardian}",
                    c.rules_version,
                    c.rules_sha256.get(..12).unwrap_or(""),
                    c.purpose,
                    c.retention_days,
                    c.channel
                ),
            ));
            Ok(((), Vec::new()))
        })
    }

    /// Withdraw the face consent; the template goes in the same transaction. Returns whether a
    /// template was deleted.
    pub fn withdraw_face_consent(
        &self,
        id: &ResidentId,
        claim: Option<Claim<'_>>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.mutate(now_ms, claim, |t| {
            if t.residents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoResident(id.to_string()));
            }
            if t.consents.remove(id.as_str())?.is_some() {
                t.audit.push(AuditEntry::new(now_ms, "consent_withdrawn", Some(id.as_str()), "by the resident"));
            }
            let had = t.templates.get(id.as_str())?.is_some();
            Ok((had, Vec::new()))
        })
    }

    pub fn face_consent(&self, id: &ResidentId) -> Result<Option<FaceConsent>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(CONSENTS)?;
        t.get(id.as_str())?.map(|v| decode("face_consents", v.value())).transpose()
    }

    /// Store a sealed template under data key `key_id`; refused without a face consent or with
    /// mode `card`. A template it replaces is deleted (its key destroyed, a receipt signed).
    pub fn put_template(&self, id: &ResidentId, key_id: &str, sealed: &[u8], now_ms: i64) -> Result<(), StoreError> {
        self.mutate(now_ms, None, |t| {
            let r: Resident = match t.residents.get(id.as_str())? {
                Some(v) => decode("residents", v.value())?,
                None => return Err(StoreError::NoResident(id.to_string())),
            };
            if !r.mode.admits_face() {
                return Err(StoreError::FaceOff(id.to_string()));
            }
            if t.consents.get(id.as_str())?.is_none() {
                return Err(StoreError::NoConsent(id.to_string()));
            }
            delete_template_in(t, id.as_str(), "replaced_by_new_enrolment")?;
            t.templates.insert(id.as_str(), sealed)?;
            let meta = TemplateMeta { key_id: key_id.to_string(), enrolled_ms: now_ms, last_used_ms: now_ms };
            t.template_meta.insert(id.as_str(), encode(&meta).as_slice())?;
            t.audit.push(AuditEntry::new(
                now_ms,
                "enrolment",
                Some(id.as_str()),
                format!("face template, key {key_id}"),
            ));
            let g = t.meta.get("templates_generation")?.map(|v| v.value()).unwrap_or(0);
            t.meta.insert("templates_generation", g + 1)?;
            Ok(((), Vec::new()))
        })
    }

    /// A template's bookkeeping (no biometric data).
    pub fn template_meta(&self, id: &ResidentId) -> Result<Option<TemplateMeta>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TEMPLATE_META)?;
        t.get(id.as_str())?.map(|v| decode("face_template_meta", v.value())).transpose()
    }

    /// Note a face use (a match that opened or paired), for the retention clock.
    pub fn touch_template(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        // Not fsynced on its own: a lost touch only makes the template expire sooner.
        tx.set_durability(Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut t = tx.open_table(TEMPLATE_META)?;
            let meta = t.get(id)?.map(|v| decode::<TemplateMeta>("face_template_meta", v.value())).transpose()?;
            if let Some(mut m) = meta {
                m.last_used_ms = m.last_used_ms.max(now_ms);
                t.insert(id, encode(&m).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Delete every template not used for longer than its consent's retention period (P7).
    /// Returns the residents whose template went.
    pub fn expire_templates(&self, now_ms: i64) -> Result<Vec<String>, StoreError> {
        self.mutate(now_ms, None, |t| {
            let mut expired = Vec::new();
            for row in t.template_meta.iter()? {
                let (k, v) = row?;
                let m: TemplateMeta = decode("face_template_meta", v.value())?;
                let days = match t.consents.get(k.value())? {
                    Some(c) => decode::<FaceConsent>("face_consents", c.value())?.retention_days,
                    None => 0,
                };
                if now_ms - m.enrolled_ms.max(m.last_used_ms) > i64::from(days) * DAY_MS {
                    expired.push(k.value().to_string());
                }
            }
            for id in &expired {
                delete_template_in(t, id, "retention_expired")?;
            }
            Ok((expired, Vec::new()))
        })
    }

    /// Deletions whose key is still to be destroyed and receipted, oldest first.
    pub fn pending_deletions(&self) -> Result<Vec<PendingDeletion>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DELETIONS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode::<PendingDeletion>("pending_deletions", v.value())?);
        }
        out.sort_by_key(|d| d.at_ms);
        Ok(out)
    }

    /// A deletion is done: its receipt event goes into the outbox and the pending row goes, in
    /// one durable transaction (a crash before it repeats the deletion step, never loses it).
    pub fn complete_deletion(
        &self,
        key_id: &str,
        event: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<OutboxEntry, StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| StoreError::Db(e.to_string()))?;
        let entry = {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut del = tx.open_table(DELETIONS)?;
            del.remove(key_id)?;
            let seq = meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
            let json = event(seq);
            outbox.insert(seq, json.as_slice())?;
            meta.insert("next_seq", seq + 1)?;
            OutboxEntry { seq, json }
        };
        tx.commit()?;
        Ok(entry)
    }

    /// Every data key id the store still refers to (templates and pending deletions).
    pub fn referenced_key_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = std::collections::HashSet::new();
        for row in tx.open_table(TEMPLATE_META)?.iter()? {
            let (_, v) = row?;
            out.insert(decode::<TemplateMeta>("face_template_meta", v.value())?.key_id);
        }
        for row in tx.open_table(DELETIONS)?.iter()? {
            let (k, _) = row?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }

    /// Compact the file as far as redb allows (free pages are released; see `docs/privacy.md`).
    /// Needs exclusive access: used by the CLI, not by the running daemon.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        self.db.compact().map_err(|e| StoreError::Db(e.to_string()))
    }

    /// Every sealed template (resident id, blob).
    pub fn templates(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = match tx.open_table(TEMPLATES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Changes whenever a template is added or deleted (the face thread reloads on a change).
    pub fn templates_generation(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get("templates_generation")?.map(|v| v.value()).unwrap_or(0))
    }

    // ---- the event outbox ---------------------------------------------------------------

    /// Append events durably, assigning consecutive sequence numbers. `build(seq)` makes each
    /// event's JSON with its number. Returns the stored entries once they are on disk.
    pub fn append_events<F>(&self, builders: Vec<F>) -> Result<Vec<OutboxEntry>, StoreError>
    where
        F: FnOnce(u64) -> Vec<u8>,
    {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| StoreError::Db(e.to_string()))?;
        let mut out = Vec::with_capacity(builders.len());
        {
            let mut meta = tx.open_table(META)?;
            let mut outbox = tx.open_table(OUTBOX)?;
            let mut seq = meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
            for b in builders {
                let json = b(seq);
                outbox.insert(seq, json.as_slice())?;
                out.push(OutboxEntry { seq, json });
                seq += 1;
            }
            meta.insert("next_seq", seq)?;
        }
        tx.commit()?;
        Ok(out)
    }

    /// Up to `limit` undelivered events with `seq > after`, oldest first.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for row in t.range(after.saturating_add(1)..)? {
            let (k, v) = row?;
            out.push(OutboxEntry { seq: k.value(), json: v.value().to_vec() });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Move delivered events (after the broker's PUBACK) from the outbox to the journal, which
    /// keeps the newest `journal_keep` for `events.backfill`. Not fsynced: see the module doc.
    pub fn ack_events(&self, seqs: &[u64]) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut t = tx.open_table(OUTBOX)?;
            let mut j = tx.open_table(JOURNAL)?;
            for s in seqs {
                if let Some(v) = t.remove(*s)? {
                    if self.journal_keep > 0 {
                        j.insert(*s, v.value())?;
                    }
                }
            }
            let excess = j.len()?.saturating_sub(self.journal_keep);
            for _ in 0..excess {
                if j.pop_first()?.is_none() {
                    break;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Up to `limit` events with `seq >= from`, delivered (journal) or not (outbox), in order.
    pub fn events_from(&self, from: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let tx = self.db.begin_read()?;
        let mut out = Vec::new();
        for table in [JOURNAL, OUTBOX] {
            let t = tx.open_table(table)?;
            for row in t.range(from..)? {
                let (k, v) = row?;
                out.push(OutboxEntry { seq: k.value(), json: v.value().to_vec() });
                if out.len() >= limit {
                    break;
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        out.truncate(limit);
        Ok(out)
    }

    /// The oldest sequence number `events_from` can still return.
    pub fn oldest_kept_seq(&self) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let j = tx.open_table(JOURNAL)?.first()?.map(|(k, _)| k.value());
        let o = tx.open_table(OUTBOX)?.first()?.map(|(k, _)| k.value());
        Ok(j.into_iter().chain(o).min())
    }

    /// Make every earlier non-durable commit durable (on shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.commit()?;
        Ok(())
    }

    pub fn outbox_depth(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(OUTBOX)?.len()?)
    }

    /// The sequence number the next event will get.
    pub fn next_seq(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1))
    }
}

fn remove_credentials_of(creds: &mut redb::Table<&str, &[u8]>, id: &ResidentId) -> Result<usize, StoreError> {
    let mut keys = Vec::new();
    for row in creds.iter()? {
        let (k, v) = row?;
        let c: Credential = decode("credentials", v.value())?;
        if &c.resident == id {
            keys.push(k.value().to_string());
        }
    }
    for k in &keys {
        creds.remove(k.as_str())?;
    }
    Ok(keys.len())
}

fn put_credential(creds: &mut redb::Table<&str, &[u8]>, holder: &Resident, c: &Credential) -> Result<(), StoreError> {
    if c.resident != holder.id {
        return Err(StoreError::InvalidResident("credential names another resident".into()));
    }
    let key = c.credential.key();
    if let Some(v) = creds.get(key.as_str())? {
        let existing: Credential = decode("credentials", v.value())?;
        if existing.resident != holder.id {
            return Err(StoreError::CredentialTaken(existing.resident.to_string()));
        }
    }
    creds.insert(key.as_str(), encode(c).as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CredentialKind, Validity};
    use crate::wiegand::Format;

    fn rid(s: &str) -> ResidentId {
        ResidentId::new(s).unwrap()
    }

    fn resident(id: &str, mode: AccessMode) -> Resident {
        Resident { id: rid(id), mode, validity: Validity::default(), schedule: None }
    }

    fn card(id: &str, n: u64) -> Credential {
        Credential {
            credential: CredentialKind::Card(CardId { format: Format::H10301, facility: 7, number: n }),
            resident: rid(id),
            validity: Validity::default(),
        }
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, s)
    }

    fn consent(days: u32) -> FaceConsent {
        FaceConsent {
            granted_ms: 0,
            rules_version: "v1".into(),
            rules_sha256: "ab".repeat(32),
            purpose: "gate_access".into(),
            retention_days: days,
            channel: "cli".into(),
            minor: false,
            guardian: None,
        }
    }

    /// A sealed-template-shaped blob naming key id `k` (the store only reads the key id).
    fn blob(k: u8) -> (String, Vec<u8>) {
        let kid = [k; 16];
        (crate::privacy::hex(&kid), [b"MTv2".as_slice(), &kid, &[0u8; 40]].concat())
    }

    fn whys(s: &Store) -> Vec<(String, String)> {
        s.pending_deletions().unwrap().into_iter().map(|d| (d.resident, d.why)).collect()
    }

    #[test]
    fn the_store_and_a_new_state_directory_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let path = state.join("menshen.redb");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        drop(Store::open(&path).unwrap());
        assert_eq!((mode(&state), mode(&path)), (0o700, 0o600));
        // A store someone opened up is closed again at the next start.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Store::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn a_template_needs_consent_and_a_face_mode_and_goes_when_face_is_turned_off() {
        let (_d, s) = open();
        s.add_resident(&resident("a", AccessMode::FaceOrCard), &[card("a", 1)], 0).unwrap();
        s.add_resident(&resident("c", AccessMode::Card), &[card("c", 3)], 0).unwrap();
        let (k1, b1) = blob(1);
        assert!(matches!(s.put_template(&rid("a"), &k1, &b1, 1), Err(StoreError::NoConsent(_))));
        s.record_face_consent(&rid("a"), &consent(30), None, 1).unwrap();
        s.record_face_consent(&rid("c"), &consent(30), None, 1).unwrap();
        assert!(matches!(s.put_template(&rid("c"), &k1, &b1, 1), Err(StoreError::FaceOff(_))));
        let g0 = s.templates_generation().unwrap();
        s.put_template(&rid("a"), &k1, &b1, 2).unwrap();
        assert_eq!(s.templates().unwrap(), vec![("a".to_string(), b1.clone())]);
        assert!(s.templates_generation().unwrap() > g0);
        assert_eq!(s.face_consent(&rid("a")).unwrap().unwrap().rules_version, "v1");
        assert_eq!(s.referenced_key_ids().unwrap().into_iter().collect::<Vec<_>>(), vec![k1.clone()]);
        // Mode to card: the template goes in the same transaction, its key is queued for
        // destruction with the reason.
        s.set_mode(&rid("a"), AccessMode::Card, 3).unwrap();
        assert!(s.templates().unwrap().is_empty());
        assert!(s.template_meta(&rid("a")).unwrap().is_none());
        assert_eq!(whys(&s), vec![("a".into(), "face_turned_off".into())]);
        let e = s.complete_deletion(&k1, |seq| format!("receipt {seq}").into_bytes()).unwrap();
        assert!(whys(&s).is_empty());
        assert_eq!(s.outbox_after(0, 10).unwrap(), vec![e]);
        // Withdrawing consent deletes it too.
        s.set_mode(&rid("a"), AccessMode::FaceOrCard, 4).unwrap();
        let (k2, b2) = blob(2);
        s.put_template(&rid("a"), &k2, &b2, 5).unwrap();
        assert!(s.withdraw_face_consent(&rid("a"), None, 6).unwrap());
        assert!(s.templates().unwrap().is_empty());
        assert!(s.face_consent(&rid("a")).unwrap().is_none());
        // Removing the resident deletes it.
        s.record_face_consent(&rid("a"), &consent(30), None, 7).unwrap();
        let (k3, b3) = blob(3);
        s.put_template(&rid("a"), &k3, &b3, 8).unwrap();
        // Re-enrolling replaces the template: the old key is destroyed too.
        let (k4, b4) = blob(4);
        s.put_template(&rid("a"), &k4, &b4, 8).unwrap();
        s.remove_resident(&rid("a"), 9).unwrap();
        assert!(s.templates().unwrap().is_empty());
        assert!(s.face_consent(&rid("a")).unwrap().is_none(), "the consent goes with the resident");
        // A sync that leaves the resident out deletes it.
        s.add_resident(&resident("b", AccessMode::FaceAndCard), &[card("b", 2)], 10).unwrap();
        s.record_face_consent(&rid("b"), &consent(30), None, 10).unwrap();
        let (k5, b5) = blob(5);
        s.put_template(&rid("b"), &k5, &b5, 10).unwrap();
        let snapshot = vec![(resident("c", AccessMode::Card), vec![card("c", 3)])];
        s.apply(RosterOp::Sync { version: 1, digest: 1, residents: snapshot }, None, 11).unwrap();
        assert!(s.templates().unwrap().is_empty());
        assert_eq!(
            whys(&s),
            vec![
                ("a".into(), "consent_withdrawn".into()),
                ("a".into(), "replaced_by_new_enrolment".into()),
                ("a".into(), "resident_removed".into()),
                ("b".into(), "resident_removed".into()),
            ]
        );
        // Every change is in the audit file, chained, with no template bytes.
        let text = std::fs::read_to_string(s.audit_path()).unwrap();
        let v = crate::privacy::audit::verify_text(&text);
        assert_eq!(v.broken, None);
        for kind in [
            "resident_added",
            "consent_recorded",
            "enrolment",
            "mode_changed",
            "deletion",
            "consent_withdrawn",
            "resident_removed",
            "roster_synced",
        ] {
            assert!(text.contains(&format!("\"kind\":\"{kind}\"")), "{kind} missing:\n{text}");
        }
        assert!(!text.contains("MTv2"));
    }

    #[test]
    fn the_retention_sweep_deletes_exactly_the_templates_unused_for_too_long() {
        let (_d, s) = open();
        let day = DAY_MS;
        for (i, (id, days)) in [("short", 30u32), ("long", 365), ("used", 30)].into_iter().enumerate() {
            s.add_resident(&resident(id, AccessMode::FaceOrCard), &[card(id, i as u64 + 1)], 0).unwrap();
            s.record_face_consent(&rid(id), &consent(days), None, 0).unwrap();
            let (k, b) = blob(i as u8 + 1);
            s.put_template(&rid(id), &k, &b, 0).unwrap();
        }
        s.touch_template("used", 20 * day).unwrap();
        assert!(s.expire_templates(30 * day).unwrap().is_empty(), "nothing is past its period yet");
        // The clock jumps 31 days: only `short` (30 days, unused) goes; `used` was seen on day 20.
        assert_eq!(s.expire_templates(31 * day).unwrap(), vec!["short".to_string()]);
        assert_eq!(whys(&s), vec![("short".into(), "retention_expired".into())]);
        assert_eq!(s.expire_templates(51 * day).unwrap(), vec!["used".to_string()]);
        assert_eq!(s.expire_templates(365 * day).unwrap(), Vec::<String>::new());
        assert_eq!(s.expire_templates(366 * day).unwrap(), vec!["long".to_string()]);
        assert!(s.templates().unwrap().is_empty());
    }

    #[test]
    fn a_consent_cannot_be_unlimited_bundled_or_without_its_rules() {
        let mut c = consent(0);
        assert!(c.validate().unwrap_err().contains("never unlimited"));
        c.retention_days = MAX_RETENTION_DAYS + 1;
        assert!(c.validate().is_err());
        c.retention_days = 30;
        assert_eq!(c.validate(), Ok(()));
        c.purpose = "marketing".into();
        assert!(c.validate().is_err(), "face processing for gate access only");
        c.purpose = "gate_access".into();
        c.rules_sha256 = "short".into();
        assert!(c.validate().is_err());
        c.rules_sha256 = "ab".repeat(32);
        c.minor = true;
        assert!(c.validate().unwrap_err().contains("guardian"));
        c.guardian = Some("g-1".into());
        assert_eq!(c.validate(), Ok(()));
        // Unknown fields (an "irrevocable" flag) are refused when a record is read.
        let json = serde_json::to_string(&c).unwrap().replace("}", ",\"irrevocable\":true}");
        assert!(serde_json::from_str::<FaceConsent>(&json).is_err());
    }

    #[test]
    fn residents_and_cards_roundtrip_and_survive_reopen() {
        let (dir, s) = open();
        s.add_resident(&resident("a", AccessMode::Card), &[card("a", 1)], 0).unwrap();
        let (c, r) = s.lookup_card(&CardId { format: Format::H10301, facility: 7, number: 1 }).unwrap().unwrap();
        assert_eq!((c.resident.as_str(), r.mode), ("a", AccessMode::Card));
        drop(s);
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(s.residents().unwrap().len(), 1);
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        assert!(s.lookup_card(&CardId { format: Format::H10301, facility: 7, number: 2 }).unwrap().is_none());
    }

    #[test]
    fn second_open_is_refused_while_the_first_is_open() {
        let (dir, _s) = open();
        assert!(matches!(Store::open(&dir.path().join("s.redb")), Err(StoreError::Locked)));
    }

    #[test]
    fn the_guard_runs_on_every_write() {
        let (_d, s) = open();
        // Face mode without a card: refused, nothing stored.
        let err = s.add_resident(&resident("f", AccessMode::FaceOrCard), &[], 0).unwrap_err();
        assert!(matches!(err, StoreError::Guard(_)));
        assert!(s.residents().unwrap().is_empty());
        // With a card: accepted.
        s.add_resident(&resident("f", AccessMode::FaceOrCard), &[card("f", 5)], 0).unwrap();
        // Removing the last card: refused, card still there.
        assert!(matches!(s.remove_credential(&card("f", 5).credential.key(), 0), Err(StoreError::Guard(_))));
        assert_eq!(s.credentials_of(&rid("f")).unwrap().len(), 1);
        // A card-mode resident may switch to face once they hold a card, not before.
        s.add_resident(&resident("c", AccessMode::Card), &[], 0).unwrap();
        assert!(matches!(s.set_mode(&rid("c"), AccessMode::FaceAndCard, 0), Err(StoreError::Guard(_))));
        assert_eq!(s.resident(&rid("c")).unwrap().unwrap().mode, AccessMode::Card);
        s.add_credential(&card("c", 6), 0).unwrap();
        assert_eq!(s.set_mode(&rid("c"), AccessMode::FaceAndCard, 0).unwrap(), AccessMode::Card);
        // An expired card does not count.
        let mut late = card("e", 9);
        late.validity.valid_until_ms = Some(100);
        assert!(s.add_resident(&resident("e", AccessMode::FaceOrCard), &[late], 200).is_err());
        // Upserting a face mode over a card-less resident is refused too.
        s.add_resident(&resident("u", AccessMode::Card), &[], 0).unwrap();
        assert!(s.upsert_resident(&resident("u", AccessMode::FaceOrCard), 0).is_err());
    }

    #[test]
    fn a_card_belongs_to_one_resident_and_removal_takes_cards() {
        let (_d, s) = open();
        s.add_resident(&resident("a", AccessMode::Card), &[card("a", 1)], 0).unwrap();
        s.add_resident(&resident("b", AccessMode::Card), &[], 0).unwrap();
        assert!(matches!(s.add_credential(&card("b", 1), 0), Err(StoreError::CredentialTaken(_))));
        assert_eq!(s.remove_resident(&rid("a"), 0).unwrap(), 1);
        assert!(s.credentials().unwrap().is_empty());
        assert!(matches!(s.remove_resident(&rid("a"), 0), Err(StoreError::NoResident(_))));
    }

    #[test]
    fn outbox_assigns_sequence_numbers_and_acks_remove() {
        let (dir, s) = open();
        let stored = s
            .append_events(
                (0..5).map(|i| move |seq: u64| format!("{{\"i\":{i},\"seq\":{seq}}}").into_bytes()).collect(),
            )
            .unwrap();
        assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(s.outbox_depth().unwrap(), 5);
        s.ack_events(&[1, 2]).unwrap();
        let rest = s.outbox_after(0, 10).unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(s.outbox_after(3, 1).unwrap()[0].seq, 4);
        s.sync().unwrap();
        drop(s);
        let s = Store::open(&dir.path().join("s.redb")).unwrap();
        assert_eq!(s.next_seq().unwrap(), 6, "sequence numbers continue after reopen");
        assert_eq!(s.outbox_depth().unwrap(), 3);
    }

    #[test]
    fn request_ids_are_claimed_once_with_their_change() {
        let (_d, s) = open();
        let claim = |id| Some(Claim { request_id: id, now_ms: 1_000 });
        let up = RosterOp::Upsert { resident: resident("a", AccessMode::Card), credentials: Some(vec![card("a", 1)]) };
        s.apply(up.clone(), claim("r1"), 1_000).unwrap();
        assert!(matches!(s.apply(up, claim("r1"), 1_000), Err(StoreError::DuplicateRequest(_))));
        // A refused change does not use up its request id (one transaction).
        let bad = RosterOp::SetMode { id: rid("a"), mode: AccessMode::FaceOrCard };
        s.apply(RosterOp::RemoveCredential(card("a", 1).credential.key()), claim("r2"), 1_000).unwrap();
        assert!(matches!(s.apply(bad, claim("r3"), 1_000), Err(StoreError::Guard(_))));
        s.apply(RosterOp::Nothing, claim("r3"), 1_000).unwrap();
        assert_eq!(s.remembered_requests().unwrap(), 3);
    }

    #[test]
    fn request_ids_are_pruned_only_past_the_minimum_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        s.set_retention(1_000, 3, 10);
        for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            s.apply(RosterOp::Nothing, Some(Claim { request_id: id, now_ms: 100 + i as i64 }), 0).unwrap();
        }
        assert_eq!(s.remembered_requests().unwrap(), 5, "all younger than the minimum age");
        s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_000 }), 0).unwrap();
        assert_eq!(s.remembered_requests().unwrap(), 3);
        let err = s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_001 }), 0);
        assert!(matches!(err, Err(StoreError::DuplicateRequest(_))));
    }

    #[test]
    fn roster_sync_is_atomic_idempotent_and_versioned() {
        let (_d, s) = open();
        s.add_resident(&resident("old", AccessMode::Card), &[card("old", 9)], 0).unwrap();
        let snap = vec![
            (resident("a", AccessMode::FaceOrCard), vec![card("a", 1)]),
            (resident("b", AccessMode::Card), vec![]),
        ];
        let sync = |v, d, r: Vec<(Resident, Vec<Credential>)>| RosterOp::Sync { version: v, digest: d, residents: r };
        let out = s.apply(sync(3, 77, snap.clone()), None, 0).unwrap();
        assert_eq!(out, OpOutcome::Synced { residents: 2, credentials: 1, removed: 0 });
        assert!(s.resident(&rid("old")).unwrap().is_none());
        assert_eq!(s.roster_version().unwrap(), 3);
        // The same snapshot again: the same state.
        s.apply(sync(3, 77, snap.clone()), None, 0).unwrap();
        assert_eq!(s.residents().unwrap().len(), 2);
        assert!(matches!(s.apply(sync(3, 78, snap.clone()), None, 0), Err(StoreError::VersionConflict(3))));
        assert!(matches!(s.apply(sync(2, 1, snap), None, 0), Err(StoreError::StaleVersion { .. })));
        // A snapshot with a face-only resident is refused whole.
        let bad = vec![(resident("c", AccessMode::Card), vec![]), (resident("f", AccessMode::FaceOrCard), vec![])];
        assert!(matches!(s.apply(sync(4, 1, bad), None, 0), Err(StoreError::Guard(_))));
        assert_eq!(s.residents().unwrap().len(), 2);
        assert_eq!(s.roster_version().unwrap(), 3);
    }

    #[test]
    fn delivered_events_stay_in_the_journal_for_backfill() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
        s.set_retention(0, 10, 3);
        s.append_events((0..6).map(|_| |seq: u64| format!("{{\"seq\":{seq}}}").into_bytes()).collect()).unwrap();
        s.ack_events(&[1, 2, 3, 4]).unwrap();
        let all = s.events_from(0, 100).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
        assert_eq!(s.events_from(4, 2).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5]);
        assert_eq!(s.oldest_kept_seq().unwrap(), Some(2));
        assert_eq!(s.outbox_depth().unwrap(), 2);
    }
    /// Cards as (number, expired).
    type Cards = Vec<(u8, bool)>;

    /// One random roster change, as the BMS or the CLI could send it.
    #[derive(Debug, Clone)]
    enum Change {
        Upsert { who: u8, mode: u8, cards: Cards },
        SetMode { who: u8, mode: u8 },
        AddCard { who: u8, card: u8, expired: bool },
        RemoveCard { card: u8 },
        Remove { who: u8 },
        Sync { entries: Vec<(u8, u8, Cards)> },
    }

    fn arb_change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        let cards = proptest::collection::vec((0..6u8, any::<bool>()), 0..3);
        prop_oneof![
            (0..4u8, 0..3u8, cards.clone()).prop_map(|(who, mode, cards)| Change::Upsert { who, mode, cards }),
            (0..4u8, 0..3u8).prop_map(|(who, mode)| Change::SetMode { who, mode }),
            (0..4u8, 0..6u8, any::<bool>()).prop_map(|(who, card, expired)| Change::AddCard { who, card, expired }),
            (0..6u8).prop_map(|card| Change::RemoveCard { card }),
            (0..4u8).prop_map(|who| Change::Remove { who }),
            proptest::collection::vec((0..4u8, 0..3u8, cards), 0..4).prop_map(|entries| Change::Sync { entries }),
        ]
    }

    const MODES: [AccessMode; 3] = [AccessMode::Card, AccessMode::FaceOrCard, AccessMode::FaceAndCard];
    const NOW_MS: i64 = 1_000_000;

    fn cred(who: u8, card: u8, expired: bool) -> Credential {
        let mut c = self::card(&format!("p{who}"), u64::from(card) + 1);
        if expired {
            c.validity.valid_until_ms = Some(NOW_MS - 1);
        }
        c
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The Art. 10 guard over whole rosters (P1): whatever sequence of changes is offered,
        /// every state the store accepts leaves each resident whose mode admits face with a
        /// card that is valid now. Refused changes change nothing.
        #[test]
        fn no_accepted_roster_leaves_anyone_face_only(changes in proptest::collection::vec(arb_change(), 1..16)) {
            let (_d, s) = open();
            let mut version = 0;
            for ch in changes {
                let before = s.fingerprint().unwrap();
                let res = match ch.clone() {
                    Change::Upsert { who, mode, cards } => {
                        let r = resident(&format!("p{who}"), MODES[mode as usize]);
                        let creds = cards.iter().map(|(c, e)| cred(who, *c, *e)).collect();
                        s.apply(RosterOp::Upsert { resident: r, credentials: Some(creds) }, None, NOW_MS).map(|_| ())
                    }
                    Change::SetMode { who, mode } => {
                        s.set_mode(&rid(&format!("p{who}")), MODES[mode as usize], NOW_MS).map(|_| ())
                    }
                    Change::AddCard { who, card, expired } => s.add_credential(&cred(who, card, expired), NOW_MS),
                    Change::RemoveCard { card } => {
                        s.remove_credential(&cred(0, card, false).credential.key(), NOW_MS).map(|_| ())
                    }
                    Change::Remove { who } => s.remove_resident(&rid(&format!("p{who}")), NOW_MS).map(|_| ()),
                    Change::Sync { entries } => {
                        version += 1;
                        let mut seen = std::collections::HashSet::new();
                        let residents = entries
                            .into_iter()
                            .filter(|(who, _, _)| seen.insert(*who))
                            .map(|(who, mode, cards)| {
                                let r = resident(&format!("p{who}"), MODES[mode as usize]);
                                (r, cards.iter().map(|(c, e)| cred(who, *c, *e)).collect())
                            })
                            .collect();
                        s.apply(RosterOp::Sync { version, digest: version, residents }, None, NOW_MS).map(|_| ())
                    }
                };
                if res.is_err() {
                    proptest::prop_assert_eq!(&before, &s.fingerprint().unwrap(), "a refused {:?} changed the store", ch);
                }
                for r in s.residents().unwrap() {
                    if r.mode.admits_face() {
                        let cards = s.credentials_of(&r.id).unwrap();
                        proptest::prop_assert!(
                            cards.iter().any(|c| c.validity.check(NOW_MS) == crate::model::ValidityState::Valid),
                            "{} has mode {:?} and no valid card after {:?}", r.id, r.mode, ch
                        );
                    }
                }
            }
        }
    }
}
