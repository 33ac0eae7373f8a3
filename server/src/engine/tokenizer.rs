//! Tokenizers: placeholder, being written.
