//! The KV cache of one document's prompt text, updated incrementally.
//!
//! [`DocumentCache::set_text`] takes the new text, re-tokenizes only from a
//! safe point before the first changed byte, finds the first changed token
//! and truncates the KV cache there; everything before is kept. The new
//! tokens are *pending* until [`DocumentCache::prefill`] runs them, in chunks,
//! lazily or in the background. The cache only ever holds the document's own
//! text: suggestions are generated in a scratch extension (see
//! [`super::generate`]) that is dropped afterwards.
//!
//! A cache may start with fixed *lead* tokens that spell no text (a BOS token,
//! project context from other files, a fill-in-the-middle prefix marker: see
//! [`DocumentCache::set_lead`]); they are sinks of every policy (always kept
//! and attended, whatever the policy evicts) and are never re-tokenized.

use anyhow::Result;

use super::kv_cache::{KvCache, KvStats};
use super::llama::{Llama, Logits};
use super::policy::AttentionPolicy;
use super::tokenizer::Tokenizer;

/// How far back [`DocumentCache::set_text`] looks for a re-tokenization point.
const MAX_SAFE_POINT_SCAN: usize = 4096;

/// What an update kept and what it must recompute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Tokens of the new text.
    pub tokens: usize,
    /// Leading tokens whose K/V were kept.
    pub reused: usize,
    /// Tokens re-tokenized (from the safe point on).
    pub retokenized: usize,
}

/// Figures for status and memory budgets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Tokens of the text (processed or not).
    pub tokens: usize,
    /// Tokens not yet run through the model.
    pub pending_tokens: usize,
    /// K/V figures of the processed part.
    #[serde(flatten)]
    pub kv: KvStats,
}

/// One document's tokens and KV cache.
pub struct DocumentCache {
    text: String,
    tokens: Vec<u32>,
    anchors: Vec<bool>,
    /// Byte offset where each token ends, when the tokenizer spells the text
    /// byte for byte (byte-level BPE); `None` forces full re-tokenization.
    ends: Option<Vec<usize>>,
    kv: KvCache,
    /// Logits after the first `.0` tokens, kept while those tokens stand.
    last_logits: Option<(usize, Vec<f32>)>,
    /// How many of `tokens` are lead tokens (before the text; they end at byte 0).
    lead: usize,
    /// The policy's own sink count (the cache's grows to cover a longer lead).
    base_sinks: u32,
    /// Tokens of other files for the lead (see [`DocumentCache::set_context`]).
    context: Vec<u32>,
}

impl DocumentCache {
    /// An empty cache for `model` under `policy`.
    pub fn new(model: &Llama, policy: AttentionPolicy) -> Self {
        DocumentCache {
            text: String::new(),
            tokens: Vec::new(),
            anchors: Vec::new(),
            ends: Some(Vec::new()),
            kv: model.new_cache(policy),
            last_logits: None,
            lead: 0,
            base_sinks: policy.sink_tokens,
            context: Vec::new(),
        }
    }

    /// Make `lead` the tokens before the text (e.g. BOS, a FIM prefix marker).
    /// A no-op when they are already; otherwise the cache starts over empty
    /// (every position after them would change).
    pub fn set_lead(&mut self, tok: &Tokenizer, lead: &[u32]) {
        if self.lead == lead.len() && self.tokens.get(..self.lead) == Some(lead) {
            return;
        }
        self.tokens = lead.to_vec();
        self.anchors = lead.iter().map(|&t| is_anchor(tok, t)).collect();
        self.ends = Some(vec![0; lead.len()]);
        self.text.clear();
        self.kv.truncate(0);
        self.kv.set_sink_tokens(self.base_sinks.max(lead.len() as u32));
        self.last_logits = None;
        self.lead = lead.len();
    }

    /// Tokens of project context (other files' chunks, rendered by
    /// `completion::context_tokens`) that the next prompt puts in the lead;
    /// they take effect, and restart the cache if they changed, at the next
    /// `completion::set_prompt`.
    pub fn set_context(&mut self, tokens: Vec<u32>) {
        self.context = tokens;
    }

    /// The project context tokens (see [`DocumentCache::set_context`]).
    pub fn context(&self) -> &[u32] {
        &self.context
    }

    /// The lead tokens (see [`DocumentCache::set_lead`]).
    pub fn lead(&self) -> &[u32] {
        &self.tokens[..self.lead]
    }

