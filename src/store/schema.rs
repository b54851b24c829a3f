//! The tables and the schema version.

use redb::{ReadableTable, TableDefinition};

use super::{Store, StoreError};

/// Bumped when the layout of a table changes; a newer file is refused, an older one migrated.
pub const SCHEMA_VERSION: u64 = 1;

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const RESIDENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("residents");
pub(super) const CREDENTIALS: TableDefinition<&str, &[u8]> = TableDefinition::new("credentials");
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Delivered events, kept (newest `journal_keep`) so the BMS can ask for them again.
pub(super) const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
/// Command request ids already seen (id → wall ms), and their arrival order for pruning.
pub(super) const REQUESTS: TableDefinition<&str, i64> = TableDefinition::new("requests");
pub(super) const REQUEST_LOG: TableDefinition<u64, &str> = TableDefinition::new("request_log");
/// Face consents: resident id → [`FaceConsent`] (JSON). Separate from every other record (Art. 2:
/// separate consent).
pub(super) const CONSENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("face_consents");
/// Face templates, sealed (encrypted and bound to the resident id; see `privacy`): resident id →
/// blob. Never an image. The invariant kept by every write: a template exists only for a resident
/// who exists, whose mode admits face, and who has a face consent.
pub(super) const TEMPLATES: TableDefinition<&str, &[u8]> = TableDefinition::new("face_templates");
/// Per template: resident id → [`TemplateMeta`] (JSON): its data key id, when enrolled, last used.
pub(super) const TEMPLATE_META: TableDefinition<&str, &[u8]> = TableDefinition::new("face_template_meta");
/// Templates deleted whose data key is still to be destroyed and receipted: key id →
/// [`PendingDeletion`] (JSON). Written in the deleting transaction; emptied by `privacy::shred`.
pub(super) const DELETIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("pending_deletions");
/// The pages of a paged `roster.sync` received so far: page index → JSON entries. The roster
/// tables are untouched until the last page is in; then one transaction switches.
pub(super) const SYNC_PAGES: TableDefinition<u32, &[u8]> = TableDefinition::new("roster_sync_pages");
/// The paged sync in progress: `current` → [`super::SyncProgress`] (JSON).
pub(super) const SYNC_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("roster_sync");
/// Audit records written with their change, waiting to be moved to the audit file: seq → JSON.
pub(super) const AUDIT_PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_pending");

impl Store {
    pub(super) fn init(&self) -> Result<(), StoreError> {
        let tx = self.write()?;
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
            tx.open_table(SYNC_PAGES)?;
            tx.open_table(SYNC_STATE)?;
        }
        self.commit(tx)?;
        self.flush_audit();
        Ok(())
    }
}
