//! Shared pieces of Tollgate's end-to-end tests: the mock provider.

pub mod mock;
