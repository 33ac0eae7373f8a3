//! The inference engine: model weights, the anchor-attention forward pass,
//! attention policies and per-document KV caches. Knows nothing of LSP.

pub mod attention;
pub mod document;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod policy;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use llama::Llama;
use tokenizer::Tokenizer;

/// A loaded model with its tokenizer: what the worker owns.
pub struct Engine {
    /// The network.
    pub model: Llama,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Where it was loaded from.
    pub path: PathBuf,
}

impl Engine {
    /// Load a `.gguf` file or a Hugging Face folder (config.json,
    /// *.safetensors, tokenizer.json). A `tokenizer.json` beside a GGUF file
    /// (same folder) is used instead of the GGUF's own vocabulary.
    pub fn load(path: &Path) -> Result<Engine> {
        if !path.exists() {
            bail!("model not found: {} (run `anchorcoder model pull` for the default model)", path.display());
        }
        let (model, tokenizer) = if path.is_dir() {
            let tok_path = path.join("tokenizer.json");
            let tokenizer = Tokenizer::from_file(&tok_path)
                .with_context(|| format!("{}: a Hugging Face model folder needs tokenizer.json", path.display()))?;
            (Llama::from_hf_dir(path)?, tokenizer)
        } else {
            let (model, content) = Llama::from_gguf(path)?;
            let beside = path.with_file_name("tokenizer.json");
            let tokenizer = if beside.exists() {
                Tokenizer::from_file(&beside)?
            } else {
                Tokenizer::from_gguf(&content).with_context(|| format!("{}: tokenizer", path.display()))?
            };
            (model, tokenizer)
        };
        if tokenizer.vocab_size() > model.config().vocab {
            bail!(
                "{}: the tokenizer has {} tokens but the model only {}",
                path.display(),
                tokenizer.vocab_size(),
                model.config().vocab
            );
        }
        Ok(Engine { model, tokenizer, path: path.to_path_buf() })
    }
}
