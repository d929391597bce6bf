//! The decision cache: every breach decision of the compacted breaches topic, read in full at
//! start and followed live, plus what this ingress admitted since each one and in each rule's
//! window. `cache` holds the decisions, the local counts and the streams to cut; `own` this
//! ingress's own counts per rule and scope; `follower` keeps the decisions in step with the topic.

mod cache;
mod follower;
pub mod own;
#[cfg(test)]
mod tests;

pub use cache::{
    Applied, DecisionCache, Entry, Exhausted, LocalCount, OwnHold, Reservation, StreamCut, Ticket, WatchHold,
};
pub use follower::{FollowConfig, FollowError, Follower};
