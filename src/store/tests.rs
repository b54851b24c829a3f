use super::*;
use crate::model::{AccessMode, CredentialKind, FaceConsent, Validity, DAY_MS, MAX_RETENTION_DAYS};
use crate::wiegand::CardId;
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

/// Audit records as the store hands them over (the chained file is `privacy::audit`'s, tested
/// there): in memory, so the store's tests need nothing outside the store.
#[derive(Debug, Default, Clone)]
struct MemorySink(std::sync::Arc<std::sync::Mutex<Vec<(u64, AuditEntry)>>>);

impl AuditSink for MemorySink {
    fn append(&self, entries: &[(u64, AuditEntry)]) -> std::io::Result<usize> {
        let mut all = self.0.lock().unwrap();
        let last = all.last().map_or(0, |(n, _)| *n);
        let new: Vec<_> = entries.iter().filter(|(n, _)| *n > last).cloned().collect();
        all.extend(new.iter().cloned());
        Ok(new.len())
    }
}

fn open() -> (tempfile::TempDir, Store, MemorySink) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open(&dir.path().join("s.redb")).unwrap();
    let sink = MemorySink::default();
    s.set_audit_sink(Box::new(sink.clone()));
    (dir, s, sink)
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
    (crate::digest::hex(&kid), [b"MTv2".as_slice(), &kid, &[0u8; 40]].concat())
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
    let (_d, s, audit) = open();
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
    assert_eq!(
        s.withdraw_face_consent(&rid("a"), None, 6).unwrap(),
        Withdrawal { withdrawn: true, template_deleted: true }
    );
    // Again: nothing to withdraw, nothing changes.
    assert_eq!(
        s.withdraw_face_consent(&rid("a"), None, 6).unwrap(),
        Withdrawal { withdrawn: false, template_deleted: false }
    );
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
    // Every change is handed to the audit sink, numbered without a gap, with no template bytes.
    let records = audit.0.lock().unwrap().clone();
    assert!(records.iter().enumerate().all(|(i, (n, _))| *n == i as u64 + 1), "{records:?}");
    let text: String = records.iter().map(|(_, e)| serde_json::to_string(e).unwrap() + "\n").collect();
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
    let (_d, s, _) = open();
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
    let (dir, s, _) = open();
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
    let (dir, _s, _) = open();
    assert!(matches!(Store::open(&dir.path().join("s.redb")), Err(StoreError::Locked)));
}

#[test]
fn the_guard_runs_on_every_write() {
    let (_d, s, _) = open();
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
    let (_d, s, _) = open();
    s.add_resident(&resident("a", AccessMode::Card), &[card("a", 1)], 0).unwrap();
    s.add_resident(&resident("b", AccessMode::Card), &[], 0).unwrap();
    assert!(matches!(s.add_credential(&card("b", 1), 0), Err(StoreError::CredentialTaken(_))));
    assert_eq!(s.remove_resident(&rid("a"), 0).unwrap(), 1);
    assert!(s.credentials().unwrap().is_empty());
    assert!(matches!(s.remove_resident(&rid("a"), 0), Err(StoreError::NoResident(_))));
}

#[test]
fn outbox_assigns_sequence_numbers_and_acks_remove() {
    let (dir, s, _) = open();
    let stored = s
        .append_events((0..5).map(|i| move |seq: u64| format!("{{\"i\":{i},\"seq\":{seq}}}").into_bytes()).collect())
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
    let (_d, s, _) = open();
    let claim = |id| Some(Claim { request_id: id, now_ms: 1_000, by: "mqtt" });
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
        s.apply(RosterOp::Nothing, Some(Claim { request_id: id, now_ms: 100 + i as i64, by: "mqtt" }), 0).unwrap();
    }
    assert_eq!(s.remembered_requests().unwrap(), 5, "all younger than the minimum age");
    s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_000, by: "mqtt" }), 0).unwrap();
    assert_eq!(s.remembered_requests().unwrap(), 3);
    let err = s.apply(RosterOp::Nothing, Some(Claim { request_id: "f", now_ms: 5_001, by: "mqtt" }), 0);
    assert!(matches!(err, Err(StoreError::DuplicateRequest(_))));
}

