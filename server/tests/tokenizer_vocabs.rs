//! llama.cpp's own tokenizer test data, run through [`Tokenizer::from_gguf`]: for each vocab-only
//! GGUF `ggml-vocab-NAME.gguf`, inputs in `.gguf.inp` (separated by `\n__ggml_vocab_test__\n`)
//! and, in `.gguf.out`, the ids llama.cpp's `test-tokenizer-0` expects for each (one line each;
//! no BOS, special-token text parsed as text).
//!
//! The files are third-party and not in the repository: `tests/bench/vocab-fixtures.sh` puts them
//! in `$ANCHORCODER_VOCAB_DIR`, else `~/.cache/anchorcoder/vocab`. With the variable set, missing
//! files fail the tests; without it and without the cache folder, the tests say so and pass.

use anchorcoder::engine::tokenizer::{TokenEncoding, Tokenizer};
use candle_core::quantized::gguf_file::Content;
use std::path::PathBuf;

/// The vocabularies with llama.cpp reference outputs that we support.
const VOCABS: &[&str] = &[
    "llama-spm",
    "phi-3",
    "gpt-2",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
];

/// The folder with the vocabularies, or `None` (not set up, and not required).
fn vocab_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ANCHORCODER_VOCAB_DIR") {
        return Some(PathBuf::from(dir));
    }
    let dir = anchorcoder::models::cache_dir().with_file_name("vocab");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no llama.cpp vocabularies at {} (run tests/bench/vocab-fixtures.sh, or set \
             ANCHORCODER_VOCAB_DIR to make their absence an error)",
            dir.display()
        );
        None
    }
}

fn read(path: &PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("cannot read {} ({e}); get the files with tests/bench/vocab-fixtures.sh", path.display())
    })
}

fn content(dir: &std::path::Path, name: &str) -> Content {
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let mut f = std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!("cannot open {} ({e}); get the files with tests/bench/vocab-fixtures.sh", path.display())
    });
    Content::read(&mut f).unwrap_or_else(|e| panic!("cannot read GGUF {}: {e}", path.display()))
}

/// (input, expected ids) pairs, read as llama.cpp's `read_tests` does.
fn samples(dir: &std::path::Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir.join(format!("ggml-vocab-{name}.gguf"));
    let inp = String::from_utf8(read(&base.with_extension("gguf.inp"))).expect("UTF-8 inputs");
    let out = String::from_utf8(read(&base.with_extension("gguf.out"))).expect("UTF-8 outputs");
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if inputs.last() == Some(&"") {
        inputs.pop(); // a separator at the very end starts no input
    }
    let outputs: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().expect("token id")).collect()).collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: inputs vs outputs");
    assert!(inputs.len() >= 20, "{name}: only {} samples", inputs.len());
    inputs.into_iter().map(String::from).zip(outputs).collect()
}

/// Tokenize every sample; assert all match llama.cpp and that decoding spells the text back.
fn check(name: &str) {
    let Some(dir) = vocab_dir() else { return };
    let tok = Tokenizer::from_gguf(&content(&dir, name))
        .unwrap_or_else(|e| panic!("{name}: cannot build the tokenizer: {e:#}"));
    let samples = samples(&dir, name);
    let mut failures = Vec::new();
    let mut tokens = 0;
    for (text, want) in &samples {
        let got = tok.encode(text).unwrap_or_else(|e| panic!("{name}: {text:?}: {e:#}"));
        if &got != want {
            failures.push(format!("  {text:?}\n    ours      {got:?}\n    llama.cpp {want:?}"));
            continue;
        }
        tokens += got.len();
        // Token bytes spell the text (SentencePiece: after the `▁` put in front of it).
        let spelled: Vec<u8> = got.iter().flat_map(|&id| tok.token_bytes(id).to_vec()).collect();
        let lead = if tok.space_prefix() && !text.is_empty() { " " } else { "" };
        assert_eq!(String::from_utf8_lossy(&spelled), format!("{lead}{text}"), "{name}: token bytes of {got:?}");
    }
    eprintln!(
        "{name}: {}/{} samples identical to llama.cpp ({tokens} tokens), encoding {:?}",
        samples.len() - failures.len(),
        samples.len(),
        tok.encoding()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {} samples differ from llama.cpp:\n{}",
        failures.len(),
        samples.len(),
        failures.join("\n")
    );
}

/// Vocabularies AnchorCoder does not rebuild must fail with an error that names the way out.
fn check_unsupported(name: &str, what: &str) {
    let Some(dir) = vocab_dir() else { return };
    let err = Tokenizer::from_gguf(&content(&dir, name)).expect_err(name);
    let msg = format!("{err:#}");
    assert!(msg.contains(what) && msg.contains("tokenizer.json"), "{name}: {msg}");
}

