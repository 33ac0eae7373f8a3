//! Tokenizers: document text ↔ token ids, and the exact bytes each token stands for.
//!
//! Three sources, each giving llama.cpp's ids for the same file:
//! - a GGUF's byte-level BPE (`tokenizer.ggml.model` = `gpt2`), rebuilt with the `tokenizers`
//!   crate and llama.cpp's pre-tokenizer regexes for the file's `tokenizer.ggml.pre`;
//! - a GGUF's SentencePiece vocabulary (`llama`: Llama 2, CodeLlama, Mistral, Phi-3), tokenized
//!   by llama.cpp's own merge-by-score algorithm (`Spm`), with `<0xNN>` byte fallback;
//! - a Hugging Face `tokenizer.json` ([`Tokenizer::from_file`]).
//!
//! Checked against llama.cpp's `llama-tokenize` (a fixture in `tests/fixtures`) and llama.cpp's
//! own vocabulary tests (`server/tests/tokenizer_vocabs.rs`).
//!
//! Document text is code: special-token strings that occur in it (`<|endoftext|>`, …) are
//! tokenized as plain text, never as control tokens, and no BOS is added by [`Tokenizer::encode`].
//!
//! Invariant: concatenating [`Tokenizer::token_bytes`] over `encode(text)` gives back
//! `text.as_bytes()` exactly, except that SentencePiece models put one space in front
//! ([`Tokenizer::space_prefix`]), as llama.cpp does.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Fill-in-the-middle control tokens of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FimIds {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
}

/// How token strings map to bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenEncoding {
    /// GPT-2 byte-level BPE: every byte is one printable unicode char.
    ByteLevel,
    /// SentencePiece style: `▁` is a space and `<0xNN>` tokens are single bytes.
    SentencePiece,
    /// Anything else: the token string's UTF-8 bytes (best effort).
    Raw,
}

/// A tokenizer with a precomputed id → bytes table and the ids that matter for completion.
#[derive(Clone)]
pub struct Tokenizer {
    model: Model,
    encoding: TokenEncoding,
    /// Concatenated token bytes; token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    special: Vec<bool>,
    eos: Vec<u32>,
    bos: Option<u32>,
    add_bos: bool,
    fim: Option<FimIds>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("encoding", &self.encoding)
            .field("vocab_size", &self.vocab_size())
            .field("eos", &self.eos)
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("fim", &self.fim)
            .finish_non_exhaustive()
    }
}

// GGUF token types (llama.cpp's llama_token_type).
const TYPE_NORMAL: u32 = 1;
const TYPE_UNKNOWN: u32 = 2;
const TYPE_CONTROL: u32 = 3;
const TYPE_USER_DEFINED: u32 = 4;
const TYPE_UNUSED: u32 = 5;
const TYPE_BYTE: u32 = 6;

/// Token texts that end a generation (llama.cpp's end-of-generation list, plus file separators:
/// a code completion must stop where a new file would begin).
const EOG_NAMES: &[&str] = &[
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|file_sep|>",
    "<file_sep>",
    "<|fim_pad|>",
    "<fim_pad>",
    "<fim-pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<reponame>",
];
/// FIM prefix token texts (llama.cpp's list).
const FIM_PRE_NAMES: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
/// FIM suffix token texts (llama.cpp's list).
const FIM_SUF_NAMES: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
/// FIM middle token texts (llama.cpp's list).
const FIM_MID_NAMES: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];

// Pre-tokenizer regexes, copied from llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Applied one after the other, each splitting the pieces of the one before.
const REGEXES_DEEPSEEK_CODER: &[&str] = &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"];
/// Letters that Unicode normalization would change (e.g. U+1F7D → U+03CE) are written as
/// `\x{…}` so that no editor can turn a range of llama.cpp's into an empty one.
const REGEXES_DEEPSEEK_LLM: &[&str] = &[
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
const REGEXES_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", REGEX_GPT2, r"[0-9][0-9][0-9]"];

/// `tokenizer.ggml.pre` values grouped by llama.cpp's pre-tokenizer type.
const PRE_SMOLLM: &[&str] =
    &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b", "mellum2"];
const PRE_GPT2: &[&str] = &[
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "mpt",
    "olmo",
    "jais",
    "trillion",
    "granite-docling",
    "exaone4",
];
const PRE_LLAMA3: &[&str] =
    &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"];
const PRE_LLAMA3_KEEP_MERGES: &[&str] = &["dbrx", "smaug-bpe", "chatglm-bpe"];
const PRE_GLM4: &[&str] = &["glm4", "glm5"];
const PRE_QWEN2: &[&str] =
    &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open"];
const PRE_QWEN35: &[&str] = &["qwen35"];
const PRE_DEEPSEEK_CODER: &[&str] = &["deepseek-coder"];
const PRE_DEEPSEEK_LLM: &[&str] = &["deepseek-llm"];
const PRE_FALCON: &[&str] = &["falcon"];

/// How a `tokenizer.ggml.pre` value pre-tokenizes, in `tokenizers` terms.
struct PreSpec {
    pre_tokenizer: PreTokenizerWrapper,
    ignore_merges: bool,
    /// llama.cpp's default for add_bos with this pre type (the GGUF key overrides it).
    add_bos: bool,
}

fn split_then_bytes(regex: &str) -> Result<PreTokenizerWrapper> {
    splits_then_bytes(&[regex])
}

/// llama.cpp's list of regexes: each match is a piece and so is the text between matches.
fn splits_then_bytes(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = regexes
        .iter()
        .map(|regex| {
            Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map(Into::into)
                .map_err(|e| anyhow!("cannot compile pre-tokenizer regex {regex}: {e}"))
        })
        .collect::<Result<_>>()?;
    steps.push(ByteLevel::new(false, false, false).into());
    Ok(Sequence::new(steps).into())
}

/// The pre-tokenizer matching llama.cpp's for `pre`, or an error naming what is supported.
fn pre_spec(pre: &str) -> Result<PreSpec> {
    let is = |list: &[&str]| list.contains(&pre);
    let spec = if is(PRE_SMOLLM) {
        // llama.cpp: "\p{N}" then the GPT-2 regex.
        PreSpec {
            pre_tokenizer: Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, false, true).into()])
                .into(),
            ignore_merges: false,
            add_bos: false,
        }
    } else if is(PRE_GPT2) {
        PreSpec { pre_tokenizer: ByteLevel::new(false, false, true).into(), ignore_merges: false, add_bos: false }
    } else if is(PRE_LLAMA3) {
        PreSpec { pre_tokenizer: split_then_bytes(REGEX_LLAMA3)?, ignore_merges: true, add_bos: true }
    } else if is(PRE_LLAMA3_KEEP_MERGES) {
        PreSpec { pre_tokenizer: split_then_bytes(REGEX_LLAMA3)?, ignore_merges: false, add_bos: false }
    } else if is(PRE_GLM4) {
        PreSpec { pre_tokenizer: split_then_bytes(REGEX_LLAMA3)?, ignore_merges: true, add_bos: false }
    } else if is(PRE_QWEN2) {
        PreSpec { pre_tokenizer: split_then_bytes(REGEX_QWEN2)?, ignore_merges: false, add_bos: false }
    } else if is(PRE_QWEN35) {
        PreSpec { pre_tokenizer: split_then_bytes(REGEX_QWEN35)?, ignore_merges: false, add_bos: false }
    } else if is(PRE_DEEPSEEK_CODER) || is(PRE_DEEPSEEK_LLM) || is(PRE_FALCON) {
        let regexes = if is(PRE_DEEPSEEK_CODER) {
            REGEXES_DEEPSEEK_CODER
        } else if is(PRE_DEEPSEEK_LLM) {
            REGEXES_DEEPSEEK_LLM
        } else {
            REGEXES_FALCON
        };
        PreSpec { pre_tokenizer: splits_then_bytes(regexes)?, ignore_merges: false, add_bos: false }
    } else {
        bail!(
            "unsupported GGUF pre-tokenizer `tokenizer.ggml.pre` = `{pre}`; AnchorCoder can \
             rebuild these: {}. Put the model's tokenizer.json next to the model or pass \
             --tokenizer",
            supported_pre_values().join(", ")
        );
    };
    Ok(spec)
}

