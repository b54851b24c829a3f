//! The pure parts of the MQTT link: connection options and backoff ([`options`]), Home
//! Assistant discovery ([`discovery`]) and the publish pipeline's bookkeeping ([`pipeline`]).
//! The session itself — the one task that owns the broker connection — is the link stage,
//! `daemon::stages::link`.

pub mod discovery;
pub mod options;
pub mod pipeline;

pub use discovery::{discovery, ha_status_topic};
pub use options::{base_options, options, status_payload, Backoff};
pub use pipeline::{Acked, Entry, Pipeline};
