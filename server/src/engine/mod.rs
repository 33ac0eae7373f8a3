//! The inference engine: model weights, the anchor-attention forward pass,
//! attention policies and per-document KV caches. Knows nothing of LSP.

pub mod adapter;
pub mod attention;
pub mod cpu;
pub mod document;
pub mod generate;
pub mod kv_cache;
pub mod llama;
pub mod policy;
pub mod quant;
pub mod simd;
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
    /// The attention policy the merged adapter was trained for, if any.
    pub adapter_policy: Option<policy::AttentionPolicy>,
}

impl Engine {
    /// Load a `.gguf` file or a Hugging Face folder (config.json,
    /// *.safetensors, tokenizer.json). A `tokenizer.json` beside a GGUF file
    /// (same folder) is used instead of the GGUF's own vocabulary.
    pub fn load(path: &Path) -> Result<Engine> {
        Engine::load_adapted(path, None)
    }

    /// Like [`Engine::load`], merging a LoRA adapter (GGUF models only; see
    /// [`adapter::Adapter::choose`] for reading one from a setting).
    ///
    /// Errors name the file and what is wrong with it, never its content or
    /// a backtrace ([`user_error`]).
    pub fn load_adapted(path: &Path, adapter: Option<adapter::Adapter>) -> Result<Engine> {
        Engine::load_unchecked(path, adapter).map_err(user_error)
    }

    fn load_unchecked(path: &Path, adapter: Option<adapter::Adapter>) -> Result<Engine> {
        if !path.exists() {
            bail!("model not found: {} (run `anchorcoder model pull` for the default model)", path.display());
        }
        let (model, mut tokenizer) = if path.is_dir() {
            if adapter.is_some() {
                bail!("adapters apply to GGUF models; {} is a Hugging Face folder", path.display());
            }
            let tok_path = path.join("tokenizer.json");
            check_regular(&tok_path, "tokenizer", MAX_TOKENIZER_JSON)?;
            let tokenizer = Tokenizer::from_file(&tok_path)
                .with_context(|| format!("{}: a Hugging Face model folder needs tokenizer.json", path.display()))?;
            (Llama::from_hf_dir(path)?, tokenizer)
        } else {
            let (model, content) = Llama::from_gguf_with(path, adapter.as_ref())?;
            let beside = path.with_file_name("tokenizer.json");
            let tokenizer = if beside.exists() {
                check_regular(&beside, "tokenizer", MAX_TOKENIZER_JSON)?;
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
        if let Some(a) = &adapter {
            // An adapter trained with its own FIM tokens: the server's FIM detection uses them.
            a.apply_fim(&mut tokenizer).with_context(|| format!("the adapter for {}", path.display()))?;
        }
        let policy = adapter.as_ref().and_then(|a| a.policy);
        Ok(Engine { model, tokenizer, path: path.to_path_buf(), adapter_policy: policy })
    }

    /// The policy to run: the merged adapter's trained policy when the user
    /// left the attention settings at their defaults, else `configured`.
    pub fn policy(&self, configured: policy::AttentionPolicy, configured_is_default: bool) -> policy::AttentionPolicy {
        match self.adapter_policy {
            Some(trained) if configured_is_default => trained,
            _ => configured,
        }
    }
}

/// The largest `tokenizer.json` read (real ones are a few MiB; the biggest
/// multilingual vocabularies ~30 MiB).
pub const MAX_TOKENIZER_JSON: u64 = 256 << 20;

/// The largest `config.json` of a Hugging Face folder read (real ones are a
/// few KiB).
pub const MAX_MODEL_CONFIG: u64 = 16 << 20;

/// What a file that is not a regular one is, for messages.
fn file_kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Fail unless `path` is a regular file (following links) of at most `max`
/// bytes; returns its length. Never opens it, so a FIFO cannot block and a
/// device cannot stream forever.
pub fn check_regular(path: &Path, what: &str, max: u64) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is {}, not a regular file", path.display(), file_kind(meta.file_type()));
    }
    if meta.len() > max {
        bail!("{what} {} is {} bytes, more than the {} MiB a {what} may have", path.display(), meta.len(), max >> 20);
    }
    Ok(meta.len())
}

