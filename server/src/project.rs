//! The worker's view of the project around each document: the workspace
//! roots, the open documents' texts, the lines the user was recently at, and
//! whether a document's project context must be chosen again.
//!
//! Choosing the context is [`context::gather`]; this module decides *when*
//! and *from what*. A document's context is chosen again only when the inputs
//! that matter change — its import lines, the definition the cursor is in
//! ([`place`]), the set of open documents, the workspace roots or the budget
//! — never on an ordinary keystroke: a new context changes the prompt's lead,
//! so the document's cache fills again (the worker chooses and fills it in
//! idle time, after a pause in typing).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use ropey::Rope;

use crate::context::{self, Chunk, ContextSet};

/// Recent cursor lines remembered per document.
const RECENT_LINES: usize = 8;
/// Open documents larger than this are not drawn from (generated or data files).
const MAX_OPEN_BYTES: usize = 1 << 20;
/// Files whose presence marks a project's root, for documents outside every
/// workspace folder the editor named (or when it named none).
const ROOT_MARKERS: [&str; 7] =
    [".git", "Cargo.toml", "pyproject.toml", "setup.py", "package.json", "go.mod", "tsconfig.json"];
/// How far up from a document a root marker is looked for.
const ROOT_SEARCH_DEPTH: usize = 12;
/// Lines above the cursor searched for the definition it is in ([`place`]).
const PLACE_SEARCH_LINES: usize = 400;

/// What [`Project::choose`] chose for a document.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chosen {
    /// The context, in prompt order.
    pub set: ContextSet,
    /// The document's path as the prompt shows it (relative to its root).
    pub shown_path: Option<String>,
}

/// The open documents, roots and recent lines, and per document the key of
/// the inputs its context was last chosen from.
#[derive(Default)]
pub struct Project {
    roots: Vec<PathBuf>,
    open: HashMap<String, Rope>,
    recent: HashMap<String, VecDeque<usize>>,
    chosen_from: HashMap<String, u64>,
}

impl Project {
    /// The workspace folders the editor named (imports resolve under the one
    /// holding a document).
    pub fn set_roots(&mut self, roots: Vec<PathBuf>) {
        self.roots = roots;
    }

    /// The user is at `cursor` in `uri`, whose text is `rope`.
    pub fn saw(&mut self, uri: &str, rope: &Rope, cursor: usize) {
        self.open.insert(uri.to_string(), rope.clone());
        let line = rope.byte_to_line(cursor.min(rope.len_bytes()));
        let recent = self.recent.entry(uri.to_string()).or_default();
        recent.retain(|&l| l != line);
        recent.push_back(line);
        while recent.len() > RECENT_LINES {
            recent.pop_front();
        }
    }

    /// `uri` was closed.
    pub fn close(&mut self, uri: &str) {
        self.open.remove(uri);
        self.recent.remove(uri);
        self.chosen_from.remove(uri);
    }

    /// Forget every choice (the budget changed): each document chooses again.
    pub fn invalidate(&mut self) {
        self.chosen_from.clear();
    }

    /// Whether `uri`'s context should be chosen (again) for the cursor at
    /// `cursor` in `rope` under `budget`.
    pub fn stale(&self, uri: &str, rope: &Rope, cursor: usize, budget: usize) -> bool {
        self.chosen_from.get(uri) != Some(&self.key(uri, rope, cursor, budget))
    }

    /// Choose `uri`'s context for the cursor at `cursor` in `rope` within
    /// `budget` tokens (`count` counts a chunk's), and remember what it was
    /// chosen from. Documents that are not files get an empty context.
    pub fn choose(
        &mut self,
        uri: &str,
        rope: &Rope,
        cursor: usize,
        budget: usize,
        count: &dyn Fn(&Chunk) -> usize,
    ) -> Chosen {
        self.chosen_from.insert(uri.to_string(), self.key(uri, rope, cursor, budget));
        let Some(file) = file_path(uri) else { return Chosen::default() };
        let root = self.root_of(&file);
        let open: HashMap<PathBuf, String> = self
            .open
            .iter()
            .filter(|(u, r)| u.as_str() != uri && r.len_bytes() <= MAX_OPEN_BYTES)
            .filter_map(|(u, r)| Some((file_path(u)?, r.to_string())))
            .collect();
        let recent: HashMap<PathBuf, Vec<usize>> = self
            .recent
            .iter()
            .filter(|(u, _)| u.as_str() != uri)
            .filter_map(|(u, lines)| Some((file_path(u)?, lines.iter().rev().copied().collect())))
            .collect();
        let text = rope.to_string();
        let request = context::Request {
            file: &file,
            text: &text,
            cursor: cursor.min(text.len()),
            root: root.as_deref(),
            open: &open,
            recent: &recent,
            budget,
        };
        chosen(&request, count)
    }

