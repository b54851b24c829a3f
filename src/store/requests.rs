//! Command request ids: claimed in the transaction of the change they carry (M3), remembered
//! for at least a day.

use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::*;
use super::{Store, StoreError};

/// A command's request id to record in the same transaction as its change (M3).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub request_id: &'a str,
    pub now_ms: i64,
    /// Who asked, recorded in the change's audit records: `mqtt`, or `cli uid=N`.
    pub by: &'a str,
}

impl Store {
    /// How many request ids are remembered.
    pub fn remembered_requests(&self) -> Result<u64, StoreError> {
        let tx = self.read()?;
        Ok(tx.open_table(REQUESTS)?.len()?)
    }

    pub(super) fn claim_in(
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
}