/// All `tokenizer.ggml.pre` values [`Tokenizer::from_gguf`] understands.
pub fn supported_pre_values() -> Vec<&'static str> {
    [
        PRE_SMOLLM,
        PRE_GPT2,
        PRE_LLAMA3,
        PRE_LLAMA3_KEEP_MERGES,
        PRE_GLM4,
        PRE_QWEN2,
        PRE_QWEN35,
        PRE_DEEPSEEK_CODER,
        PRE_DEEPSEEK_LLM,
        PRE_FALCON,
    ]
    .concat()
}

/// GPT-2's byte → printable char table, inverted (char → byte).
fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable.into_iter().zip(chars).map(|(b, c)| (char::from_u32(c).expect("valid char"), b as u8)).collect()
}

/// Bytes of a byte-level token string (chars outside the table keep their UTF-8 bytes).
fn byte_level_bytes(token: &str, table: &HashMap<char, u8>, out: &mut Vec<u8>) {
    for c in token.chars() {
        match table.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// `<0xNN>` → the byte.
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Bytes of a SentencePiece token string.
fn sentencepiece_bytes(token: &str, out: &mut Vec<u8>) {
    if let Some(b) = parse_byte_token(token) {
        out.push(b);
    } else {
        out.extend_from_slice(token.replace('\u{2581}', " ").as_bytes());
    }
}

/// What turns text into ids.
#[derive(Clone)]
enum Model {
    /// A `tokenizers` pipeline: byte-level BPE rebuilt from GGUF metadata, or a tokenizer.json.
    Hf(Box<tokenizers::Tokenizer>),
    /// SentencePiece from GGUF metadata, with llama.cpp's own merge algorithm.
    Spm(Spm),
}

/// llama.cpp's SentencePiece (SPM) tokenizer (`llm_tokenizer_spm_session`), from a GGUF's
/// vocabulary and scores.
///
/// Spaces become `▁`; the text is split into characters and the adjacent pair whose
/// concatenation is the highest-scoring vocabulary entry (leftmost on ties) is merged until no
/// pair is in the vocabulary; characters left without a token become their `<0xNN>` byte tokens.
/// Written out rather than built from `tokenizers` pieces: its BPE ranks merges, not the merged
/// tokens' scores, and differed from llama.cpp on real text (see the vocabulary tests).
#[derive(Clone)]
struct Spm {
    /// Token text → id (a repeated text maps to its last id, as in llama.cpp).
    ids: HashMap<String, u32>,
    tokens: Vec<String>,
    scores: Vec<f32>,
    /// The token of each byte: `<0xNN>`, else the one-byte token.
    byte_ids: Vec<Option<u32>>,
    /// User-defined tokens, longest text first: split out before the merges, as llama.cpp does
    /// even with special-token parsing off.
    user: Vec<u32>,
    /// Put `▁` before the text and after each user-defined token (`tokenizer.ggml.add_space_prefix`).
    add_space_prefix: bool,
}

/// A candidate merge of two adjacent symbols; ordered as llama.cpp's `llm_bigram_spm`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text: a bigram is stale once either side has changed.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Highest score first, then leftmost.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// One character (or merged run) of the text being tokenized, in a linked list.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl Spm {
    fn new(tokens: Vec<String>, scores: Vec<f32>, mut user: Vec<u32>, add_space_prefix: bool) -> Spm {
        let ids: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let byte_ids = (0..=255u8)
            .map(|b| {
                ids.get(format!("<0x{b:02X}>").as_str()).or_else(|| ids.get(std::str::from_utf8(&[b]).ok()?)).copied()
            })
            .collect();
        user.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));
        Spm { ids, tokens, scores, byte_ids, user, add_space_prefix }
    }

    /// llama.cpp's `tokenize(text, add_special = false, parse_special = false)`.
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Split out user-defined tokens: `Err(range)` is text, `Ok(id)` a token.
        let mut parts: Vec<std::result::Result<u32, std::ops::Range<usize>>> =
            if text.is_empty() { vec![] } else { vec![Err(0..text.len())] };
        for &id in &self.user {
            let needle = self.tokens[id as usize].as_str();
            if !text.contains(needle) {
                continue;
            }
            parts = parts
                .into_iter()
                .flat_map(|part| {
                    let mut out = Vec::new();
                    match part {
                        Err(range) => {
                            let mut at = range.start;
                            while let Some(i) = text[at..range.end].find(needle) {
                                if i > 0 {
                                    out.push(Err(at..at + i));
                                }
                                out.push(Ok(id));
                                at += i + needle.len();
                            }
                            if at < range.end {
                                out.push(Err(at..range.end));
                            }
                        }
                        token => out.push(token),
                    }
                    out
                })
                .collect();
        }
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut after_special = true;
        for part in parts {
            match part {
                Ok(id) => {
                    out.push(id);
                    after_special = true;
                }
                Err(range) => {
                    let mut piece = String::with_capacity(range.len() + 3);
                    if self.add_space_prefix && after_special {
                        piece.push(' ');
                    }
                    piece.push_str(&text[range]);
                    self.merge(&piece.replace(' ', "\u{2581}"), &mut out)?;
                    after_special = false;
                }
            }
        }
        Ok(out)
    }

    /// The merge loop over one escaped piece of text, appending its ids.
    fn merge(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut symbols: Vec<Symbol> =
            text.char_indices().map(|(start, c)| Symbol { start, len: c.len_utf8(), prev: None, next: None }).collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = std::collections::BinaryHeap::new();
        let bigram = |symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (l, r) = (symbols[left?], symbols[right?]);
            let id = *self.ids.get(&text[l.start..r.start + r.len])?;
            Some(Bigram { score: self.scores[id as usize], left: left?, right: right?, len: l.len + r.len })
        };
        for i in 1..n {
            queue.extend(bigram(&symbols, Some(i - 1), Some(i)));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(b.left);
            }
            queue.extend(bigram(&symbols, l.prev, Some(b.left)));
            queue.extend(bigram(&symbols, Some(b.left), r.next));
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.byte_ids[b as usize].with_context(|| {
                            format!("the vocabulary has no token for byte 0x{b:02X} (no <0x{b:02X}>)")
                        })?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }
}

