//! AnchorCoder: local inline code completion over LSP, with per-document
//! anchor-compressed KV caches.
//!
//! Data flows one way: editor → [`lsp`] (documents, requests) → worker (owns
//! the model, queue and caches) → [`engine`] (tensors). See
//! `docs/architecture.md` for the map.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod completion;
pub mod config;
pub mod context;
pub mod engine;
pub mod eval;
pub mod lsp;
pub mod models;
pub mod project;
pub mod redact;
pub mod worker;
