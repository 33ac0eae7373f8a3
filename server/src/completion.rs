//! From a document and a cursor to a suggestion: the prompt window, token
//! healing, the single-/multi-line rules and the clean-up of what the model
//! wrote. Plain Rust over text; the CLI (`anchorcoder complete`) and the
//! server's worker both call [`complete`].
//!
//! Rules:
//! - The prompt is the text before the cursor, from a line start chosen so the
//!   window holds about `prefix_tokens` tokens. The start stays put while the
//!   user types (so the cached prefix is reused) and only jumps when the window
//!   outgrows twice the budget.
//! - Token healing: the last token of the cursor's line is cut from the prompt
//!   and the model must spell it first.
//! - Fill-in-the-middle, when the model has FIM tokens and `fim` is on: the
//!   cached prompt is `<fim_prefix>` + the text before the cursor, exactly as
//!   without FIM, so typing still only changes its tail. The suffix goes in the
//!   generator's scratch extension (`<fim_suffix>` + up to `suffix_tokens` of
//!   the text after the cursor + `<fim_middle>`), recomputed per request and
//!   dropped after it (PSM order, which every FIM model supports).
//! - Text after the cursor on its line → one line that does not repeat it.
//!   Otherwise up to `max_lines` lines, ending where indentation falls below
//!   the cursor's block, at two blank lines, or at end of sequence.

use std::time::Duration;

use anyhow::Result;

use crate::engine::document::{line_start, DocumentCache, Update};
use crate::engine::generate::{generate, GenerateParams, StopReason};
use crate::engine::Engine;

/// Knobs of one completion (the configuration's `completion` section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Most lines in a multi-line suggestion.
    pub max_lines: usize,
    /// Token budget of the text before the cursor.
    pub prefix_tokens: usize,
    /// Token budget of the text after the cursor (FIM only).
    pub suffix_tokens: usize,
    /// Use fill-in-the-middle when the model has FIM tokens.
    pub fim: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { max_tokens: 64, max_lines: 8, prefix_tokens: 2048, suffix_tokens: 256, fim: true }
    }
}

impl From<&crate::config::CompletionConfig> for Settings {
    fn from(c: &crate::config::CompletionConfig) -> Self {
        Settings {
            max_tokens: c.max_tokens,
            max_lines: c.max_lines,
            prefix_tokens: c.prefix_tokens,
            suffix_tokens: c.suffix_tokens,
            fim: c.fim,
        }
    }
}

/// Bytes per token assumed when sizing a window before tokenizing it (code
/// runs 3–4 bytes a token with these vocabularies; erring low keeps windows
/// inside their budget).
pub const BYTES_PER_TOKEN: usize = 3;

/// Most bytes token healing cuts: more than any token spells.
const MAX_HEAL: usize = 64;

/// Where the prompt of a cursor starts and what it heals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Byte offset where the window starts: a line start, or, when the
    /// cursor's line alone is longer than the budget, a step of half the
    /// budget into that line.
    pub window_start: usize,
    /// Byte offset where the cached prompt text ends (before healed bytes).
    pub cut: usize,
    /// The bytes cut for token healing, which the suggestion must start with.
    pub healed: String,
    /// Whether the suggestion is a single line.
    pub single_line: bool,
    /// Rest of the cursor's line after the cursor.
    pub line_suffix: String,
    /// Indentation (in columns) below which a multi-line suggestion ends.
    pub block_indent: usize,
}

/// The outcome of one completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Suggestion {
    /// Text to insert at the cursor (empty: nothing worth showing).
    pub text: String,
    /// Why generation ended.
    pub stop: StopReason,
    /// Tokens generated.
    pub tokens: usize,
    /// Document tokens that had to be run first (0 when the cache was warm).
    pub prefilled: usize,
    /// Tokens of the prompt whose K/V were reused.
    pub reused: usize,
    /// Time spent prefilling and decoding.
    pub prefill_time: Duration,
    /// Time spent decoding.
    pub decode_time: Duration,
}