fn meta<'a>(ct: &'a Content, key: &str) -> Option<&'a Value> {
    ct.metadata.get(key)
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    match meta(ct, key)? {
        Value::U8(v) => Some(u32::from(*v)),
        Value::U16(v) => Some(u32::from(*v)),
        Value::U32(v) => Some(*v),
        Value::U64(v) => u32::try_from(*v).ok(),
        Value::I8(v) => u32::try_from(*v).ok(),
        Value::I16(v) => u32::try_from(*v).ok(),
        Value::I32(v) => u32::try_from(*v).ok(),
        Value::I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

fn meta_str<'a>(ct: &'a Content, key: &str) -> Option<&'a str> {
    match meta(ct, key)? {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

fn meta_bool(ct: &Content, key: &str) -> Option<bool> {
    match meta(ct, key)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn meta_strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    let v = meta(ct, key).with_context(|| format!("the GGUF has no `{key}`"))?;
    let arr = match v {
        Value::Array(a) => a,
        _ => bail!("GGUF `{key}` is not an array"),
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => bail!("GGUF `{key}`[{i}] is not a string: {other:?}"),
        })
        .collect()
}

fn meta_types(ct: &Content, n: usize) -> Result<Vec<u32>> {
    let Some(v) = meta(ct, "tokenizer.ggml.token_type") else {
        return Ok(vec![TYPE_NORMAL; n]);
    };
    let Value::Array(arr) = v else {
        bail!("GGUF `tokenizer.ggml.token_type` is not an array");
    };
    if arr.len() != n {
        bail!("GGUF `tokenizer.ggml.token_type` has {} entries but there are {n} tokens", arr.len());
    }
    arr.iter()
        .map(|v| match v {
            Value::I32(t) => Ok(*t as u32),
            Value::U32(t) => Ok(*t),
            Value::I8(t) => Ok(*t as u32),
            Value::U8(t) => Ok(u32::from(*t)),
            other => bail!("unexpected token type value {other:?}"),
        })
        .collect()
}

/// `tokenizer.ggml.scores` (0 for every token when absent, as in llama.cpp).
fn meta_scores(ct: &Content, n: usize) -> Result<Vec<f32>> {
    let Some(v) = meta(ct, "tokenizer.ggml.scores") else {
        return Ok(vec![0.0; n]);
    };
    let Value::Array(arr) = v else {
        bail!("GGUF `tokenizer.ggml.scores` is not an array");
    };
    if arr.len() < n {
        bail!("GGUF `tokenizer.ggml.scores` has {} entries but there are {n} tokens", arr.len());
    }
    arr[..n]
        .iter()
        .map(|v| match v {
            Value::F32(s) => Ok(*s),
            Value::I32(s) => Ok(*s as f32),
            other => bail!("unexpected token score value {other:?}"),
        })
        .collect()
}

/// The id of the first name in `names` that is in the vocabulary.
fn find_named(lookup: &HashMap<&str, u32>, names: &[&str]) -> Option<u32> {
    names.iter().find_map(|n| lookup.get(n).copied())
}

impl Tokenizer {
    /// Build the tokenizer stored in a GGUF's metadata: byte-level BPE (`tokenizer.ggml.model` =
    /// `gpt2`) or SentencePiece (`llama`: Llama 2, CodeLlama, Mistral, Phi-3, …).
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let model = meta_str(content, "tokenizer.ggml.model")
            .context("the GGUF has no `tokenizer.ggml.model`; it carries no tokenizer")?;
        let encoding = match model {
            "gpt2" => TokenEncoding::ByteLevel,
            "llama" => TokenEncoding::SentencePiece,
            other => bail!(
                "unsupported GGUF tokenizer `tokenizer.ggml.model` = `{other}` (byte-level BPE, \
                 `gpt2`, and SentencePiece, `llama`, are rebuilt from GGUF metadata); put the \
                 model's tokenizer.json next to the model or pass --tokenizer"
            ),
        };
        // Checked before the vocabulary is read, so an unknown pre-tokenizer fails fast.
        let spec = match encoding {
            TokenEncoding::ByteLevel => Some(pre_spec(meta_str(content, "tokenizer.ggml.pre").unwrap_or("default"))?),
            _ => None,
        };

