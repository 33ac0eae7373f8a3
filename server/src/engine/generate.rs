//! Greedy generation after a document's text, in a scratch extension of its
//! cache that is dropped afterwards.
//!
//! Token healing: when the prompt was cut back over a partial token, the
//! removed bytes are passed as `forced_prefix` and the first generated tokens
//! are constrained to spell them (then they are stripped from the result).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::document::{is_anchor, DocumentCache};
use super::llama::{Llama, Logits};
use super::tokenizer::Tokenizer;

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    EndOfSequence,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The caller's stop rule said so.
    Rule,
    /// The caller cancelled; the text so far is returned.
    Cancelled,
    /// No token can continue the forced prefix.
    NoContinuation,
    /// Nothing to continue: no text before the cursor and no extra prompt
    /// (the start of a document, for a model without a start token).
    EmptyPrompt,
}

/// What to generate.
pub struct GenerateParams<'a> {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Bytes the output must start with (token healing); stripped from the
    /// returned text.
    pub forced_prefix: &'a [u8],
    /// Tokens fed after the document before generating (e.g. a FIM marker).
    pub extra_prompt: &'a [u32],
    /// Prefill chunk size for pending document tokens.
    pub chunk: usize,
    /// Called with the text so far (forced prefix stripped); `true` stops.
    pub stop: &'a mut dyn FnMut(&str) -> bool,
    /// Polled between steps; `true` cancels.
    pub cancelled: &'a dyn Fn() -> bool,
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The generated text (forced prefix stripped; an incomplete trailing
    /// UTF-8 sequence dropped).
    pub text: String,
    /// Tokens generated.
    pub tokens: usize,
    /// Why it ended.
    pub stop: StopReason,
    /// Document tokens that had to be run before generating.
    pub prefilled: usize,
    /// Time spent running pending document tokens.
    pub prefill_time: Duration,
    /// Time spent generating.
    pub decode_time: Duration,
}

/// Generate greedily after `doc`'s text. The document cache is left exactly
/// as before (plus any pending tokens now processed).
pub fn generate(model: &Llama, tok: &Tokenizer, doc: &mut DocumentCache, p: GenerateParams<'_>) -> Result<Generation> {
    let t0 = Instant::now();
    let nothing = |stop, prefilled| Generation {
        text: String::new(),
        tokens: 0,
        stop,
        prefilled,
        prefill_time: t0.elapsed(),
        decode_time: Duration::ZERO,
    };
    let pending = doc.pending();
    let logits = if doc.tokens().is_empty() {
        if p.extra_prompt.is_empty() {
            return Ok(nothing(StopReason::EmptyPrompt, 0));
        }
        // The extra prompt alone gives the first logits.
        Some(Vec::new())
    } else {
        doc.logits(model, p.chunk, p.cancelled)?
    };
    let Some(mut logits) = logits else {
        // `logits` may have re-queued the last token to recompute its logits
        // before it was cancelled: then nothing was prefilled.
        return Ok(nothing(StopReason::Cancelled, pending.saturating_sub(doc.pending())));
    };
    let prefill_time = t0.elapsed();
    let doc_len = doc.kv().len();
    let result = decode(model, tok, doc, &mut logits, p);
    doc.kv_mut().truncate(doc_len);
    let (bytes, tokens, stop) = result?;
    let text = String::from_utf8_lossy(valid_utf8_prefix(&bytes)).into_owned();
    Ok(Generation { text, tokens, stop, prefilled: pending, prefill_time, decode_time: t0.elapsed() - prefill_time })
}

fn decode(
    model: &Llama,
    tok: &Tokenizer,
    doc: &mut DocumentCache,
    logits: &mut Vec<f32>,
    p: GenerateParams<'_>,
) -> Result<(Vec<u8>, usize, StopReason)> {
    let kv = doc.kv_mut();
    if !p.extra_prompt.is_empty() {
        let anchors: Vec<bool> = p.extra_prompt.iter().map(|&t| is_anchor(tok, t)).collect();
        *logits = model.forward(p.extra_prompt, &anchors, kv, Logits::Last)?;
    }
    let forced = p.forced_prefix;
    let mut out: Vec<u8> = Vec::new();
    let mut n = 0;
    let stop = loop {
        if n >= p.max_tokens {
            break StopReason::MaxTokens;
        }
        if (p.cancelled)() {
            break StopReason::Cancelled;
        }
        let pending_force = forced.get(out.len()..).unwrap_or(&[]);
        let Some(next) = pick(tok, logits, pending_force) else { break StopReason::NoContinuation };
        if tok.eos_ids().contains(&next) {
            break StopReason::EndOfSequence;
        }
        out.extend_from_slice(tok.token_bytes(next));
        n += 1;
        if out.len() >= forced.len() {
            let text = String::from_utf8_lossy(valid_utf8_prefix(&out[forced.len()..])).into_owned();
            if (p.stop)(&text) {
                break StopReason::Rule;
            }
        }
        *logits = model.forward(&[next], &[is_anchor(tok, next)], kv, Logits::Last)?;
    };
    let text = out.get(forced.len()..).unwrap_or(&[]).to_vec();
    Ok((text, n, stop))
}

/// The best token; while `force` is not yet spelled out, only tokens that
/// agree with it (it starts with them, or they start with it).
fn pick(tok: &Tokenizer, logits: &[f32], force: &[u8]) -> Option<u32> {
    let ok = |id: usize| {
        if force.is_empty() {
            return true;
        }
        let b = tok.token_bytes(id as u32);
        !b.is_empty() && !tok.is_special(id as u32) && (b.starts_with(force) || force.starts_with(b))
    };
    logits
        .iter()
        .enumerate()
        .filter(|&(id, l)| l.is_finite() && ok(id))
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(id, _)| id as u32)
}

/// The longest prefix of `b` that is valid UTF-8 (drops a cut-off character).
fn valid_utf8_prefix(b: &[u8]) -> &[u8] {
    match std::str::from_utf8(b) {
        Ok(_) => b,
        Err(e) if e.error_len().is_none() => &b[..e.valid_up_to()],
        Err(_) => b,
    }
}
