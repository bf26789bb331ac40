//! Ferry's cluster state on etcd. etcd is the single source of truth; this crate gives it
//! types: the key layout of DESIGN.md, JSON records, a lease that is kept alive and
//! reports its loss, prefix watches that resume after disconnects and compactions,
//! compare-and-swap on placements, and leader election.

mod error;
pub mod etcd_server;
mod keys;
pub mod lease;
mod store;
pub mod watch;

pub use error::StoreError;
pub use keys::Keys;
pub use lease::{Lease, LeaseState, RenewalClock};
pub use store::{encode, Election, Store, Versioned};
pub use watch::{PrefixWatch, WatchEvent};