        let tokens = meta_strings(content, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize {
            bail!("the GGUF has {n} tokens");
        }
        let types = meta_types(content, n)?;

        // Name → id, first occurrence wins for lookups by name.
        let mut lookup: HashMap<&str, u32> = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate().rev() {
            lookup.insert(t.as_str(), i as u32);
        }

        let fim = match (
            meta_u32(content, "tokenizer.ggml.fim_pre_token_id")
                .or_else(|| meta_u32(content, "tokenizer.ggml.prefix_token_id")),
            meta_u32(content, "tokenizer.ggml.fim_suf_token_id")
                .or_else(|| meta_u32(content, "tokenizer.ggml.suffix_token_id")),
            meta_u32(content, "tokenizer.ggml.fim_mid_token_id")
                .or_else(|| meta_u32(content, "tokenizer.ggml.middle_token_id")),
        ) {
            (Some(prefix), Some(suffix), Some(middle)) => Some(FimIds { prefix, suffix, middle }),
            _ => match (
                find_named(&lookup, FIM_PRE_NAMES),
                find_named(&lookup, FIM_SUF_NAMES),
                find_named(&lookup, FIM_MID_NAMES),
            ) {
                (Some(prefix), Some(suffix), Some(middle)) => Some(FimIds { prefix, suffix, middle }),
                _ => None,
            },
        }
        .filter(|f| [f.prefix, f.suffix, f.middle].iter().all(|&id| (id as usize) < n));

        // llama.cpp's defaults when the keys are absent: SentencePiece BOS 1, EOS 2.
        let spm = encoding == TokenEncoding::SentencePiece;
        let eos_default = spm.then_some(2);
        let mut eos: Vec<u32> =
            ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"]
                .iter()
                .filter_map(|k| meta_u32(content, k))
                .collect();
        if !content.metadata.contains_key("tokenizer.ggml.eos_token_id") {
            eos.extend(eos_default);
        }
        eos.extend(EOG_NAMES.iter().filter_map(|name| lookup.get(name).copied()));
        // `</s>` ends generation and is a control token even where the GGUF calls it
        // user-defined (Phi-3), except in vocabularies where it is normal text (Gemma 4, PLaMo),
        // as in llama.cpp.
        if let Some(&id) = lookup.get("</s>") {
            if !lookup.contains_key("<|tool_response>") && !lookup.contains_key("<|plamo:eos|>") {
                eos.push(id);
            }
        }
        eos.retain(|&id| (id as usize) < n);
        eos.sort_unstable();
        eos.dedup();

        // llama.cpp forces end-of-generation and FIM tokens to be control tokens.
        let mut forced_control = vec![false; n];
        for &id in &eos {
            forced_control[id as usize] = true;
        }
        if let Some(f) = fim {
            for id in [f.prefix, f.suffix, f.middle] {
                forced_control[id as usize] = true;
            }
        }

        let mut special = vec![false; n];
        let mut special_tokens = Vec::new();
        let mut user_tokens = Vec::new();
        let table = byte_level_char_to_byte();
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        for (i, (tok, &ty)) in tokens.iter().zip(&types).enumerate() {
            let control = forced_control[i] || matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN | TYPE_UNUSED);
            if control {
                special[i] = true;
                if ty != TYPE_UNUSED {
                    special_tokens.push(AddedToken::from(tok.clone(), true).normalized(false));
                }
            } else if ty == TYPE_USER_DEFINED {
                user_tokens.push(AddedToken::from(tok.clone(), false).normalized(false));
                bytes.extend_from_slice(tok.as_bytes());
            } else if ty == TYPE_BYTE {
                match parse_byte_token(tok) {
                    Some(b) => bytes.push(b),
                    None if spm => bytes.extend_from_slice(tok.as_bytes()),
                    None => byte_level_bytes(tok, &table, &mut bytes),
                }
            } else if spm {
                // llama.cpp spells only normal SentencePiece tokens; other types print nothing.
                if ty == TYPE_NORMAL {
                    sentencepiece_bytes(tok, &mut bytes);
                } else {
                    special[i] = true;
                }
            } else {
                byte_level_bytes(tok, &table, &mut bytes);
            }
            offsets.push(u32::try_from(bytes.len()).context("token byte table exceeds 4 GiB")?);
        }

        let bos = meta_u32(content, "tokenizer.ggml.bos_token_id").or(spm.then_some(1)).filter(|&id| (id as usize) < n);
        let add_bos_default = spec.as_ref().is_none_or(|s| s.add_bos);
        let add_bos = meta_bool(content, "tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default) && bos.is_some();

        let model = match spec {
            Some(spec) => {
                let merges: Vec<(String, String)> = meta_strings(content, "tokenizer.ggml.merges")?
                    .into_iter()
                    .enumerate()
                    .map(|(i, m)| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .with_context(|| format!("GGUF merge {i} `{m}` has no space"))
                    })
                    .collect::<Result<_>>()?;
                let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab, merges)
                    .ignore_merges(spec.ignore_merges)
                    .build()
                    .map_err(|e| anyhow!("cannot build the BPE model from the GGUF: {e}"))?;
                let mut inner = tokenizers::Tokenizer::new(bpe);
                inner.with_pre_tokenizer(Some(spec.pre_tokenizer));
                inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
                inner.add_special_tokens(&special_tokens);
                inner.add_tokens(&user_tokens);
                // Special-token strings in documents are text, as llama.cpp does with
                // parse_special off.
                inner.set_encode_special_tokens(true);
                Model::Hf(Box::new(inner))
            }
            None => {
                let scores = meta_scores(content, n)?;
                let user: Vec<u32> =
                    user_tokens.iter().filter_map(|t| lookup.get(t.content.as_str()).copied()).collect();
                let add_space_prefix = meta_bool(content, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
                Model::Spm(Spm::new(tokens, scores, user, add_space_prefix))
            }
        };