/// Open `path` for reading if it is a regular file of at most `max` bytes;
/// returns it and its length. Opened without blocking (a FIFO swapped in
/// after the check cannot hang the caller) and checked again once open.
pub fn open_regular(path: &Path, what: &str, max: u64) -> Result<(std::fs::File, u64)> {
    check_regular(path, what, max)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).with_context(|| format!("cannot open {what} {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("cannot read {what} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is {}, not a regular file", path.display(), file_kind(meta.file_type()));
    }
    Ok((file, meta.len()))
}

/// The whole of a regular file of at most `max` bytes (see [`open_regular`]);
/// reads no more than the length it had when opened.
pub fn read_regular(path: &Path, what: &str, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path, what, max)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut bytes).with_context(|| format!("cannot read {what} {}", path.display()))?;
    Ok(bytes)
}

/// `text` without backtrace lines (candle errors carry one in their
/// `Display` when `RUST_BACKTRACE` is set: frames with the builder's and the
/// user's paths, nothing a user can act on).
pub fn strip_backtrace(text: &str) -> String {
    let frame = |l: &str| {
        let t = l.trim_start();
        let numbered = t.split_once(": ").is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        (l.starts_with(' ') && (numbered || t.starts_with("at "))) || t.starts_with("stack backtrace:")
    };
    let kept: Vec<&str> = text.lines().filter(|l| !frame(l)).collect();
    kept.join("\n").trim_end().to_string()
}

/// An error for users: each message of the chain without backtraces (the
/// chain stays, so `{:#}` still reads "outer: inner").
pub fn user_error(e: anyhow::Error) -> anyhow::Error {
    let mut messages: Vec<String> = e.chain().map(|c| strip_backtrace(&c.to_string())).collect();
    let mut out = anyhow::anyhow!(messages.pop().unwrap_or_default());
    while let Some(m) = messages.pop() {
        out = out.context(m);
    }
    out
}

#[cfg(test)]
mod file_tests {
    use super::*;

