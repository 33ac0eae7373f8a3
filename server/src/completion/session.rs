//! The one completion pipeline: a document's [`Session`] takes a cursor
//! through plan → prompt → re-plan by token density → typing-through →
//! generation → the suggestion rules, whoever generates. A [`Generator`] is
//! the only part that differs: [`Local`] (the engine and a document cache)
//! or a remote engine (`backend::route`). The server's worker, its remote
//! route, `anchorcoder complete`, `anchorcoder eval` and `anchorcoder bench`
//! all run [`Session::complete`], so the tools measure what editors get.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use anyhow::Result;
use ropey::Rope;

use super::{
    fim_tail, finish, only_indentation, plan, set_prompt, should_stop, FreshLine, Prompt, Settings, Suggestion,
};
use super::{BYTES_PER_TOKEN, SUFFIX_BYTES_PER_TOKEN};
use crate::engine::document::DocumentCache;
use crate::engine::generate::{generate_with, Constraints, GenerateParams, StopReason};
use crate::engine::Engine;

/// Prompt windows the region reaches back (in bytes at [`BYTES_PER_TOKEN`]):
/// room for a kept window start to stay inside it while typing, and for the
/// token-density re-plan.
const REGION_WINDOWS_BACK: usize = 3;
/// Bytes the region reaches past the cursor at least: the rest of the line and
/// what follows, which the suggestion rules compare against.
pub const REGION_AFTER_MIN_BYTES: usize = 8192;

/// The bounded region of the document around `cursor` that prompts are cut
/// from, as text and its byte offset. Never the whole of a huge file.
pub fn region(rope: &Rope, cursor: usize, s: &Settings) -> (String, usize) {
    let back = s.prefix_tokens * BYTES_PER_TOKEN * REGION_WINDOWS_BACK;
    let lo_line = rope.byte_to_line(cursor.saturating_sub(back));
    let lo = rope.line_to_byte(lo_line);
    // The suffix budget past the cursor, snapped back to the start of the
    // character it may split (`byte_slice` panics off a character boundary).
    let after = REGION_AFTER_MIN_BYTES.max(s.suffix_tokens * SUFFIX_BYTES_PER_TOKEN);
    let hi = rope.char_to_byte(rope.byte_to_char((cursor + after).min(rope.len_bytes())));
    (rope.byte_slice(lo..hi).to_string(), lo)
}

/// The prompt set up by [`Generator::set_prompt`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Tokens the prompt spans, lead tokens included; `None` when the
    /// generator cannot count them (no re-plan by density then).
    pub tokens: Option<usize>,
    /// Tokens whose cached K/V were reused.
    pub reused: usize,
}

/// What to generate: the region prompts are cut from, the cursor in it, and
/// the plan (window, healing, single- or multi-line).
pub struct Request<'a> {
    /// The region of the document ([`region`]).
    pub region: &'a str,
    /// The cursor, as a byte offset into `region`.
    pub cursor: usize,
    /// The final plan.
    pub prompt: &'a Prompt,
    /// The completion's knobs.
    pub settings: &'a Settings,
}

impl Request<'_> {
    /// The text after the cursor.
    pub fn following(&self) -> &str {
        &self.region[self.cursor..]
    }
}

/// What a generator wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Raw {
    /// The text after the cursor (healed bytes already spelled and stripped),
    /// before the suggestion rules.
    pub text: String,
    /// Why generation ended, when the generator knows.
    pub stop: Option<StopReason>,
    /// Tokens generated (0 when unknown).
    pub tokens: usize,
    /// Prompt tokens that had to be run first.
    pub prefilled: usize,
    /// Time spent running the prompt.
    pub prefill_time: std::time::Duration,
    /// Time spent decoding.
    pub decode_time: std::time::Duration,
}

/// Generation, the one part of the pipeline that differs between the local
/// model and a remote engine.
pub trait Generator {
    /// Why it failed.
    type Error;

    /// Put the prompt `window` (the text from the window start to the cut)
    /// in place; called again when the plan changes.
    fn set_prompt(&mut self, window: &str, s: &Settings) -> Result<Prepared, Self::Error>;

