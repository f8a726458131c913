//! vmcsnap's shared vocabulary: pages and their hashes, the manifest tree, commit records,
//! the data-plane and control messages, and the one codec that frames them.
//!
//! # Goals
//! - One place that defines every byte that crosses a socket or lands in a store.
//! - Every decode is bounded: a frame's length is checked against a named limit before a
//!   single byte of it is decoded.
//!
//! # Non-goals
//! - IO. **Architecture Invariant:** this crate opens no socket and touches no disk; it is
//!   tested as pure functions.

pub mod codec;
pub mod control;
pub mod manifest;
pub mod page;
pub mod retention;
pub mod units;
pub mod wire;

pub use page::{hash_page, is_zero_page, NodeId, PageHash, PAGE_SIZE, ZERO_HASH};