#[test]
fn roster_sync_is_atomic_idempotent_and_versioned() {
    let (_d, s, _) = open();
    s.add_resident(&resident("old", AccessMode::Card), &[card("old", 9)], 0).unwrap();
    let snap =
        vec![(resident("a", AccessMode::FaceOrCard), vec![card("a", 1)]), (resident("b", AccessMode::Card), vec![])];
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
        let (_d, s, _) = open();
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

fn page(id: &str, version: u64, n: u32, of: u32, residents: Vec<(Resident, Vec<Credential>)>) -> SyncPage {
    SyncPage { sync_id: id.into(), version, page: n, pages: of, residents }
}

fn card_resident(id: &str, n: u64) -> (Resident, Vec<Credential>) {
    (resident(id, AccessMode::FaceOrCard), vec![card(id, n)])
}

const TIMEOUT_MS: i64 = 600_000;
const TIMEOUT: Timeout = Timeout { ms: TIMEOUT_MS, online_since_ms: 0 };

fn claim(id: &str) -> Option<Claim<'_>> {
    Some(Claim { request_id: id, now_ms: 1_000, by: "mqtt" })
}

#[test]
fn a_paged_sync_switches_only_on_its_last_page_in_one_transaction() {
    let (_d, s, audit) = open();
    s.add_resident(&resident("old", AccessMode::Card), &[card("old", 9)], 0).unwrap();
    let out = s.stage_page(page("s1", 5, 0, 3, vec![card_resident("a", 1)]), claim("p0"), 10, TIMEOUT).unwrap();
    assert_eq!(out.switched, None);
    assert_eq!(out.progress.next_page, 1);
    s.stage_page(page("s1", 5, 1, 3, vec![card_resident("b", 2)]), claim("p1"), 20, TIMEOUT).unwrap();
    // Until the last page, the old roster is the roster.
    assert!(s.lookup_card(&CardId { format: Format::H10301, facility: 7, number: 9 }).unwrap().is_some());
    assert!(s.resident(&rid("a")).unwrap().is_none());
    assert_eq!(s.roster_version().unwrap(), 0);
    assert_eq!(s.sync_progress().unwrap().unwrap().next_page, 2);
    let out = s.stage_page(page("s1", 5, 2, 3, vec![card_resident("c", 3)]), claim("p2"), 30, TIMEOUT).unwrap();
    assert_eq!(out.switched, Some(OpOutcome::Synced { residents: 3, credentials: 3, removed: 0 }));
    assert_eq!(s.roster_version().unwrap(), 5);
    assert!(s.resident(&rid("old")).unwrap().is_none());
    assert_eq!(s.roster_counts().unwrap(), (3, 3));
    assert_eq!(s.sync_progress().unwrap(), None, "the staging is emptied by the switch");
    assert!(audit.0.lock().unwrap().iter().any(|(_, e)| e.kind == "roster_synced"));
}

#[test]
fn a_paged_sync_refuses_pages_out_of_order_duplicated_or_from_another_sync() {
    let (_d, s, _) = open();
    s.stage_page(page("s1", 2, 0, 3, vec![card_resident("a", 1)]), claim("a0"), 0, TIMEOUT).unwrap();
    let e = s.stage_page(page("s1", 2, 2, 3, vec![card_resident("c", 3)]), claim("a2"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::PageOutOfOrder { expected: 1, got: 2, .. }), "{e}");
    let e = s.stage_page(page("s1", 2, 0, 3, vec![card_resident("a", 1)]), claim("a0b"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::DuplicatePage { page: 0, expected: 1, .. }), "{e}");
    let e = s.stage_page(page("other", 2, 1, 3, vec![card_resident("b", 2)]), claim("o1"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::UnknownSync(_)), "{e}");
    let e = s.stage_page(page("s1", 3, 1, 3, vec![card_resident("b", 2)]), claim("v1"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::UnknownSync(_)), "a page of another version: {e}");
    // A refused page claimed nothing: its request id can be used again.
    s.stage_page(page("s1", 2, 1, 3, vec![card_resident("b", 2)]), claim("a2"), 0, TIMEOUT).unwrap();
    assert_eq!(s.sync_progress().unwrap().unwrap().next_page, 2);
    // The same request id twice is a replay.
    let e = s.stage_page(page("s1", 2, 2, 3, vec![card_resident("c", 3)]), claim("a2"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::DuplicateRequest(_)), "{e}");
    assert_eq!(s.roster_version().unwrap(), 0);
}

