//! The decision cache: every breach decision of the compacted breaches topic, read in full at
//! start and followed live, plus what this ingress admitted since each one. `cache` holds the
//! decisions, the local counts and the streams to cut; `follower` keeps them in step with the topic.

mod cache;
mod follower;
#[cfg(test)]
mod tests;

pub use cache::{Applied, DecisionCache, Entry, LocalCount, StreamCut, Ticket, WatchHold};
pub use follower::{FollowConfig, FollowError, Follower};
