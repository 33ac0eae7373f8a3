//! The document store: the text of every open document, kept in sync with the
//! editor through LSP `didOpen` / `didChange` / `didClose`.
//!
//! Positions follow the LSP rules:
//!
//! * lines are separated by `\n`, `\r\n` or `\r` — and by nothing else, even
//!   though ropey (with its default `unicode_lines` feature) also breaks lines
//!   at VT, FF, NEL, LS and PS; [`Document`] corrects for that;
//! * a line's end is *before* its terminator, so no position can point between
//!   `\r` and `\n`;
//! * a `character` past the end of its line is clamped to the line's end;
//! * a line past the end of the document is an error
//!   ([`DocError::PositionOutOfRange`]), and so is a `character` that lands
//!   inside a character ([`DocError::InvalidUtf16Offset`] inside a surrogate
//!   pair, [`DocError::InvalidUtf8Offset`] inside a multi-byte sequence).
//!
//! A change that fails leaves the document's text and version exactly as they
//! were (every position is validated before anything is mutated), but marks
//! it [desynchronized](Document::is_desynced): the editor believes the change
//! happened, so later incremental edits are applied to the wrong base text
//! until a full-text change or a re-open.

use std::fmt;
use std::ops::Range as StdRange;
use std::sync::OnceLock;

use dashmap::DashMap;
use ropey::{Rope, RopeSlice};
use tower_lsp::lsp_types::{
    ClientCapabilities, Position, PositionEncodingKind, Range, TextDocumentContentChangeEvent, Url,
};

/// How many leading bytes [`is_probably_binary`] inspects.
pub const BINARY_SNIFF_BYTES: usize = 8 * 1024;

/// The unit `Position::character` counts, negotiated at `initialize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PositionEncoding {
    /// UTF-8 code units (bytes).
    Utf8,
    /// UTF-16 code units: the LSP default, which every server must support.
    #[default]
    Utf16,
}

impl PositionEncoding {
    /// Picks the encoding from the client's `general.positionEncodings`:
    /// UTF-8 when offered, otherwise UTF-16 (also when the list is absent).
    pub fn negotiate(offered: Option<&[PositionEncodingKind]>) -> Self {
        match offered {
            Some(kinds) if kinds.contains(&PositionEncodingKind::UTF8) => Self::Utf8,
            _ => Self::Utf16,
        }
    }

    /// [`negotiate`](Self::negotiate) applied to a client's capabilities.
    pub fn from_client_capabilities(capabilities: &ClientCapabilities) -> Self {
        Self::negotiate(capabilities.general.as_ref().and_then(|general| general.position_encodings.as_deref()))
    }

    /// The value to announce as `ServerCapabilities::position_encoding`.
    pub fn kind(self) -> PositionEncodingKind {
        match self {
            Self::Utf8 => PositionEncodingKind::UTF8,
            Self::Utf16 => PositionEncodingKind::UTF16,
        }
    }
}

/// Why a position, range or change could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocError {
    /// The position's line is past the last line of the document.
    PositionOutOfRange {
        /// The offending position.
        position: Position,
        /// How many lines the document has.
        line_count: usize,
    },
    /// A UTF-16 `character` that lands between the two halves of a surrogate pair.
    InvalidUtf16Offset {
        /// The offending position.
        position: Position,
    },
    /// A UTF-8 `character` that lands inside a multi-byte character.
    InvalidUtf8Offset {
        /// The offending position.
        position: Position,
    },
    /// A range whose start comes after its end.
    InvalidRange {
        /// The offending range.
        range: Range,
    },
    /// A byte offset past the end of the document.
    ByteOffsetOutOfRange {
        /// The offending offset.
        offset: usize,
        /// The document's length in bytes.
        len: usize,
    },
    /// A char index past the end of the document.
    CharIndexOutOfRange {
        /// The offending index.
        index: usize,
        /// The document's length in chars.
        len_chars: usize,
    },
    /// A byte offset inside a multi-byte character.
    NotCharBoundary {
        /// The offending offset.
        offset: usize,
    },
    /// The document is not open.
    NotOpen(Url),
}

impl fmt::Display for DocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PositionOutOfRange { position, line_count } => write!(
                f,
                "position {}:{} is out of range: line {} is past the end of the document ({line_count} lines)",
                position.line, position.character, position.line
            ),
            Self::InvalidUtf16Offset { position } => write!(
                f,
                "position {}:{} is invalid: UTF-16 offset {} falls inside a surrogate pair",
                position.line, position.character, position.character
            ),
            Self::InvalidUtf8Offset { position } => write!(
                f,
                "position {}:{} is invalid: UTF-8 offset {} falls inside a multi-byte character",
                position.line, position.character, position.character
            ),
            Self::InvalidRange { range } => write!(
                f,
                "range {}:{}-{}:{} is invalid: its start comes after its end",
                range.start.line, range.start.character, range.end.line, range.end.character
            ),
            Self::ByteOffsetOutOfRange { offset, len } => {
                write!(f, "byte offset {offset} is past the end of the document ({len} bytes)")
            }
            Self::CharIndexOutOfRange { index, len_chars } => {
                write!(f, "char index {index} is past the end of the document ({len_chars} chars)")
            }
            Self::NotCharBoundary { offset } => {
                write!(f, "byte offset {offset} falls inside a multi-byte character")
            }
            Self::NotOpen(uri) => write!(f, "document {uri} is not open"),
        }
    }
}