#[test]
fn a_paged_sync_refuses_art10_per_page_and_conflicts_at_the_switch() {
    let (_d, s, _) = open();
    // A face-only resident is refused on the page that carries it; the sync goes on.
    s.stage_page(page("s1", 1, 0, 2, vec![card_resident("a", 1)]), claim("g0"), 0, TIMEOUT).unwrap();
    let face_only = vec![(resident("f", AccessMode::FaceOrCard), vec![])];
    let e = s.stage_page(page("s1", 1, 1, 2, face_only), claim("g1"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::Guard(_)), "{e}");
    assert_eq!(s.sync_progress().unwrap().unwrap().next_page, 1);
    // A card held by residents of two pages is only seen at the switch: refused, and the
    // staged sync is discarded (nothing changed).
    let e = s.stage_page(page("s1", 1, 1, 2, vec![card_resident("b", 1)]), claim("g2"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::CredentialTaken(_)), "{e}");
    assert_eq!(s.sync_progress().unwrap(), None);
    assert_eq!(s.roster_counts().unwrap(), (0, 0));
    // A resident in two pages: refused at the switch too.
    s.stage_page(page("s2", 1, 0, 2, vec![card_resident("a", 1)]), claim("h0"), 0, TIMEOUT).unwrap();
    let e = s.stage_page(page("s2", 1, 1, 2, vec![card_resident("a", 2)]), claim("h1"), 0, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::InvalidResident(_)), "{e}");
    assert_eq!(s.roster_version().unwrap(), 0);
}

#[test]
fn a_half_received_sync_is_replaced_by_a_new_one_or_discarded_after_its_timeout() {
    let (_d, s, audit) = open();
    s.stage_page(page("s1", 1, 0, 2, vec![card_resident("a", 1)]), claim("x0"), 0, TIMEOUT).unwrap();
    let out = s.stage_page(page("s2", 1, 0, 2, vec![card_resident("b", 2)]), claim("y0"), 5, TIMEOUT).unwrap();
    assert_eq!(out.replaced.map(|p| p.sync_id), Some("s1".to_string()));
    let e = s.stage_page(page("s1", 1, 1, 2, vec![card_resident("c", 3)]), claim("x1"), 6, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::UnknownSync(_)), "{e}");
    // An older version may not replace a newer half-received one.
    let e = s.stage_page(page("s0", 0, 0, 2, vec![card_resident("c", 3)]), claim("z0"), 7, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::StaleVersion { .. }), "{e}");
    assert_eq!(s.discard_stale_sync(5 + TIMEOUT_MS, TIMEOUT).unwrap(), None, "not yet");
    let gone = s.discard_stale_sync(6 + TIMEOUT_MS, TIMEOUT).unwrap().unwrap();
    assert_eq!((gone.sync_id.as_str(), gone.next_page), ("s2", 1));
    assert_eq!(s.sync_progress().unwrap(), None);
    assert_eq!(audit.0.lock().unwrap().iter().filter(|(_, e)| e.kind == "roster_sync_discarded").count(), 2);
    // A late page of a timed-out sync is refused even before the periodic discard ran.
    s.stage_page(page("s3", 1, 0, 2, vec![card_resident("a", 1)]), claim("w0"), 0, TIMEOUT).unwrap();
    let e = s
        .stage_page(page("s3", 1, 1, 2, vec![card_resident("b", 2)]), claim("w1"), TIMEOUT_MS + 1, TIMEOUT)
        .unwrap_err();
    assert!(matches!(e, StoreError::UnknownSync(_)), "{e}");
}