    #[test]
    fn only_regular_files_are_opened() {
        let e = open_regular(Path::new("/dev/zero"), "model file", u64::MAX).unwrap_err().to_string();
        assert_eq!(e, "model file /dev/zero is a device, not a regular file");
        let e = read_regular(Path::new("/tmp"), "adapter", u64::MAX).unwrap_err().to_string();
        assert!(e.contains("is a folder"), "{e}");
        let dir = std::env::temp_dir().join(format!("anchorcoder-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("pipe");
        let _ = std::fs::remove_file(&fifo);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_regular(&fifo, "adapter", u64::MAX).unwrap_err().to_string();
        assert!(e.ends_with("pipe is a named pipe (FIFO), not a regular file"), "{e}");
        let file = dir.join("f");
        std::fs::write(&file, b"0123456789").unwrap();
        assert_eq!(read_regular(&file, "adapter", 10).unwrap(), b"0123456789");
        let e = read_regular(&file, "adapter", 9).unwrap_err().to_string();
        assert!(e.contains("is 10 bytes, more than"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_gguf_tensor_past_the_end_of_the_file_is_refused_before_reading() {
        use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
        let path = std::env::temp_dir().join(format!("anchorcoder-table-{}.gguf", std::process::id()));
        let t = candle_core::Tensor::zeros((64, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("w.weight", &q)]).unwrap();
        let len = f.metadata().unwrap().len();
        assert!(llama::read_gguf_header(&path).is_ok());
        f.set_len(len - 100).unwrap();
        let e = format!("{:#}", llama::read_gguf_header(&path).unwrap_err());
        assert!(e.contains("tensor `w.weight`") && e.contains("lies past the end of the file"), "{e}");
        std::fs::write(&path, b"hello, notes").unwrap();
        let e = format!("{:#}", llama::read_gguf_header(&path).unwrap_err());
        assert!(e.ends_with("is not a GGUF file (bad magic); pass a .gguf file or a Hugging Face model folder"), "{e}");
        assert!(!e.contains("6c6c6568") && !e.contains("hello"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn user_errors_carry_no_backtrace() {
        let bt = "unknown dtype 99\nstack backtrace:\n   0: candle_core::error::Error::bt\n             at /home/someone/.cargo/registry/src/error.rs:10:5\n   1: main";
        let e = anyhow::anyhow!(bt.to_string()).context("model.gguf: cannot read tensor `x`");
        let shown = format!("{:#}", user_error(e));
        assert_eq!(shown, "model.gguf: cannot read tensor `x`: unknown dtype 99");
        assert_eq!(strip_backtrace("line one\nline two: 3"), "line one\nline two: 3");
    }
}

#[cfg(test)]
mod tests {
    //! Real-model tests: the default model (run `anchorcoder model pull`).
    use super::*;
    use crate::engine::document::DocumentCache;
    use crate::engine::generate::{generate, GenerateParams};
    use crate::engine::policy::{AttentionPolicy, PolicyKind};

    fn default_model() -> PathBuf {
        crate::models::test_model()
    }

    fn greedy(engine: &Engine, policy: AttentionPolicy, prompt: &str, max_tokens: usize) -> String {
        let mut doc = DocumentCache::new(&engine.model, policy);
        doc.set_text(&engine.tokenizer, prompt).unwrap();
        let mut stop = |t: &str| t.contains("\n\n");
        generate(
            &engine.model,
            &engine.tokenizer,
            &mut doc,
            GenerateParams {
                max_tokens,
                forced_prefix: b"",
                extra_prompt: &[],
                chunk: 256,
                stop: &mut stop,
                cancelled: &|| false,
            },
        )
        .unwrap()
        .text
    }

    const PY: &str = "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return";
    const RUST: &str = "enum Shape {\n    Circle(f64),\n    Square(f64),\n}\n\nfn area(s: &Shape) -> f64 {\n    match s {\n        Shape::Circle(r) => 3.14 * r * r,\n        Shape::Square(";

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn default_model_completes_known_prompts_sensibly() {
        let engine = Engine::load(&default_model()).unwrap();
        let py = greedy(&engine, AttentionPolicy::full(), PY, 8);
        assert!(py.starts_with(" a + b"), "{py:?}");
        // A well-formed match arm: the binding, `) =>`, a value and `,` (this
        // 135M model does not reliably get the formula right: measured
        // `r) => 10.0f,`).
        let rs = greedy(&engine, AttentionPolicy::full(), RUST, 12);
        let arm = rs.lines().next().unwrap_or("");
        assert!(arm.contains(") =>") && arm.trim_end().ends_with(','), "{rs:?}");
        // The default anchor policy agrees on these short prompts.
        let anchor = greedy(&engine, AttentionPolicy::standard_anchor(), PY, 8);
        assert!(anchor.starts_with(" a + b"), "{anchor:?}");
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn trained_adapter_merges_and_completes_under_its_policy() {
        // The built-in adapter is the file in server/assets.
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/adapter_anchor.safetensors");
        assert_eq!(adapter::Adapter::load(&file).unwrap().policy, adapter::Adapter::builtin().unwrap().policy);
        let chosen = adapter::Adapter::choose(Some(Path::new("builtin"))).unwrap();
        let engine = Engine::load_adapted(&default_model(), chosen).unwrap();
        let policy = engine.adapter_policy.expect("the adapter names its policy");
        assert_eq!(policy.kind, PolicyKind::Anchor { recent_lines: 2, dense_every: 0 });
        assert_eq!(policy.sink_tokens, 4);
        // Its policy replaces the configured one only while that is the default.
        assert_eq!(engine.policy(AttentionPolicy::standard_anchor(), true), policy);
        assert_eq!(engine.policy(AttentionPolicy::full(), false), AttentionPolicy::full());
        // None unless asked for.
        assert!(adapter::Adapter::choose(None).unwrap().is_none());
        assert!(adapter::Adapter::choose(Some(Path::new("none"))).unwrap().is_none());
        assert!(adapter::Adapter::choose(Some(Path::new("/no/such.safetensors"))).is_err());
        let py = greedy(&engine, policy, PY, 8);
        assert!(py.starts_with(" a + b"), "{py:?}");
        // The merge changed the weights: the logits differ from the base model's.
        let base = Engine::load(&default_model()).unwrap();
        let logits = |e: &Engine| {
            let mut d = DocumentCache::new(&e.model, policy);
            d.set_text(&e.tokenizer, RUST).unwrap();
            d.logits(&e.model, 256, &|| false).unwrap().unwrap()
        };
        let (a, b) = (logits(&engine), logits(&base));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        assert!(diff > 0.1, "adapter had no effect ({diff})");
    }
}