    /// Keep this many lines of full K/V beyond the policy's needs, so edits
    /// close to the end stay cheap (see [`KvCache::set_eviction_slack`]).
    pub fn set_eviction_slack(&mut self, lines: u32) {
        self.kv.set_eviction_slack(lines);
    }

    /// The text the cache's tokens spell.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Tokens of the cache: the lead tokens, then the text's.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The KV cache (processed tokens only).
    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    /// The policy of this cache.
    pub fn policy(&self) -> AttentionPolicy {
        *self.kv.policy()
    }

    /// Tokens not yet run through the model.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.kv.len()
    }

    /// Size and memory figures.
    pub fn stats(&self) -> CacheStats {
        CacheStats { tokens: self.tokens.len(), pending_tokens: self.pending(), kv: self.kv.stats() }
    }

    /// Make `text` the cache's text, keeping every token (and its K/V) before
    /// the first one that changed.
    pub fn set_text(&mut self, tok: &Tokenizer, text: &str) -> Result<Update> {
        let e = common_prefix(self.text.as_bytes(), text.as_bytes());
        if e == self.text.len() && e == text.len() {
            return Ok(Update { tokens: self.tokens.len(), reused: self.kv.len(), retokenized: 0 });
        }
        let (b, ib) = self.safe_point(e);
        let (tail, tail_ends) = match self.tokenize_from(tok, text, b)? {
            Some(t) => t,
            None => return self.retokenize_all(tok, text),
        };
        let d = tail.iter().zip(&self.tokens[ib..]).take_while(|(a, b)| a == b).count();
        // A change before the line above the edit means this tokenizer does not
        // restart cleanly at `b`: start over from the beginning instead.
        let first_change = tail_ends.get(d.wrapping_sub(1)).copied().unwrap_or(b);
        if b > 0 && first_change < line_start(text, line_start(text, e).saturating_sub(1)) {
            return self.retokenize_all(tok, text);
        }
        let changed_at = ib + d;
        let anchors: Vec<bool> = tail.iter().map(|&t| is_anchor(tok, t)).collect();
        self.tokens.truncate(ib);
        self.tokens.extend_from_slice(&tail);
        self.anchors.truncate(ib);
        self.anchors.extend(anchors);
        if let Some(ends) = &mut self.ends {
            ends.truncate(ib);
            ends.extend(tail_ends);
        }
        self.text = text.to_string();
        Ok(self.keep_prefix(changed_at, tail.len()))
    }

    /// Run up to `max_tokens` pending tokens through the model; returns how
    /// many ran.
    pub fn prefill(&mut self, model: &Llama, max_tokens: usize) -> Result<usize> {
        self.prefill_until(model, max_tokens, &|| false)
    }

    /// [`DocumentCache::prefill`] that gives up as soon as `stop` answers
    /// `true` (polled before each layer), with an
    /// [`Interrupted`](super::llama::Interrupted) error and nothing of the
    /// chunk kept.
    pub fn prefill_until(&mut self, model: &Llama, max_tokens: usize, stop: &dyn Fn() -> bool) -> Result<usize> {
        let start = self.kv.len();
        let end = self.tokens.len().min(start + max_tokens.max(1));
        if start == end {
            return Ok(0);
        }
        let want = if end == self.tokens.len() { Logits::Last } else { Logits::None };
        let logits =
            model.forward_until(&self.tokens[start..end], &self.anchors[start..end], &mut self.kv, want, stop)?;
        if want == Logits::Last {
            self.last_logits = Some((end, logits));
        }
        self.kv.compact(false);
        Ok(end - start)
    }

    /// Next-token logits after the whole text, running whatever is pending
    /// (in chunks of `chunk` tokens; `cancelled` is checked between chunks and
    /// makes this return `Ok(None)`).
    pub fn logits(&mut self, model: &Llama, chunk: usize, cancelled: &dyn Fn() -> bool) -> Result<Option<Vec<f32>>> {
        if self.tokens.is_empty() {
            anyhow::bail!("cannot predict after an empty prompt");
        }
        if self.pending() == 0 && !matches!(self.last_logits, Some((n, _)) if n == self.tokens.len()) {
            // Processed, but the logits were not kept: recompute the last token.
            let keep = self.kv.reusable_prefix(self.tokens.len() - 1);
            self.kv.truncate(keep);
        }
        while self.pending() > 0 {
            if cancelled() {
                return Ok(None);
            }
            self.prefill(model, chunk)?;
        }
        Ok(self.last_logits.as_ref().map(|(_, l)| l.clone()))
    }

    /// Evict every K/V entry no later token can attend to (for measuring).
    pub fn compact(&mut self) {
        self.kv.compact(true);
    }

    /// The document is idle: give back what its policy no longer keeps, when
    /// that is worth a copy ([`KvCache::compact_idle`]).
    pub fn settle(&mut self) {
        self.kv.compact_idle();
    }

    /// Mutable access to the KV cache for the generator's scratch extension.
    pub(crate) fn kv_mut(&mut self) -> &mut KvCache {
        &mut self.kv
    }

    /// Keep the first `changed_at` tokens' K/V (or fewer, if recomputing from
    /// there needs evicted entries).
    fn keep_prefix(&mut self, changed_at: usize, retokenized: usize) -> Update {
        let keep = self.kv.reusable_prefix(changed_at.min(self.kv.len()));
        self.kv.truncate(keep);
        if matches!(self.last_logits, Some((n, _)) if n > keep) {
            self.last_logits = None;
        }
        Update { tokens: self.tokens.len(), reused: keep, retokenized }
    }

    fn retokenize_all(&mut self, tok: &Tokenizer, text: &str) -> Result<Update> {
        let body = tok.encode(text)?;
        let n = body.len();
        let tokens: Vec<u32> = self.tokens[..self.lead].iter().copied().chain(body).collect();
        let changed_at = tokens.iter().zip(&self.tokens).take_while(|(a, b)| a == b).count();
        self.ends = byte_ends(tok, &tokens[self.lead..], text.as_bytes(), 0).map(|e| {
            let mut all = vec![0; self.lead];
            all.extend(e);
            all
        });
        self.anchors = tokens.iter().map(|&t| is_anchor(tok, t)).collect();
        self.tokens = tokens;
        self.text = text.to_string();
        Ok(self.keep_prefix(changed_at, n))
    }

    /// Tokenize `text[b..]`; `None` if the tokenizer does not spell it byte for
    /// byte (then the caller re-tokenizes everything).
    #[allow(clippy::type_complexity)]
    fn tokenize_from(&self, tok: &Tokenizer, text: &str, b: usize) -> Result<Option<(Vec<u32>, Vec<usize>)>> {
        if self.ends.is_none() {
            return Ok(None);
        }
        let tail = tok.encode(&text[b..])?;
        Ok(byte_ends(tok, &tail, &text.as_bytes()[b..], b).map(|ends| (tail, ends)))
    }

    /// A byte offset `b` (with its token index) at least one line before byte
    /// `e` from which re-tokenizing gives the same tokens as tokenizing the
    /// whole text: a token start where a non-blank character is followed by a
    /// space or tab. Every regex pre-tokenizer of the Llama family (GPT-2,
    /// SmolLM, Llama 3, Qwen2) and SentencePiece split there, and the split
    /// depends only on the bytes up to it, which the edit did not touch.
    fn safe_point(&self, e: usize) -> (usize, usize) {
        let Some(ends) = &self.ends else { return (0, self.lead) };
        let limit = line_start(&self.text, line_start(&self.text, e).saturating_sub(1));
        let bytes = self.text.as_bytes();
        // Token i starts at ends[i - 1]; find the last start at or before `limit`.
        let last = ends.partition_point(|&x| x <= limit);
        for i in (1..=last).rev().take(MAX_SAFE_POINT_SCAN) {
            let p = ends[i - 1];
            if p < e && p > 0 && !bytes[p - 1].is_ascii_whitespace() && matches!(bytes[p], b' ' | b'\t') {
                return (p, i);
            }
        }
        (0, self.lead)
    }
}