    /// Generate after the prompt of `req`. `stop` sees the text after the
    /// cursor so far (healed bytes stripped) and ends generation by returning
    /// `true`. A local generator is done when this returns (its future is
    /// ready at once); a remote one streams.
    fn generate(
        &mut self,
        req: &Request<'_>,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> impl Future<Output = Result<Raw, Self::Error>> + Send;
}

/// What was last shown for a document, for typing through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    /// Text from the window start to the cursor.
    pub before: String,
    /// The rest of the cursor's line after it.
    pub line_suffix: String,
    /// The suggestion shown.
    pub suggestion: String,
}

/// One document's completion state: where its prompt window starts (kept
/// while the user types, so caches keep matching) and what was last shown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Absolute byte offset of the last prompt window's start.
    window_start: Option<usize>,
    /// The last suggestion shown.
    shown: Option<Shown>,
}

impl Session {
    /// Where the last prompt window started (a byte offset in the document).
    pub fn window_start(&self) -> Option<usize> {
        self.window_start
    }

    /// Take `other`'s window start (its cache was filled for that window),
    /// keeping what this session showed.
    pub fn adopt_window(&mut self, other: &Session) {
        self.window_start = other.window_start;
    }

    /// Plan the prompt for `cursor` in `region` (at byte `lo` of the
    /// document) and put it in place. Windows are sized in bytes; text far
    /// denser in tokens than code (digits are one token each) is planned
    /// again with the byte budget its own density gives, so that a prompt
    /// stays near `prefix_tokens`: a new window may reach 1.25× of it, a kept
    /// one 2× (it grows while the user types). Returns the final plan and the
    /// tokens reused.
    pub fn prepare<G: Generator>(
        &mut self,
        gen: &mut G,
        region: &str,
        lo: usize,
        cursor: usize,
        s: &Settings,
    ) -> Result<(Prompt, usize), G::Error> {
        let previous = self.window_start.and_then(|p| p.checked_sub(lo));
        let mut prompt = plan(region, cursor, previous, s);
        let mut prepared = gen.set_prompt(&region[prompt.window_start..prompt.cut], s)?;
        let p = s.prefix_tokens;
        let cap = if previous == Some(prompt.window_start) { 2 * p } else { p + p / 4 };
        if let Some(tokens) = prepared.tokens.filter(|&t| t > cap) {
            let bytes = prompt.cut - prompt.window_start;
            let scaled = p * bytes / (tokens * BYTES_PER_TOKEN);
            let denser = Settings { prefix_tokens: scaled.max(1), ..s.clone() };
            prompt = plan(region, cursor, None, &denser);
            prepared = gen.set_prompt(&region[prompt.window_start..prompt.cut], s)?;
        }
        self.window_start = Some(lo + prompt.window_start);
        Ok((prompt, prepared.reused))
    }

    /// The suggestion at byte `cursor` of `rope`: the rest of the one shown
    /// when the user typed its beginning, else what `gen` writes, through the
    /// suggestion rules. A cancelled local generation gives an empty text
    /// with `stop` `Cancelled` and leaves what was shown as it was.
    pub async fn complete<G: Generator>(
        &mut self,
        gen: &mut G,
        rope: &Rope,
        cursor: usize,
        s: &Settings,
    ) -> Result<Suggestion, G::Error> {
        let cursor = cursor.min(rope.len_bytes());
        let (region, lo) = region(rope, cursor, s);
        let at = cursor - lo;
        let (prompt, reused) = self.prepare(gen, &region, lo, at, s)?;
        let before = &region[prompt.window_start..at];
        let mut done = Suggestion {
            text: String::new(),
            stop: None,
            typed_through: false,
            single_line: prompt.single_line,
            tokens: 0,
            prefilled: 0,
            reused,
            prefill_time: Default::default(),
            decode_time: Default::default(),
        };
        if let Some(rest) = self.shown.as_ref().and_then(|shown| type_through(shown, before, &prompt.line_suffix)) {
            return Ok(Suggestion { text: rest, typed_through: true, ..done });
        }
        let req = Request { region: &region, cursor: at, prompt: &prompt, settings: s };
        let mut stop = |t: &str| should_stop(t, &prompt, s);
        let raw = gen.generate(&req, &mut stop).await?;
        done = Suggestion {
            stop: raw.stop,
            tokens: raw.tokens,
            prefilled: raw.prefilled,
            prefill_time: raw.prefill_time,
            decode_time: raw.decode_time,
            ..done
        };
        if raw.stop == Some(StopReason::Cancelled) {
            return Ok(done);
        }
        let text = finish(&raw.text, &prompt, req.following(), s);
        self.shown = (!text.is_empty()).then(|| Shown {
            before: before.to_string(),
            line_suffix: prompt.line_suffix.clone(),
            suggestion: text.clone(),
        });
        Ok(Suggestion { text, ..done })
    }