        Ok(Tokenizer { model, encoding, bytes, offsets, special, eos, bos, add_bos, fim })
    }

    /// Load a Hugging Face `tokenizer.json`; `tokenizer_config.json` and `config.json` next to it,
    /// when present, supply BOS/EOS.
    ///
    /// For byte-level tokenizers a plain NFC normalizer (Qwen2's) is dropped so that token bytes
    /// reproduce the document exactly, as llama.cpp does. SentencePiece-style tokenizers usually
    /// prepend a space to the text: the first token's bytes then start with that extra space.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read tokenizer file {}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let mut inner: tokenizers::Tokenizer =
            text.parse().map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))?;

        let has_type = |v: &serde_json::Value, ty: &str| json_has_type(v, ty);
        let encoding = if has_type(&json["pre_tokenizer"], "ByteLevel") || has_type(&json["decoder"], "ByteLevel") {
            TokenEncoding::ByteLevel
        } else if json["model"]["byte_fallback"].as_bool() == Some(true)
            || has_type(&json["pre_tokenizer"], "Metaspace")
            || has_type(&json["decoder"], "Metaspace")
            || json["decoder"].to_string().contains('\u{2581}')
        {
            TokenEncoding::SentencePiece
        } else {
            TokenEncoding::Raw
        };
        if encoding == TokenEncoding::ByteLevel && json["normalizer"]["type"] == "NFC" {
            inner.with_normalizer(None::<NormalizerWrapper>);
        }
        inner.set_encode_special_tokens(true);

        let full_vocab = inner.get_vocab(true);
        let n = full_vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if n == 0 {
            bail!("tokenizer {} has an empty vocabulary", path.display());
        }
        let added = inner.get_added_tokens_decoder();
        let table = byte_level_char_to_byte();
        let mut special = vec![false; n];
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0u32);
        for (id, is_special) in special.iter_mut().enumerate() {
            let id32 = id as u32;
            if let Some(tok) = added.get(&id32) {
                if tok.special {
                    *is_special = true;
                } else {
                    bytes.extend_from_slice(tok.content.as_bytes());
                }
            } else if let Some(tok) = inner.id_to_token(id32) {
                match encoding {
                    TokenEncoding::ByteLevel => byte_level_bytes(&tok, &table, &mut bytes),
                    TokenEncoding::SentencePiece => sentencepiece_bytes(&tok, &mut bytes),
                    TokenEncoding::Raw => bytes.extend_from_slice(tok.as_bytes()),
                }
            }
            offsets.push(u32::try_from(bytes.len()).context("token byte table exceeds 4 GiB")?);
        }

        let lookup: HashMap<&str, u32> = full_vocab.iter().map(|(k, &v)| (k.as_str(), v)).collect();
        let dir = path.parent().unwrap_or(Path::new("."));
        let read_json = |name: &str| -> Option<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
        };
        let tok_config = read_json("tokenizer_config.json");
        let model_config = read_json("config.json");
        let config_token = |key: &str| -> Option<u32> {
            let v = &tok_config.as_ref()?[key];
            let name = v.as_str().or_else(|| v["content"].as_str())?;
            lookup.get(name).copied()
        };
        let config_ids = |key: &str| -> Vec<u32> {
            match model_config.as_ref().map(|c| &c[key]) {
                Some(serde_json::Value::Number(x)) => x.as_u64().map(|x| x as u32).into_iter().collect(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => Vec::new(),
            }
        };

        let mut eos: Vec<u32> = EOG_NAMES.iter().filter_map(|n| lookup.get(n).copied()).collect();
        eos.extend(config_token("eos_token"));
        eos.extend(config_ids("eos_token_id"));
        eos.retain(|&id| (id as usize) < n);
        eos.sort_unstable();
        eos.dedup();
        let bos = config_token("bos_token")
            .or_else(|| config_ids("bos_token_id").first().copied())
            .filter(|&id| (id as usize) < n);
        let add_bos = tok_config.as_ref().and_then(|c| c["add_bos_token"].as_bool()).unwrap_or(false) && bos.is_some();
        let fim = match (
            find_named(&lookup, FIM_PRE_NAMES),
            find_named(&lookup, FIM_SUF_NAMES),
            find_named(&lookup, FIM_MID_NAMES),
        ) {
            (Some(prefix), Some(suffix), Some(middle)) => Some(FimIds { prefix, suffix, middle }),
            _ => None,
        };

        Ok(Tokenizer { model: Model::Hf(Box::new(inner)), encoding, bytes, offsets, special, eos, bos, add_bos, fim })
    }

    /// Document text → ids: no BOS, special-token strings tokenized as plain text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.model {
            Model::Hf(inner) => {
                let enc = inner.encode_fast(text, false).map_err(|e| anyhow!("tokenization failed: {e}"))?;
                Ok(enc.get_ids().to_vec())
            }
            Model::Spm(spm) => spm.encode(text),
        }
    }

    /// Ids → text (invalid UTF-8 replaced; special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        match self.encoding {
            TokenEncoding::ByteLevel | TokenEncoding::SentencePiece => {
                let mut out = Vec::with_capacity(ids.len() * 4);
                for &id in ids {
                    out.extend_from_slice(self.token_bytes(id));
                }
                String::from_utf8_lossy(&out).into_owned()
            }
            TokenEncoding::Raw => match &self.model {
                Model::Hf(inner) => inner.decode(ids, true).unwrap_or_default(),
                Model::Spm(_) => unreachable!("SentencePiece models decode through token bytes"),
            },
        }
    }

    /// The exact bytes token `id` stands for. Special (control/unknown/unused) tokens and
    /// out-of-range ids give an empty slice (check [`Tokenizer::is_special`]); user-defined
    /// added tokens give their text.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        if i + 1 >= self.offsets.len() {
            return &[];
        }
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The token's string as stored in the vocabulary (byte-level chars, `▁`, …).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.model {
            Model::Hf(inner) => inner.id_to_token(id),
            Model::Spm(spm) => spm.tokens.get(id as usize).cloned(),
        }
    }

    /// The id of a vocabulary string (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.model {
            Model::Hf(inner) => inner.token_to_id(token),
            Model::Spm(spm) => spm.ids.get(token).copied(),
        }
    }

    /// Number of ids (highest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.special.len()
    }

    /// Ids that should stop a code completion (sorted, deduplicated).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// True when `id` is one of [`Tokenizer::eos_ids`].
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.binary_search(&id).is_ok()
    }

    /// The beginning-of-sequence id, if the model names one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether the model expects [`Tokenizer::bos_id`] in front of a prompt.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Fill-in-the-middle tokens, when the model has all three.
    pub fn fim_ids(&self) -> Option<FimIds> {
        self.fim
    }

    /// Use `fim` as the fill-in-the-middle tokens (an adapter trained with its
    /// own, see `Adapter::apply_fim`); they become control tokens, as the
    /// model's own FIM tokens are. Ids past the vocabulary are ignored.
    pub fn set_fim(&mut self, fim: FimIds) {
        let ids = [fim.prefix, fim.suffix, fim.middle];
        if ids.iter().all(|&id| (id as usize) < self.special.len()) {
            for id in ids {
                self.special[id as usize] = true;
            }
            self.fim = Some(fim);
        }
    }

    /// True for control, unknown and unused tokens (never produced by [`Tokenizer::encode`]).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// How token strings map to bytes for this tokenizer.
    pub fn encoding(&self) -> TokenEncoding {
        self.encoding
    }

    /// Whether [`Tokenizer::encode`] puts a space (`▁`) in front of the text, as llama.cpp does
    /// for SentencePiece models (`add_space_prefix`): the token bytes of `encode(text)` then
    /// spell `" " + text`. False for byte-level BPE.
    pub fn space_prefix(&self) -> bool {
        matches!(&self.model, Model::Spm(spm) if spm.add_space_prefix)
    }
}

