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

use redb::{Database, ReadableDatabase, ReadableTable};
use std::path::Path;

use crate::model::{Credential, Resident, ResidentId};
use crate::policy::{guard, GuardError};

mod audit;
mod outbox;
mod requests;
mod roster;
mod schema;
mod sync;
mod templates;
#[cfg(test)]
mod tests;

pub use audit::{AuditEntry, AuditSink};
pub use outbox::OutboxEntry;
pub use requests::Claim;
pub use roster::{OpOutcome, RosterOp};
pub use schema::SCHEMA_VERSION;
use schema::*;
pub use sync::{PageOutcome, SyncPage, SyncProgress, Timeout};
use templates::enforce_template_invariant;
pub use templates::{PendingDeletion, TemplateMeta, Withdrawal};

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
    /// A PIN another resident holds (the holder is not named: that would give their PIN away).
    #[error("this PIN is already in use at this gate: choose another")]
    PinTaken,
    #[error("the duress PIN must differ from the resident's PIN")]
    DuressSameAsPin,
    #[error("resident `{0}` has no {1}")]
    NoPin(String, &'static str),
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
    /// One entry of a `roster.batch` failed: nothing of the batch was applied.
    #[error("batch entry {index}: {source} (nothing in the batch was applied)")]
    InBatch { index: usize, source: Box<StoreError> },
    #[error("roster.sync {sync_id}: page {got} is out of order; the next page is {expected}")]
    PageOutOfOrder { sync_id: String, expected: u32, got: u32 },
    #[error("roster.sync {sync_id}: page {page} is already in; the next page is {expected}")]
    DuplicatePage { sync_id: String, page: u32, expected: u32 },
    #[error("{0}")]
    UnknownSync(String),
}

struct Tables<'t> {
    residents: redb::Table<'t, &'static str, &'static [u8]>,
    creds: redb::Table<'t, &'static str, &'static [u8]>,
    meta: redb::Table<'t, &'static str, u64>,
    consents: redb::Table<'t, &'static str, &'static [u8]>,
    templates: redb::Table<'t, &'static str, &'static [u8]>,
    template_meta: redb::Table<'t, &'static str, &'static [u8]>,
    deletions: redb::Table<'t, &'static str, &'static [u8]>,
    /// The half-received paged `roster.sync`, if any (see `sync`).
    sync_pages: redb::Table<'t, u32, &'static [u8]>,
    sync_state: redb::Table<'t, &'static str, &'static [u8]>,
    /// Audit records of this transaction (written with it).
    audit: Vec<AuditEntry>,
    now_ms: i64,
}

/// The Art. 10 guard ([`guard`]) on the state `t` holds, for each of `ids` that still exists: the
/// position and error of the first that fails.
fn guard_all(t: &Tables<'_>, ids: &[ResidentId], now_ms: i64) -> Result<Option<(usize, GuardError)>, StoreError> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut by_holder: std::collections::HashMap<ResidentId, Vec<Credential>> = std::collections::HashMap::new();
    for row in t.creds.iter()? {
        let (_, v) = row?;
        let c: Credential = decode("credentials", v.value())?;
        by_holder.entry(c.resident.clone()).or_default().push(c);
    }
    for (k, id) in ids.iter().enumerate() {
        if let Some(v) = t.residents.get(id.as_str())? {
            let r: Resident = decode("residents", v.value())?;
            if let Err(e) = guard(&r, by_holder.get(id).map_or(&[][..], Vec::as_slice), now_ms) {
                return Ok(Some((k, e)));
            }
        }
    }
    Ok(None)
}

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

/// Free bytes the store's filesystem needs before a failed store is reopened for writing.
const REOPEN_MIN_FREE: u64 = 256 * 1024;