    /// [`Session::complete`] with the local model over `doc`, on this thread.
    pub fn complete_local(
        &mut self,
        engine: &Engine,
        doc: &mut DocumentCache,
        rope: &Rope,
        cursor: usize,
        s: &Settings,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Suggestion> {
        let mut gen = Local { engine, doc, cancelled };
        run_ready(self.complete(&mut gen, rope, cursor, s))
    }

    /// [`Session::prepare`] with the local model over `doc` (warm-up),
    /// planned from `rope` as [`Session::complete_local`] would be.
    pub fn prepare_local(
        &mut self,
        engine: &Engine,
        doc: &mut DocumentCache,
        rope: &Rope,
        cursor: usize,
        s: &Settings,
    ) -> Result<(Prompt, usize)> {
        let cursor = cursor.min(rope.len_bytes());
        let (region, lo) = region(rope, cursor, s);
        self.prepare(&mut Local { engine, doc, cancelled: &|| false }, &region, lo, cursor - lo, s)
    }
}

/// The rest of the shown suggestion when the user typed its beginning.
pub fn type_through(shown: &Shown, before: &str, line_suffix: &str) -> Option<String> {
    let typed = before.strip_prefix(shown.before.as_str())?;
    if typed.is_empty() || line_suffix != shown.line_suffix {
        return None;
    }
    let rest = shown.suggestion.strip_prefix(typed)?;
    (!rest.trim().is_empty()).then(|| rest.to_string())
}

/// The local model as a [`Generator`]: the prompt goes into `doc` (what is
/// unchanged stays cached), generation runs in a scratch extension of it on
/// the calling thread, polling `cancelled` between tokens.
pub struct Local<'a> {
    /// The model and tokenizer.
    pub engine: &'a Engine,
    /// The document's cache.
    pub doc: &'a mut DocumentCache,
    /// Polled between steps; `true` cancels.
    pub cancelled: &'a dyn Fn() -> bool,
}

impl Local<'_> {
    fn run(&mut self, req: &Request<'_>, stop: &mut (dyn FnMut(&str) -> bool + Send)) -> Result<Raw> {
        let (engine, s, prompt) = (self.engine, req.settings, req.prompt);
        let tail = fim_tail(engine, req.following(), s)?;
        let code_first = prompt.fresh_line && s.fresh_line == FreshLine::Constrain;
        // On a fresh line, a run of spaces past the typed indentation leads
        // nowhere (the rules drop extra indentation): stop it early.
        let mut stop = |t: &str| stop(t) || (prompt.fresh_line && only_indentation(t) && t.len() >= MAX_EXTRA_INDENT);
        let first = self.generate(s, prompt.healed.as_bytes(), &tail, code_first, &mut stop)?;
        // Healing cut the typed indentation from the prompt and forces it as
        // the suggestion's start; on a fresh line that sometimes leaves a
        // small model writing nothing but spaces, or copying the lines after
        // the cursor. Then ask once more with that whitespace in the prompt,
        // as the editor has it.
        if !retry_unhealed(prompt, &first, req.following(), s) {
            return Ok(first);
        }
        let mut extra = engine.tokenizer.encode(&prompt.healed)?;
        extra.extend_from_slice(&tail);
        let second = self.generate(s, b"", &extra, code_first, &mut stop)?;
        Ok(Raw {
            tokens: first.tokens + second.tokens,
            prefilled: first.prefilled + second.prefilled,
            prefill_time: first.prefill_time + second.prefill_time,
            decode_time: first.decode_time + second.decode_time,
            ..second
        })
    }

    fn generate(
        &mut self,
        s: &Settings,
        forced_prefix: &[u8],
        extra_prompt: &[u32],
        code_first: bool,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> Result<Raw> {
        let engine = self.engine;
        let g = generate_with(
            &engine.model,
            &engine.tokenizer,
            self.doc,
            GenerateParams {
                max_tokens: s.max_tokens,
                forced_prefix,
                extra_prompt,
                chunk: 256,
                stop,
                cancelled: self.cancelled,
            },
            Constraints { code_first },
        )?;
        Ok(Raw {
            text: g.text,
            stop: Some(g.stop),
            tokens: g.tokens,
            prefilled: g.prefilled,
            prefill_time: g.prefill_time,
            decode_time: g.decode_time,
        })
    }
}

