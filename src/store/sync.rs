//! The paged `roster.sync`: a compound's roster (50,000 residents) in pages a managed broker
//! accepts (64–256 KB), switched in one transaction.
//!
//! Pages are staged in their own tables, in order, each with its request id claimed in the same
//! durable transaction; the roster tables are not touched, so the old roster decides every
//! swipe until the last page is in. The last page's transaction replaces the roster exactly as a
//! one-payload sync does (same version rules, same Art. 10 guard on every resident) and empties
//! the staging: the switch is one commit, or nothing. A half-received sync survives a restart
//! (the BMS resumes at the page the gate names), is replaced by a new sync's page 0, and is
//! discarded after `roster.sync_timeout_secs` without a page.

use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use super::roster::apply_in;
use super::{decode, encode, AuditEntry, Claim, OpOutcome, RosterOp, Store, StoreError, Tables};
use crate::model::{Credential, Resident};
use crate::policy::guard;

const CURRENT: &str = "current";

/// One page as the commands stage hands it over.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncPage {
    pub sync_id: String,
    pub version: u64,
    /// 0-based.
    pub page: u32,
    pub pages: u32,
    pub residents: Vec<(Resident, Vec<Credential>)>,
}

/// The paged sync in progress (shown in `health`, the retained `summary` and `menshen status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub sync_id: String,
    pub version: u64,
    pub pages: u32,
    /// The page the gate waits for (= pages received, since they come in order).
    pub next_page: u32,
    pub residents: u64,
    pub started_ms: i64,
    pub updated_ms: i64,
}

impl SyncProgress {
    /// `v2-site (version 2) after 3 of 78 pages`: for events, audit records and logs.
    pub fn describe(&self) -> String {
        format!("{} (version {}) after {} of {} pages", self.sync_id, self.version, self.next_page, self.pages)
    }
}

/// When a half-received sync is given up: after `ms` without a page, counted from its last page
/// or from the last time the gate (re)connected to the broker, whichever is later. A gate that
/// was offline could not receive pages: its persistent session delivers the rest when it is back,
/// and they must not find the sync discarded for the outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout {
    pub ms: i64,
    /// Wall ms of the last connection to the broker (0: none).
    pub online_since_ms: i64,
}

impl Timeout {
    fn expired(&self, p: &SyncProgress, now_ms: i64) -> bool {
        now_ms.saturating_sub(p.updated_ms.max(self.online_since_ms)) > self.ms
    }
}

/// What one page did.
#[derive(Debug, Clone, PartialEq)]
pub struct PageOutcome {
    pub progress: SyncProgress,
    /// A half-received sync that this page 0 replaced (discarded).
    pub replaced: Option<SyncProgress>,
    /// Set on the last page: the roster was switched in this page's transaction.
    pub switched: Option<OpOutcome>,
}

/// The content digest of a paged snapshot: SHA-256 over its entries sorted by resident id, so the
/// same snapshot in other page sizes is the same version (a resend after a lost reply is not a
/// conflict).
fn paged_digest(entries: &mut [(Resident, Vec<Credential>)]) -> u64 {
    entries.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    let mut bytes = b"menshen paged roster v1\n".to_vec();
    for e in entries.iter() {
        bytes.extend_from_slice(&encode(e));
        bytes.push(b'\n');
    }
    crate::digest::sha256_u64(&bytes)
}

fn current(t: &Tables<'_>) -> Result<Option<SyncProgress>, StoreError> {
    t.sync_state.get(CURRENT)?.map(|v| decode("roster_sync", v.value())).transpose()
}

fn clear(t: &mut Tables<'_>) -> Result<(), StoreError> {
    t.sync_pages.retain(|_, _| false)?;
    t.sync_state.remove(CURRENT)?;
    Ok(())
}

fn discard(t: &mut Tables<'_>, p: &SyncProgress, why: &str, now_ms: i64) -> Result<(), StoreError> {
    clear(t)?;
    t.audit.push(AuditEntry::new(now_ms, "roster_sync_discarded", None, format!("sync {}: {why}", p.describe())));
    Ok(())
}

impl Store {
    /// The paged sync in progress, if any.
    pub fn sync_progress(&self) -> Result<Option<SyncProgress>, StoreError> {
        let tx = self.read()?;
        let t = tx.open_table(super::schema::SYNC_STATE)?;
        t.get(CURRENT)?.map(|v| decode("roster_sync", v.value())).transpose()
    }

    /// Stage one page (claiming `claim` with it); on the last page, switch the roster in the same
    /// transaction. A refused page changes nothing (send it again, fixed). A refused switch (a
    /// card held by residents of two pages, a version conflict) discards the staged sync, so the
    /// BMS starts again with a fixed snapshot; a storage error leaves it to be retried.
    /// A sync that has waited longer than `timeout_ms` for a page (see [`Timeout`]) counts as
    /// discarded.
    pub fn stage_page(
        &self,
        page: SyncPage,
        claim: Option<Claim<'_>>,
        now_ms: i64,
        timeout: Timeout,
    ) -> Result<PageOutcome, StoreError> {
        let sync_id = page.sync_id.clone();
        let mut switching = false;
        match self.mutate(now_ms, claim, |t| stage_in(t, page, now_ms, timeout, &mut switching)) {
            Err(e) if switching && !matches!(e, StoreError::Db(_)) => {
                self.mutate(now_ms, None, |t| {
                    if let Some(p) = current(t)?.filter(|p| p.sync_id == sync_id) {
                        discard(t, &p, &format!("the switch was refused: {e}"), now_ms)?;
                    }
                    Ok(((), Vec::new()))
                })?;
                Err(e)
            }
            other => other,
        }
    }

