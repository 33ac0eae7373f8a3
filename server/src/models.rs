//! Locating and pulling models: placeholder, being written.