/// Spaces past the typed indentation after which a fresh line's generation
/// stops (no code line starts that much deeper than the editor indented).
const MAX_EXTRA_INDENT: usize = 16;

/// Whether generation that gave `first` under `prompt` should run again
/// with the healed bytes in the prompt: a fresh line whose healed
/// whitespace led to nothing to show (no code at all, or only the lines
/// that already follow the cursor, which a model given the suffix tends to
/// copy).
fn retry_unhealed(prompt: &Prompt, first: &Raw, following: &str, s: &Settings) -> bool {
    prompt.fresh_line
        && !prompt.healed.is_empty()
        && first.stop != Some(StopReason::Cancelled)
        && finish(&first.text, prompt, following, s).is_empty()
}

impl Generator for Local<'_> {
    type Error = anyhow::Error;

    fn set_prompt(&mut self, window: &str, s: &Settings) -> Result<Prepared> {
        let update = set_prompt(self.engine, self.doc, window, s)?;
        Ok(Prepared { tokens: Some(self.doc.tokens().len()), reused: update.reused })
    }

    fn generate(
        &mut self,
        req: &Request<'_>,
        stop: &mut (dyn FnMut(&str) -> bool + Send),
    ) -> impl Future<Output = Result<Raw>> + Send {
        std::future::ready(self.run(req, stop))
    }
}