impl std::error::Error for DocError {}

impl From<DocError> for tower_lsp::jsonrpc::Error {
    fn from(err: DocError) -> Self {
        Self::invalid_params(err.to_string())
    }
}

/// What [`Documents::change`] did with a change notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Every change applied; the document now has this version.
    Applied {
        /// The document's new version.
        version: i32,
    },
    /// The version was not greater than the stored one; nothing was applied.
    Stale {
        /// The version the store already has.
        stored: i32,
        /// The version the notification carried.
        received: i32,
    },
}

/// One open text document: its text as a rope, plus its version and language.
///
/// Cloning is cheap (the rope is shared copy-on-write), so a clone serves as an
/// immutable snapshot for the worker.
#[derive(Debug, Clone)]
pub struct Document {
    rope: Rope,
    version: i32,
    language_id: String,
    /// Sorted byte offsets of characters that ropey counts as line breaks but
    /// LSP does not (VT, FF, NEL, LS, PS); empty for almost every document.
    foreign_breaks: Vec<usize>,
    /// Set when a change failed: the editor's text has diverged from ours.
    desynced: bool,
}

impl Document {
    /// Creates a document from its full text.
    pub fn new(text: &str, version: i32, language_id: impl Into<String>) -> Self {
        let mut foreign_breaks = Vec::new();
        scan_foreign_breaks(text, 0, &mut foreign_breaks);
        Self { rope: Rope::from_str(text), version, language_id: language_id.into(), foreign_breaks, desynced: false }
    }

    /// The version last reported by the editor.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// Sets the version (done by [`Documents::change`] after a successful change).
    pub fn set_version(&mut self, version: i32) {
        self.version = version;
    }

    /// The LSP language identifier given at open (`"rust"`, `"python"`, ...).
    pub fn language_id(&self) -> &str {
        &self.language_id
    }

    /// The whole text as a rope (cheap to clone).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// True once a change failed to apply: our text no longer matches the
    /// editor's; cleared by a full-text change.
    pub fn is_desynced(&self) -> bool {
        self.desynced
    }

    /// The whole text as a `String` (O(n)).
    pub fn text(&self) -> String {
        self.rope.to_string()
    }

    /// Length of the text in bytes.
    pub fn len_bytes(&self) -> usize {
        self.rope.len_bytes()
    }

    /// Number of LSP lines (a trailing line break starts one more, empty, line).
    pub fn line_count(&self) -> usize {
        self.rope.len_lines() - self.foreign_breaks.len()
    }