macro_rules! vocab_tests {
    ($($test:ident => $name:literal),* $(,)?) => {
        $(#[test] fn $test() { check($name); })*
    };
}

vocab_tests! {
    llama_spm => "llama-spm",
    phi_3 => "phi-3",
    gpt_2 => "gpt-2",
    llama_bpe => "llama-bpe",
    qwen2 => "qwen2",
    qwen35 => "qwen35",
    starcoder => "starcoder",
    refact => "refact",
    command_r => "command-r",
    mpt => "mpt",
    deepseek_coder => "deepseek-coder",
    deepseek_llm => "deepseek-llm",
    falcon => "falcon",
}

#[test]
fn bert_wordpiece_is_unsupported() {
    check_unsupported("bert-bge", "`bert`");
}

/// The SentencePiece specifics, on the Llama 2 vocabulary.
#[test]
fn llama_spm_metadata_and_bytes() {
    let Some(dir) = vocab_dir() else { return };
    let tok = Tokenizer::from_gguf(&content(&dir, "llama-spm")).unwrap();
    assert_eq!(tok.encoding(), TokenEncoding::SentencePiece);
    assert_eq!(tok.vocab_size(), 32000);
    assert_eq!(tok.bos_id(), Some(1));
    assert!(tok.add_bos() && tok.space_prefix());
    assert_eq!(tok.eos_ids(), &[2]);
    assert!((0..3).all(|id| tok.is_special(id) && tok.token_bytes(id).is_empty()));
    // Byte tokens <0x00>..<0xFF> are ids 3..=258.
    assert!((0..=255u8).all(|b| tok.token_bytes(3 + u32::from(b)) == [b]));
    assert_eq!(tok.token_bytes(tok.token_to_id("▁hello").unwrap()), b" hello");
    // Characters without a token fall back to their UTF-8 bytes.
    let ids = tok.encode("🦙").unwrap();
    assert_eq!(ids.len(), 5, "▁ + 4 byte tokens: {ids:?}");
    assert!(ids[1..].iter().all(|&id| (3..259).contains(&id)));
    assert_eq!(tok.decode(&ids), " 🦙");
    // Special-token text in a document is text.
    assert!(tok.encode("x </s> <s> <unk>").unwrap().iter().all(|&id| id > 2));
    assert!(tok.encode("").unwrap().is_empty());
}

/// With `ANCHORCODER_VOCAB_DIR` set, every vocabulary the tests read must be there.
#[test]
fn vocab_dir_complete_when_required() {
    let Some(dir) = std::env::var_os("ANCHORCODER_VOCAB_DIR").map(PathBuf::from) else {
        return;
    };
    let missing: Vec<String> = VOCABS
        .iter()
        .flat_map(|n| ["", ".inp", ".out"].map(|ext| format!("ggml-vocab-{n}.gguf{ext}")))
        .chain(["ggml-vocab-bert-bge.gguf".to_string()])
        .filter(|f| !dir.join(f).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "ANCHORCODER_VOCAB_DIR={} lacks {missing:?}; run tests/bench/vocab-fixtures.sh",
        dir.display()
    );
}

/// Real source files through our tokenizer and llama.cpp's `llama-tokenize`, for every vocabulary
/// above: prints identical/total per vocabulary and fails on any difference. Needs llama.cpp
/// (tests/bench/build-llamacpp.sh), so it only runs when asked:
/// `cargo test -p anchorcoder --release --test tokenizer_vocabs -- --ignored --nocapture`.
#[test]
#[ignore]
fn real_sources_match_llama_tokenize() {
    let dir = vocab_dir().expect("run tests/bench/vocab-fixtures.sh first");
    let tools = std::env::var_os("ANCHORCODER_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| anchorcoder::models::cache_dir().with_file_name("tools"));
    let tool = tools.join("llama.cpp/bin/llama-tokenize");
    assert!(tool.is_file(), "no {}; run tests/bench/build-llamacpp.sh", tool.display());

    // Code in several languages and scripts, as LF and CRLF.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut texts: Vec<(String, String)> = Vec::new();
    for rel in [
        "src/engine/tokenizer.rs",
        "src/engine/document.rs",
        "src/lsp/documents.rs",
        "../editors/nvim/lua/anchorcoder/init.lua",
        "../editors/vscode/src/extension.ts",
        "../README.md",
    ] {
        if let Ok(text) = std::fs::read_to_string(root.join(rel)) {
            texts.push((rel.to_string(), text));
        }
    }
    for py in ["argparse.py", "textwrap.py", "json/decoder.py"] {
        let found = std::fs::read_dir("/usr/lib")
            .ok()
            .and_then(|rd| rd.filter_map(|e| e.ok().map(|e| e.path().join(py))).find(|p| p.is_file()));
        if let Some(text) = found.and_then(|p| std::fs::read_to_string(p).ok()) {
            texts.push((py.to_string(), text));
        }
    }
    assert!(texts.len() >= 6, "only {} source files found", texts.len());
    let crlf: Vec<_> = texts.iter().map(|(n, t)| (format!("{n} (CRLF)"), t.replace('\n', "\r\n"))).collect();
    texts.extend(crlf);
    texts.push(("mixed".into(), "\n\n  \tx=1 \u{a0}é—“q” 日本語 🦀👩‍💻 ١٢٣ 1234567 <s></s><unk> \r\n   \n".into()));

    let tmp = std::env::temp_dir().join(format!("anchorcoder-vocab-{}.txt", std::process::id()));
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for name in VOCABS {
        let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = Tokenizer::from_gguf(&content(&dir, name)).unwrap();
        let mut same = 0;
        let mut tokens = 0;
        for (file, text) in &texts {
            std::fs::write(&tmp, text).unwrap();
            let out = std::process::Command::new(&tool)
                .arg("-m")
                .arg(&gguf)
                .arg("-f")
                .arg(&tmp)
                .args(["--ids", "--log-disable", "--no-bos", "--no-parse-special"])
                .arg("--no-escape")
                .output()
                .expect("run llama-tokenize");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .rfind(|l| l.starts_with('['))
                .unwrap_or_else(|| panic!("{name} {file}: no ids from llama-tokenize"));
            let want: Vec<u32> = serde_json::from_str(line).unwrap();
            let got = tok.encode(text).unwrap();
            if got == want {
                same += 1;
                tokens += got.len();
            } else {
                let at = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
                failures.push(format!(
                    "{name} {file}: first difference at token {at}: ours {:?} llama.cpp {:?}",
                    &got[at..(at + 4).min(got.len())],
                    &want[at..(at + 4).min(want.len())]
                ));
            }
        }
        report.push(format!("{name}: {same}/{} texts identical ({tokens} tokens)", texts.len()));
    }
    let _ = std::fs::remove_file(&tmp);
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
