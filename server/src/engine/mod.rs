//! The inference engine: model weights, the anchor-attention forward pass,
//! attention policies and per-document KV caches. Knows nothing of LSP.

pub mod tokenizer;