    /// The workspace root holding `file`: the deepest folder the editor
    /// named, else the nearest folder above it with a project marker.
    pub fn root_of(&self, file: &Path) -> Option<PathBuf> {
        if let Some(root) = self.roots.iter().filter(|r| file.starts_with(r)).max_by_key(|r| r.components().count()) {
            return Some(root.clone());
        }
        file.ancestors()
            .skip(1)
            .take(ROOT_SEARCH_DEPTH)
            .find(|dir| ROOT_MARKERS.iter().any(|m| dir.join(m).exists()))
            .map(Path::to_path_buf)
    }

    /// What a document's context depends on: its import lines, the place of
    /// the cursor, the other open documents, the roots and the budget.
    fn key(&self, uri: &str, rope: &Rope, cursor: usize, budget: usize) -> u64 {
        let mut h = DefaultHasher::new();
        budget.hash(&mut h);
        place(rope, cursor).hash(&mut h);
        self.roots.hash(&mut h);
        let mut others: Vec<&String> = self.open.keys().filter(|u| u.as_str() != uri).collect();
        others.sort();
        others.hash(&mut h);
        for line in rope.lines() {
            // Borrowed unless the line spans two of the rope's chunks.
            let line: std::borrow::Cow<str> = line.into();
            let t = line.trim_start();
            if is_import_line(t) {
                t.trim_end().hash(&mut h);
            }
        }
        h.finish()
    }
}

/// The context of one file on disk with no editor around it (`anchorcoder
/// complete --workspace`, `anchorcoder eval --context ours`): its imports under
/// `root` and the `open` files (path → text), as the server chooses them.
pub fn file_context(
    file: &Path,
    text: &str,
    cursor: usize,
    root: &Path,
    open: &HashMap<PathBuf, String>,
    budget: usize,
    count: &dyn Fn(&Chunk) -> usize,
) -> Chosen {
    let request = context::Request {
        file,
        text,
        cursor: cursor.min(text.len()),
        root: Some(root),
        open,
        recent: &HashMap::new(),
        budget,
    };
    chosen(&request, count)
}

/// [`context::gather`] and the document's path as the prompt shows it.
fn chosen(r: &context::Request, count: &dyn Fn(&Chunk) -> usize) -> Chosen {
    let set = context::gather(r, count);
    let shown_path = Some(match r.root {
        Some(root) => context::display_path(r.file, root),
        None => r.file.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    })
    .filter(|p| !p.is_empty());
    Chosen { set, shown_path }
}

/// Where the cursor is, as far as its context cares: the nearest line above
/// the cursor's that starts a definition ([`context::is_signature`]) or a
/// top-level statement, up to the name it defines (`def parse`, `class Config`,
/// `pub fn main`). Typing in a function body keeps it, and so does typing a
/// new `def` line (the line being typed is not looked at); moving to another
/// function changes it. `None` at the top of a document.
fn place(rope: &Rope, cursor: usize) -> Option<String> {
    let line = rope.byte_to_line(cursor.min(rope.len_bytes()));
    (line.saturating_sub(PLACE_SEARCH_LINES)..line).rev().find_map(|n| {
        let l: std::borrow::Cow<str> = rope.line(n).into();
        let t = l.trim();
        let top = !l.starts_with([' ', '\t']) && !t.is_empty();
        let closing = matches!(t.chars().next(), Some('}' | ')' | ']'));
        let comment = ["#", "//", "/*", "*", "@"].iter().any(|c| t.starts_with(c));
        if closing || comment || !(top || context::is_signature(t)) {
            return None;
        }
        let end = t.find(['(', ':', '{', '<', '=']).unwrap_or(t.len());
        Some(t[..end].trim_end().chars().take(80).collect())
    })
}

/// A line that may import another file (in any language the context knows):
/// a change to one can change what the context draws from.
fn is_import_line(t: &str) -> bool {
    const STARTS: [&str; 7] = ["import ", "from ", "use ", "pub use ", "mod ", "pub mod ", "export "];
    STARTS.iter().any(|s| t.starts_with(s)) || t.contains("require(")
}

