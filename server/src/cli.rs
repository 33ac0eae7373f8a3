//! Command-line pieces shared by several subcommands (`complete`, `eval`,
//! `debug-mask`): the attention-policy flags and "the given model, else the
//! default one, pulled on first use".

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::engine::policy::{AttentionPolicy, PolicyKind};
use crate::models;

/// Attention policy flags.
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// anchor, full or window.
    #[arg(long, default_value = "anchor")]
    pub policy: String,
    /// Lines before the current one whose tokens stay fully visible (anchor).
    #[arg(long, default_value_t = 8)]
    pub recent_lines: u32,
    /// Leading tokens always kept (attention sinks).
    #[arg(long, default_value_t = 4)]
    pub sink_tokens: u32,
    /// Every N-th layer dense (0 = none; anchor).
    #[arg(long, default_value_t = 0)]
    pub dense_every: u32,
    /// Tokens of the window (window).
    #[arg(long, default_value_t = 256)]
    pub window_tokens: u32,
}

impl PolicyArgs {
    /// The policy these flags spell (`full` without sinks, as the reference).
    pub fn policy(&self) -> Result<AttentionPolicy> {
        let p = AttentionPolicy::from_parts(
            &self.policy,
            self.recent_lines,
            self.sink_tokens,
            self.dense_every,
            self.window_tokens,
        )?;
        Ok(if p.kind == PolicyKind::Full { AttentionPolicy::full() } else { p })
    }
}

/// Pull the default model (if missing), showing progress on stderr.
pub fn pull() -> Result<PathBuf> {
    let mut last = String::new();
    models::pull_default(&mut |p| {
        let line = format!("{p}");
        if line != last {
            eprintln!("{line}");
            last = line;
        }
    })
}

/// The model to use: the given path, else the default model (pulled if missing).
pub fn model_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) => Ok(p.to_path_buf()),
        None => pull(),
    }
}
