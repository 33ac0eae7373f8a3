//! Context from the rest of the project (plain Rust: no engine, no LSP).
//!
//! A suggestion that calls a function defined in another module needs that
//! function's name and parameters in the prompt. This module finds candidate
//! chunks of other files and picks the few worth their tokens:
//!
//! - **sources**: definitions in the files the current one imports (Python
//!   `import` / `from`, Rust `use` / `mod`, JS/TS `import` / `require`,
//!   resolved under the workspace root; read from disk when not open), other
//!   open documents, and the regions the user recently edited or rested on;
//! - **chunks**: a file's top-level items (a function, a class, an `impl`,
//!   with the comments and decorators above them), at most [`CHUNK_LINES`]
//!   lines; a longer item keeps its head and the signatures inside it;
//! - **similar code**: windows of [`SIMILAR_LINES`] lines of those files
//!   that share the most identifiers with the lines just before the cursor
//!   ([`similar`]): how the project already calls what the cursor is about
//!   to call;
//! - **choice**: similar code takes up to [`SIMILAR_SHARE`] of the token
//!   budget; items fill the rest, each scored by the identifiers it shares
//!   with the text near the cursor, the names it *defines* counting most
//!   ([`score`]); deduplicated, until the budget is spent ([`choose`]).
//!
//! The caller renders the choice ([`ContextSet`]) in front of the document's
//! window, each chunk under its file's path (see `completion::context_lead`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};

/// Lines of one chunk at most (llama.vim's ring buffer uses 64; definitions
/// are shorter, and a shorter chunk leaves room for more files).
pub const CHUNK_LINES: usize = 32;
/// Files larger than this are not read for context (generated code, data).
pub const MAX_FILE_BYTES: u64 = 512 * 1024;
/// Imported files read per document at most.
pub const MAX_IMPORTED_FILES: usize = 16;
/// Lines before the cursor (and after it) whose identifiers make the query.
pub const QUERY_LINES_BEFORE: usize = 40;
pub const QUERY_LINES_AFTER: usize = 8;
/// Lines of a similar-code window ([`similar`]); windows start every half of it.
pub const SIMILAR_LINES: usize = 16;
/// Lines just before the cursor that similar code is matched against.
pub const SIMILAR_QUERY_LINES: usize = 12;
/// A window shares at least this part of its and the query's identifiers
/// (Jaccard) to count as similar.
pub const SIMILAR_MIN: f32 = 0.1;
/// Similar windows [`similar`] returns at most.
pub const SIMILAR_KEEP: usize = 64;
/// The part of the budget code similar to the cursor's may take first ([`choose`]).
pub const SIMILAR_SHARE: f32 = 0.5;

/// The languages whose imports are understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Python,
    Rust,
    /// JavaScript and TypeScript (same import forms).
    Js,
    /// Anything else: no imports, generic top-level items.
    Other,
}

impl Lang {
    /// From a file name's extension.
    pub fn of(path: &Path) -> Lang {
        match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
            "py" | "pyi" => Lang::Python,
            "rs" => Lang::Rust,
            "js" | "jsx" | "mjs" | "cjs" | "ts" | "tsx" | "mts" | "cts" => Lang::Js,
            _ => Lang::Other,
        }
    }

    /// A line comment saying `text`, for models without a file-separator token.
    pub fn comment(self, text: &str) -> String {
        match self {
            Lang::Python => format!("# {text}\n"),
            Lang::Rust | Lang::Js => format!("// {text}\n"),
            // `#` reads as a comment in shells, TOML, YAML, Ruby, Makefiles; C-like
            // languages would take `//`, but a wrong comment here only costs tokens.
            Lang::Other => format!("// {text}\n"),
        }
    }
}

/// Where a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A file the current document imports.
    Import,
    /// Another open document.
    OpenDocument,
    /// A region the user recently edited or rested on.
    Recent,
}

/// A piece of another file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// The file's path as the prompt shows it (relative to the workspace when inside it).
    pub path: String,
    /// 0-based line of the chunk's first line in its file.
    pub line: usize,
    pub text: String,
    pub source: Source,
}

/// The chunks chosen for one document, in prompt order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContextSet {
    pub chunks: Vec<Chunk>,
}

impl ContextSet {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The chunks' text joined per file, files in the order they first
    /// appear in the prompt: `(path, text)`.
    pub fn by_file(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for c in &self.chunks {
            match out.iter_mut().find(|(p, _)| *p == c.path) {
                Some((_, t)) => t.push_str(&c.text),
                None => out.push((c.path.clone(), c.text.clone())),
            }
        }
        out
    }

    /// The files in the set with their chunks' total bytes (for status).
    pub fn files(&self) -> Vec<(String, usize)> {
        self.by_file().into_iter().map(|(p, t)| (p, t.len())).collect()
    }
}

/// An `import` of the current file, before resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Import {
    /// Python: dots of a relative import (0 = absolute) and the dotted module path
    /// (`from ..a.b import c` → `(2, ["a", "b"], ["c"])`); `names` are what `from` imports.
    Python { level: usize, module: Vec<String>, names: Vec<String> },
    /// Rust: a `use` path (`crate::a::b::C` → `["crate", "a", "b", "C"]`) or a `mod x;` (`["self", "x"]`
    /// with `is_mod`).
    Rust { path: Vec<String>, is_mod: bool },
    /// JS/TS: the module specifier (`./util`, `../lib/x.js`, `react`).
    Js { spec: String },
}