/// Whether token `t` ends a line.
pub fn is_anchor(tok: &Tokenizer, t: u32) -> bool {
    tok.token_bytes(t).contains(&b'\n')
}

/// Byte end of each token (offset by `base`), if the tokens spell `text`
/// exactly.
fn byte_ends(tok: &Tokenizer, tokens: &[u32], text: &[u8], base: usize) -> Option<Vec<usize>> {
    let mut ends = Vec::with_capacity(tokens.len());
    let mut at = 0;
    for &t in tokens {
        let b = tok.token_bytes(t);
        if text.get(at..at + b.len())? != b {
            return None;
        }
        at += b.len();
        ends.push(base + at);
    }
    (at == text.len()).then_some(ends)
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Start of the line that contains byte `at` (clamped to the text).
pub fn line_start(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::generate::{generate, GenerateParams};
    use crate::engine::kv_cache::KvPrecision;
    use crate::engine::llama::tests::tiny_config;
    use crate::engine::llama::Interrupted;
    use crate::engine::policy::PolicyKind;
    use std::cell::Cell;

    /// GPT-2's byte → printable-char map used by byte-level BPE vocabularies.
    fn byte_char(b: u8) -> char {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        if printable {
            return b as char;
        }
        let rank = (0..b).filter(|&x| !((33..=126).contains(&x) || (161..=172).contains(&x) || x >= 174)).count();
        char::from_u32(256 + rank as u32).unwrap()
    }

    /// A small byte-level BPE (SmolLM-style pre-tokenizer) with merges that make
    /// multi-byte tokens, newline+indent anchors and merged words.
    pub(crate) fn test_tokenizer() -> Tokenizer {
        test_tokenizer_with_specials(&[])
    }

    /// [`test_tokenizer`] with more special tokens at the end of the vocabulary
    /// (e.g. FIM markers).
    pub(crate) fn test_tokenizer_with_specials(specials: &[&str]) -> Tokenizer {
        let s = |t: &str| t.bytes().map(byte_char).collect::<String>();
        let mut vocab: Vec<String> = vec!["<|endoftext|>".into()];
        vocab.extend((0..=255u8).map(|b| byte_char(b).to_string()));
        let pairs = [
            ("  ", " "),
            ("   ", " "),
            ("\n", " "),
            ("\n ", " "),
            ("\n  ", " "),
            ("\n   ", " "),
            ("d", "e"),
            ("de", "f"),
            (" ", "x"),
            ("r", "e"),
            ("re", "t"),
            ("ret", "urn"),
            ("u", "r"),
            ("ur", "n"),
            ("f", "o"),
            ("fo", "o"),
            (")", ":"),
            ("\n", "\n"),
            ("\r", "\n"),
            (" ", "="),
            ("i", "f"),
            (" ", "foo"),
            ("é", "é"),
        ];
        let mut merges = Vec::new();
        for (a, b) in pairs {
            let (a, b) = (s(a), s(b));
            for part in [&a, &b] {
                if !vocab.contains(part) {
                    vocab.push(part.clone());
                }
            }
            merges.push(format!("{a} {b}"));
            vocab.push(format!("{a}{b}"));
        }
        let mut added = vec![serde_json::json!({"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})];
        for sp in specials {
            added.push(serde_json::json!({"id": vocab.len(), "content": sp, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
            vocab.push(sp.to_string());
        }
        let vocab_json: serde_json::Map<String, serde_json::Value> =
            vocab.iter().enumerate().map(|(i, t)| (t.clone(), (i as u64).into())).collect();
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "vocab": vocab_json, "merges": merges},
        });
        // One directory per call: tests run in parallel threads, and two of them writing the
        // same file while a third reads it once made a reader see an empty file.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("anchorcoder-test-tok-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let tokenizer = Tokenizer::from_file(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        tokenizer
    }

    /// xorshift64*: a small deterministic generator for the property tests.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1)
        }
        pub(crate) fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
        }
    }

    const PIECES: &[&str] = &[
        "def ", "foo", "(x)", ":", "\n", "\n    ", "    ", " ", "x", "return", " = ", "1", "42", "é", "😀", "\r\n",
        "\t", "if ", "# note", "\n\n", "日本", "  ", "ret", ")", "\"s\"",
    ];

    fn random_text(rng: &mut Rng, pieces: usize) -> String {
        (0..pieces).map(|_| PIECES[rng.below(PIECES.len())]).collect()
    }

    fn char_boundary(s: &str, rng: &mut Rng) -> usize {
        let b: Vec<usize> = s.char_indices().map(|(i, _)| i).chain([s.len()]).collect();
        b[rng.below(b.len())]
    }

    fn random_edit(text: &mut String, rng: &mut Rng) {
        let a = char_boundary(text, rng);
        let b = char_boundary(text, rng);
        let (a, b) = (a.min(b), a.max(b));
        let insert = if rng.below(3) == 0 {
            String::new()
        } else {
            let n = 1 + rng.below(4);
            random_text(rng, n)
        };
        match rng.below(3) {
            0 => text.insert_str(a, &insert),       // insertion
            1 => text.replace_range(a..b, ""),      // deletion
            _ => text.replace_range(a..b, &insert), // replacement
        }
    }

    fn policies() -> Vec<AttentionPolicy> {
        vec![
            AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 2 }, sink_tokens: 2 },
            AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 0 }, sink_tokens: 1 },
            AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 2, dense_every: 0 }, sink_tokens: 2 },
            AttentionPolicy::full(),
            AttentionPolicy { kind: PolicyKind::Window { window_tokens: 13 }, sink_tokens: 2 },
        ]
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The property the engine rests on: after any random edits and any
    /// prefill chunking, the incremental cache's next-token logits equal those
    /// of one from-scratch pass over the final text with the same policy.
    #[test]
    fn incremental_cache_equals_from_scratch_after_random_edits() {
        incremental_equals_from_scratch(KvPrecision::F32, 1e-4);
    }

    /// With K/V stored as f16, chunking changes which f32 values get rounded
    /// (a different summation order can cross a rounding boundary): the
    /// bound is 2⁻¹¹-relative rounding carried through the layers, measured
    /// at ~2e-4 on this model.
    #[test]
    fn incremental_f16_cache_stays_near_from_scratch_after_random_edits() {
        incremental_equals_from_scratch(KvPrecision::F16, 2e-3);
    }

    /// With K/V stored as q8, a different summation order can move a value
    /// across a rounding step of 1/254 of its row's largest magnitude
    /// (measured below 1e-3 on this model, as f16's).
    #[test]
    fn incremental_q8_cache_stays_near_from_scratch_after_random_edits() {
        incremental_equals_from_scratch(KvPrecision::Q8, 2e-3);
    }

    fn incremental_equals_from_scratch(precision: KvPrecision, bound: f32) {
        let tok = test_tokenizer();
        let mut model = Llama::random(tiny_config(tok.vocab_size()), 11).unwrap();
        model.set_kv_precision(precision);
        let (mut full_recomputes, mut local_updates, mut interrupted) = (0, 0, 0);
        for seed in 0..60u64 {
            let mut rng = Rng::new(seed);
            let policy = policies()[seed as usize % 5];
            let mut doc = DocumentCache::new(&model, policy);
            doc.set_eviction_slack(rng.below(3) as u32);
            // Some documents start with lead tokens: a BOS and a FIM marker, or a
            // project context longer than the policy's sinks (they become sinks).
            let lead: Vec<u32> = match seed % 3 {
                0 => vec![0, 7],
                1 if seed % 2 == 1 => (0..24).map(|i| 20 + (i * 7) % 40).collect(),
                _ => vec![],
            };
            doc.set_lead(&tok, &lead);
            let expect = |text: &str| -> Vec<u32> { lead.iter().copied().chain(tok.encode(text).unwrap()).collect() };
            let n = 20 + rng.below(40);
            let mut text = random_text(&mut rng, n);
            for _ in 0..8 {
                let before = doc.kv().len();
                let upd = doc.set_text(&tok, &text).unwrap();
                assert_eq!(doc.tokens(), expect(&text).as_slice(), "seed {seed}: tokens");
                assert_eq!(doc.text(), text);
                if before > 0 {
                    if upd.reused == 0 {
                        full_recomputes += 1
                    } else {
                        local_updates += 1
                    }
                }
                // Random chunking: sometimes nothing, sometimes a bit, sometimes
                // a pass interrupted after a few layers, sometimes all.
                match rng.below(4) {
                    0 => {}
                    1 => {
                        doc.prefill(&model, 1 + rng.below(9)).unwrap();
                    }
                    2 => {
                        let (before, pending) = (doc.kv().len(), doc.pending());
                        let (polls, layers) = (Cell::new(0), rng.below(model.config().n_layers));
                        let stop = || {
                            polls.set(polls.get() + 1);
                            polls.get() > layers
                        };
                        match doc.prefill_until(&model, 1 + rng.below(30), &stop) {
                            Err(e) => assert!(e.is::<Interrupted>() && pending > 0, "seed {seed}: {e:#}"),
                            Ok(ran) => assert_eq!((ran, pending), (0, 0), "seed {seed}: only nothing to run runs"),
                        }
                        assert_eq!((doc.kv().len(), doc.pending()), (before, pending), "seed {seed}: nothing kept");
                        interrupted += usize::from(pending > 0);
                    }
                    _ => while doc.prefill(&model, 1 + rng.below(30)).unwrap() > 0 {},
                }
                random_edit(&mut text, &mut rng);
                if text.is_empty() {
                    text.push('x');
                }
            }
            doc.set_text(&tok, &text).unwrap();
            let got = doc.logits(&model, 1 + rng.below(20), &|| false).unwrap().unwrap();
            let tokens = expect(&text);
            let anchors: Vec<bool> = tokens.iter().map(|&t| is_anchor(&tok, t)).collect();
            // The reference attends as the cache does: its lead tokens are sinks.
            let mut effective = policy;
            effective.sink_tokens = policy.sink_tokens.max(lead.len() as u32);
            assert_eq!(doc.policy(), effective);
            let mut fresh = model.new_cache(effective);
            let want = model.forward(&tokens, &anchors, &mut fresh, Logits::Last).unwrap();
            assert!(max_diff(&got, &want) < bound, "seed {seed} {policy:?}: {}", max_diff(&got, &want));
        }
        // Both update paths were exercised.
        assert!(full_recomputes > 0 && local_updates > 0, "{full_recomputes} {local_updates}");
        assert!(interrupted > 0, "and interrupted passes");
    }

    #[test]
    fn changing_the_lead_starts_over_and_keeping_it_keeps_the_cache() {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), 3).unwrap();
        let mut doc = DocumentCache::new(&model, AttentionPolicy::full());
        doc.set_lead(&tok, &[0]);
        doc.set_text(&tok, "def foo(x):\n    return x\n").unwrap();
        doc.prefill(&model, 1000).unwrap();
        let n = doc.kv().len();
        assert_eq!(doc.lead(), &[0]);
        doc.set_lead(&tok, &[0]);
        assert_eq!(doc.kv().len(), n, "the same lead keeps everything");
        let upd = doc.set_text(&tok, "def foo(x):\n    return x\nif").unwrap();
        assert!(upd.reused >= n - 3 && upd.reused > 1, "{upd:?}");
        doc.set_lead(&tok, &[0, 5]);
        assert_eq!((doc.kv().len(), doc.text()), (0, ""), "a new lead starts over");
        assert_eq!(doc.tokens(), &[0, 5]);
        // Only lead tokens: the model can still predict after them.
        assert!(doc.logits(&model, 8, &|| false).unwrap().is_some());
    }

    /// A window that moves (new text from its first token) keeps a lead of
    /// project context however much of the old window was evicted: the lead
    /// is sinks, and nothing after them is needed to recompute from there.
    #[test]
    fn a_moved_window_keeps_the_context_lead_after_eviction() {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), 13).unwrap();
        let lead: Vec<u32> = (0..24).map(|i| 20 + (i * 7) % 40).collect();
        let cases = [
            AttentionPolicy { kind: PolicyKind::Window { window_tokens: 13 }, sink_tokens: 2 },
            AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 0, dense_every: 0 }, sink_tokens: 1 },
        ];
        for (i, policy) in cases.into_iter().enumerate() {
            let mut rng = Rng::new(40 + i as u64);
            let mut doc = DocumentCache::new(&model, policy);
            doc.set_lead(&tok, &lead);
            doc.set_text(&tok, &random_text(&mut rng, 80)).unwrap();
            while doc.prefill(&model, 16).unwrap() > 0 {}
            doc.compact();
            let layers = model.config().n_layers;
            assert!(doc.kv().stats().kept_entries < doc.kv().len() * layers, "{policy:?}: something was evicted");
            let moved = format!("x{}", random_text(&mut rng, 60));
            let upd = doc.set_text(&tok, &moved).unwrap();
            assert_eq!(upd.reused, lead.len(), "{policy:?}: the lead is kept");
            let got = doc.logits(&model, 7, &|| false).unwrap().unwrap();
            let tokens: Vec<u32> = lead.iter().copied().chain(tok.encode(moved.as_str()).unwrap()).collect();
            let anchors: Vec<bool> = tokens.iter().map(|&t| is_anchor(&tok, t)).collect();
            let mut fresh = model.new_cache(doc.policy());
            let want = model.forward(&tokens, &anchors, &mut fresh, Logits::Last).unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "{policy:?}: {}", max_diff(&got, &want));
        }
    }

    #[test]
    fn an_empty_document_generates_nothing_or_from_the_extra_prompt() {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), 5).unwrap();
        let mut doc = DocumentCache::new(&model, policies()[0]);
        doc.set_text(&tok, "").unwrap();
        let mut run = |extra: &[u32]| {
            let mut stop = |_: &str| false;
            let params = GenerateParams {
                max_tokens: 3,
                forced_prefix: b"",
                extra_prompt: extra,
                chunk: 8,
                stop: &mut stop,
                cancelled: &|| false,
            };
            generate(&model, &tok, &mut doc, params).unwrap()
        };
        // The start of a document: nothing to continue, and no error.
        let g = run(&[]);
        assert!(g.stop == crate::engine::generate::StopReason::EmptyPrompt && g.text.is_empty() && g.tokens == 0);
        // With an extra prompt (a fill-in-the-middle tail) it generates from that.
        let extra = tok.encode("def f").unwrap();
        let g = run(&extra);
        assert_eq!(g.tokens, 3);
        assert_eq!(doc.kv().len(), 0, "the scratch extension is dropped");
    }

    #[test]
    fn a_generation_cancelled_while_recomputing_the_last_token_reports_nothing_prefilled() {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), 5).unwrap();
        let mut doc = DocumentCache::new(&model, policies()[0]);
        doc.set_text(&tok, "def foo(x):\n    return x\n").unwrap();
        doc.logits(&model, 8, &|| false).unwrap().unwrap();
        // A shorter text that the cache already holds: nothing is pending, but
        // the logits after its last token were not kept and must be recomputed.
        doc.set_text(&tok, "def foo(x):\n    return x").unwrap();
        assert_eq!(doc.pending(), 0);
        let mut stop = |_: &str| false;
        let params = GenerateParams {
            max_tokens: 3,
            forced_prefix: b"",
            extra_prompt: &[],
            chunk: 8,
            stop: &mut stop,
            cancelled: &|| true,
        };
        let g = generate(&model, &tok, &mut doc, params).unwrap();
        assert!(g.stop == crate::engine::generate::StopReason::Cancelled);
        assert_eq!(g.prefilled, 0);
    }

    #[test]
    fn generation_leaves_the_document_cache_as_it_was() {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), 5).unwrap();
        let policy = policies()[0];
        let mut doc = DocumentCache::new(&model, policy);
        doc.set_text(&tok, "def foo(x):\n    return x\n\ndef ").unwrap();
        let before = doc.logits(&model, 8, &|| false).unwrap().unwrap();
        // Spare capacity may grow in the scratch extension; live figures may not.
        let live = |d: &DocumentCache| {
            let mut s = d.stats();
            s.kv.allocated_bytes = 0;
            s
        };
        let stats = live(&doc);
        let mut stop = |_: &str| false;
        let g = generate(
            &model,
            &tok,
            &mut doc,
            GenerateParams {
                max_tokens: 12,
                forced_prefix: b"",
                extra_prompt: &[],
                chunk: 8,
                stop: &mut stop,
                cancelled: &|| false,
            },
        )
        .unwrap();
        assert_eq!(g.tokens, 12);
        assert_eq!(live(&doc), stats);
        let after = doc.logits(&model, 8, &|| false).unwrap().unwrap();
        assert_eq!(before, after);
        // Healing: the output must start with the forced bytes, which are stripped.
        let mut stop = |_: &str| false;
        let g = generate(
            &model,
            &tok,
            &mut doc,
            GenerateParams {
                max_tokens: 6,
                forced_prefix: b"fo",
                extra_prompt: &[],
                chunk: 8,
                stop: &mut stop,
                cancelled: &|| false,
            },
        )
        .unwrap();
        assert!(g.stop == crate::engine::generate::StopReason::MaxTokens);
        let mut again = |_: &str| false;
        let plain = generate(
            &model,
            &tok,
            &mut doc,
            GenerateParams {
                max_tokens: 0,
                forced_prefix: b"",
                extra_prompt: &[],
                chunk: 8,
                stop: &mut again,
                cancelled: &|| false,
            },
        )
        .unwrap();
        assert_eq!(plain.tokens, 0);
        assert_eq!(live(&doc), stats);
        let _ = g;
    }
}