#[test]
fn a_sync_timeout_counts_from_the_reconnection_too() {
    let (_d, s, _) = open();
    s.stage_page(page("s1", 1, 0, 2, vec![card_resident("a", 1)]), claim("t0"), 0, TIMEOUT).unwrap();
    // The gate was offline for an hour and came back a minute ago: the sync is not stale.
    let back = Timeout { ms: TIMEOUT_MS, online_since_ms: 3_600_000 };
    assert_eq!(s.discard_stale_sync(3_660_000, back).unwrap(), None);
    let out = s.stage_page(page("s1", 1, 1, 2, vec![card_resident("b", 2)]), claim("t1"), 3_660_000, back).unwrap();
    assert!(out.switched.is_some(), "the queued page completes the sync");
}

#[test]
fn a_paged_sync_survives_a_reopen_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let s = Store::open(&path).unwrap();
        s.stage_page(page("s1", 4, 0, 2, vec![card_resident("a", 1)]), claim("r0"), 0, TIMEOUT).unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert_eq!(s.sync_progress().unwrap().unwrap().next_page, 1);
    let out = s.stage_page(page("s1", 4, 1, 2, vec![card_resident("b", 2)]), claim("r1"), 1, TIMEOUT).unwrap();
    assert!(out.switched.is_some());
    assert_eq!(s.roster_version().unwrap(), 4);
    // The same snapshot again in other page sizes is the same version: not a conflict.
    s.stage_page(page("s9", 4, 0, 1, vec![card_resident("b", 2), card_resident("a", 1)]), claim("r2"), 2, TIMEOUT)
        .unwrap();
    let e = s.stage_page(page("s10", 4, 0, 1, vec![card_resident("a", 1)]), claim("r3"), 3, TIMEOUT).unwrap_err();
    assert!(matches!(e, StoreError::VersionConflict(4)), "{e}");
}

#[test]
fn a_batch_is_all_or_nothing() {
    let (_d, s, _) = open();
    s.add_resident(&resident("x", AccessMode::Card), &[card("x", 9)], 0).unwrap();
    let up = |id: &str, n: u64| RosterOp::Upsert {
        resident: resident(id, AccessMode::FaceOrCard),
        credentials: Some(vec![card(id, n)]),
    };
    let ok = RosterOp::Batch(vec![up("a", 1), up("b", 2), RosterOp::RemoveResident(rid("x"))]);
    assert_eq!(s.apply(ok, claim("b1"), 0).unwrap(), OpOutcome::Batched { ops: 3 });
    assert_eq!(s.roster_counts().unwrap(), (2, 2));
    // One face-only entry refuses the whole batch.
    let face_only = RosterOp::Upsert { resident: resident("f", AccessMode::FaceOrCard), credentials: Some(vec![]) };
    let bad = RosterOp::Batch(vec![up("c", 3), face_only]);
    let e = s.apply(bad, claim("b2"), 0).unwrap_err();
    assert!(matches!(&e, StoreError::InBatch { index: 1, source } if matches!(**source, StoreError::Guard(_))), "{e}");
    // A card of another resident: the entry's index is named.
    let bad = RosterOp::Batch(vec![up("d", 4), up("e", 1)]);
    let e = s.apply(bad, claim("b3"), 0).unwrap_err();
    assert!(
        matches!(&e, StoreError::InBatch { index: 1, source } if matches!(**source, StoreError::CredentialTaken(_))),
        "{e}"
    );
    assert_eq!(s.roster_counts().unwrap(), (2, 2), "nothing of a refused batch was applied");
    assert!(s.resident(&rid("c")).unwrap().is_none() && s.resident(&rid("d")).unwrap().is_none());
}