/// The imports written in `text`.
pub fn imports(lang: Lang, text: &str) -> Vec<Import> {
    let mut out = Vec::new();
    match lang {
        Lang::Python => {
            for line in logical_lines(text) {
                let l = line.trim_start();
                if let Some(rest) = l.strip_prefix("from ") {
                    let Some((module, names)) = rest.split_once(" import ") else { continue };
                    let module = module.trim();
                    let level = module.len() - module.trim_start_matches('.').len();
                    let module: Vec<String> = module
                        .trim_start_matches('.')
                        .split('.')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    let names = names
                        .trim_matches(|c: char| c == '(' || c == ')' || c.is_whitespace())
                        .split(',')
                        .filter_map(|n| n.split_whitespace().next())
                        .filter(|n| is_ident(n))
                        .map(str::to_string)
                        .collect();
                    out.push(Import::Python { level, module, names });
                } else if let Some(rest) = l.strip_prefix("import ") {
                    for m in rest.split(',') {
                        let m = m.split_whitespace().next().unwrap_or("");
                        if !m.is_empty() && m.split('.').all(is_ident) {
                            out.push(Import::Python {
                                level: 0,
                                module: m.split('.').map(str::to_string).collect(),
                                names: vec![],
                            });
                        }
                    }
                }
            }
        }
        Lang::Rust => {
            for line in text.lines() {
                let l = line.trim_start();
                let l = l.strip_prefix("pub ").or_else(|| l.strip_prefix("pub(crate) ")).unwrap_or(l);
                if let Some(rest) = l.strip_prefix("use ") {
                    let rest = rest.trim_end().trim_end_matches(';');
                    // `a::b::{C, d::E}`: the path before the braces, then each leaf.
                    let (base, leaves) = match rest.split_once("::{") {
                        Some((b, l)) => (b, l.trim_end_matches('}').split(',').map(str::trim).collect::<Vec<_>>()),
                        None => (rest.split(" as ").next().unwrap_or(rest), vec![""]),
                    };
                    for leaf in leaves {
                        let leaf = leaf.split(" as ").next().unwrap_or("").trim();
                        let full = if leaf.is_empty() { base.to_string() } else { format!("{base}::{leaf}") };
                        let path: Vec<String> = full
                            .split("::")
                            .map(str::trim)
                            .filter(|s| !s.is_empty() && *s != "*")
                            .map(str::to_string)
                            .collect();
                        if !path.is_empty() && path.iter().all(|s| is_ident(s)) {
                            out.push(Import::Rust { path, is_mod: false });
                        }
                    }
                } else if let Some(rest) = l.strip_prefix("mod ") {
                    let name = rest.trim_end();
                    if let Some(name) = name.strip_suffix(';') {
                        if is_ident(name.trim()) {
                            out.push(Import::Rust { path: vec!["self".into(), name.trim().into()], is_mod: true });
                        }
                    }
                }
            }
        }
        Lang::Js => {
            for line in text.lines() {
                let l = line.trim();
                let spec = if l.starts_with("import ") || l.starts_with("export ") && l.contains(" from ") {
                    l.rsplit_once(" from ").map(|(_, s)| s).or_else(|| l.strip_prefix("import ")).and_then(quoted)
                } else if let Some(i) = l.find("require(") {
                    quoted(&l[i + "require(".len()..])
                } else {
                    None
                };
                if let Some(spec) = spec {
                    out.push(Import::Js { spec: spec.to_string() });
                }
            }
        }
        Lang::Other => {}
    }
    out
}

/// Python's lines with a parenthesized `from ... import (` list joined into
/// one line (`from a import (b,\n    c)` → `from a import (b, c)`).
fn logical_lines(text: &str) -> Vec<Cow<'_, str>> {
    let mut out: Vec<Cow<'_, str>> = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        if let Some(acc) = open.as_mut() {
            acc.push(' ');
            acc.push_str(line.trim());
            if line.contains(')') {
                out.push(Cow::Owned(open.take().unwrap_or_default()));
            }
            continue;
        }
        let t = line.trim_start();
        if t.starts_with("from ") && t.contains("import (") && !t.contains(')') {
            open = Some(line.to_string());
        } else {
            out.push(Cow::Borrowed(line));
        }
    }
    out.extend(open.map(Cow::Owned));
    out
}

/// The names a document imports by name (`from m import a`, `use m::{A, b}`,
/// `import { a } from`, `const { a } = require(...)`, `import X from`): what it
/// means to use from other files, so the chunks defining them matter most.
pub fn named_imports(lang: Lang, text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    for imp in imports(lang, text) {
        match imp {
            Import::Python { names, .. } => out.extend(names),
            Import::Rust { path, is_mod: false } => {
                out.extend(path.last().filter(|n| !matches!(n.as_str(), "self" | "super" | "crate")).cloned())
            }
            _ => {}
        }
    }
    if lang == Lang::Js {
        for line in text.lines() {
            let l = line.trim();
            let binding = if let Some(rest) = l.strip_prefix("import ") {
                rest.split_once(" from ").map(|(b, _)| b)
            } else if l.contains("require(") {
                l.split_once('=').map(|(b, _)| {
                    let b = b.trim();
                    ["const ", "let ", "var "].iter().fold(b, |b, k| b.strip_prefix(k).unwrap_or(b))
                })
            } else {
                None
            };
            let Some(binding) = binding else { continue };
            for part in binding.split([',', '{', '}']) {
                // `a as b` / `a: b`: `a` is what the other file defines, `b` what this one uses.
                for name in part.split([' ', ':']).filter(|w| !matches!(*w, "" | "as" | "type")) {
                    if is_ident(name) {
                        out.insert(name.to_string());
                    }
                }
            }
        }
    }
    out
}

/// The first quoted string of `s` (single, double or back quotes).
fn quoted(s: &str) -> Option<&str> {
    let s = s.trim_start();
    let q = s.chars().next().filter(|c| matches!(c, '"' | '\'' | '`'))?;
    let rest = &s[1..];
    rest.find(q).map(|end| &rest[..end])
}

fn is_ident(s: &str) -> bool {
    let mut cs = s.chars();
    matches!(cs.next(), Some(c) if c == '_' || c.is_alphabetic()) && cs.all(|c| c == '_' || c.is_alphanumeric())
}