    /// Line `line` without its terminator.
    pub fn line(&self, line: usize) -> Result<RopeSlice<'_>, DocError> {
        if line >= self.line_count() {
            return Err(DocError::PositionOutOfRange {
                position: Position::new(saturate(line), 0),
                line_count: self.line_count(),
            });
        }
        Ok(self.rope.byte_slice(self.line_start_byte(line)..self.line_end_byte(line)))
    }

    /// The text between two byte offsets, or `None` when out of bounds, reversed
    /// or not on character boundaries.
    pub fn slice_bytes(&self, range: StdRange<usize>) -> Option<RopeSlice<'_>> {
        self.rope.get_byte_slice(range)
    }

    /// True when the first [`BINARY_SNIFF_BYTES`] contain a NUL byte.
    pub fn is_probably_binary(&self) -> bool {
        is_probably_binary(&self.rope)
    }

    /// Converts an LSP position to a byte offset (see the module docs for the rules).
    pub fn position_to_byte(&self, position: Position, encoding: PositionEncoding) -> Result<usize, DocError> {
        let line = position.line as usize;
        let line_count = self.line_count();
        if line >= line_count {
            return Err(DocError::PositionOutOfRange { position, line_count });
        }
        let start = self.line_start_byte(line);
        let end = self.line_end_byte(line);
        let character = position.character as usize;
        match encoding {
            PositionEncoding::Utf8 => {
                let target = start.saturating_add(character);
                if target >= end {
                    Ok(end)
                } else if self.is_char_boundary(target) {
                    Ok(target)
                } else {
                    Err(DocError::InvalidUtf8Offset { position })
                }
            }
            PositionEncoding::Utf16 => {
                let start_cu = self.rope.char_to_utf16_cu(self.rope.byte_to_char(start));
                let end_cu = self.rope.char_to_utf16_cu(self.rope.byte_to_char(end));
                let target = start_cu.saturating_add(character);
                if target >= end_cu {
                    return Ok(end);
                }
                let char_idx = self.rope.utf16_cu_to_char(target);
                if self.rope.char_to_utf16_cu(char_idx) != target {
                    return Err(DocError::InvalidUtf16Offset { position });
                }
                Ok(self.rope.char_to_byte(char_idx))
            }
        }
    }

    /// Converts an LSP position to a char (Unicode scalar value) index.
    pub fn position_to_char(&self, position: Position, encoding: PositionEncoding) -> Result<usize, DocError> {
        Ok(self.rope.byte_to_char(self.position_to_byte(position, encoding)?))
    }

    /// Converts a byte offset to an LSP position; an offset between `\r` and
    /// `\n` maps to the end of its line.
    pub fn byte_to_position(&self, offset: usize, encoding: PositionEncoding) -> Result<Position, DocError> {
        let len = self.len_bytes();
        if offset > len {
            return Err(DocError::ByteOffsetOutOfRange { offset, len });
        }
        if !self.is_char_boundary(offset) {
            return Err(DocError::NotCharBoundary { offset });
        }
        let mut offset = offset;
        if offset > 0 && offset < len && self.rope.byte(offset - 1) == b'\r' && self.rope.byte(offset) == b'\n' {
            offset -= 1;
        }
        let line = self.line_of_byte(offset);
        let start = self.line_start_byte(line);
        let offset = offset.min(self.line_end_byte(line));
        let character = match encoding {
            PositionEncoding::Utf8 => offset - start,
            PositionEncoding::Utf16 => {
                self.rope.char_to_utf16_cu(self.rope.byte_to_char(offset))
                    - self.rope.char_to_utf16_cu(self.rope.byte_to_char(start))
            }
        };
        Ok(Position::new(saturate(line), saturate(character)))
    }

    /// Converts a char index to an LSP position (see [`byte_to_position`](Self::byte_to_position)).
    pub fn char_to_position(&self, char_idx: usize, encoding: PositionEncoding) -> Result<Position, DocError> {
        let offset = self
            .rope
            .try_char_to_byte(char_idx)
            .map_err(|_| DocError::CharIndexOutOfRange { index: char_idx, len_chars: self.rope.len_chars() })?;
        self.byte_to_position(offset, encoding)
    }

    /// The position just past the last character.
    pub fn end_position(&self, encoding: PositionEncoding) -> Position {
        self.byte_to_position(self.len_bytes(), encoding).expect("the end of the text is a valid offset")
    }

    /// Replaces `range` (or, when `None`, the whole text) with `text`.
    ///
    /// Both ends are validated before anything changes, so on error the
    /// document is untouched.
    pub fn apply_change(
        &mut self,
        range: Option<Range>,
        text: &str,
        encoding: PositionEncoding,
    ) -> Result<(), DocError> {
        let Some(range) = range else {
            self.rope = Rope::from_str(text);
            self.foreign_breaks.clear();
            scan_foreign_breaks(text, 0, &mut self.foreign_breaks);
            self.desynced = false;
            return Ok(());
        };
        let start = self.position_to_byte(range.start, encoding)?;
        let end = self.position_to_byte(range.end, encoding)?;
        if start > end {
            return Err(DocError::InvalidRange { range });
        }
        let start_char = self.rope.byte_to_char(start);
        if start < end {
            let end_char = self.rope.byte_to_char(end);
            self.rope.remove(start_char..end_char);
        }
        if !text.is_empty() {
            self.rope.insert(start_char, text);
        }
        self.splice_foreign_breaks(start, end, text);
        Ok(())
    }

    /// Applies an LSP content change event.
    pub fn apply_content_change(
        &mut self,
        change: &TextDocumentContentChangeEvent,
        encoding: PositionEncoding,
    ) -> Result<(), DocError> {
        self.apply_change(change.range, &change.text, encoding)
    }

    // --- LSP line bookkeeping on top of ropey's lines -----------------------

    /// The ropey line index where LSP line `line` starts.
    fn rope_line(&self, line: usize) -> usize {
        // Foreign break `i` sits on LSP line `rope_line(break_i) - i`, which is
        // non-decreasing in `i`; count those on lines before `line`.
        let (mut lo, mut hi) = (0, self.foreign_breaks.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.rope.byte_to_line(self.foreign_breaks[mid]) - mid < line {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        line + lo
    }

    /// The LSP line containing byte `offset`.
    fn line_of_byte(&self, offset: usize) -> usize {
        self.rope.byte_to_line(offset) - self.foreign_breaks.partition_point(|&b| b < offset)
    }

    /// Byte offset where LSP line `line` (< `line_count()`) starts.
    fn line_start_byte(&self, line: usize) -> usize {
        self.rope.line_to_byte(self.rope_line(line))
    }

    /// Byte offset where LSP line `line` (< `line_count()`) ends, before its terminator.
    fn line_end_byte(&self, line: usize) -> usize {
        if line + 1 >= self.line_count() {
            return self.len_bytes();
        }
        let next = self.line_start_byte(line + 1);
        match self.rope.byte(next - 1) {
            b'\n' if next >= 2 && self.rope.byte(next - 2) == b'\r' => next - 2,
            _ => next - 1,
        }
    }

    fn is_char_boundary(&self, offset: usize) -> bool {
        offset == self.len_bytes() || self.rope.byte(offset) & 0xC0 != 0x80
    }

    /// Keeps `foreign_breaks` in step with replacing bytes `start..end` by `text`.
    fn splice_foreign_breaks(&mut self, start: usize, end: usize, text: &str) {
        let lo = self.foreign_breaks.partition_point(|&b| b < start);
        let hi = self.foreign_breaks.partition_point(|&b| b < end);
        for b in &mut self.foreign_breaks[hi..] {
            *b = *b - (end - start) + text.len();
        }
        let mut inserted = Vec::new();
        scan_foreign_breaks(text, start, &mut inserted);
        self.foreign_breaks.splice(lo..hi, inserted);
    }
}

/// True when the first [`BINARY_SNIFF_BYTES`] bytes of `rope` contain a NUL.
pub fn is_probably_binary(rope: &Rope) -> bool {
    let mut seen = 0;
    for chunk in rope.chunks() {
        let take = chunk.len().min(BINARY_SNIFF_BYTES - seen);
        if chunk.as_bytes()[..take].contains(&0) {
            return true;
        }
        seen += take;
        if seen >= BINARY_SNIFF_BYTES {
            break;
        }
    }
    false
}

/// All open documents, keyed by URI; safe to share between tasks.
#[derive(Debug, Default)]
pub struct Documents {
    map: DashMap<Url, Document>,
}

impl Documents {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a newly opened document, replacing any previous one with that URI.
    pub fn open(&self, uri: Url, text: &str, version: i32, language_id: impl Into<String>) {
        self.map.insert(uri, Document::new(text, version, language_id));
    }

    /// Applies one `didChange` notification atomically: either every change
    /// applies and the version is updated, or nothing changes.
    ///
    /// A version not greater than the stored one is ignored
    /// ([`ChangeOutcome::Stale`]). When a change fails the text and version
    /// stay as they were and the document is marked desynchronized.
    pub fn change(
        &self,
        uri: &Url,
        version: i32,
        changes: &[TextDocumentContentChangeEvent],
        encoding: PositionEncoding,
    ) -> Result<ChangeOutcome, DocError> {
        let mut entry = self.map.get_mut(uri).ok_or_else(|| DocError::NotOpen(uri.clone()))?;
        if version <= entry.version {
            return Ok(ChangeOutcome::Stale { stored: entry.version, received: version });
        }
        let mut updated = entry.clone();
        for change in changes {
            if let Err(err) = updated.apply_content_change(change, encoding) {
                entry.desynced = true;
                return Err(err);
            }
        }
        updated.version = version;
        *entry = updated;
        Ok(ChangeOutcome::Applied { version })
    }

    /// Forgets a document; returns whether it was open.
    pub fn close(&self, uri: &Url) -> bool {
        self.map.remove(uri).is_some()
    }

    /// A cheap immutable copy of the document (O(1) rope clone).
    pub fn snapshot(&self, uri: &Url) -> Option<Document> {
        self.map.get(uri).map(|doc| doc.clone())
    }

    /// Whether the document is open.
    pub fn contains(&self, uri: &Url) -> bool {
        self.map.contains_key(uri)
    }

    /// Number of open documents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no document is open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// URIs of all open documents, in no particular order.
    pub fn uris(&self) -> Vec<Url> {
        self.map.iter().map(|entry| entry.key().clone()).collect()
    }
}

/// Characters that ropey treats as line breaks but LSP does not, detected at
/// runtime so the code is right whether or not ropey's `unicode_lines`
/// feature is enabled.
fn foreign_break_chars() -> &'static [char] {
    static CHARS: OnceLock<Vec<char>> = OnceLock::new();
    CHARS.get_or_init(|| {
        ['\u{0B}', '\u{0C}', '\u{85}', '\u{2028}', '\u{2029}']
            .into_iter()
            .filter(|&c| Rope::from_str(c.encode_utf8(&mut [0; 4])).len_lines() == 2)
            .collect()
    })
}

