//! Ferry's cluster state on etcd. etcd is the single source of truth; this crate gives it
//! types: the key layout of DESIGN.md, JSON records, a lease that is kept alive and
//! reports its loss, prefix watches that resume after disconnects and compactions,
//! compare-and-swap on placements, and leader election; and the cluster read model:
//! reads with three outcomes (present, absent, unreadable), VM entries folded from
//! listings and watches, the event log, and the manager's `ClusterSnapshot`.

pub mod auth;
mod error;
pub mod etcd_server;
pub mod events;
mod keys;
pub mod lease;
pub mod read;
pub mod snapshot;
mod store;
pub mod vms;
pub mod watch;

pub use error::StoreError;
pub use events::EventLog;
pub use keys::Keys;
pub use lease::{Lease, LeaseState, RenewalClock};
pub use read::{Change, Guard, Listing, Read, Unreadable};
pub use snapshot::ClusterSnapshot;
pub use store::{encode, Election, Store, StoreTls, Versioned};
pub use vms::{fold_vm_change, read_vm_entries, read_vm_entry, VmEntries, VmEntry, VmPart};
pub use watch::{PrefixWatch, WatchEvent};