/// The files an import may name, most likely first; only those that exist.
/// `file` is the importing file, `root` the workspace (imports never resolve
/// outside it).
pub fn resolve(import: &Import, file: &Path, root: &Path) -> Vec<PathBuf> {
    let dir = file.parent().unwrap_or(root);
    let mut tries: Vec<PathBuf> = Vec::new();
    match import {
        Import::Python { level, module, names } => {
            let bases: Vec<PathBuf> = if *level > 0 {
                let mut d = dir.to_path_buf();
                for _ in 1..*level {
                    d.pop();
                }
                vec![d]
            } else {
                // Absolute: from the workspace root, from its `src/`, and from every
                // ancestor of the file inside the workspace (a package root).
                let mut v = vec![root.to_path_buf(), root.join("src")];
                let mut d = dir.to_path_buf();
                while d.starts_with(root) {
                    v.push(d.clone());
                    // `import pkg.mod` inside the folder `pkg` itself (an installed package).
                    if module.first().is_some_and(|m| d.file_name().is_some_and(|n| n == m.as_str())) {
                        if let Some(parent) = d.parent() {
                            v.push(parent.to_path_buf());
                        }
                    }
                    if d == root || !d.pop() {
                        break;
                    }
                }
                v
            };
            for base in bases {
                let m = module.iter().fold(base.clone(), |p, s| p.join(s));
                // `from pkg import mod` names a module as often as a function.
                for n in names {
                    tries.push(m.join(format!("{n}.py")));
                }
                tries.push(m.with_extension("py"));
                tries.push(m.join("__init__.py"));
            }
        }
        Import::Rust { path, is_mod } => {
            if *is_mod {
                let name = &path[1];
                // `mod x;` in `a.rs` (not main/lib/mod.rs) lives in `a/x.rs`.
                let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
                let base = if matches!(stem, "main" | "lib" | "mod") { dir.to_path_buf() } else { dir.join(stem) };
                tries.push(base.join(format!("{name}.rs")));
                tries.push(base.join(name).join("mod.rs"));
            } else {
                let (base, rest): (PathBuf, &[String]) = match path[0].as_str() {
                    "crate" => (crate_src(file, root), &path[1..]),
                    "super" => (dir.parent().unwrap_or(dir).to_path_buf(), &path[1..]),
                    "self" => (dir.to_path_buf(), &path[1..]),
                    _ => (crate_src(file, root), &path[..]),
                };
                // The longest prefix that is a file: `a::b::C` is in a/b.rs, a/b/mod.rs or a.rs.
                for n in (1..=rest.len()).rev() {
                    let p = rest[..n].iter().fold(base.clone(), |p, s| p.join(s));
                    tries.push(p.with_extension("rs"));
                    tries.push(p.join("mod.rs"));
                }
            }
        }
        Import::Js { spec } => {
            if spec.starts_with("./") || spec.starts_with("../") {
                let p = dir.join(spec);
                tries.push(p.clone());
                for ext in ["ts", "tsx", "js", "jsx", "mjs", "cjs", "d.ts"] {
                    let mut s = p.clone().into_os_string();
                    s.push(format!(".{ext}"));
                    tries.push(PathBuf::from(s));
                    tries.push(p.join(format!("index.{ext}")));
                }
                // `./x.js` written for a `./x.ts` source (TypeScript's ESM style).
                if let Some(stem) = spec.strip_suffix(".js") {
                    tries.push(dir.join(format!("{stem}.ts")));
                }
            }
        }
    }
    let root = normalize(root);
    let mut seen = HashSet::new();
    tries
        .into_iter()
        .map(|p| normalize(&p))
        .filter(|p| p.starts_with(&root) && p.as_path() != normalize(file) && seen.insert(p.clone()))
        .filter(|p| std::fs::metadata(p).map(|m| m.is_file() && m.len() <= MAX_FILE_BYTES).unwrap_or(false))
        .collect()
}