/// Plan the prompt for a cursor at byte `cursor` of `text`. `previous_start`
/// is the window start used last time for this document, kept if still good.
pub fn plan(text: &str, cursor: usize, previous_start: Option<usize>, s: &Settings) -> Prompt {
    let cursor = text.floor_char_boundary(cursor);
    let line_begin = line_start(text, cursor);
    let line_end = text[cursor..].find('\n').map_or(text.len(), |i| cursor + i);
    let line_suffix = text[cursor..line_end].trim_end_matches('\r').to_string();
    let before = &text[line_begin..cursor];

    let budget = s.prefix_tokens * BYTES_PER_TOKEN;
    let keep = previous_start.filter(|&p| {
        let line_start = p <= line_begin && (p == 0 || text.as_bytes().get(p - 1) == Some(&b'\n'));
        let in_this_line = p > line_begin && p <= cursor && text.is_char_boundary(p);
        (line_start || in_this_line) && cursor - p <= 2 * budget
    });
    let window_start = keep.unwrap_or_else(|| {
        if cursor <= budget {
            return 0;
        }
        let from = cursor - budget;
        if from < line_begin {
            // The first line start at or after `cursor - budget`.
            let from = text.floor_char_boundary(from);
            return text[from..line_begin].find('\n').map_or(line_begin, |i| from + i + 1);
        }
        // The cursor's line alone is over the budget (minified code, data):
        // start inside it, at a step of half the budget from its start, so the
        // window stays put while typing.
        let step = (budget / 2).max(1);
        text.floor_char_boundary(line_begin + (from - line_begin).div_ceil(step) * step)
    });

    // Healing never reaches before the window (a line of one long word, or
    // of spaces, longer than the budget) nor further back than any token.
    let healable =
        &text[text.floor_char_boundary(window_start.max(line_begin).max(cursor.saturating_sub(MAX_HEAL)))..cursor];
    let healed = heal_split(healable);
    let block_indent = indent_width(before);
    Prompt {
        window_start,
        cut: cursor - healed.len(),
        healed: healed.to_string(),
        single_line: !line_suffix.trim().is_empty(),
        line_suffix,
        block_indent,
    }
}

/// The part of the cursor's line (text before the cursor) that healing cuts:
/// the trailing identifier, run of spaces, or punctuation run.
fn heal_split(before: &str) -> &str {
    let Some(last) = before.chars().last() else { return "" };
    let class = |c: char| {
        if c.is_alphanumeric() || c == '_' {
            0
        } else if c.is_whitespace() {
            1
        } else {
            2
        }
    };
    let k = class(last);
    let start = before.char_indices().rev().take_while(|&(_, c)| class(c) == k).last().map_or(before.len(), |(i, _)| i);
    // An identifier keeps the space before it, as BPE tokens carry it (" foo").
    let start = if k == 0 && start > 0 && before[..start].ends_with(' ') { start - 1 } else { start };
    &before[start..]
}

/// The tokens every prompt of `engine` starts with under `s`: BOS where the
/// model's tokenizer asks for one, then `<fim_prefix>` when FIM is used.
pub fn lead_tokens(engine: &Engine, s: &Settings) -> Vec<u32> {
    let tok = &engine.tokenizer;
    let bos = tok.bos_id().filter(|_| tok.add_bos());
    let fim = tok.fim_ids().filter(|_| s.fim).map(|f| f.prefix);
    bos.into_iter().chain(fim).collect()
}

/// Bring `doc` to the prompt `window` (the text from `prompt.window_start` to
/// `prompt.cut`), after the lead tokens; what is unchanged stays cached.
pub fn set_prompt(engine: &Engine, doc: &mut DocumentCache, window: &str, s: &Settings) -> Result<Update> {
    doc.set_lead(&engine.tokenizer, &lead_tokens(engine, s));
    doc.set_text(&engine.tokenizer, window)
}