/// The file a `file://` URI names (percent-decoded); `None` for other schemes.
pub fn file_path(uri: &str) -> Option<PathBuf> {
    let rest = uri.strip_prefix("file://")?;
    // `file:///path` or `file://localhost/path`.
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    let path = String::from_utf8(out).ok()?;
    // Windows: `file:///C:/dir` names `C:/dir`.
    let path = match path.as_bytes() {
        [b'/', drive, b':', ..] if drive.is_ascii_alphabetic() => path[1..].to_string(),
        _ => path,
    };
    Some(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(c: &Chunk) -> usize {
        c.text.len() / 4 + 2
    }

    #[test]
    fn file_uris_become_paths() {
        assert_eq!(file_path("file:///a/b%20c.py"), Some(PathBuf::from("/a/b c.py")));
        assert_eq!(file_path("file://localhost/x.rs"), Some(PathBuf::from("/x.rs")));
        assert_eq!(file_path("untitled:Untitled-1"), None);
        assert_eq!(file_path("file:///C:/w/a.py"), Some(PathBuf::from("C:/w/a.py")));
    }

    #[test]
    fn the_place_is_the_definition_above_the_cursors_line() {
        let text = "import os\n\nclass Config:\n    # A comment.\n    def load(self, path):\n        x = 1\n        y\n\n@cache\ndef top():\n    pass\n}\n";
        let rope = Rope::from_str(text);
        let at = |s: &str| place(&rope, text.find(s).unwrap());
        assert_eq!(at("import"), None, "nothing above the first line");
        assert_eq!(at("class"), Some("import os".into()), "a top-level statement counts");
        assert_eq!(at("    def load"), Some("class Config".into()), "comments are skipped");
        assert_eq!(at("        y"), Some("def load".into()), "nested definitions count");
        assert_eq!(at("def top"), Some("def load".into()), "decorators and the line typed are not looked at");
        assert_eq!(at("    pass"), Some("def top".into()));
        assert_eq!(place(&rope, text.len()), Some("def top".into()), "closing lines are skipped");
    }

    #[test]
    fn the_context_comes_from_imports_under_the_root_and_is_chosen_again_only_when_its_inputs_change() {
        let dir = std::env::temp_dir().join(format!("anchorcoder-project-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pkg")).unwrap();
        std::fs::write(dir.join("pyproject.toml"), "").unwrap();
        std::fs::write(
            dir.join("pkg/util.py"),
            "def parse_header(line):\n    return line.split(':', 1)\n\n\ndef unused():\n    pass\n",
        )
        .unwrap();
        let uri = format!("file://{}/pkg/main.py", dir.display());
        let text = "from .util import parse_header\n\n\ndef handle(line):\n    name, value = parse_header(";
        let rope = Rope::from_str(text);
        let mut p = Project::default();
        p.saw(&uri, &rope, text.len());
        assert_eq!(p.root_of(&dir.join("pkg/main.py")), Some(dir.clone()), "found by its pyproject.toml");
        assert!(p.stale(&uri, &rope, text.len(), 512));
        let chosen = p.choose(&uri, &rope, text.len(), 512, &count);
        assert_eq!(chosen.shown_path.as_deref(), Some("pkg/main.py"));
        let files = chosen.set.files();
        assert_eq!(files.first().map(|(f, _)| f.as_str()), Some("pkg/util.py"), "{files:?}");
        assert!(chosen.set.chunks.iter().any(|c| c.text.contains("def parse_header")), "{:?}", chosen.set);
        assert!(!p.stale(&uri, &rope, text.len(), 512), "chosen for these inputs");

        // Typing in the body changes nothing the context depends on.
        let typed = Rope::from_str(&format!("{text}line)\n"));
        p.saw(&uri, &typed, typed.len_bytes());
        assert!(!p.stale(&uri, &typed, typed.len_bytes(), 512));
        // Moving to another function does (its context is chosen for it).
        let two = Rope::from_str(&format!("{text}line)\n\n\ndef other(x):\n    return x\n"));
        assert!(!p.stale(&uri, &two, typed.len_bytes(), 512), "still in handle");
        assert!(p.stale(&uri, &two, two.len_bytes() - 2, 512), "in other");
        // A new import, another open document, or a new budget does.
        let imports = Rope::from_str(&format!("import os\n{text}"));
        assert!(p.stale(&uri, &imports, imports.len_bytes(), 512));
        assert!(p.stale(&uri, &typed, typed.len_bytes(), 256));
        let other = format!("file://{}/pkg/other.py", dir.display());
        p.saw(&other, &Rope::from_str("x = 1\n"), 0);
        assert!(p.stale(&uri, &typed, typed.len_bytes(), 512));
        p.close(&other);
        assert!(!p.stale(&uri, &typed, typed.len_bytes(), 512), "back to the inputs it was chosen from");

        // The editor's workspace folder wins over markers; non-file documents get nothing.
        p.set_roots(vec![dir.join("pkg")]);
        assert_eq!(p.root_of(&dir.join("pkg/main.py")), Some(dir.join("pkg")));
        assert_eq!(p.choose("untitled:1", &rope, 0, 512, &count), Chosen::default());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