/// The `src/` of the crate `file` is in (the nearest ancestor with a Cargo.toml).
fn crate_src(file: &Path, root: &Path) -> PathBuf {
    let mut d = file.parent().map(Path::to_path_buf).unwrap_or_default();
    loop {
        if d.join("Cargo.toml").is_file() {
            return d.join("src");
        }
        if d == root || !d.pop() {
            return root.join("src");
        }
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// A file's top-level items as chunks `(first line, text)`: comments and
/// decorators above an item belong to it; an item longer than [`CHUNK_LINES`]
/// keeps its first lines and then only the lines that start nested
/// definitions (an outline of a class or an `impl`).
pub fn items(text: &str) -> Vec<(usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        // Skip blank lines between items.
        if lines[i].trim().is_empty() {
            i += 1;
            continue;
        }
        let start = i;
        // Leading comments / decorators / attributes at column 0.
        while i < lines.len() && is_preamble(lines[i]) {
            i += 1;
        }
        if i >= lines.len() {
            break;
        }
        i += 1; // the item's first line
                // Its body: indented, blank, or closing lines (`}`, `};`, `)`, `]`).
        while i < lines.len() {
            let l = lines[i];
            let top = !l.is_empty() && !l.starts_with([' ', '\t']);
            let closing = top && matches!(l.trim_end().chars().next(), Some('}' | ')' | ']'));
            if top && !closing {
                break;
            }
            i += 1;
        }
        let mut end = i;
        while end > start + 1 && lines[end - 1].trim().is_empty() {
            end -= 1;
        }
        out.push((start, shorten(&lines[start..end])));
    }
    out
}

fn is_preamble(l: &str) -> bool {
    let t = l.trim_start();
    !l.starts_with([' ', '\t'])
        && (t.starts_with('#') && !t.starts_with("#!") && !t.starts_with("#include")
            || t.starts_with("//")
            || t.starts_with("/*")
            || t.starts_with(" *")
            || t.starts_with('@'))
}

/// An item of at most [`CHUNK_LINES`] lines: the head, then nested signatures.
fn shorten(lines: &[&str]) -> String {
    let mut keep: Vec<&str> = Vec::new();
    let head = CHUNK_LINES / 2;
    for (k, l) in lines.iter().enumerate() {
        if lines.len() <= CHUNK_LINES || k < head || k == lines.len() - 1 || is_signature(l) {
            keep.push(l);
        }
        if keep.len() >= CHUNK_LINES {
            break;
        }
    }
    let mut s = keep.join("\n");
    s.push('\n');
    s
}

/// Whether line `l` starts a definition (`def`, `class`, `fn`, `struct`, …;
/// nested ones too).
pub fn is_signature(l: &str) -> bool {
    let t = l.trim_start();
    let t = t.strip_prefix("pub ").or_else(|| t.strip_prefix("export ")).unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    ["def ", "class ", "fn ", "function ", "struct ", "enum ", "trait ", "interface ", "type "]
        .iter()
        .any(|k| t.starts_with(k))
}

/// The names an item defines (after `def`, `class`, `fn`, `struct`, …, or
/// before `=` / `:` at the start of a top-level line).
pub fn defined_names(item: &str) -> Vec<&str> {
    const KEYWORDS: &[&str] = &[
        "def",
        "class",
        "fn",
        "struct",
        "enum",
        "trait",
        "type",
        "const",
        "static",
        "let",
        "var",
        "function",
        "interface",
        "impl",
        "mod",
        "macro_rules!",
    ];
    let mut out = Vec::new();
    for l in item.lines() {
        let words: Vec<&str> = l.split(|c: char| !(c == '_' || c == '!' || c.is_alphanumeric())).collect();
        let words: Vec<&str> = words.into_iter().filter(|w| !w.is_empty()).collect();
        for w in words.windows(2) {
            if KEYWORDS.contains(&w[0]) && is_ident(w[1]) && !COMMON.contains(&w[1]) {
                out.push(w[1]);
            }
        }
        // `NAME = ...` / `NAME: T = ...` at column 0 (Python constants, JS exports aside).
        if !l.starts_with([' ', '\t']) {
            let head = l.split(['=', ':', '(']).next().unwrap_or("").trim();
            if is_ident(head) && !COMMON.contains(&head) && (l.contains('=') || l.contains(':')) {
                out.push(head);
            }
        }
    }
    out
}

/// Identifiers of `text` (ASCII words of 3+ characters that are not keywords).
pub fn identifiers(text: &str) -> HashSet<&str> {
    text.split(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
        .filter(|w| w.len() >= 3 && !w.as_bytes()[0].is_ascii_digit() && !COMMON.contains(w))
        .collect()
}

/// Words too common in code to say anything about relevance.
const COMMON: &[&str] = &[
    "self",
    "def",
    "class",
    "return",
    "import",
    "from",
    "None",
    "True",
    "False",
    "and",
    "not",
    "for",
    "while",
    "pub",
    "let",
    "mut",
    "impl",
    "use",
    "crate",
    "struct",
    "enum",
    "match",
    "Some",
    "Ok",
    "Err",
    "String",
    "Vec",
    "const",
    "var",
    "function",
    "this",
    "new",
    "export",
    "default",
    "async",
    "await",
    "else",
    "elif",
    "with",
    "try",
    "except",
    "raise",
    "pass",
    "lambda",
    "yield",
    "the",
    "str",
    "int",
    "len",
    "print",
    "Self",
    "fn",
    "static",
    "type",
    "null",
    "undefined",
    "typeof",
    "instanceof",
    "require",
    "module",
];

/// What the chunks are scored against, from the current document.
#[derive(Clone, Debug, Default)]
pub struct Query<'a> {
    /// Identifiers of the lines around the cursor ([`query_text`]).
    pub near: HashSet<&'a str>,
    /// Names the document imports by name ([`named_imports`]).
    pub named: HashSet<String>,
    /// Identifiers anywhere in the document.
    pub anywhere: HashSet<&'a str>,
    /// Identifiers of the [`SIMILAR_QUERY_LINES`] lines before the cursor:
    /// what similar code elsewhere is matched against.
    pub tail: HashSet<&'a str>,
}

impl<'a> Query<'a> {
    /// The query of a document (`text`, in `lang`) at byte offset `cursor`.
    pub fn new(lang: Lang, text: &'a str, cursor: usize) -> Query<'a> {
        Query {
            near: identifiers(query_text(text, cursor)),
            named: named_imports(lang, text),
            anywhere: identifiers(text),
            tail: identifiers(tail_text(text, cursor)),
        }
    }

    /// Only the text near the cursor (no imports, no rest of the document);
    /// the cursor is at its end.
    pub fn near(query: &'a str) -> Query<'a> {
        Query { near: identifiers(query), tail: identifiers(tail_text(query, query.len())), ..Default::default() }
    }
}

/// How relevant a chunk is: each name the chunk defines counts 4 when the
/// text near the cursor uses it or the document imports it by name, 2 when
/// the document uses it elsewhere; each other identifier shared with the text
/// near the cursor counts 1. The sum is divided by the square root of the
/// chunk's distinct identifiers (a long chunk must share more to win). 0 when
/// it shares nothing.
pub fn score(chunk: &str, q: &Query) -> f32 {
    let ids = identifiers(chunk);
    if ids.is_empty() {
        return 0.0;
    }
    let defined: HashSet<&str> = defined_names(chunk).into_iter().collect();
    let mut s = 0.0;
    for id in &ids {
        s += if defined.contains(id) {
            if q.near.contains(id) || q.named.contains(*id) {
                4.0
            } else if q.anywhere.contains(id) {
                2.0
            } else {
                0.0
            }
        } else if q.near.contains(id) {
            1.0
        } else {
            0.0
        };
    }
    s / (ids.len() as f32).sqrt()
}

/// The query: identifiers of the lines around the cursor (byte offset `cursor` in `text`).
pub fn query_text(text: &str, cursor: usize) -> &str {
    let (start, cursor) = lines_before(text, cursor, QUERY_LINES_BEFORE);
    let after = &text[cursor..];
    let end = after.match_indices('\n').nth(QUERY_LINES_AFTER).map(|(i, _)| cursor + i).unwrap_or(text.len());
    &text[start..end]
}

/// The [`SIMILAR_QUERY_LINES`] lines before byte offset `cursor` of `text`, up to the cursor.
pub fn tail_text(text: &str, cursor: usize) -> &str {
    let (start, cursor) = lines_before(text, cursor, SIMILAR_QUERY_LINES);
    &text[start..cursor]
}

/// Where the `n` lines before byte offset `cursor` of `text` start (the
/// cursor's own line besides), and the cursor on a character boundary.
fn lines_before(text: &str, cursor: usize, n: usize) -> (usize, usize) {
    let cursor = text.floor_char_boundary(cursor.min(text.len()));
    let start = text[..cursor].rmatch_indices('\n').nth(n).map(|(i, _)| i + 1).unwrap_or(0);
    (start, cursor)
}

/// Code like the code just before the cursor (the retrieval of RepoCoder
/// and of Copilot's neighbouring tabs): windows of [`SIMILAR_LINES`] lines
/// of the candidate files, every half window, scored by the Jaccard
/// similarity of their identifiers with [`Query::tail`]'s. A small model
/// copies such code's calls, argument order and names far more readily than
/// it uses a definition. Best first; windows under [`SIMILAR_MIN`] or
/// without code are left out.
pub fn similar(candidates: &[Candidate], q: &Query) -> Vec<(f32, Chunk)> {
    let mut out = Vec::new();
    if q.tail.is_empty() {
        return out;
    }
    for c in candidates.iter().filter(|c| c.source != Source::Recent) {
        let lines: Vec<&str> = c.text.lines().collect();
        let step = SIMILAR_LINES / 2;
        let mut start = 0;
        while start < lines.len() {
            let end = (start + SIMILAR_LINES).min(lines.len());
            let mut text = lines[start..end].join("\n");
            text.push('\n');
            let ids = identifiers(&text);
            let shared = ids.intersection(&q.tail).count();
            let jaccard = shared as f32 / (ids.len() + q.tail.len() - shared).max(1) as f32;
            if jaccard >= SIMILAR_MIN {
                out.push((jaccard, Chunk { path: c.path.clone(), line: start, text, source: c.source }));
            }
            if end == lines.len() {
                break;
            }
            start += step;
        }
    }
    // Ties: an imported file's window first (the same code in an open copy goes in once).
    out.sort_by(|(x, a), (y, b)| {
        y.total_cmp(x)
            .then((a.source != Source::Import).cmp(&(b.source != Source::Import)))
            .then_with(|| a.path.cmp(&b.path))
            .then(a.line.cmp(&b.line))
    });
    // A budget of hundreds of tokens takes a few windows; the rest need not be counted.
    out.truncate(SIMILAR_KEEP);
    out
}

/// Another file the context may draw from.
pub struct Candidate<'a> {
    /// The path the prompt shows.
    pub path: String,
    pub text: &'a str,
    pub source: Source,
    /// For [`Source::Recent`]: the 0-based lines the user edited or rested on
    /// (only items containing one of them are candidates).
    pub lines: Vec<usize>,
}

/// Choose chunks from `candidates` for a document whose text near the
/// cursor is `query`, within `budget` tokens (`count` counts a chunk's
/// tokens, path line included). Two kinds of chunk compete: code
/// [`similar`] to the lines before the cursor, up to [`SIMILAR_SHARE`] of
/// the budget, then top-level items by [`score`] (definitions of names the
/// cursor uses), then similar code again with what is left. Chunks that
/// score 0 never go in; identical or overlapping chunks go in once. Files
/// are ordered least relevant first, so the most relevant sit closest to
/// the document's window; a file's chunks keep their order in the file.
pub fn choose(candidates: &[Candidate], q: &Query, budget: usize, count: &dyn Fn(&Chunk) -> usize) -> ContextSet {
    if budget == 0 {
        return ContextSet::default();
    }
    let mut scored: Vec<(f32, Chunk)> = Vec::new();
    for c in candidates {
        for (line, text) in items(c.text) {
            if c.source == Source::Recent {
                let n = text.lines().count().max(1);
                if !c.lines.iter().any(|&l| l >= line && l < line + n) {
                    continue;
                }
            }
            let s = score(&text, q)
                * match c.source {
                    Source::Import => 1.5,
                    Source::Recent => 1.2,
                    Source::OpenDocument => 1.0,
                };
            if s > 0.0 {
                scored.push((s, Chunk { path: c.path.clone(), line, text, source: c.source }));
            }
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.path.cmp(&b.1.path)).then(a.1.line.cmp(&b.1.line)));
    let like = similar(candidates, q);
    let mut left = budget;
    let mut chosen = Vec::new();
    fill(&like, (budget as f32 * SIMILAR_SHARE) as usize, &mut left, &mut chosen, count);
    fill(&scored, left, &mut left, &mut chosen, count);
    fill(&like, left, &mut left, &mut chosen, count);
    // Group by file (chunks of one file together, in file order), files least relevant first.
    let mut order: HashMap<&str, usize> = HashMap::new();
    for (i, c) in chosen.iter().enumerate() {
        order.entry(c.path.as_str()).or_insert(i);
    }
    let mut grouped = chosen.clone();
    grouped.sort_by(|a, b| order[b.path.as_str()].cmp(&order[a.path.as_str()]).then(a.line.cmp(&b.line)));
    ContextSet { chunks: grouped }
}

/// Add chunks of `list` (best first) to `chosen` while they fit `cap` tokens
/// and what is `left` of the budget; skip one whose text is already in or
/// whose lines overlap a chosen chunk of the same file (or that holds or is
/// held by a chosen chunk's text: the same code in two files goes in once).
fn fill(list: &[(f32, Chunk)], cap: usize, left: &mut usize, chosen: &mut Vec<Chunk>, count: &dyn Fn(&Chunk) -> usize) {
    let span = |c: &Chunk| c.line..c.line + c.text.lines().count().max(1);
    let mut spent = 0;
    for (_, chunk) in list {
        if *left == 0 || spent >= cap {
            break;
        }
        let s = span(chunk);
        let clash = chosen.iter().any(|c| {
            let t = span(c);
            c.text.contains(chunk.text.trim())
                || chunk.text.contains(c.text.trim())
                || c.path == chunk.path && t.start < s.end && s.start < t.end
        });
        if clash {
            continue;
        }
        let n = count(chunk);
        if n <= *left && spent + n <= cap {
            *left -= n;
            spent += n;
            chosen.push(chunk.clone());
        }
    }
}

/// The imported files of a document as candidates (read from disk unless
/// `open` has them: the editor's unsaved text wins). `root` is the workspace.
pub fn imported<'a>(
    file: &Path,
    text: &str,
    root: &Path,
    open: &'a HashMap<PathBuf, String>,
    read: &'a mut Vec<(PathBuf, String)>,
) -> Vec<(String, PathBuf)> {
    let lang = Lang::of(file);
    let mut files: Vec<PathBuf> = Vec::new();
    for imp in imports(lang, text) {
        for p in resolve(&imp, file, root).into_iter().take(2) {
            if !files.contains(&p) {
                files.push(p);
            }
        }
        if files.len() >= MAX_IMPORTED_FILES {
            break;
        }
    }
    files.truncate(MAX_IMPORTED_FILES);
    let mut out = Vec::new();
    for p in files {
        if !open.contains_key(&p) {
            match std::fs::read(&p) {
                Ok(bytes) if !bytes.contains(&0) => match String::from_utf8(bytes) {
                    Ok(s) => read.push((p.clone(), s)),
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        out.push((display_path(&p, root), p));
    }
    out
}

/// `p` relative to `root` when inside it, with `/` separators.
pub fn display_path(p: &Path, root: &Path) -> String {
    let rel = p.strip_prefix(root).unwrap_or(p);
    rel.components()
        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Everything [`gather`] needs about the document and its surroundings.
pub struct Request<'a> {
    /// The document's file (absolute) and text; `cursor` a byte offset in it.
    pub file: &'a Path,
    pub text: &'a str,
    pub cursor: usize,
    /// The workspace root (imports resolve under it); none: imports are not followed.
    pub root: Option<&'a Path>,
    /// Other open documents (absolute path → text).
    pub open: &'a HashMap<PathBuf, String>,
    /// Recently edited or visited lines per open document.
    pub recent: &'a HashMap<PathBuf, Vec<usize>>,
    /// Token budget.
    pub budget: usize,
}

/// The context for one document: its imports, the other open documents and
/// the recent regions, chosen by [`choose`].
pub fn gather(r: &Request, count: &dyn Fn(&Chunk) -> usize) -> ContextSet {
    if r.budget == 0 {
        return ContextSet::default();
    }
    let mut read = Vec::new();
    let empty = PathBuf::new();
    let root = r.root.unwrap_or(&empty);
    let imported = if r.root.is_some() { imported(r.file, r.text, root, r.open, &mut read) } else { vec![] };
    let mut candidates: Vec<Candidate> = Vec::new();
    for (shown, p) in &imported {
        let text =
            r.open.get(p).map(String::as_str).or_else(|| read.iter().find(|(q, _)| q == p).map(|(_, s)| s.as_str()));
        if let Some(text) = text {
            candidates.push(Candidate { path: shown.clone(), text, source: Source::Import, lines: vec![] });
        }
    }
    let mut others: Vec<(&PathBuf, &String)> = r.open.iter().filter(|(p, _)| p.as_path() != r.file).collect();
    others.sort();
    for (p, text) in others {
        if imported.iter().any(|(_, q)| q == p) {
            continue;
        }
        let shown = if r.root.is_some() { display_path(p, root) } else { display_path(p, Path::new("")) };
        candidates.push(Candidate { path: shown.clone(), text, source: Source::OpenDocument, lines: vec![] });
        if let Some(lines) = r.recent.get(p) {
            candidates.push(Candidate { path: shown, text, source: Source::Recent, lines: lines.clone() });
        }
    }
    choose(&candidates, &Query::new(Lang::of(r.file), r.text, r.cursor), r.budget, count)
}

/// The llama.vim-style baseline the benchmarks compare against: chunks of 64
/// lines from the candidate files, most recently seen first, no relevance
/// ranking, within the same token budget.
pub fn ring_buffer(candidates: &[Candidate], budget: usize, count: &dyn Fn(&Chunk) -> usize) -> ContextSet {
    const RING_LINES: usize = 64;
    let mut left = budget;
    let mut chunks = Vec::new();
    'files: for c in candidates {
        let lines: Vec<&str> = c.text.lines().collect();
        for (k, part) in lines.chunks(RING_LINES).enumerate() {
            let chunk =
                Chunk { path: c.path.clone(), line: k * RING_LINES, text: part.join("\n") + "\n", source: c.source };
            let n = count(&chunk);
            if n > left {
                break 'files;
            }
            left -= n;
            chunks.push(chunk);
        }
    }
    chunks.reverse();
    ContextSet { chunks }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_imports() {
        let t = "import os, json\nfrom .util import helper, other as o\nfrom ..pkg.mod import (a,\n    b)\nx = 1\n";
        let got = imports(Lang::Python, t);
        assert_eq!(got[0], Import::Python { level: 0, module: vec!["os".into()], names: vec![] });
        assert_eq!(got[1], Import::Python { level: 0, module: vec!["json".into()], names: vec![] });
        assert_eq!(
            got[2],
            Import::Python { level: 1, module: vec!["util".into()], names: vec!["helper".into(), "other".into()] }
        );
        assert_eq!(
            got[3],
            Import::Python { level: 2, module: vec!["pkg".into(), "mod".into()], names: vec!["a".into(), "b".into()] }
        );
    }

    #[test]
    fn display_paths_are_relative_with_forward_slashes() {
        assert_eq!(display_path(Path::new("/w/pkg/a.py"), Path::new("/w")), "pkg/a.py");
        assert_eq!(display_path(Path::new("/tmp/x/a.py"), Path::new("")), "tmp/x/a.py", "no root: no leading slashes");
    }

    #[test]
    fn logical_lines_join_parenthesised_python_imports() {
        let t = "from m import (a,\n    b,\n    c)\nx = f(1,\n  2)\n";
        let lines = logical_lines(t);
        assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["from", "m", "import", "(a,", "b,", "c)"]);
        assert_eq!(lines.len(), 3, "{lines:?}");
    }

    #[test]
    fn named_imports_per_language() {
        let py =
            named_imports(Lang::Python, "import os\nfrom .util import helper, other as o\nfrom x import (p,\n  q)\n");
        for n in ["helper", "other", "p", "q"] {
            assert!(py.contains(n), "{n} in {py:?}");
        }
        assert!(!py.contains("os"), "a plain module import names no definition: {py:?}");
        let rs = named_imports(Lang::Rust, "use crate::engine::{Engine, policy::Policy};\nuse std::io;\n");
        for n in ["Engine", "Policy", "io"] {
            assert!(rs.contains(n), "{n} in {rs:?}");
        }
        let js = named_imports(Lang::Js, "import { a, b as c } from './m';\nconst { d } = require('./n');\n");
        for n in ["a", "b", "d"] {
            assert!(js.contains(n), "{n} in {js:?}");
        }
    }

    #[test]
    fn rust_and_js_imports() {
        let r = imports(
            Lang::Rust,
            "use crate::engine::{Engine, policy::Policy};\nmod worker;\npub use super::x::Y as Z;\n",
        );
        assert_eq!(r[0], Import::Rust { path: vec!["crate".into(), "engine".into(), "Engine".into()], is_mod: false });
        assert_eq!(
            r[1],
            Import::Rust {
                path: vec!["crate".into(), "engine".into(), "policy".into(), "Policy".into()],
                is_mod: false
            }
        );
        assert_eq!(r[2], Import::Rust { path: vec!["self".into(), "worker".into()], is_mod: true });
        assert_eq!(r[3], Import::Rust { path: vec!["super".into(), "x".into(), "Y".into()], is_mod: false });
        let j = imports(Lang::Js, "import { a } from './util';\nconst fs = require(\"fs\");\nimport './side.js';\n");
        let specs: Vec<_> = j
            .iter()
            .map(|i| match i {
                Import::Js { spec } => spec.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(specs, ["./util", "fs", "./side.js"]);
    }

    /// A directory of files, removed when dropped.
    struct Tree(PathBuf);
    impl Tree {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tree(files: &[(&str, &str)]) -> Tree {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("anchorcoder-context-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for (p, t) in files {
            let p = d.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, t).unwrap();
        }
        Tree(d)
    }

    #[test]
    fn resolves_inside_the_workspace_only() {
        let d = tree(&[
            ("pkg/__init__.py", ""),
            ("pkg/util.py", "def helper(): pass\n"),
            ("pkg/sub/mod.py", "from ..util import helper\n"),
            ("Cargo.toml", "[package]\n"),
            ("src/main.rs", "mod engine;\n"),
            ("src/engine/mod.rs", "pub mod policy;\n"),
            ("src/engine/policy.rs", "pub struct Policy;\n"),
            ("web/a.ts", "import { b } from './b.js';\n"),
            ("web/b.ts", "export const b = 1;\n"),
        ]);
        let root = d.path();
        let py = imports(Lang::Python, "from ..util import helper\n");
        assert_eq!(resolve(&py[0], &root.join("pkg/sub/mod.py"), root), vec![root.join("pkg/util.py")]);
        let abs = imports(Lang::Python, "from pkg.util import helper\nimport os\n");
        assert_eq!(resolve(&abs[0], &root.join("pkg/sub/mod.py"), root), vec![root.join("pkg/util.py")]);
        assert!(resolve(&abs[1], &root.join("pkg/sub/mod.py"), root).is_empty());
        // The workspace is the package folder itself (`import pkg.util` inside `pkg/`).
        let pkg = root.join("pkg");
        assert_eq!(resolve(&abs[0], &pkg.join("sub/mod.py"), &pkg), vec![pkg.join("util.py")]);
        let rs = imports(Lang::Rust, "mod engine;\nuse crate::engine::policy::Policy;\n");
        assert_eq!(resolve(&rs[0], &root.join("src/main.rs"), root), vec![root.join("src/engine/mod.rs")]);
        assert_eq!(resolve(&rs[1], &root.join("src/main.rs"), root)[0], root.join("src/engine/policy.rs"));
        let js = imports(Lang::Js, "import { b } from './b.js';\nimport x from '../../etc/passwd';\n");
        assert_eq!(resolve(&js[0], &root.join("web/a.ts"), root), vec![root.join("web/b.ts")]);
        assert!(resolve(&js[1], &root.join("web/a.ts"), root).is_empty());
    }

    #[test]
    fn items_keep_their_comments_and_outline_long_classes() {
        let mut t = String::from("import os\n\n# Adds.\n@cache\ndef add(a, b):\n    return a + b\n\n\nclass Big:\n");
        for k in 0..60 {
            t += &format!("    def m{k}(self, x):\n        return x + {k}\n");
        }
        t += "\nfn_after = 1\n";
        let it = items(&t);
        assert_eq!(it[0], (0, "import os\n".to_string()));
        assert_eq!(it[1], (2, "# Adds.\n@cache\ndef add(a, b):\n    return a + b\n".to_string()));
        assert_eq!(it[2].0, 8);
        let big = &it[2].1;
        assert_eq!(big.lines().count(), CHUNK_LINES);
        assert!(big.starts_with("class Big:\n    def m0(self, x):"));
        assert!(big.contains("    def m20(self, x):") && !big.contains("return x + 20"));
        assert_eq!(it[3], (130, "fn_after = 1\n".to_string()));
        // Rust: a closing brace at column 0 ends the item, it does not start one.
        let r = items("/// Doc.\npub fn f() {\n    1\n}\n\nimpl X {\n    fn g() {}\n}\n");
        assert_eq!(
            r,
            vec![
                (0, "/// Doc.\npub fn f() {\n    1\n}\n".to_string()),
                (5, "impl X {\n    fn g() {}\n}\n".to_string())
            ]
        );
    }

    #[test]
    fn a_chunk_defining_a_name_the_cursor_uses_wins() {
        let q = Query::near("    total = compute_total(items, discount)\n    return tot");
        let defines = "def compute_total(items, discount):\n    return sum(items) * (1 - discount)\n";
        let mentions = "def report(items):\n    print(compute_total)\n    log(items, level, extra, more, words)\n";
        let unrelated = "def parse(line):\n    return line.split()\n";
        assert!(score(defines, &q) > score(mentions, &q));
        assert!(score(mentions, &q) > 0.0);
        assert_eq!(score(unrelated, &q), 0.0);
    }

    #[test]
    fn choose_respects_the_budget_and_dedups() {
        let util = "def compute_total(items, discount):\n    return 1\n\n\ndef other():\n    pass\n";
        let cands = [
            Candidate { path: "util.py".into(), text: util, source: Source::Import, lines: vec![] },
            Candidate { path: "copy.py".into(), text: util, source: Source::OpenDocument, lines: vec![] },
        ];
        let count = |c: &Chunk| c.text.len() / 4 + 4;
        let set = choose(&cands, &Query::near("x = compute_total("), 1000, &count);
        assert_eq!(set.chunks.len(), 1, "the same chunk in two files goes in once: {set:?}");
        assert_eq!(set.chunks[0].path, "util.py");
        assert!(set.chunks[0].text.starts_with("def compute_total"));
        assert!(choose(&cands, &Query::near("x = compute_total("), 5, &count).is_empty());
        assert!(choose(&cands, &Query::near("x = compute_total("), 0, &count).is_empty());
        assert_eq!(set.files(), vec![("util.py".to_string(), set.chunks[0].text.len())]);
    }

    #[test]
    fn similar_code_is_found_by_the_lines_before_the_cursor() {
        let mut other = String::new();
        for k in 0..40 {
            other += &format!("def unrelated_{k}(value):\n    return value * {k}\n");
        }
        let at = other.lines().count();
        other += "def load(path):\n    config = read_config(path, strict=True)\n    cache.store(config)\n";
        let cands = [Candidate { path: "loader.py".into(), text: &other, source: Source::OpenDocument, lines: vec![] }];
        let q = Query::near("def reload(path):\n    config = read_config(path, ");
        let found = similar(&cands, &q);
        assert!(!found.is_empty());
        let best = &found[0].1;
        assert!(best.text.contains("read_config(path, strict=True)"), "{best:?}");
        assert!(best.line <= at && at < best.line + SIMILAR_LINES);
        assert!(found.windows(2).all(|w| w[0].0 >= w[1].0), "best first");
        // In the choice, the similar window goes in beside the items, within the budget.
        let count = |c: &Chunk| c.text.len() / 4 + 4;
        let set = choose(&cands, &q, 200, &count);
        assert!(set.chunks.iter().any(|c| c.text.contains("strict=True")), "{set:?}");
        assert!(set.chunks.iter().map(count).sum::<usize>() <= 200);
        // No identifiers before the cursor: nothing is similar.
        assert!(similar(&cands, &Query::near("\n")).is_empty());
    }

    #[test]
    fn gather_reads_imports_prefers_open_text_and_skips_binary() {
        let d = tree(&[
            ("app/util.py", "def compute_total(items, discount):\n    return 0\n"),
            ("app/blob.py", "def compute_total_bin():\n\0\0"),
        ]);
        let root = d.path();
        let file = root.join("app/main.py");
        let text = "from .util import compute_total\nfrom .blob import x\n\ntotal = compute_total(";
        let mut open = HashMap::new();
        let recent = HashMap::new();
        let count = |c: &Chunk| c.text.len() / 4 + 4;
        let set = gather(
            &Request {
                file: &file,
                text,
                cursor: text.len(),
                root: Some(root),
                open: &open,
                recent: &recent,
                budget: 500,
            },
            &count,
        );
        assert_eq!(set.files().len(), 1, "{set:?}");
        assert_eq!(set.chunks[0].path, "app/util.py");
        assert_eq!(set.chunks[0].source, Source::Import);
        // The editor's unsaved text of an imported file wins over the disk's.
        open.insert(root.join("app/util.py"), "def compute_total(items, discount, tax):\n    return 1\n".to_string());
        let r = Request {
            file: &file,
            text,
            cursor: text.len(),
            root: Some(root),
            open: &open,
            recent: &recent,
            budget: 500,
        };
        assert!(gather(&r, &count).chunks[0].text.contains("tax"));
        // Without a workspace, imports are not followed; open documents still count.
        let set = gather(&Request { root: None, ..r }, &count);
        assert_eq!(set.chunks[0].source, Source::OpenDocument);
    }

    #[test]
    fn ring_buffer_takes_whole_chunks_in_order() {
        let text: String = (0..100).map(|i| format!("line{i}\n")).collect();
        let cands = [Candidate { path: "a.py".into(), text: &text, source: Source::OpenDocument, lines: vec![] }];
        let count = |c: &Chunk| c.text.lines().count();
        let set = ring_buffer(&cands, 80, &count);
        assert_eq!(set.chunks.len(), 1);
        assert_eq!(set.chunks[0].line, 0);
        assert_eq!(ring_buffer(&cands, 200, &count).chunks.len(), 2);
    }
}