/// The scratch tokens after the cached prefix: with FIM, `<fim_suffix>`, the
/// text after the cursor (up to `suffix_tokens`, cut at a line end when it
/// does not fit) and `<fim_middle>`; without, none.
pub fn fim_tail(engine: &Engine, following: &str, s: &Settings) -> Result<Vec<u32>> {
    let Some(f) = engine.tokenizer.fim_ids().filter(|_| s.fim) else { return Ok(Vec::new()) };
    let budget = s.suffix_tokens * 4;
    let mut text = &following[..following.floor_char_boundary(budget)];
    if text.len() < following.len() {
        text = &text[..text.rfind('\n').map_or(text.len(), |i| i + 1)];
    }
    let mut suffix = engine.tokenizer.encode(text)?;
    suffix.truncate(s.suffix_tokens);
    Ok([f.suffix].into_iter().chain(suffix).chain([f.middle]).collect())
}

/// Generate a suggestion for `prompt` over `doc` (brought to the prompt by
/// [`set_prompt`]); `following` is the document text after the cursor.
pub fn complete(
    engine: &Engine,
    doc: &mut DocumentCache,
    prompt: &Prompt,
    following: &str,
    s: &Settings,
    reused: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<Suggestion> {
    let mut stop = |t: &str| should_stop(t, prompt, s);
    let tail = fim_tail(engine, following, s)?;
    let g = generate(
        &engine.model,
        &engine.tokenizer,
        doc,
        GenerateParams {
            max_tokens: s.max_tokens,
            forced_prefix: prompt.healed.as_bytes(),
            extra_prompt: &tail,
            chunk: 256,
            stop: &mut stop,
            cancelled,
        },
    )?;
    let text = if g.stop == StopReason::Cancelled { String::new() } else { finish(&g.text, prompt, following, s) };
    Ok(Suggestion {
        text,
        stop: g.stop,
        tokens: g.tokens,
        prefilled: g.prefilled,
        reused,
        prefill_time: g.prefill_time,
        decode_time: g.decode_time,
    })
}

/// The stop rule while generating: `text` is what follows the cursor so far.
pub fn should_stop(text: &str, p: &Prompt, s: &Settings) -> bool {
    if p.single_line {
        return text.contains('\n');
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let complete_lines = lines.len() - 1;
    complete_lines >= s.max_lines
        || text.contains("\n\n\n")
        || text.contains("\r\n\r\n\r\n")
        || lines[1..complete_lines.max(1)].iter().any(|l| ends_block(l, p))
}

/// Whether a (non-first) line of the suggestion leaves the cursor's block.
fn ends_block(line: &str, p: &Prompt) -> bool {
    let l = line.trim_end_matches('\r');
    !l.trim().is_empty() && indent_width(l) < p.block_indent
}

/// Cut the model's text to what the rules allow and drop what is not worth
/// showing. `following` is the document text after the cursor.
pub fn finish(raw: &str, p: &Prompt, following: &str, s: &Settings) -> String {
    let text = if p.single_line {
        let first = raw.split('\n').next().unwrap_or("").trim_end_matches('\r');
        let suffix = p.line_suffix.trim();
        let trimmed = first.trim_end();
        match trimmed.strip_suffix(suffix) {
            Some(rest) if !suffix.is_empty() => rest.trim_end().to_string(),
            _ => trimmed.to_string(),
        }
    } else {
        let mut kept: Vec<&str> = Vec::new();
        let mut blank_run = 0;
        for (i, line) in raw.split('\n').enumerate() {
            let line = line.trim_end_matches('\r');
            if i >= s.max_lines || (i > 0 && ends_block(line, p)) {
                break;
            }
            blank_run = if line.trim().is_empty() { blank_run + 1 } else { 0 };
            if blank_run >= 2 {
                break;
            }
            kept.push(line);
        }
        let eol = if following.contains("\r\n") { "\r\n" } else { "\n" };
        let joined: Vec<&str> = kept.iter().map(|l| l.trim_end()).collect();
        joined.join(eol).trim_end().to_string()
    };
    if text.trim().is_empty() || repeats_following(&text, p, following) {
        return String::new();
    }
    text
}

/// Whether the suggestion only repeats the lines right after the cursor.
fn repeats_following(text: &str, p: &Prompt, following: &str) -> bool {
    if p.single_line {
        return false;
    }
    let next_lines: Vec<&str> =
        following.split('\n').skip(1).map(|l| l.trim()).filter(|l| !l.is_empty()).take(3).collect();
    let ours: Vec<&str> = text.split('\n').map(|l| l.trim()).filter(|l| !l.is_empty()).collect();
    !ours.is_empty()
        && !next_lines.is_empty()
        && ours.iter().zip(&next_lines).all(|(a, b)| a == b)
        && ours.len() <= next_lines.len()
}

/// Width of the leading whitespace (a tab counts 4).
fn indent_width(line: &str) -> usize {
    line.chars().take_while(|c| *c == ' ' || *c == '\t').map(|c| if c == '\t' { 4 } else { 1 }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::document::is_anchor;
    use crate::engine::document::tests::{test_tokenizer, test_tokenizer_with_specials};
    use crate::engine::llama::tests::tiny_config;
    use crate::engine::llama::{Llama, Logits};
    use crate::engine::policy::{AttentionPolicy, PolicyKind};

    fn engine_with(tok: crate::engine::tokenizer::Tokenizer) -> Engine {
        let model = Llama::random(tiny_config(tok.vocab_size()), 4).unwrap();
        Engine { model, tokenizer: tok, path: "test".into(), adapter_policy: None }
    }

    /// FIM layout: the cache holds `<fim_prefix>` + the text before the
    /// cursor only; `<fim_suffix>` + suffix + `<fim_middle>` run in scratch,
    /// and together they give exactly the logits of the whole PSM prompt.
    #[test]
    fn fim_caches_the_prefix_and_runs_the_suffix_in_scratch() {
        let engine = engine_with(test_tokenizer_with_specials(&["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]));
        let f = engine.tokenizer.fim_ids().expect("FIM tokens found by name");
        let s = Settings::default();
        assert_eq!(lead_tokens(&engine, &s), vec![f.prefix]);

        let text = "def foo(x):\n    if x:\n        return x\n    return 42\n";
        let cursor = text.find("x:").unwrap();
        let p = plan(text, cursor, None, &s);
        let policy = AttentionPolicy { kind: PolicyKind::Anchor { recent_lines: 1, dense_every: 0 }, sink_tokens: 2 };
        let mut doc = DocumentCache::new(&engine.model, policy);
        set_prompt(&engine, &mut doc, &text[p.window_start..p.cut], &s).unwrap();
        assert_eq!(doc.text(), &text[..p.cut]);
        assert_eq!(doc.tokens()[0], f.prefix);

        let tail = fim_tail(&engine, &text[cursor..], &s).unwrap();
        assert_eq!((tail[0], *tail.last().unwrap()), (f.suffix, f.middle));
        assert_eq!(engine.tokenizer.decode(&tail[1..tail.len() - 1]), &text[cursor..]);

        doc.logits(&engine.model, 7, &|| false).unwrap().unwrap();
        let n = doc.kv().len();
        let anchors = |t: &[u32]| t.iter().map(|&t| is_anchor(&engine.tokenizer, t)).collect::<Vec<_>>();
        let got = engine.model.forward(&tail, &anchors(&tail), doc.kv_mut(), Logits::Last).unwrap();
        let all: Vec<u32> = doc.tokens().iter().chain(&tail).copied().collect();
        let mut fresh = engine.model.new_cache(policy);
        let want = engine.model.forward(&all, &anchors(&all), &mut fresh, Logits::Last).unwrap();
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-4, "{diff}");

        doc.kv_mut().truncate(n);

        // A full generation leaves the cache holding the prefix only.
        complete(&engine, &mut doc, &p, &text[cursor..], &s, 0, &|| false).unwrap();
        assert_eq!((doc.kv().len(), doc.text()), (n, &text[..p.cut]));

        // The suffix budget cuts at a line end; `fim: false` means no FIM at all.
        let small = Settings { suffix_tokens: 6, ..s.clone() };
        let cut = fim_tail(&engine, &text[cursor..], &small).unwrap();
        assert!(cut.len() <= 8 && cut.len() < tail.len(), "{cut:?}");
        let off = Settings { fim: false, ..s };
        assert!(lead_tokens(&engine, &off).is_empty() && fim_tail(&engine, "x", &off).unwrap().is_empty());
    }

    #[test]
    fn no_fim_tokens_means_the_plain_prefix_prompt() {
        let engine = engine_with(test_tokenizer());
        let s = Settings::default();
        assert!(lead_tokens(&engine, &s).is_empty());
        assert!(fim_tail(&engine, "rest\n", &s).unwrap().is_empty());
    }

    fn at(text: &str, marker: &str) -> (String, usize) {
        let i = text.find(marker).unwrap();
        (text.replacen(marker, "", 1), i)
    }

    #[test]
    fn healing_cuts_the_partial_token() {
        assert_eq!(heal_split("    return foo"), " foo");
        assert_eq!(heal_split("    "), "    ");
        assert_eq!(heal_split("x = a."), ".");
        assert_eq!(heal_split(""), "");
        let (t, c) = at("def f():\n    ret|\n", "|");
        let p = plan(&t, c, None, &Settings::default());
        // BPE tokens carry the space before a word: "   " + " ret".
        assert_eq!(&t[..p.cut], "def f():\n   ");
        assert_eq!(p.healed, " ret");
        assert!(!p.single_line);
        assert_eq!(p.block_indent, 4);
    }

    #[test]
    fn text_after_the_cursor_means_one_line_without_repeating_it() {
        let (t, c) = at("print(|)\n", "|");
        let p = plan(&t, c, None, &Settings::default());
        assert!(p.single_line);
        assert_eq!(p.line_suffix, ")");
        assert_eq!(finish("x + 1)\nmore", &p, ")\n", &Settings::default()), "x + 1");
        assert!(should_stop("x\n", &p, &Settings::default()));
        assert!(!should_stop("x + 1)", &p, &Settings::default()));
    }

    #[test]
    fn multi_line_stops_at_dedent_blank_pairs_and_max_lines() {
        let (t, c) = at("class A:\n    def f(self):\n        |", "|");
        let p = plan(&t, c, None, &Settings::default());
        assert_eq!(p.block_indent, 8);
        let s = Settings { max_lines: 3, ..Settings::default() };
        let raw = "return 1\n        x = 2\n    def g(self):\n        pass";
        assert_eq!(finish(raw, &p, "", &s), "return 1\n        x = 2");
        assert!(should_stop(raw, &p, &s));
        assert_eq!(finish("a\n\n\nb", &p, "", &s), "a");
        assert_eq!(finish("a\n        b\n        c\n        d", &p, "", &s), "a\n        b\n        c");
        assert_eq!(finish("   \n  ", &p, "", &s), "");
    }

    #[test]
    fn suggestions_that_repeat_the_next_lines_are_dropped() {
        let (t, c) = at("def f():\n    |\n    return 1\n", "|");
        let p = plan(&t, c, None, &Settings::default());
        let following = &t[c..];
        assert_eq!(finish("return 1", &p, following, &Settings::default()), "");
        assert_eq!(finish("x = 2", &p, following, &Settings::default()), "x = 2");
    }

    #[test]
    fn window_start_is_a_line_start_and_stays_while_typing() {
        let s = Settings { prefix_tokens: 10, ..Settings::default() };
        let text: String = (0..40).map(|i| format!("line {i}\n")).collect();
        let p = plan(&text, text.len(), None, &s);
        assert!(p.window_start > 0);
        assert_eq!(text.as_bytes()[p.window_start - 1], b'\n');
        assert!(text.len() - p.window_start <= 30);
        let more = format!("{text}line 40");
        let q = plan(&more, more.len(), Some(p.window_start), &s);
        assert_eq!(q.window_start, p.window_start);
        // Far past twice the budget the window moves on.
        let far: String = format!("{text}{}", "x = 1\n".repeat(20));
        let r = plan(&far, far.len(), Some(p.window_start), &s);
        assert!(r.window_start > p.window_start);
    }

    #[test]
    fn a_line_longer_than_the_budget_starts_the_window_inside_it_and_keeps_it() {
        let s = Settings { prefix_tokens: 10, ..Settings::default() };
        let budget = 10 * BYTES_PER_TOKEN;
        for head in ["", "x = 1\n"] {
            // Multi-byte characters so that steps can fall inside one.
            let text = format!("{head}var a=[{}", "é,1,".repeat(200));
            let p = plan(&text, text.len(), None, &s);
            assert!(p.window_start > head.len() && text.is_char_boundary(p.window_start), "{}", p.window_start);
            assert!(text.len() - p.window_start <= budget + 4, "{}", text.len() - p.window_start);
            // Typing on keeps it; far past twice the budget it moves on.
            let more = format!("{text}2,3");
            assert_eq!(plan(&more, more.len(), Some(p.window_start), &s).window_start, p.window_start);
            let far = format!("{text}{}", "4,".repeat(budget));
            let q = plan(&far, far.len(), Some(p.window_start), &s);
            assert!(q.window_start > p.window_start && far.len() - q.window_start <= budget + 4);
            // Without the previous start, one more character keeps the step.
            assert_eq!(plan(&more, more.len() - 1, None, &s).window_start, p.window_start);
        }
    }

    /// The worker slices `window_start..cut` (and the remote path
    /// `max(line start, window_start)..cut`): a cursor at the end of a line
    /// longer than the budget whose last word (or run of spaces) is longer
    /// than the window once put the cut before the window (a panic).
    #[test]
    fn a_long_line_of_one_word_heals_inside_the_window() {
        let text = "x".repeat(7000);
        let p = plan(&text, text.len(), None, &Settings::default());
        assert!(p.window_start <= p.cut && p.cut < text.len(), "{} > {}", p.window_start, p.cut);
        assert_eq!(format!("{}{}", &text[p.window_start..p.cut], p.healed), text[p.window_start..]);
        assert!(p.healed.len() <= MAX_HEAL);
    }

    /// Plan invariants over line lengths and cursors at and around the
    /// budget, one long line or after others, at the document's end with and
    /// without a newline, words, spaces, punctuation and multi-byte text.
    #[test]
    fn plans_hold_their_invariants_around_the_budget() {
        for prefix_tokens in [1, 2, 10, 2048] {
            let s = Settings { prefix_tokens, ..Settings::default() };
            let budget = prefix_tokens * BYTES_PER_TOKEN;
            for unit in ["x", " ", ".", "é", "ab ", "😀x"] {
                for head in ["", "def f():\n", "a\n\n"] {
                    for tail in ["", "\n", "\r\n", "\nmore\n"] {
                        let mut lens: Vec<usize> = (0..8).collect();
                        for b in [budget / 2, budget, 2 * budget, 3 * budget, 7000] {
                            lens.extend(b.saturating_sub(3)..b + 4);
                        }
                        for n in lens {
                            let line = unit.repeat(n.div_ceil(unit.len()));
                            let text = format!("{head}{line}{tail}");
                            let end = head.len() + line.len();
                            let cursors = [head.len(), end.saturating_sub(1), end, text.len()];
                            let mut previous = None;
                            for cursor in cursors.into_iter().chain(cursors.into_iter().rev()) {
                                let p = plan(&text, cursor, previous, &s);
                                let at = text.floor_char_boundary(cursor);
                                let from = line_start(&text, at).max(p.window_start);
                                let ok = p.window_start <= p.cut
                                    && from <= p.cut
                                    && text.is_char_boundary(p.window_start)
                                    && text.is_char_boundary(p.cut)
                                    && text[p.cut..at] == p.healed
                                    && p.healed.len() <= MAX_HEAL + 3;
                                assert!(ok, "{prefix_tokens} {unit:?} {head:?} {tail:?} {n} {cursor}: {p:?}");
                                previous = Some(p.window_start);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn crlf_documents_keep_crlf() {
        let (t, c) = at("def f():\r\n    |\r\n", "|");
        let p = plan(&t, c, None, &Settings::default());
        assert!(!p.single_line, "a lone \\r after the cursor is no text");
        assert_eq!(finish("a = 1\r\n    b = 2", &p, &t[c..], &Settings::default()), "a = 1\r\n    b = 2");
    }
}