    /// Discard a half-received sync that has waited longer than its timeout.
    pub fn discard_stale_sync(&self, now_ms: i64, timeout: Timeout) -> Result<Option<SyncProgress>, StoreError> {
        match self.sync_progress()? {
            Some(p) if timeout.expired(&p, now_ms) => {}
            _ => return Ok(None),
        }
        self.mutate(now_ms, None, |t| match current(t)? {
            Some(p) if timeout.expired(&p, now_ms) => {
                discard(t, &p, &format!("no page for {} s", timeout.ms / 1000), now_ms)?;
                Ok((Some(p), Vec::new()))
            }
            _ => Ok((None, Vec::new())),
        })
    }
}

fn stage_in(
    t: &mut Tables<'_>,
    page: SyncPage,
    now_ms: i64,
    timeout: Timeout,
    switching: &mut bool,
) -> Result<(PageOutcome, Vec<crate::model::ResidentId>), StoreError> {
    let applied = t.meta.get("roster_version")?.map(|v| v.value()).unwrap_or(0);
    if page.version < applied {
        return Err(StoreError::StaleVersion { offered: page.version, applied });
    }
    let mut replaced = None;
    let mut cur = current(t)?;
    let timeout_ms = timeout.ms;
    if let Some(p) = cur.as_ref().filter(|p| timeout.expired(p, now_ms)) {
        if page.page != 0 {
            return Err(StoreError::UnknownSync(format!(
                "roster.sync `{}` timed out (no page for {} s): send it again from page 0",
                p.sync_id,
                timeout_ms / 1000
            )));
        }
        let p = p.clone();
        discard(t, &p, &format!("no page for {} s", timeout_ms / 1000), now_ms)?;
        cur = None;
    }
    let mut progress = match cur {
        Some(p) if p.sync_id == page.sync_id => {
            if p.version != page.version || p.pages != page.pages {
                return Err(StoreError::UnknownSync(format!(
                    "roster.sync {}: this page says version {} of {} pages, the sync began as version {} of {} pages",
                    page.sync_id, page.version, page.pages, p.version, p.pages
                )));
            }
            if page.page < p.next_page {
                return Err(StoreError::DuplicatePage { sync_id: p.sync_id, page: page.page, expected: p.next_page });
            }
            if page.page > p.next_page {
                return Err(StoreError::PageOutOfOrder { sync_id: p.sync_id, expected: p.next_page, got: page.page });
            }
            p
        }
        other => {
            if page.page != 0 {
                return Err(StoreError::UnknownSync(format!(
                    "no roster.sync `{}` is in progress (completed, replaced by a newer sync, discarded after its \
                     timeout, or never begun): send it again from page 0",
                    page.sync_id
                )));
            }
            if let Some(p) = other {
                if page.version < p.version {
                    return Err(StoreError::StaleVersion { offered: page.version, applied: p.version });
                }
                discard(t, &p, &format!("replaced by sync {}", page.sync_id), now_ms)?;
                replaced = Some(p);
            }
            SyncProgress {
                sync_id: page.sync_id.clone(),
                version: page.version,
                pages: page.pages,
                next_page: 0,
                residents: 0,
                started_ms: now_ms,
                updated_ms: now_ms,
            }
        }
    };
    // What can be decided per page is decided per page: Art. 10 on every resident here.
    for (r, cs) in &page.residents {
        guard(r, cs, now_ms)?;
    }
    t.sync_pages.insert(page.page, encode(&page.residents).as_slice())?;
    progress.next_page += 1;
    progress.residents += page.residents.len() as u64;
    progress.updated_ms = now_ms;
    if progress.next_page < progress.pages {
        t.sync_state.insert(CURRENT, encode(&progress).as_slice())?;
        return Ok((PageOutcome { progress, replaced, switched: None }, Vec::new()));
    }
    // The last page: the switch, in this transaction. Its refusal (a card in two pages, a
    // version conflict, the guard on the whole roster) ends the staged sync.
    *switching = true;
    let mut entries: Vec<(Resident, Vec<Credential>)> = Vec::with_capacity(progress.residents as usize);
    for row in t.sync_pages.iter()? {
        let (_, v) = row?;
        let mut part: Vec<(Resident, Vec<Credential>)> = decode("roster_sync_pages", v.value())?;
        entries.append(&mut part);
    }
    if entries.len() as u64 != progress.residents || t.sync_pages.len()? != u64::from(progress.pages) {
        return Err(StoreError::Corrupt { table: "roster_sync_pages", detail: "staged pages do not add up".into() });
    }
    let digest = paged_digest(&mut entries);
    clear(t)?;
    let (outcome, touched) =
        apply_in(t, RosterOp::Sync { version: progress.version, digest, residents: entries }, now_ms)?;
    Ok((PageOutcome { progress, replaced, switched: Some(outcome) }, touched))
}
