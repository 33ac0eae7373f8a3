//! Command-line pieces shared by several subcommands (`complete`, `eval`,
//! `debug-mask`): the attention-policy flags and "the given model, else the
//! default one, pulled on first use", with its adapter.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use crate::engine::adapter::Adapter;
use crate::engine::policy::{AttentionPolicy, PolicyKind, PolicySpec};
use crate::engine::Engine;
use crate::models;

/// Attention policy flags. With none given and an adapter merged that names
/// its trained policy, that policy is used (as the server does).
#[derive(Args, Clone, Debug)]
pub struct PolicyArgs {
    /// window, anchor or full [default: window, or the merged adapter's trained policy]
    #[arg(long)]
    pub policy: Option<String>,
    /// Lines before the current one whose tokens stay fully visible (anchor) [default: 8]
    #[arg(long)]
    pub recent_lines: Option<u32>,
    /// Leading tokens always kept (attention sinks) [default: 4]
    #[arg(long)]
    pub sink_tokens: Option<u32>,
    /// Every N-th layer dense (0 = none; anchor) [default: 0]
    #[arg(long)]
    pub dense_every: Option<u32>,
    /// Tokens of the window (window) [default: 560]
    #[arg(long)]
    pub window_tokens: Option<u32>,
}

impl PolicyArgs {
    /// The policy these flags spell, defaults filled in (`full` without
    /// sinks, as the reference).
    pub fn policy(&self) -> Result<AttentionPolicy> {
        // The server's defaults (`attention.*`), so that the tools run what users get.
        let d = PolicySpec::default();
        let p = AttentionPolicy::from_spec(&PolicySpec {
            policy: self.policy.as_deref().map(str::parse).transpose()?.unwrap_or(d.policy),
            recent_lines: self.recent_lines.unwrap_or(d.recent_lines),
            sink_tokens: self.sink_tokens.unwrap_or(d.sink_tokens),
            dense_every: self.dense_every.unwrap_or(d.dense_every),
            window_tokens: self.window_tokens.unwrap_or(d.window_tokens),
        })?;
        Ok(if p.kind == PolicyKind::Full { AttentionPolicy::full() } else { p })
    }

    /// The policy to run with `engine`: its adapter's trained policy when no
    /// flag was given, else [`PolicyArgs::policy`].
    pub fn policy_for(&self, engine: &Engine) -> Result<AttentionPolicy> {
        let none_given = self.policy.is_none()
            && self.recent_lines.is_none()
            && self.sink_tokens.is_none()
            && self.dense_every.is_none()
            && self.window_tokens.is_none();
        Ok(engine.policy(self.policy()?, none_given))
    }
}

/// Load the given model (else the default one, pulled if missing) with the
/// adapter `adapter` asks for (see [`Adapter::choose`]).
pub fn load_engine(model: Option<&Path>, adapter: Option<&Path>) -> Result<Engine> {
    let path = model_path(model)?;
    Engine::load_adapted(&path, Adapter::choose(adapter)?)
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
