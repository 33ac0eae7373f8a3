//! The LSP front end: open documents and protocol types the editor speaks.

pub mod documents;
pub mod protocol;
pub mod server;
pub mod transport;