/// The store.
pub struct Store {
    /// `None` only while the file is being reopened after a failed write (see [`Store::write`]).
    db: std::sync::RwLock<Option<Database>>,
    /// Set when a write failed (a full disk, an I/O error): redb then refuses every write until
    /// the file is reopened, which the next writer does first. Reads go on meanwhile.
    failed: std::sync::atomic::AtomicBool,
    /// How many times the file was reopened after a failed write. A reopen goes back to the last
    /// durable commit, so outbox removals made since (non-durable, see `ack_events`) are undone:
    /// the link re-reads the outbox when this changes.
    reopens: std::sync::atomic::AtomicU64,
    path: std::path::PathBuf,
    /// Where audit records go after their commit (the audit file, attached by `privacy`).
    audit: Option<Box<dyn AuditSink>>,
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
                // (the packaged service's StateDirectoryMode=0710 adds only traversal for the admin group).
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
            db: std::sync::RwLock::new(Some(db)),
            failed: std::sync::atomic::AtomicBool::new(false),
            reopens: std::sync::atomic::AtomicU64::new(0),
            audit: None,
            path: path.to_path_buf(),
            request_min_age_ms: 24 * 3600 * 1000,
            request_keep: 10_000,
            journal_keep: 10_000,
        };
        store.init()?;
        Ok(store)
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
        let tx = self.read()?;
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
        Ok(crate::digest::hex(&h.finalize()))
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get("schema_version")?.map(|v| v.value()).unwrap_or(0))
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
        let tx = self.write()?;
        let out = {
            let mut t = Tables {
                residents: tx.open_table(RESIDENTS)?,
                creds: tx.open_table(CREDENTIALS)?,
                meta: tx.open_table(META)?,
                consents: tx.open_table(CONSENTS)?,
                templates: tx.open_table(TEMPLATES)?,
                template_meta: tx.open_table(TEMPLATE_META)?,
                deletions: tx.open_table(DELETIONS)?,
                sync_pages: tx.open_table(SYNC_PAGES)?,
                sync_state: tx.open_table(SYNC_STATE)?,
                audit: Vec::new(),
                now_ms,
            };
            if let Some(c) = claim {
                self.claim_in(&tx, &mut t.meta, c)?;
            }
            let (out, touched) = f(&mut t)?;
            if let Some(c) = claim {
                for e in t.audit.iter_mut().filter(|e| e.by.is_none()) {
                    e.by = Some(format!("{}, request {}", c.by, c.request_id));
                }
            }
            // Turning face off (mode `card`, removal, a sync without the resident) deletes the
            // template in the same transaction as the change: at once, never later.
            for id in enforce_template_invariant(&mut t)? {
                tracing::info!(resident = %id, "face template deleted (face turned off, consent withdrawn or resident removed)");
            }
            if let Some((_, e)) = guard_all(&t, &touched, now_ms)? {
                return Err(e.into());
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
        self.commit(tx)?;
        if out.1 {
            self.flush_audit();
        }
        Ok(out.0)
    }

    /// Compact the file as far as redb allows (free pages are released; see `docs/privacy.md`).
    /// Needs exclusive access: used by the CLI, not by the running daemon.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        let db = self.db.get_mut().unwrap_or_else(|p| p.into_inner());
        match db.as_mut() {
            Some(db) => db.compact().map_err(|e| StoreError::Db(e.to_string())),
            None => Err(StoreError::Db("the store is being reopened".into())),
        }
    }

    /// Make every earlier non-durable commit durable (on shutdown).
    pub fn sync(&self) -> Result<(), StoreError> {
        let tx = self.write()?;
        self.commit(tx)?;
        Ok(())
    }

    /// A read transaction: an MVCC snapshot, never blocked by a writer, and still served after a
    /// failed write.
    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(|p| p.into_inner());
        match db.as_ref() {
            Some(db) => Ok(db.begin_read()?),
            None => Err(StoreError::Db("the store is being reopened".into())),
        }
    }

    /// A write transaction. After a failed write (redb then refuses every write with "previous
    /// I/O error" until the file is closed and opened again) the file is reopened first; if that
    /// fails too, this fails, and the next writer tries again. Nothing committed is lost by a
    /// reopen: redb's commit is atomic and the failed transaction never became visible.
    fn write(&self) -> Result<redb::WriteTransaction, StoreError> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::Acquire) {
            self.reopen()?;
        }
        let begin = || {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            match db.as_ref() {
                Some(db) => Ok(db.begin_write()),
                None => Err(StoreError::Db("the store is being reopened".into())),
            }
        };
        match begin()? {
            Ok(tx) => Ok(tx),
            // A write that failed inside a transaction (not at its commit) poisons the file too.
            Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                self.failed.store(true, Ordering::Release);
                self.reopen()?;
                Ok(begin()??)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Commit `tx`; a failure marks the file for reopening before the next write.
    fn commit(&self, tx: redb::WriteTransaction) -> Result<(), StoreError> {
        tx.commit().map_err(|e| {
            self.failed.store(true, std::sync::atomic::Ordering::Release);
            StoreError::from(e)
        })
    }

    fn reopen(&self) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        // While the disk is still full, leave the open file alone: reads go on from it, and a
        // write could not succeed anyway.
        if let Some(dir) = self.path.parent() {
            if let Ok(v) = rustix::fs::statvfs(dir) {
                let free = v.f_bavail.saturating_mul(v.f_frsize);
                if free < REOPEN_MIN_FREE {
                    return Err(StoreError::Db(format!("no space left on the store's disk ({free} bytes free)")));
                }
            }
        }
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if !self.failed.load(Ordering::Acquire) {
            return Ok(()); // another writer reopened it meanwhile
        }
        // The old handle must be closed before the file can be opened again (redb locks it).
        drop(db.take());
        let opened = Database::create(&self.path);
        let result = match opened {
            Ok(d) => {
                *db = Some(d);
                self.failed.store(false, Ordering::Release);
                self.reopens.fetch_add(1, Ordering::AcqRel);
                tracing::info!(path = %self.path.display(), "store reopened after a failed write");
                Ok(())
            }
            Err(e) => Err(StoreError::from(e)),
        };
        if db.is_none() {
            // Reads must go on: try once more at once (a read transaction of another thread can
            // hold the old file open for a moment).
            if let Ok(d) = Database::create(&self.path) {
                *db = Some(d);
                self.failed.store(false, Ordering::Release);
                self.reopens.fetch_add(1, Ordering::AcqRel);
                return Ok(());
            }
        }
        result
    }

    /// Hold the store's one write transaction (tests: a commit in progress, as an event batch's
    /// fdatasync or an enrolment would).
    #[cfg(test)]
    pub(crate) fn write_for_test(&self) -> Result<redb::WriteTransaction, StoreError> {
        self.write()
    }

    /// How many times the file was reopened after a failed write (see the field).
    pub fn reopens(&self) -> u64 {
        self.reopens.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the last write failed and the file waits to be reopened (status and health).
    pub fn write_failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }
}