/// Run a future that never waits (the pipeline over [`Local`], whose
/// generation is done before its future is polled) on this thread.
fn run_ready<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => anyhow::bail!("internal error: a local completion waited on something"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::document::tests::test_tokenizer;
    use crate::engine::llama::tests::tiny_config;
    use crate::engine::llama::Llama;
    use crate::engine::policy::AttentionPolicy;

    /// Only a fresh line whose healed whitespace gave nothing to show asks
    /// again with it in the prompt; a run of spaces stops early.
    #[test]
    fn a_fresh_line_that_gave_only_spaces_is_asked_again_unhealed() {
        let s = Settings::default();
        let text = "def f(x):\n    y = x\n    ";
        let fresh = crate::completion::plan(text, text.len(), None, &s);
        assert!(fresh.fresh_line && fresh.healed == "\n    ", "{fresh:?}");
        let raw = |text: &str, stop| Raw {
            text: text.into(),
            stop: Some(stop),
            tokens: 0,
            prefilled: 0,
            prefill_time: Default::default(),
            decode_time: Default::default(),
        };
        let retry = |p: &Prompt, r: Raw, following: &str| retry_unhealed(p, &r, following, &s);
        assert!(retry(&fresh, raw("                ", StopReason::Rule), ""));
        assert!(retry(&fresh, raw("", StopReason::MaxTokens), ""));
        assert!(!retry(&fresh, raw("  return y", StopReason::Rule), ""));
        assert!(!retry(&fresh, raw("\n    return y", StopReason::Rule), ""));
        assert!(!retry(&fresh, raw("   ", StopReason::Cancelled), ""));
        // Only a copy of the lines that follow the cursor: nothing to show either.
        let following = "\n    return y\n";
        assert!(retry(&fresh, raw("return y", StopReason::Rule), following));
        assert!(!retry(&fresh, raw("y += 1", StopReason::Rule), following));
        let mid = crate::completion::plan("def f(x):\n    ret", 17, None, &s);
        assert!(!mid.fresh_line && !retry(&mid, raw("", StopReason::MaxTokens), ""));
        assert!(only_indentation(" \t  ") && !only_indentation("  \n") && !only_indentation(" x"));
    }

    /// Text far denser in tokens than code is planned again so the prompt
    /// stays near the budget: a new window within 1.25x, a kept one within 2x;
    /// ordinary code keeps its first plan.
    #[test]
    fn prepare_replans_token_dense_text_to_the_budget() {
        let engine = tiny_engine(4);
        let s = Settings { prefix_tokens: 128, ..Settings::default() };
        let policy = AttentionPolicy::full();
        // Digits and punctuation: about one token a byte with the test vocabulary.
        let digits: String = (0..3000).map(|i| format!("{},", i % 97)).collect();
        let mut doc = DocumentCache::new(&engine.model, policy);
        let mut session = Session::default();
        let mut prepare = |doc: &mut DocumentCache, text: &str, s: &Settings| {
            let mut gen = Local { engine: &engine, doc, cancelled: &|| false };
            session.prepare(&mut gen, text, 0, text.len(), s).unwrap().0
        };
        let p = prepare(&mut doc, &digits, &s);
        let first = plan(&digits, digits.len(), None, &s);
        assert!(p.window_start > first.window_start, "re-planned to a shorter window");
        assert!(doc.tokens().len() <= 128 + 128 / 4, "{} tokens", doc.tokens().len());
        // Typing on: the kept window may grow, up to twice the budget.
        let typed = format!("{digits}1,2,3,");
        let q = prepare(&mut doc, &typed, &s);
        assert!(doc.tokens().len() <= 2 * 128, "{} tokens", doc.tokens().len());
        assert!(q.window_start >= p.window_start);
        // Text within the token cap keeps the plain plan.
        let code: String = (0..100).map(|i| format!("def f{i}(x):\n    return x\n")).collect();
        let mut doc = DocumentCache::new(&engine.model, policy);
        let mut session = Session::default();
        let mut gen = Local { engine: &engine, doc: &mut doc, cancelled: &|| false };
        let (c, _) = session.prepare(&mut gen, &code, 0, code.len(), &Settings::default()).unwrap();
        assert_eq!(c, plan(&code, code.len(), None, &Settings::default()));
    }

    fn tiny_engine(seed: u64) -> Engine {
        let tok = test_tokenizer();
        let model = Llama::random(tiny_config(tok.vocab_size()), seed).unwrap();
        Engine { model, tokenizer: tok, path: "test".into(), adapter_policy: None }
    }

    #[test]
    fn regions_end_on_character_boundaries() {
        // Two- and four-byte characters put 8 KiB past the cursor inside one,
        // at every cursor parity.
        for text in [format!("x\n{}", "é".repeat(10_000)), format!("ab\n{}", "😀".repeat(5_000))] {
            let rope = Rope::from_str(&text);
            for cursor in (0..16).filter(|&c| text.is_char_boundary(c)) {
                let (region, lo) = region(&rope, cursor, &Settings::default());
                assert_eq!(lo, 0);
                assert!(text.starts_with(&region) && region.len() > 8192 - 4, "{cursor}: {}", region.len());
                // A suffix budget past 8 KiB widens the region to hold it.
                let wide = Settings { suffix_tokens: 4096, ..Settings::default() };
                let (longer, _) = super::region(&rope, cursor, &wide);
                assert!(text.starts_with(&longer) && longer.len() > 4096 * 4 - 4, "{cursor}: {}", longer.len());
            }
        }
    }

    #[test]
    fn typing_through_returns_the_rest_of_the_suggestion() {
        let shown = Shown { before: "def f(".into(), line_suffix: String::new(), suggestion: "a, b):".into() };
        assert_eq!(type_through(&shown, "def f(a", ""), Some(", b):".into()));
        assert_eq!(type_through(&shown, "def f(a, b", ""), Some("):".into()));
        // Nothing typed, a mismatch, a different line suffix, or nothing left: run the model.
        assert_eq!(type_through(&shown, "def f(", ""), None);
        assert_eq!(type_through(&shown, "def f(x", ""), None);
        assert_eq!(type_through(&shown, "def f(a", ")"), None);
        assert_eq!(type_through(&shown, "def f(a, b):", ""), None);
    }

    /// A generator that cannot count tokens and writes a fixed text, to see
    /// the pipeline's own steps.
    struct Scripted {
        windows: Vec<String>,
        text: &'static str,
        generated: usize,
    }

    impl Generator for Scripted {
        type Error = String;

        fn set_prompt(&mut self, window: &str, _: &Settings) -> Result<Prepared, String> {
            self.windows.push(window.to_string());
            Ok(Prepared { tokens: None, reused: 0 })
        }

        fn generate(
            &mut self,
            _: &Request<'_>,
            stop: &mut (dyn FnMut(&str) -> bool + Send),
        ) -> impl Future<Output = Result<Raw, String>> + Send {
            self.generated += 1;
            // Streamed a byte at a time, as the stop rule sees it.
            let end = (1..=self.text.len()).find(|&i| stop(&self.text[..i])).unwrap_or(self.text.len());
            std::future::ready(Ok(Raw { text: self.text[..end].to_string(), ..Raw::default() }))
        }
    }

    fn block_on<T, E>(f: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("pending"),
        }
    }

    /// Rules, window and typing-through come from the session, whatever
    /// generates: a suggestion ends where the stop rule says, the window start
    /// stays while typing, and typing its beginning answers without generating.
    #[test]
    fn the_session_applies_the_rules_keeps_the_window_and_types_through() {
        let text = "def f(x):\n    return x\n\nprint(f(|))\n";
        let cursor = text.find('|').unwrap();
        let text = text.replace('|', "");
        let mut gen = Scripted { windows: Vec::new(), text: "1, 2))\nmore()", generated: 0 };
        let mut session = Session::default();
        let s = Settings::default();
        let got = block_on(session.complete(&mut gen, &Rope::from_str(&text), cursor, &s)).unwrap();
        // One line (text follows the cursor), without repeating the line's rest.
        assert_eq!((got.text.as_str(), got.typed_through, gen.generated), ("1, 2", false, 1));
        assert_eq!(gen.windows, ["def f(x):\n    return x\n\nprint(f"]);
        let typed = format!("{}1{}", &text[..cursor], &text[cursor..]);
        let got = block_on(session.complete(&mut gen, &Rope::from_str(&typed), cursor + 1, &s)).unwrap();
        assert_eq!((got.text.as_str(), got.typed_through, gen.generated), (", 2", true, 1));
        assert_eq!(session.window_start, Some(0));
    }

    /// The local generator through the session gives what the pipeline's
    /// parts give by hand (plan, set the prompt, generate, the rules).
    #[test]
    fn the_local_session_equals_the_pipeline_by_hand() {
        let engine = tiny_engine(7);
        let text: String = (0..30).map(|i| format!("def f{i}(x):\n    return x + {i}\n")).collect();
        let s = Settings { max_tokens: 12, ..Settings::default() };
        for cursor in [text.len(), text.find("x + 3").unwrap(), text.find("f7").unwrap()] {
            let mut doc = DocumentCache::new(&engine.model, AttentionPolicy::full());
            let mut session = Session::default();
            let got = session.complete_local(&engine, &mut doc, &Rope::from_str(&text), cursor, &s, &|| false).unwrap();
            let p = plan(&text, cursor, None, &s);
            let mut fresh = DocumentCache::new(&engine.model, AttentionPolicy::full());
            set_prompt(&engine, &mut fresh, &text[p.window_start..p.cut], &s).unwrap();
            let mut stop = |t: &str| should_stop(t, &p, &s);
            let params = GenerateParams {
                max_tokens: s.max_tokens,
                forced_prefix: p.healed.as_bytes(),
                extra_prompt: &fim_tail(&engine, &text[cursor..], &s).unwrap(),
                chunk: 256,
                stop: &mut stop,
                cancelled: &|| false,
            };
            let raw =
                generate_with(&engine.model, &engine.tokenizer, &mut fresh, params, Constraints::default()).unwrap();
            let want = finish(&raw.text, &p, &text[cursor..], &s);
            assert_eq!((&got.text, got.tokens, got.stop), (&want, raw.tokens, Some(raw.stop)), "{cursor}");
            assert_eq!(doc.tokens(), fresh.tokens());
        }
    }
}