/// True if a JSON tokenizer component (possibly a Sequence) has an element of type `ty`.
fn json_has_type(v: &serde_json::Value, ty: &str) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            m.get("type").and_then(|t| t.as_str()) == Some(ty) || m.values().any(|x| json_has_type(x, ty))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_type(x, ty)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    fn default_content() -> &'static Content {
        static CONTENT: OnceLock<Content> = OnceLock::new();
        CONTENT.get_or_init(|| {
            let path = crate::models::test_model();
            let mut f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            Content::read(&mut f).unwrap_or_else(|e| panic!("cannot read GGUF {}: {e}", path.display()))
        })
    }

    fn default_tokenizer() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_gguf(default_content()).expect("build tokenizer"))
    }

    fn with_meta(key: &str, value: Value) -> Content {
        let base = default_content();
        let mut metadata = base.metadata.clone();
        metadata.insert(key.to_string(), value);
        Content {
            magic: base.magic,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: base.tensor_data_offset,
        }
    }

    fn concat_bytes(tok: &Tokenizer, ids: &[u32]) -> Vec<u8> {
        ids.iter().flat_map(|&id| tok.token_bytes(id).to_vec()).collect()
    }

    fn assert_round_trip(tok: &Tokenizer, name: &str, text: &str) -> usize {
        let ids = tok.encode(text).unwrap();
        let back = concat_bytes(tok, &ids);
        if back != text.as_bytes() {
            let at = back.iter().zip(text.as_bytes()).position(|(a, b)| a != b).unwrap_or(back.len().min(text.len()));
            panic!(
                "{name}: token bytes differ from the text at byte {at} (text {} bytes, tokens {} \
                 bytes)",
                text.len(),
                back.len()
            );
        }
        assert_eq!(tok.decode(&ids), text, "{name}: decode");
        assert!(ids.iter().all(|&id| !tok.is_special(id)), "{name}: special id");
        ids.len()
    }

    /// Real source files on this machine: Python stdlib and crate sources.
    fn real_source_files() -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = Vec::new();
        let mut push_glob = |dir: PathBuf, prefix: &str| {
            if let Ok(rd) = std::fs::read_dir(&dir) {
                let mut v: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
                    .collect();
                v.sort();
                roots.extend(v);
            }
        };
        push_glob(PathBuf::from("/usr/lib"), "python3");
        if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
            if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
                for e in rd.filter_map(|e| e.ok()) {
                    push_glob(e.path().join("lib"), "python3");
                }
            }
        }
        let mut files = Vec::new();
        for root in &roots {
            for rel in ["argparse.py", "textwrap.py", "json/decoder.py", "difflib.py"] {
                let p = root.join(rel);
                if p.is_file() {
                    files.push(p);
                }
            }
        }
        if let Some(home) = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        {
            if let Ok(rd) = std::fs::read_dir(home.join("registry/src")) {
                for index in rd.filter_map(|e| e.ok()) {
                    let mut crates: Vec<PathBuf> = std::fs::read_dir(index.path())
                        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                        .unwrap_or_default();
                    crates.sort();
                    for c in crates {
                        let name = c.file_name().unwrap().to_string_lossy().into_owned();
                        if ["anyhow-", "serde_json-", "sha2-", "half-"].iter().any(|p| name.starts_with(p)) {
                            let p = c.join("src/lib.rs");
                            if p.is_file() {
                                files.push(p);
                            }
                        }
                    }
                }
            }
        }
        files
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn default_model_metadata() {
        let tok = default_tokenizer();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.encoding(), TokenEncoding::ByteLevel);
        assert_eq!(tok.bos_id(), Some(1));
        assert!(!tok.add_bos());
        assert_eq!(tok.fim_ids(), None, "SmolLM2 has no FIM tokens");
        // <|endoftext|>, <|im_end|> (eos), <reponame>, <file_sep>.
        assert_eq!(tok.eos_ids(), &[0, 2, 4, 5]);
        assert!(tok.is_eos(2) && !tok.is_eos(1));
        for id in 0..=16 {
            assert!(tok.is_special(id), "{id}");
            assert!(tok.token_bytes(id).is_empty(), "{id}");
        }
        assert!(!tok.is_special(17));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
        assert!(tok.token_bytes(u32::MAX).is_empty());
        assert!(!tok.is_special(u32::MAX));
        // Every non-special token has bytes.
        assert!((17..49152).all(|id| !tok.token_bytes(id).is_empty()));
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn special_token_text_is_plain_text() {
        let tok = default_tokenizer();
        for s in [
            "<|endoftext|>",
            "x = '<|im_end|>'\n",
            "<file_sep><filename>a.py\n<|im_start|>user",
            "print(\"<jupyter_code>\")<empty_output>",
        ] {
            let ids = tok.encode(s).unwrap();
            assert!(ids.iter().all(|&id| id > 16), "{s:?} → {ids:?}");
            assert_round_trip(tok, s, s);
        }
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn round_trip_synthetic() {
        let tok = default_tokenizer();
        let long_ws = format!("fn f() {{\n{}x\n{}\t\t}}\n", " ".repeat(40), " ".repeat(13));
        let samples = [
            "",
            " ",
            "\n",
            "def add(a, b):\n    return a + b\n",
            "line one\r\nline two\r\n\r\n\tindented\r\n",
            &long_ws,
            "x = 1234567 + 0.5e-10 - 0x1F; // ١٢٣ ½ ²",
            "héllo wörld — “quotes” ‘single’ … naïve café",
            "日本語のテキスト 中文字符 한국어 텍스트",
            "emoji 🦀🐍👩‍💻 flags 🇫🇷 skin 👍🏽 zwj",
            "mixed\u{00a0}nbsp\u{2003}emspace\u{200b}zwsp\u{feff}bom",
            "trailing spaces   \n\n\n   \n",
            "can't won't it's I'LL we'Re",
            "\u{0000}\u{0001}\u{007f} control chars \u{0085}",
        ];
        for s in samples {
            assert_round_trip(tok, &format!("{s:?}"), s);
        }
        assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn round_trip_real_sources() {
        let tok = default_tokenizer();
        let files = real_source_files();
        assert!(
            files.len() >= 4,
            "expected real source files (Python stdlib, ~/.cargo/registry) on this machine, found \
             {files:?}"
        );
        let mut checked = 0;
        let mut tokens = 0;
        for f in &files {
            let Ok(text) = std::fs::read_to_string(f) else {
                continue;
            };
            tokens += assert_round_trip(tok, &f.display().to_string(), &text);
            let crlf = text.replace('\n', "\r\n");
            tokens += assert_round_trip(tok, &format!("{} (CRLF)", f.display()), &crlf);
            checked += 1;
        }
        assert!(checked >= 4, "only {checked} readable files");
        eprintln!("round trip: {checked} files (+CRLF variants), {tokens} tokens");
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn matches_llamacpp_fixture() {
        #[derive(serde::Deserialize)]
        struct Sample {
            name: String,
            text: String,
            ids: Vec<u32>,
            #[serde(default)]
            pre: Option<String>,
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer_llamacpp.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("cannot read {} ({e}); regenerate it with tests/bench/make-tokenizer-fixture.py", path.display())
        });
        let samples: Vec<Sample> = serde_json::from_str(&text).expect("fixture JSON");
        assert!(samples.len() >= 10, "fixture too small");
        let mut by_pre: HashMap<String, Tokenizer> = HashMap::new();
        let mut failures = Vec::new();
        let mut matched = 0;
        let mut tokens = 0;
        for s in &samples {
            let pre = s.pre.clone().unwrap_or_else(|| "smollm".to_string());
            let tok = by_pre.entry(pre.clone()).or_insert_with(|| {
                Tokenizer::from_gguf(&with_meta("tokenizer.ggml.pre", Value::String(pre.clone())))
                    .unwrap_or_else(|e| panic!("pre {pre}: {e:#}"))
            });
            let ids = tok.encode(&s.text).unwrap();
            if ids == s.ids {
                matched += 1;
                tokens += ids.len();
            } else {
                let at = ids.iter().zip(&s.ids).position(|(a, b)| a != b).unwrap_or(ids.len().min(s.ids.len()));
                failures.push(format!(
                    "{} [pre {pre}]: first difference at token {at}: ours {:?} llama.cpp {:?} ({} vs {} tokens)",
                    s.name,
                    &ids[at..(at + 5).min(ids.len())],
                    &s.ids[at..(at + 5).min(s.ids.len())],
                    ids.len(),
                    s.ids.len()
                ));
            }
            if pre == "smollm" || tok.encoding() == TokenEncoding::ByteLevel {
                assert_eq!(concat_bytes(tok, &s.ids), s.text.as_bytes(), "{}: llama.cpp ids' bytes", s.name);
            }
        }
        eprintln!(
            "llama.cpp fixture: {matched}/{} samples match exactly ({tokens} tokens); pre types {:?}",
            samples.len(),
            {
                let mut k: Vec<_> = by_pre.keys().cloned().collect();
                k.sort();
                k
            }
        );
        assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn unsupported_tokenizers_give_clear_errors() {
        let err = Tokenizer::from_gguf(&with_meta("tokenizer.ggml.model", Value::String("bert".into()))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("`bert`") && msg.contains("SentencePiece") && msg.contains("tokenizer.json"), "{msg}");
        let err =
            Tokenizer::from_gguf(&with_meta("tokenizer.ggml.pre", Value::String("no-such-pre".into()))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("`no-such-pre`") && msg.contains("smollm"), "{msg}");
        let err = Tokenizer::from_gguf(&with_meta("tokenizer.ggml.model", Value::String("t5".into()))).unwrap_err();
        assert!(format!("{err:#}").contains("`t5`"));
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn other_pre_types_build_and_round_trip() {
        for pre in supported_pre_values() {
            let tok = Tokenizer::from_gguf(&with_meta("tokenizer.ggml.pre", Value::String(pre.into())))
                .unwrap_or_else(|e| panic!("{pre}: {e:#}"));
            assert_round_trip(&tok, pre, "def f(x):\r\n    return x*1234 # émoji 🦀\n\n   ");
        }
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn fim_ids_from_names() {
        let base = default_content();
        let mut tokens = match &base.metadata["tokenizer.ggml.tokens"] {
            Value::Array(a) => a.clone(),
            _ => unreachable!(),
        };
        // Rename three unused specials to StarCoder-style FIM tokens.
        tokens[11] = Value::String("<fim_prefix>".into());
        tokens[12] = Value::String("<fim_middle>".into());
        tokens[13] = Value::String("<fim_suffix>".into());
        let tok = Tokenizer::from_gguf(&with_meta("tokenizer.ggml.tokens", Value::Array(tokens))).unwrap();
        assert_eq!(tok.fim_ids(), Some(FimIds { prefix: 11, suffix: 13, middle: 12 }));
        let ids = tok.encode("<fim_prefix>x").unwrap();
        assert!(ids.iter().all(|&id| id > 16), "{ids:?}");
    }

    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn from_file_round_trip() {
        // Write a small byte-level tokenizer.json derived from the default model.
        let tok = default_tokenizer();
        let dir = std::env::temp_dir().join(format!("anchorcoder-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let Model::Hf(inner) = &tok.model else { unreachable!("the default model is byte-level BPE") };
        inner.save(&path, false).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
        )
        .unwrap();
        let loaded = Tokenizer::from_file(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.encoding(), TokenEncoding::ByteLevel);
        assert_eq!(loaded.vocab_size(), 49152);
        assert_eq!(loaded.bos_id(), Some(1));
        assert_eq!(loaded.eos_ids(), &[0, 2, 4, 5]);
        let text = "impl Foo {\r\n    fn bar(&self) -> u32 { 42 } // <|endoftext|> ü\n}\n";
        assert_eq!(loaded.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_round_trip(&loaded, "from_file", text);
        assert!(Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).is_err());
    }

    /// A small SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens (ids
    /// 3..=258), then `extra` (text, score, type) from id 259.
    fn spm_content(extra: &[(&str, f32, u32)], more: &[(&str, Value)]) -> Content {
        let mut tokens = vec![
            ("<unk>".to_string(), 0.0, TYPE_UNKNOWN),
            ("<s>".to_string(), 0.0, TYPE_CONTROL),
            ("</s>".to_string(), 0.0, TYPE_CONTROL),
        ];
        tokens.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, TYPE_BYTE)));
        tokens.extend(extra.iter().map(|&(t, s, ty)| (t.to_string(), s, ty)));
        let array = |f: &dyn Fn(&(String, f32, u32)) -> Value| Value::Array(tokens.iter().map(f).collect());
        let mut metadata: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", array(&|t| Value::String(t.0.clone()))),
            ("tokenizer.ggml.scores", array(&|t| Value::F32(t.1))),
            ("tokenizer.ggml.token_type", array(&|t| Value::I32(t.2 as i32))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        metadata.extend(more.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    /// Ids → their vocabulary strings, for readable assertions.
    fn pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
        let ids = tok.encode(text).unwrap();
        ids.iter().map(|&id| tok.id_to_token(id).unwrap()).collect()
    }

    const SPM_VOCAB: &[(&str, f32, u32)] = &[
        ("\u{2581}", -5.0, TYPE_NORMAL),
        ("a", -6.0, TYPE_NORMAL),
        ("b", -7.0, TYPE_NORMAL),
        ("c", -8.0, TYPE_NORMAL),
        ("ab", -1.0, TYPE_NORMAL),
        ("bc", -2.0, TYPE_NORMAL),
        ("\u{2581}ab", -3.0, TYPE_NORMAL),
        ("aa", -4.0, TYPE_NORMAL),
        ("<|user|>", 0.0, TYPE_USER_DEFINED),
    ];

    #[test]
    fn sentencepiece_merges_by_score_then_leftmost() {
        let tok = Tokenizer::from_gguf(&spm_content(SPM_VOCAB, &[])).unwrap();
        assert_eq!(tok.encoding(), TokenEncoding::SentencePiece);
        assert!(tok.space_prefix());
        // `ab` (-1) beats `bc` (-2); then `▁` + `ab` merge.
        assert_eq!(pieces(&tok, "abc"), ["▁ab", "c"]);
        assert_eq!(pieces(&tok, "ab c"), ["▁ab", "▁", "c"]);
        // Equal scores: the leftmost pair first.
        assert_eq!(pieces(&tok, "aaa"), ["▁", "aa", "a"]);
        // With `bc` scoring higher, `a` is left alone.
        let mut swapped = SPM_VOCAB.to_vec();
        swapped[5].1 = 0.5;
        let tok2 = Tokenizer::from_gguf(&spm_content(&swapped, &[])).unwrap();
        assert_eq!(pieces(&tok2, "abc"), ["▁", "a", "bc"]);
    }

    #[test]
    fn sentencepiece_bytes_user_tokens_and_prefix() {
        let tok = Tokenizer::from_gguf(&spm_content(SPM_VOCAB, &[])).unwrap();
        // No token for `é`: its UTF-8 bytes.
        assert_eq!(tok.encode("é").unwrap(), [259, 3 + 0xC3, 3 + 0xA9]);
        // User-defined tokens are split out first, and the text after one gets a `▁` again.
        assert_eq!(pieces(&tok, "a<|user|>b"), ["▁", "a", "<|user|>", "▁", "b"]);
        assert_eq!(pieces(&tok, "<|user|>"), ["<|user|>"]);
        // Control-token text is text.
        assert!(tok.encode("<s></s>").unwrap().iter().all(|&id| id > 2));
        assert!(tok.encode("").unwrap().is_empty());
        // Bytes: `▁` is a space, byte tokens their byte, user tokens their text, controls nothing.
        let ids = tok.encode("ab é<|user|>").unwrap();
        assert_eq!(tok.decode(&ids), " ab é<|user|>");
        assert_eq!(tok.token_bytes(3 + 0x0A), b"\n");
        assert!(tok.token_bytes(1).is_empty() && tok.is_special(1) && tok.is_special(0));
        // llama.cpp's defaults: BOS 1 (added), EOS 2.
        assert_eq!((tok.bos_id(), tok.add_bos(), tok.eos_ids()), (Some(1), true, &[2u32][..]));

        let plain = Tokenizer::from_gguf(&spm_content(
            SPM_VOCAB,
            &[
                ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
                ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ],
        ))
        .unwrap();
        assert!(!plain.space_prefix() && !plain.add_bos());
        assert_eq!(pieces(&plain, "ab c"), ["ab", "▁", "c"]);
        assert_round_trip(&plain, "no prefix", "abc ab\t\n é 🦀");
    }

    #[test]
    fn sentencepiece_errors_are_clear() {
        // Without byte tokens, a character outside the vocabulary cannot be encoded.
        let mut content = spm_content(SPM_VOCAB, &[]);
        let keep = |v: &Value| match v {
            Value::Array(a) => Value::Array([&a[..3], &a[259..]].concat()),
            other => other.clone(),
        };
        for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
            let v = keep(&content.metadata[key]);
            content.metadata.insert(key.to_string(), v);
        }
        let tok = Tokenizer::from_gguf(&content).unwrap();
        let err = tok.encode("aé").unwrap_err();
        assert!(format!("{err:#}").contains("0xC3"), "{err:#}");
        // Scores that do not cover the vocabulary.
        let content = spm_content(SPM_VOCAB, &[("tokenizer.ggml.scores", Value::Array(vec![]))]);
        let err = Tokenizer::from_gguf(&content).unwrap_err();
        assert!(format!("{err:#}").contains("scores"), "{err:#}");
    }

    #[test]
    fn byte_level_table_is_a_bijection() {
        let t = byte_level_char_to_byte();
        assert_eq!(t.len(), 256);
        let mut seen = [false; 256];
        for &b in t.values() {
            seen[b as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0x0A"), None);
    }
}