/// Appends `base + offset` for every foreign line break in `text`.
fn scan_foreign_breaks(text: &str, base: usize, out: &mut Vec<usize>) {
    let chars = foreign_break_chars();
    if chars.is_empty() {
        return;
    }
    for (i, byte) in text.bytes().enumerate() {
        // Lead bytes of VT, FF, NEL (C2 85), LS and PS (E2 80 A8/A9).
        if matches!(byte, 0x0B | 0x0C | 0xC2 | 0xE2) && text[i..].chars().next().is_some_and(|c| chars.contains(&c)) {
            out.push(base + i);
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use PositionEncoding::{Utf16, Utf8};

    fn pos(line: u32, character: u32) -> Position {
        Position::new(line, character)
    }

    fn range(l0: u32, c0: u32, l1: u32, c1: u32) -> Option<Range> {
        Some(Range::new(pos(l0, c0), pos(l1, c1)))
    }

    fn uri(name: &str) -> Url {
        Url::parse(&format!("file:///tmp/{name}")).unwrap()
    }

    fn change(r: Option<Range>, text: &str) -> TextDocumentContentChangeEvent {
        TextDocumentContentChangeEvent { range: r, range_length: None, text: text.to_owned() }
    }

    #[test]
    fn negotiates_utf8_only_when_offered() {
        use PositionEncodingKind as K;
        assert_eq!(PositionEncoding::negotiate(None), Utf16);
        assert_eq!(PositionEncoding::negotiate(Some(&[])), Utf16);
        assert_eq!(PositionEncoding::negotiate(Some(&[K::UTF16])), Utf16);
        assert_eq!(PositionEncoding::negotiate(Some(&[K::UTF32])), Utf16);
        assert_eq!(PositionEncoding::negotiate(Some(&[K::UTF16, K::UTF8])), Utf8);
        assert_eq!(PositionEncoding::negotiate(Some(&[K::UTF8])), Utf8);

        let caps: ClientCapabilities = serde_json::from_value(serde_json::json!({
            "general": { "positionEncodings": ["utf-32", "utf-8", "utf-16"] }
        }))
        .unwrap();
        assert_eq!(PositionEncoding::from_client_capabilities(&caps), Utf8);
        assert_eq!(PositionEncoding::from_client_capabilities(&ClientCapabilities::default()), Utf16);
        assert_eq!(Utf8.kind().as_str(), "utf-8");
        assert_eq!(Utf16.kind().as_str(), "utf-16");
    }

    #[test]
    fn line_counts_follow_lsp() {
        assert_eq!(Document::new("", 0, "x").line_count(), 1);
        assert_eq!(Document::new("a", 0, "x").line_count(), 1);
        assert_eq!(Document::new("a\n", 0, "x").line_count(), 2);
        assert_eq!(Document::new("a\r\nb\rc\nd", 0, "x").line_count(), 4);
        assert_eq!(Document::new("\r\r\n\n", 0, "x").line_count(), 4);
        let doc = Document::new("a\r\nb\rc\n", 0, "x");
        let lines: Vec<String> = (0..doc.line_count()).map(|n| doc.line(n).unwrap().to_string()).collect();
        assert_eq!(lines, ["a", "b", "c", ""]);
        assert!(matches!(doc.line(4), Err(DocError::PositionOutOfRange { line_count: 4, .. })));
    }

    #[test]
    fn unicode_separators_are_not_lsp_line_breaks() {
        // VT, FF, NEL, LS and PS are ordinary characters for LSP.
        let text = "a\u{0B}b\u{0C}c\u{85}d\u{2028}e\u{2029}f\ng\u{0C}\nh";
        let mut doc = Document::new(text, 0, "x");
        assert_eq!(doc.line_count(), 3);
        assert_eq!(doc.line(0).unwrap(), "a\u{0B}b\u{0C}c\u{85}d\u{2028}e\u{2029}f");
        assert_eq!(doc.line(1).unwrap(), "g\u{0C}");
        assert_eq!(doc.line(2).unwrap(), "h");
        // 'f' ends at UTF-16 offset 11 on line 0.
        let f = doc.position_to_byte(pos(0, 11), Utf16).unwrap();
        assert_eq!(&text[f - 1..f], "f");
        assert_eq!(doc.byte_to_position(text.len(), Utf16).unwrap(), pos(2, 1));
        doc.apply_change(range(1, 1, 2, 0), "\u{2028}", Utf16).unwrap();
        assert_eq!(doc.line_count(), 2);
        assert_eq!(doc.line(1).unwrap(), "g\u{2028}h");
        doc.apply_change(range(0, 0, 0, 10), "", Utf16).unwrap();
        assert_eq!(doc.text(), "f\ng\u{2028}h");
    }

    #[test]
    fn character_past_line_end_clamps_before_crlf() {
        let doc = Document::new("ab\r\ncd", 0, "x");
        for enc in [Utf8, Utf16] {
            assert_eq!(doc.position_to_byte(pos(0, 2), enc).unwrap(), 2);
            // One past the end would sit between \r and \n: clamped instead.
            assert_eq!(doc.position_to_byte(pos(0, 3), enc).unwrap(), 2);
            assert_eq!(doc.position_to_byte(pos(0, u32::MAX), enc).unwrap(), 2);
            assert_eq!(doc.position_to_byte(pos(1, 0), enc).unwrap(), 4);
            assert_eq!(doc.position_to_byte(pos(1, 99), enc).unwrap(), 6);
            // The offset between \r and \n maps to the line end.
            assert_eq!(doc.byte_to_position(3, enc).unwrap(), pos(0, 2));
            assert_eq!(doc.byte_to_position(2, enc).unwrap(), pos(0, 2));
            assert_eq!(doc.byte_to_position(4, enc).unwrap(), pos(1, 0));
            assert_eq!(doc.end_position(enc), pos(1, 2));
        }
    }

    #[test]
    fn line_past_end_is_an_error() {
        let doc = Document::new("a\nb", 0, "x");
        let err = doc.position_to_byte(pos(2, 0), Utf16).unwrap_err();
        assert_eq!(err, DocError::PositionOutOfRange { position: pos(2, 0), line_count: 2 });
        assert!(err.to_string().contains("line 2 is past the end"), "{err}");
        let jsonrpc: tower_lsp::jsonrpc::Error = err.into();
        assert_eq!(jsonrpc.code, tower_lsp::jsonrpc::ErrorCode::InvalidParams);
    }

    #[test]
    fn surrogate_pair_and_multibyte_offsets() {
        // 😀 is 2 UTF-16 units and 4 bytes; 中 is 1 unit and 3 bytes.
        let doc = Document::new("a😀中b", 0, "x");
        assert_eq!(doc.position_to_byte(pos(0, 1), Utf16).unwrap(), 1);
        assert_eq!(
            doc.position_to_byte(pos(0, 2), Utf16).unwrap_err(),
            DocError::InvalidUtf16Offset { position: pos(0, 2) }
        );
        assert_eq!(doc.position_to_byte(pos(0, 3), Utf16).unwrap(), 5);
        assert_eq!(doc.position_to_byte(pos(0, 4), Utf16).unwrap(), 8);
        assert_eq!(doc.position_to_char(pos(0, 4), Utf16).unwrap(), 3);
        assert_eq!(doc.position_to_byte(pos(0, 5), Utf8).unwrap(), 5);
        for bad in [2, 3, 4, 6, 7] {
            assert_eq!(
                doc.position_to_byte(pos(0, bad), Utf8).unwrap_err(),
                DocError::InvalidUtf8Offset { position: pos(0, bad) }
            );
        }
        assert_eq!(doc.byte_to_position(5, Utf16).unwrap(), pos(0, 3));
        assert_eq!(doc.byte_to_position(8, Utf16).unwrap(), pos(0, 4));
        assert_eq!(doc.byte_to_position(8, Utf8).unwrap(), pos(0, 8));
        assert_eq!(doc.char_to_position(2, Utf16).unwrap(), pos(0, 3));
        assert_eq!(
            doc.char_to_position(5, Utf16).unwrap_err(),
            DocError::CharIndexOutOfRange { index: 5, len_chars: 4 }
        );
        assert_eq!(doc.byte_to_position(2, Utf16).unwrap_err(), DocError::NotCharBoundary { offset: 2 });
        assert_eq!(doc.byte_to_position(10, Utf16).unwrap_err(), DocError::ByteOffsetOutOfRange { offset: 10, len: 9 });
        let msg = DocError::InvalidUtf16Offset { position: pos(0, 2) }.to_string();
        assert!(msg.contains("surrogate pair"), "{msg}");
    }

    #[test]
    fn failed_change_leaves_document_untouched() {
        let mut doc = Document::new("x😀\ny", 3, "x");
        let before = doc.text();
        for (r, err) in [
            (range(0, 0, 0, 2), "InvalidUtf16Offset"),
            (range(0, 2, 0, 3), "InvalidUtf16Offset"),
            (range(0, 0, 5, 0), "PositionOutOfRange"),
            (range(1, 0, 0, 0), "InvalidRange"),
        ] {
            let e = doc.apply_change(r, "zzz", Utf16).unwrap_err();
            assert!(format!("{e:?}").starts_with(err), "{e:?}");
            assert_eq!(doc.text(), before);
            assert_eq!(doc.line_count(), 2);
        }
        doc.apply_change(range(0, 1, 0, 3), "é", Utf16).unwrap();
        assert_eq!(doc.text(), "xé\ny");
    }

    #[test]
    fn edits_spanning_lines_and_full_replacement() {
        let mut doc = Document::new("one\r\ntwo\nthree", 1, "x");
        doc.apply_change(range(0, 2, 2, 1), "X\rY", Utf8).unwrap();
        assert_eq!(doc.text(), "onX\rYhree");
        assert_eq!(doc.line_count(), 2);
        // Inserting \n right after a lone \r merges them into one CRLF break.
        doc.apply_change(range(1, 0, 1, 0), "\n", Utf8).unwrap();
        assert_eq!(doc.text(), "onX\r\nYhree");
        assert_eq!(doc.line_count(), 2);
        assert_eq!(doc.line(1).unwrap(), "Yhree");
        doc.apply_change(None, "fresh\n", Utf8).unwrap();
        assert_eq!(doc.text(), "fresh\n");
        assert_eq!(doc.line_count(), 2);
        assert_eq!(doc.slice_bytes(1..3).unwrap(), "re");
        assert!(doc.slice_bytes(3..9).is_none());
        assert_eq!(doc.len_bytes(), 6);
    }

    #[test]
    fn binary_detection_looks_at_the_first_8_kib() {
        assert!(!is_probably_binary(&Rope::from_str("fn main() {}\n")));
        assert!(is_probably_binary(&Rope::from_str("ELF\0\x01")));
        let late_nul = format!("{}\0", "a".repeat(BINARY_SNIFF_BYTES));
        assert!(!is_probably_binary(&Rope::from_str(&late_nul)));
        let edge_nul = format!("{}\0", "a".repeat(BINARY_SNIFF_BYTES - 1));
        assert!(is_probably_binary(&Rope::from_str(&edge_nul)));
        assert!(Document::new("\0", 0, "x").is_probably_binary());
    }

    #[test]
    fn huge_documents_convert_positions() {
        let line = "let x = \"中😀\";\r\n";
        let text = line.repeat(100_000);
        let doc = Document::new(&text, 0, "rust");
        assert_eq!(doc.line_count(), 100_001);
        // After `let x = "中😀`: 12 UTF-16 units, 16 bytes; 11 splits the emoji.
        let p = pos(77_777, 12);
        let b = doc.position_to_byte(p, Utf16).unwrap();
        assert_eq!(b, 77_777 * line.len() + 16);
        assert!(doc.position_to_byte(pos(77_777, 11), Utf16).is_err());
        assert_eq!(doc.byte_to_position(b, Utf16).unwrap(), p);
        assert_eq!(doc.position_to_byte(pos(99_999, 99), Utf16).unwrap(), 100_000 * line.len() - 2);
    }

    #[test]
    fn store_open_change_close() {
        let docs = Documents::new();
        let u = uri("a.rs");
        assert!(docs.is_empty());
        assert_eq!(docs.change(&u, 1, &[], Utf16).unwrap_err(), DocError::NotOpen(u.clone()));
        docs.open(u.clone(), "hello\n", 1, "rust");
        assert!(docs.contains(&u));
        assert_eq!(docs.len(), 1);
        assert_eq!(docs.uris(), vec![u.clone()]);

        let snapshot = docs.snapshot(&u).unwrap();
        let outcome = docs.change(&u, 2, &[change(range(0, 5, 0, 5), " world")], Utf16).unwrap();
        assert_eq!(outcome, ChangeOutcome::Applied { version: 2 });
        // The earlier snapshot is unaffected.
        assert_eq!(snapshot.text(), "hello\n");
        assert_eq!(snapshot.version(), 1);
        let now = docs.snapshot(&u).unwrap();
        assert_eq!((now.text().as_str(), now.version()), ("hello world\n", 2));
        assert_eq!(now.language_id(), "rust");

        for stale in [2, 1, -5] {
            assert_eq!(
                docs.change(&u, stale, &[change(None, "nope")], Utf16).unwrap(),
                ChangeOutcome::Stale { stored: 2, received: stale }
            );
        }
        assert_eq!(docs.snapshot(&u).unwrap().text(), "hello world\n");

        assert!(docs.close(&u));
        assert!(!docs.close(&u));
        assert!(docs.snapshot(&u).is_none());
    }

    #[test]
    fn store_applies_batches_atomically() {
        let docs = Documents::new();
        let u = uri("b.py");
        docs.open(u.clone(), "ab\ncd", 1, "python");
        let batch = [change(range(0, 0, 0, 0), "1"), change(range(0, 0, 0, 0), "2"), change(range(9, 0, 9, 0), "boom")];
        let err = docs.change(&u, 2, &batch, Utf8).unwrap_err();
        assert!(matches!(err, DocError::PositionOutOfRange { .. }));
        let doc = docs.snapshot(&u).unwrap();
        assert_eq!((doc.text().as_str(), doc.version()), ("ab\ncd", 1));
        assert!(doc.is_desynced());

        // Sequential application: each change sees the previous one's result.
        let ok = [change(range(0, 0, 0, 0), "1"), change(range(0, 0, 0, 1), "2"), change(range(1, 2, 1, 2), "!")];
        docs.change(&u, 3, &ok, Utf8).unwrap();
        let doc = docs.snapshot(&u).unwrap();
        assert_eq!(doc.text(), "2ab\ncd!");
        assert!(doc.is_desynced(), "an incremental change cannot resync");

        docs.change(&u, 4, &[change(None, "sync")], Utf8).unwrap();
        assert!(!docs.snapshot(&u).unwrap().is_desynced());
    }

    // --- Fuzz test against an independent reference model -------------------

    /// xorshift64* — tiny, deterministic, good enough for fuzzing.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
    }

    /// The reference: a `String` plus deliberately naive LSP position math.
    struct Reference;

    #[derive(Debug, PartialEq)]
    enum RefError {
        LineOutOfRange,
        InsideChar,
    }

    impl Reference {
        fn line_starts(text: &str) -> Vec<usize> {
            let bytes = text.as_bytes();
            let mut starts = vec![0];
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                    i += 2;
                    starts.push(i);
                } else {
                    if bytes[i] == b'\r' || bytes[i] == b'\n' {
                        starts.push(i + 1);
                    }
                    i += 1;
                }
            }
            starts
        }

        fn line_end(text: &str, starts: &[usize], line: usize) -> usize {
            match starts.get(line + 1) {
                None => text.len(),
                Some(&next) if text[..next].ends_with("\r\n") => next - 2,
                Some(&next) => next - 1,
            }
        }

        fn units(c: char, enc: PositionEncoding) -> usize {
            match enc {
                Utf8 => c.len_utf8(),
                Utf16 => c.len_utf16(),
            }
        }

        fn to_byte(text: &str, p: Position, enc: PositionEncoding) -> Result<usize, RefError> {
            let starts = Self::line_starts(text);
            let line = p.line as usize;
            if line >= starts.len() {
                return Err(RefError::LineOutOfRange);
            }
            let (start, end) = (starts[line], Self::line_end(text, &starts, line));
            let mut seen = 0usize;
            for (i, c) in text[start..end].char_indices() {
                if seen == p.character as usize {
                    return Ok(start + i);
                }
                seen += Self::units(c, enc);
                if seen > p.character as usize {
                    return Err(RefError::InsideChar);
                }
            }
            Ok(end)
        }

        fn to_position(text: &str, byte: usize, enc: PositionEncoding) -> Position {
            let starts = Self::line_starts(text);
            let line = starts.partition_point(|&s| s <= byte) - 1;
            let byte = byte.min(Self::line_end(text, &starts, line));
            let character = text[starts[line]..byte].chars().map(|c| Self::units(c, enc)).sum::<usize>();
            Position::new(line as u32, character as u32)
        }
    }

    const PIECES: &[&str] = &[
        "a", "b", "xyz", " ", "\t", "\n", "\n", "\r", "\r\n", "\r\n", "😀", "🦀", "中", "文字", "é", "\u{0C}",
        "\u{2028}", "\u{85}", "", "\n\n",
    ];

    fn random_text(rng: &mut XorShift, max_pieces: usize) -> String {
        (0..rng.below(max_pieces + 1)).map(|_| PIECES[rng.below(PIECES.len())]).collect()
    }

    fn random_boundary(rng: &mut XorShift, text: &str) -> usize {
        let mut b = rng.below(text.len() + 1);
        while !text.is_char_boundary(b) {
            b -= 1;
        }
        b
    }

    /// A position that is sometimes out of range or inside a character.
    fn random_position(rng: &mut XorShift, text: &str, enc: PositionEncoding) -> Position {
        let mut p = Reference::to_position(text, random_boundary(rng, text), enc);
        match rng.below(10) {
            0 => p.character += 1 + rng.below(3) as u32,
            1 => p.character += 1_000,
            2 => p.line += 1 + rng.below(2) as u32,
            _ => {}
        }
        p
    }

    fn check_same(doc: &Document, reference: &str, rng: &mut XorShift, enc: PositionEncoding) {
        assert_eq!(doc.text(), reference);
        assert_eq!(doc.len_bytes(), reference.len());
        let starts = Reference::line_starts(reference);
        assert_eq!(doc.line_count(), starts.len(), "text {reference:?}");
        for _ in 0..4 {
            let b = random_boundary(rng, reference);
            assert_eq!(
                doc.byte_to_position(b, enc).unwrap(),
                Reference::to_position(reference, b, enc),
                "byte {b} of {reference:?}"
            );
            let p = random_position(rng, reference, enc);
            let ours = doc.position_to_byte(p, enc);
            match Reference::to_byte(reference, p, enc) {
                Ok(b) => assert_eq!(ours, Ok(b), "{p:?} in {reference:?}"),
                Err(RefError::LineOutOfRange) => assert!(
                    matches!(ours, Err(DocError::PositionOutOfRange { .. })),
                    "{p:?} in {reference:?}: {ours:?}"
                ),
                Err(RefError::InsideChar) => assert!(
                    matches!(ours, Err(DocError::InvalidUtf16Offset { .. } | DocError::InvalidUtf8Offset { .. })),
                    "{p:?} in {reference:?}: {ours:?}"
                ),
            }
            let line = rng.below(starts.len());
            let expected = &reference[starts[line]..Reference::line_end(reference, &starts, line)];
            assert_eq!(doc.line(line).unwrap(), expected);
        }
    }

    fn fuzz(seed: u64, steps: usize, enc: PositionEncoding) {
        let mut rng = XorShift(seed);
        let mut reference = random_text(&mut rng, 30);
        let mut doc = Document::new(&reference, 0, "fuzz");
        let (mut applied, mut rejected) = (0, 0);
        for step in 0..steps {
            if rng.chance(1) {
                reference = random_text(&mut rng, 60);
                doc.apply_change(None, &reference, enc).unwrap();
                continue;
            }
            let (mut start, mut end) =
                (random_position(&mut rng, &reference, enc), random_position(&mut rng, &reference, enc));
            // Mostly well-ordered ranges; a few reversed ones must be rejected.
            if let (Ok(a), Ok(b)) =
                (Reference::to_byte(&reference, start, enc), Reference::to_byte(&reference, end, enc))
            {
                if a > b && !rng.chance(5) {
                    std::mem::swap(&mut start, &mut end);
                }
            }
            // Keep documents a few KiB (several ropey chunks): bias toward deleting.
            let insert = if reference.len() > 6_000 {
                String::new()
            } else {
                let max_pieces = if rng.chance(5) { 400 } else { 6 };
                random_text(&mut rng, max_pieces)
            };
            let expected = match (Reference::to_byte(&reference, start, enc), Reference::to_byte(&reference, end, enc))
            {
                (Ok(a), Ok(b)) if a <= b => Some(a..b),
                _ => None,
            };
            let result = doc.apply_change(Some(Range::new(start, end)), &insert, enc);
            match expected {
                Some(bytes) => {
                    assert_eq!(result, Ok(()), "step {step}: {start:?}-{end:?} in {reference:?}");
                    reference.replace_range(bytes, &insert);
                    applied += 1;
                }
                None => {
                    assert!(result.is_err(), "step {step}: {start:?}-{end:?} in {reference:?}");
                    rejected += 1;
                }
            }
            check_same(&doc, &reference, &mut rng, enc);
        }
        assert!(applied > steps / 2, "applied {applied} of {steps}");
        assert!(rejected > 0, "no invalid edit was exercised");
    }

    #[test]
    fn fuzz_incremental_edits_utf16() {
        for seed in [0x9E37_79B9_7F4A_7C15, 42, 7] {
            fuzz(seed, 2_000, Utf16);
        }
    }

    #[test]
    fn fuzz_incremental_edits_utf8() {
        for seed in [0xD1B5_4A32_D192_ED03, 43, 8] {
            fuzz(seed, 2_000, Utf8);
        }
    }
}
