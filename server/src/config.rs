//! Server configuration, read from `initializationOptions` and
//! `workspace/didChangeConfiguration`.
//!
//! Settings arrive as JSON, either bare (`{"completion": {...}}`) or nested
//! under an `"anchorcoder"` key. [`Config::apply`] applies a partial update key
//! by key: a bad value is reported and leaves that key's old value in place,
//! while the other keys of the same update still apply. Every key and its
//! range is documented in `docs/configuration.md`.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde::Serialize;

/// `attention.*` settings: the engine's policy spelled as settings (see
/// [`PolicySpec`](crate::engine::policy::PolicySpec), where the defaults and
/// the names live).
pub use crate::engine::policy::{PolicyName, PolicySpec as AttentionConfig};
use serde_json::{Map, Value};
use tower_lsp::lsp_types::MessageType;

/// The key under which editors namespace the settings.
pub const SECTION: &str = "anchorcoder";

/// A problem found while applying settings, for `window/showMessage` or the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigMessage {
    /// Something was ignored (an unknown key).
    Warning(String),
    /// A value was rejected; the old value was kept.
    Error(String),
}

impl ConfigMessage {
    /// The message text.
    pub fn text(&self) -> &str {
        match self {
            Self::Warning(text) | Self::Error(text) => text,
        }
    }

    /// True for [`ConfigMessage::Error`].
    pub fn is_error(&self) -> bool {
        matches!(self, Self::Error(_))
    }

    /// The LSP message type to show it with.
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Warning(_) => MessageType::WARNING,
            Self::Error(_) => MessageType::ERROR,
        }
    }
}

impl fmt::Display for ConfigMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}

/// The whole server configuration. `Default` gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// Which model to run.
    pub model: ModelConfig,
    /// The attention policy and its parameters.
    pub attention: AttentionConfig,
    /// The per-document KV cache.
    pub cache: CacheConfig,
    /// Completion length, context size and timing.
    pub completion: CompletionConfig,
    /// Inference threads; `None` means one per core.
    pub threads: Option<usize>,
    /// File to append logs to; `None` logs to stderr only.
    pub log_file: Option<PathBuf>,
    /// Where generation runs: the in-process model or a remote engine.
    pub backend: BackendConfig,
}

/// `model.*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// Model weights to load; `None` uses (and pulls if needed) the default model.
    pub path: Option<PathBuf>,
    /// Adapter to apply to the model; `None` for none.
    pub adapter: Option<PathBuf>,
}

/// `backend.*` settings: the in-process model, or a remote inference server
/// that only generates (documents, prompt windows and suggestion rules stay
/// local). The API key itself is never a setting: `api_key_env` names the
/// environment variable that holds it, so settings files stay shareable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendConfig {
    /// `local`, `openai` or `llamacpp`.
    pub kind: BackendKind,
    /// Base URL of the remote engine (`http://` or `https://`, no trailing `/`).
    pub url: Option<String>,
    /// Model name sent to the engine; `None` asks the engine (`/v1/models`).
    pub model: Option<String>,
    /// Environment variable holding the API key; `None` sends no key.
    pub api_key_env: Option<String>,
    /// Most time one remote request may take, in milliseconds.
    pub timeout_ms: u64,
    /// Serve completions from the local model while the remote is down.
    pub fallback_to_local: bool,
}

impl BackendConfig {
    /// Whether generation runs on a remote engine.
    pub fn is_remote(&self) -> bool {
        self.kind != BackendKind::Local
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Local,
            url: None,
            model: None,
            api_key_env: None,
            timeout_ms: 5000,
            fallback_to_local: false,
        }
    }
}

/// The backend kinds accepted by `backend.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The in-process model.
    #[default]
    Local,
    /// An OpenAI-compatible `/v1/completions` (vLLM, llama.cpp, Ollama, TGI).
    #[serde(rename = "openai")]
    OpenAi,
    /// llama.cpp's server, natively (`/infill`, `/completion`).
    #[serde(rename = "llamacpp")]
    LlamaCpp,
}

impl BackendKind {
    /// All kinds, as written in settings.
    pub const ALL: [BackendKind; 3] = [Self::Local, Self::OpenAi, Self::LlamaCpp];

    /// The name as written in settings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::OpenAi => "openai",
            Self::LlamaCpp => "llamacpp",
        }
    }

    /// Parses a settings name (exact, lowercase).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// `cache.*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    /// Keep KV caches between requests.
    pub enabled: bool,
    /// Memory budget for all caches together, in MiB.
    #[serde(rename = "memoryBudgetMiB")]
    pub memory_budget_mib: u64,
}

impl CacheConfig {
    /// The memory budget in bytes.
    pub fn memory_budget_bytes(&self) -> u64 {
        self.memory_budget_mib * 1024 * 1024
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self { enabled: true, memory_budget_mib: 512 }
    }
}

/// `completion.*` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CompletionConfig {
    /// Most tokens generated per completion.
    pub max_tokens: usize,
    /// Most lines in one completion.
    pub max_lines: usize,
    /// Most prompt tokens taken before the cursor.
    pub prefix_tokens: usize,
    /// Most prompt tokens taken after the cursor (FIM only).
    pub suffix_tokens: usize,
    /// Wait this long after a request before starting work, in milliseconds.
    pub debounce_ms: u64,
    /// Use fill-in-the-middle prompts (text after the cursor) when the model supports them.
    pub fim: bool,
    /// Token budget of context from other files of the project (0 = none).
    pub context_tokens: usize,
}

impl Default for CompletionConfig {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            max_lines: 8,
            prefix_tokens: 2048,
            suffix_tokens: 256,
            debounce_ms: 0,
            fim: true,
            context_tokens: crate::completion::DEFAULT_CONTEXT_TOKENS,
        }
    }
}

/// Allowed ranges, shared by validation, messages and docs.
pub mod limits {
    use std::ops::RangeInclusive;

    /// `attention.recentLines`.
    pub const RECENT_LINES: RangeInclusive<u64> = 0..=4096;
    /// `attention.sinkTokens`.
    pub const SINK_TOKENS: RangeInclusive<u64> = 0..=64;
    /// `attention.denseEvery`.
    pub const DENSE_EVERY: RangeInclusive<u64> = 0..=1024;
    /// `attention.windowTokens`.
    pub const WINDOW_TOKENS: RangeInclusive<u64> = 1..=65536;
    /// `cache.memoryBudgetMiB`.
    pub const MEMORY_BUDGET_MIB: RangeInclusive<u64> = 1..=65536;
    /// `completion.maxTokens`.
    pub const MAX_TOKENS: RangeInclusive<u64> = 1..=1024;
    /// `completion.maxLines`.
    pub const MAX_LINES: RangeInclusive<u64> = 1..=100;
    /// `completion.prefixTokens`.
    pub const PREFIX_TOKENS: RangeInclusive<u64> = 64..=32768;
    /// `completion.suffixTokens`.
    pub const SUFFIX_TOKENS: RangeInclusive<u64> = 0..=32768;
    /// `completion.contextTokens`.
    pub const CONTEXT_TOKENS: RangeInclusive<u64> = 0..=8192;
    /// `completion.debounceMs`.
    pub const DEBOUNCE_MS: RangeInclusive<u64> = 0..=10_000;
    /// `threads`.
    pub const THREADS: RangeInclusive<u64> = 1..=256;
    /// `backend.timeoutMs`.
    pub const TIMEOUT_MS: RangeInclusive<u64> = 100..=600_000;
}

impl Config {
    /// Builds a configuration from `initializationOptions` (absent = defaults).
    pub fn from_initialization_options(options: Option<&Value>) -> (Self, Vec<ConfigMessage>) {
        let mut config = Self::default();
        let messages = options.map(|o| config.apply(o)).unwrap_or_default();
        (config, messages)
    }

    /// Applies a partial update, bare or nested under `"anchorcoder"`.
    ///
    /// Unknown keys produce a [`ConfigMessage::Warning`]; invalid values a
    /// [`ConfigMessage::Error`], keeping that key's old value. `null` for a
    /// key or section restores its default; a `null` update changes nothing.
    pub fn apply(&mut self, value: &Value) -> Vec<ConfigMessage> {
        let mut u = Updater::default();
        let value = match value.get(SECTION) {
            Some(nested) => nested,
            None => value,
        };
        match value {
            // Lua clients encode an empty table as `[]`: no settings, like `{}`.
            Value::Null => {}
            Value::Array(a) if a.is_empty() => {}
            Value::Object(root) => self.apply_root(&mut u, root),
            other => u.reject("", other, "an object of settings", "keeping all current settings"),
        }
        u.messages
    }

    /// Inference threads to use: `threads`, or the number of cores.
    pub fn effective_threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    fn apply_root(&mut self, u: &mut Updater, root: &Map<String, Value>) {
        for (key, value) in root {
            match key.as_str() {
                "model" => {
                    if let Some(map) = u.section("model", value, &mut self.model) {
                        self.model.apply(u, map);
                    }
                }
                "attention" => {
                    if let Some(map) = u.section("attention", value, &mut self.attention) {
                        self.attention.apply(u, map);
                    }
                }
                "cache" => {
                    if let Some(map) = u.section("cache", value, &mut self.cache) {
                        self.cache.apply(u, map);
                    }
                }
                "completion" => {
                    if let Some(map) = u.section("completion", value, &mut self.completion) {
                        self.completion.apply(u, map);
                    }
                }
                "backend" => {
                    if let Some(map) = u.section("backend", value, &mut self.backend) {
                        self.backend.apply(u, map);
                    }
                }
                "threads" => u.optional_uint("threads", value, limits::THREADS, &mut self.threads),
                "logFile" => u.optional_path("logFile", value, &mut self.log_file),
                _ => u.unknown(key),
            }
        }
    }
}

impl ModelConfig {
    fn apply(&mut self, u: &mut Updater, map: &Map<String, Value>) {
        for (key, value) in map {
            match key.as_str() {
                "path" => u.optional_path("model.path", value, &mut self.path),
                "adapter" => u.optional_path("model.adapter", value, &mut self.adapter),
                _ => u.unknown(&format!("model.{key}")),
            }
        }
    }
}

impl BackendConfig {
    /// Key by key like the other sections; then a remote kind without a URL
    /// is refused (kind and URL keep their old values), as it could never work.
    fn apply(&mut self, u: &mut Updater, map: &Map<String, Value>) {
        let default = Self::default();
        let (old_kind, old_url) = (self.kind, self.url.clone());
        for (key, value) in map {
            match key.as_str() {
                "kind" => u.backend_kind("backend.kind", value, &mut self.kind),
                "url" => u.url("backend.url", value, &mut self.url),
                "model" => u.optional_string("backend.model", value, &mut self.model),
                "apiKeyEnv" => u.env_name("backend.apiKeyEnv", value, &mut self.api_key_env),
                "timeoutMs" => {
                    u.uint("backend.timeoutMs", value, limits::TIMEOUT_MS, &mut self.timeout_ms, default.timeout_ms)
                }
                "fallbackToLocal" => {
                    u.boolean("backend.fallbackToLocal", value, &mut self.fallback_to_local, default.fallback_to_local)
                }
                _ => u.unknown(&format!("backend.{key}")),
            }
        }
        if self.is_remote() && self.url.is_none() {
            u.messages.push(ConfigMessage::Error(format!(
                "`backend.kind` \"{}\" needs `backend.url` (e.g. \"http://127.0.0.1:8080\"); keeping \"{old_kind}\"",
                self.kind
            )));
            (self.kind, self.url) = (old_kind, old_url);
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AttentionConfig {
    fn apply(&mut self, u: &mut Updater, map: &Map<String, Value>) {
        let default = Self::default();
        for (key, value) in map {
            match key.as_str() {
                "policy" => u.policy("attention.policy", value, &mut self.policy),
                "recentLines" => u.uint(
                    "attention.recentLines",
                    value,
                    limits::RECENT_LINES,
                    &mut self.recent_lines,
                    default.recent_lines,
                ),
                "sinkTokens" => u.uint(
                    "attention.sinkTokens",
                    value,
                    limits::SINK_TOKENS,
                    &mut self.sink_tokens,
                    default.sink_tokens,
                ),
                "denseEvery" => u.uint(
                    "attention.denseEvery",
                    value,
                    limits::DENSE_EVERY,
                    &mut self.dense_every,
                    default.dense_every,
                ),
                "windowTokens" => u.uint(
                    "attention.windowTokens",
                    value,
                    limits::WINDOW_TOKENS,
                    &mut self.window_tokens,
                    default.window_tokens,
                ),
                _ => u.unknown(&format!("attention.{key}")),
            }
        }
    }
}

impl CacheConfig {
    fn apply(&mut self, u: &mut Updater, map: &Map<String, Value>) {
        let default = Self::default();
        for (key, value) in map {
            match key.as_str() {
                "enabled" => u.boolean("cache.enabled", value, &mut self.enabled, default.enabled),
                "memoryBudgetMiB" => u.uint(
                    "cache.memoryBudgetMiB",
                    value,
                    limits::MEMORY_BUDGET_MIB,
                    &mut self.memory_budget_mib,
                    default.memory_budget_mib,
                ),
                _ => u.unknown(&format!("cache.{key}")),
            }
        }
    }
}

impl CompletionConfig {
    fn apply(&mut self, u: &mut Updater, map: &Map<String, Value>) {
        let default = Self::default();
        for (key, value) in map {
            match key.as_str() {
                "maxTokens" => {
                    u.uint("completion.maxTokens", value, limits::MAX_TOKENS, &mut self.max_tokens, default.max_tokens)
                }
                "maxLines" => {
                    u.uint("completion.maxLines", value, limits::MAX_LINES, &mut self.max_lines, default.max_lines)
                }
                "prefixTokens" => u.uint(
                    "completion.prefixTokens",
                    value,
                    limits::PREFIX_TOKENS,
                    &mut self.prefix_tokens,
                    default.prefix_tokens,
                ),
                "suffixTokens" => u.uint(
                    "completion.suffixTokens",
                    value,
                    limits::SUFFIX_TOKENS,
                    &mut self.suffix_tokens,
                    default.suffix_tokens,
                ),
                "debounceMs" => u.uint(
                    "completion.debounceMs",
                    value,
                    limits::DEBOUNCE_MS,
                    &mut self.debounce_ms,
                    default.debounce_ms,
                ),
                "fim" => u.boolean("completion.fim", value, &mut self.fim, default.fim),
                "contextTokens" => u.uint(
                    "completion.contextTokens",
                    value,
                    limits::CONTEXT_TOKENS,
                    &mut self.context_tokens,
                    default.context_tokens,
                ),
                _ => u.unknown(&format!("completion.{key}")),
            }
        }
    }
}

/// Collects messages while validating and storing individual values.
#[derive(Default)]
struct Updater {
    messages: Vec<ConfigMessage>,
}

impl Updater {
    fn unknown(&mut self, path: &str) {
        self.messages.push(ConfigMessage::Warning(format!("unknown setting `{path}` ignored")));
    }

    fn reject(&mut self, path: &str, value: &Value, expected: &str, kept: &str) {
        let what = if path.is_empty() { "settings".to_owned() } else { format!("`{path}`") };
        self.messages.push(ConfigMessage::Error(format!(
            "invalid value {} for {what}: expected {expected}; {kept}",
            show(value)
        )));
    }

    /// Resolves a section: its map to apply, or `None` when it was reset
    /// (`null`) or rejected (not an object).
    fn section<'v, T: Default>(
        &mut self,
        path: &str,
        value: &'v Value,
        slot: &mut T,
    ) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            Value::Null => {
                *slot = T::default();
                None
            }
            other => {
                self.reject(path, other, "an object", "keeping its current values");
                None
            }
        }
    }

    fn uint<T>(&mut self, path: &str, value: &Value, range: RangeInclusive<u64>, slot: &mut T, default: T)
    where
        T: Copy + TryFrom<u64> + fmt::Display,
    {
        if value.is_null() {
            *slot = default;
            return;
        }
        match integer_in(value, &range).and_then(|n| T::try_from(n).ok()) {
            Some(n) => *slot = n,
            None => self.reject(
                path,
                value,
                &format!("an integer from {} to {}", range.start(), range.end()),
                &format!("keeping {slot}"),
            ),
        }
    }

    fn optional_uint<T>(&mut self, path: &str, value: &Value, range: RangeInclusive<u64>, slot: &mut Option<T>)
    where
        T: Copy + TryFrom<u64> + fmt::Display,
    {
        if value.is_null() {
            *slot = None;
            return;
        }
        match integer_in(value, &range).and_then(|n| T::try_from(n).ok()) {
            Some(n) => *slot = Some(n),
            None => self.reject(
                path,
                value,
                &format!("an integer from {} to {}, or null", range.start(), range.end()),
                &match slot {
                    Some(old) => format!("keeping {old}"),
                    None => "keeping null".to_owned(),
                },
            ),
        }
    }

    fn boolean(&mut self, path: &str, value: &Value, slot: &mut bool, default: bool) {
        match value {
            Value::Bool(b) => *slot = *b,
            Value::Null => *slot = default,
            other => self.reject(path, other, "true or false", &format!("keeping {slot}")),
        }
    }

    fn optional_path(&mut self, path: &str, value: &Value, slot: &mut Option<PathBuf>) {
        match value {
            Value::String(s) if !s.trim().is_empty() => *slot = Some(PathBuf::from(s)),
            Value::Null => *slot = None,
            other => {
                let kept = match slot {
                    Some(old) => format!("keeping \"{}\"", old.display()),
                    None => "keeping null".to_owned(),
                };
                self.reject(path, other, "a non-empty path string, or null", &kept);
            }
        }
    }

    fn optional_string(&mut self, path: &str, value: &Value, slot: &mut Option<String>) {
        match value {
            Value::String(s) if !s.trim().is_empty() => *slot = Some(s.trim().to_owned()),
            Value::Null => *slot = None,
            other => {
                let kept = keeping_string(slot);
                self.reject(path, other, "a non-empty string, or null", &kept);
            }
        }
    }

    /// An `http://` or `https://` base URL without credentials (keys come
    /// from `apiKeyEnv`, never from settings); a trailing `/` is dropped.
    fn url(&mut self, path: &str, value: &Value, slot: &mut Option<String>) {
        let parsed = match value {
            Value::Null => return *slot = None,
            Value::String(s) => reqwest::Url::parse(s.trim()).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
            }),
            _ => None,
        };
        match parsed {
            Some(u) => *slot = Some(u.as_str().trim_end_matches('/').to_owned()),
            None => {
                let kept = keeping_string(slot);
                // Quoted without the credentials it may hold.
                let shown = match value {
                    Value::String(s) => Value::String(crate::redact::redact(s)),
                    other => other.clone(),
                };
                self.reject(
                    path,
                    &shown,
                    "an http:// or https:// URL without user, password, query or fragment, or null",
                    &kept,
                );
            }
        }
    }

    /// The name of an environment variable (not the key itself).
    fn env_name(&mut self, path: &str, value: &Value, slot: &mut Option<String>) {
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && !s.starts_with(|c: char| c.is_ascii_digit())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        match value {
            Value::String(s) if ok(s) => *slot = Some(s.clone()),
            Value::Null => *slot = None,
            // Never echo what might be the key itself.
            Value::String(_) => {
                let kept = keeping_string(slot);
                self.messages.push(ConfigMessage::Error(format!(
                    "invalid value for `{path}`: expected the name of an environment variable \
                     (letters, digits and _), not the key itself; {kept}"
                )));
            }
            other => {
                let kept = keeping_string(slot);
                self.reject(path, other, "the name of an environment variable, or null", &kept);
            }
        }
    }

    fn backend_kind(&mut self, path: &str, value: &Value, slot: &mut BackendKind) {
        match value {
            Value::Null => *slot = BackendKind::default(),
            Value::String(s) if BackendKind::parse(s).is_some() => {
                *slot = BackendKind::parse(s).expect("checked above");
            }
            other => {
                self.reject(path, other, "one of \"local\", \"openai\", \"llamacpp\"", &format!("keeping \"{slot}\""))
            }
        }
    }

    fn policy(&mut self, path: &str, value: &Value, slot: &mut PolicyName) {
        match value {
            Value::Null => *slot = PolicyName::default(),
            Value::String(s) if PolicyName::parse(s).is_some() => {
                *slot = PolicyName::parse(s).expect("checked above");
            }
            other => {
                self.reject(path, other, "one of \"anchor\", \"full\", \"window\"", &format!("keeping \"{slot}\""))
            }
        }
    }
}

fn keeping_string(slot: &Option<String>) -> String {
    match slot {
        Some(old) => format!("keeping \"{old}\""),
        None => "keeping null".to_owned(),
    }
}

/// The value as a non-negative integer within `range`, accepting integral
/// floats such as `8.0` (some clients send every number as a float).
fn integer_in(value: &Value, range: &RangeInclusive<u64>) -> Option<u64> {
    let n = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(f)).map(|f| f as u64)
        })?,
        _ => return None,
    };
    range.contains(&n).then_some(n)
}

/// A JSON value for a message, shortened if long.
fn show(value: &Value) -> String {
    const MAX: usize = 60;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(messages: &[ConfigMessage]) -> Vec<&str> {
        messages.iter().filter(|m| m.is_error()).map(ConfigMessage::text).collect()
    }

    fn warnings(messages: &[ConfigMessage]) -> Vec<&str> {
        messages.iter().filter(|m| !m.is_error()).map(ConfigMessage::text).collect()
    }

    #[test]
    fn an_empty_array_means_no_settings() {
        let mut c = Config::default();
        assert!(c.apply(&serde_json::json!([])).is_empty());
        assert_eq!(c, Config::default());
        assert!(c.apply(&serde_json::json!([1])).iter().any(|m| m.is_error()));
    }

    #[test]
    fn defaults_match_the_documented_json() {
        let config = Config::default();
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            json!({
                "model": { "path": null, "adapter": null },
                "attention": { "policy": "window", "recentLines": 8, "sinkTokens": 4, "denseEvery": 0, "windowTokens": 560 },
                "cache": { "enabled": true, "memoryBudgetMiB": 512 },
                "completion": { "maxTokens": 64, "maxLines": 8, "prefixTokens": 2048, "suffixTokens": 256, "debounceMs": 0, "fim": true, "contextTokens": 512 },
                "threads": null,
                "logFile": null,
                "backend": { "kind": "local", "url": null, "model": null, "apiKeyEnv": null, "timeoutMs": 5000, "fallbackToLocal": false }
            })
        );
        assert_eq!(config.cache.memory_budget_bytes(), 512 << 20);
        assert!(config.effective_threads() >= 1);
    }

    /// Every integer key and its allowed range.
    fn ranges() -> [(&'static str, RangeInclusive<u64>); 13] {
        [
            ("attention.recentLines", limits::RECENT_LINES),
            ("attention.sinkTokens", limits::SINK_TOKENS),
            ("attention.denseEvery", limits::DENSE_EVERY),
            ("attention.windowTokens", limits::WINDOW_TOKENS),
            ("cache.memoryBudgetMiB", limits::MEMORY_BUDGET_MIB),
            ("completion.maxTokens", limits::MAX_TOKENS),
            ("completion.maxLines", limits::MAX_LINES),
            ("completion.prefixTokens", limits::PREFIX_TOKENS),
            ("completion.suffixTokens", limits::SUFFIX_TOKENS),
            ("completion.debounceMs", limits::DEBOUNCE_MS),
            ("completion.contextTokens", limits::CONTEXT_TOKENS),
            ("threads", limits::THREADS),
            ("backend.timeoutMs", limits::TIMEOUT_MS),
        ]
    }

    /// The settings' leaf keys, dotted, with their default values.
    fn leaves(prefix: &str, value: &Value, out: &mut Vec<(String, Value)>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&key, v, out);
                }
            }
            other => out.push((prefix.to_owned(), other.clone())),
        }
    }

    /// The VS Code extension exposes every key as `anchorcoder.<key>`, with the
    /// server's default and range, and sends it (its `SERVER_KEYS`).
    #[test]
    fn the_vscode_extension_exposes_every_key() {
        let package: Value = serde_json::from_str(include_str!("../../editors/vscode/package.json")).unwrap();
        let props = &package["contributes"]["configuration"]["properties"];
        let source = include_str!("../../editors/vscode/src/settings.ts");
        let sent = source.split("const SERVER_KEYS = [").nth(1).and_then(|r| r.split("] as const").next()).unwrap();
        let mut keys = Vec::new();
        leaves("", &serde_json::to_value(Config::default()).unwrap(), &mut keys);
        assert!(keys.len() > 20, "{keys:?}");
        for (key, default) in &keys {
            let prop = &props[format!("anchorcoder.{key}")];
            assert!(prop.is_object(), "package.json has no anchorcoder.{key}");
            assert_eq!(&prop["default"], default, "default of anchorcoder.{key}");
            assert!(sent.contains(&format!("'{key}'")), "SERVER_KEYS lacks {key}");
        }
        for (key, range) in ranges() {
            let prop = &props[format!("anchorcoder.{key}")];
            assert_eq!(prop["minimum"], *range.start(), "minimum of anchorcoder.{key}");
            assert_eq!(prop["maximum"], *range.end(), "maximum of anchorcoder.{key}");
        }
    }

    /// `docs/configuration.md` must show the real defaults and ranges.
    #[test]
    fn documentation_matches_the_code() {
        let doc = include_str!("../../docs/configuration.md");
        let raw = doc
            .split("### Raw `initializationOptions`")
            .nth(1)
            .and_then(|rest| rest.split("```json").nth(1))
            .and_then(|block| block.split("```").next())
            .expect("the raw initializationOptions example");
        let documented: Value = serde_json::from_str(raw).unwrap();
        assert_eq!(documented, serde_json::to_value(Config::default()).unwrap());

        for (key, range) in ranges() {
            let row = doc
                .lines()
                .find(|line| line.starts_with(&format!("| `{key}` |")))
                .unwrap_or_else(|| panic!("no table row for {key}"));
            let allowed = format!("| {} – {} |", range.start(), range.end());
            assert!(row.ends_with(&allowed), "{row} should end with {allowed}");
        }
    }

    #[test]
    fn applying_the_defaults_changes_nothing() {
        let mut config = Config::default();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        assert!(config.apply(&defaults).is_empty());
        assert_eq!(config, Config::default());
    }

    #[test]
    fn full_update_applies_every_key() {
        let mut config = Config::default();
        let messages = config.apply(&json!({
            "model": { "path": "/m/coder.safetensors", "adapter": "/m/lora" },
            "attention": { "policy": "window", "recentLines": 0, "sinkTokens": 64, "denseEvery": 4, "windowTokens": 65536 },
            "cache": { "enabled": false, "memoryBudgetMiB": 65536 },
            "completion": { "maxTokens": 1024, "maxLines": 100, "prefixTokens": 64, "suffixTokens": 0, "debounceMs": 75, "fim": false, "contextTokens": 0 },
            "threads": 256,
            "logFile": "/tmp/anchorcoder.log",
            "backend": { "kind": "openai", "url": "https://gpu.example:8000/", "model": "coder", "apiKeyEnv": "TEAM_KEY", "timeoutMs": 600000, "fallbackToLocal": true }
        }));
        assert_eq!(messages, []);
        assert_eq!(
            config,
            Config {
                model: ModelConfig { path: Some("/m/coder.safetensors".into()), adapter: Some("/m/lora".into()) },
                attention: AttentionConfig {
                    policy: PolicyName::Window,
                    recent_lines: 0,
                    sink_tokens: 64,
                    dense_every: 4,
                    window_tokens: 65536,
                },
                cache: CacheConfig { enabled: false, memory_budget_mib: 65536 },
                completion: CompletionConfig {
                    max_tokens: 1024,
                    max_lines: 100,
                    prefix_tokens: 64,
                    suffix_tokens: 0,
                    debounce_ms: 75,
                    fim: false,
                    context_tokens: 0,
                },
                threads: Some(256),
                log_file: Some("/tmp/anchorcoder.log".into()),
                backend: BackendConfig {
                    kind: BackendKind::OpenAi,
                    url: Some("https://gpu.example:8000".into()),
                    model: Some("coder".into()),
                    api_key_env: Some("TEAM_KEY".into()),
                    timeout_ms: 600000,
                    fallback_to_local: true,
                },
            }
        );
        assert_eq!(config.effective_threads(), 256);
    }

    #[test]
    fn partial_update_keeps_other_keys() {
        let mut config = Config::default();
        assert!(config.apply(&json!({ "completion": { "maxLines": 3 } })).is_empty());
        assert!(config.apply(&json!({ "completion": { "maxTokens": 10 } })).is_empty());
        assert_eq!(config.completion.max_lines, 3);
        assert_eq!(config.completion.max_tokens, 10);
        assert_eq!(config.attention, AttentionConfig::default());
    }

    #[test]
    fn accepts_settings_nested_under_anchorcoder() {
        let mut config = Config::default();
        let messages = config.apply(&json!({
            "anchorcoder": { "attention": { "policy": "full" } },
            "rust-analyzer": { "checkOnSave": true }
        }));
        assert_eq!(messages, [], "keys of other tools are not ours to judge");
        assert_eq!(config.attention.policy, PolicyName::Full);

        let (config, messages) = Config::from_initialization_options(Some(&json!({ "anchorcoder": { "threads": 2 } })));
        assert_eq!((config.threads, messages.len()), (Some(2), 0));
    }

    #[test]
    fn null_update_changes_nothing_and_null_key_restores_default() {
        let mut config = Config::default();
        config.apply(&json!({ "threads": 3, "completion": { "maxTokens": 9, "fim": false } }));
        assert!(config.apply(&Value::Null).is_empty());
        assert!(config.apply(&json!({ "anchorcoder": null })).is_empty());
        assert_eq!(config.threads, Some(3));

        assert!(config.apply(&json!({ "threads": null, "completion": { "maxTokens": null } })).is_empty());
        assert_eq!(config.threads, None);
        assert_eq!(config.completion.max_tokens, 64);
        assert!(!config.completion.fim);
        assert!(config.apply(&json!({ "completion": null })).is_empty());
        assert_eq!(config.completion, CompletionConfig::default());

        let (config, messages) = Config::from_initialization_options(None);
        assert_eq!((config, messages), (Config::default(), vec![]));
    }

    #[test]
    fn unknown_keys_warn_with_their_path() {
        let mut config = Config::default();
        let messages = config.apply(&json!({
            "completion": { "maxTokenz": 5, "maxTokens": 5 },
            "attention": { "sink": 1 },
            "cache": { "size": 1 },
            "model": { "name": "x" },
            "colour": "blue"
        }));
        let mut got = warnings(&messages);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                "unknown setting `attention.sink` ignored",
                "unknown setting `cache.size` ignored",
                "unknown setting `colour` ignored",
                "unknown setting `completion.maxTokenz` ignored",
                "unknown setting `model.name` ignored",
            ]
        );
        assert!(errors(&messages).is_empty());
        assert_eq!(config.completion.max_tokens, 5, "valid sibling still applies");
        assert!(messages.iter().all(|m| m.message_type() == MessageType::WARNING));
    }

    /// Each rejected value names the key, the value and the allowed range, and
    /// keeps the old value.
    #[test]
    fn out_of_range_values_are_rejected() {
        let cases: &[(&str, &str, Value, &str)] = &[
            ("attention", "recentLines", json!(4097), "from 0 to 4096"),
            ("attention", "sinkTokens", json!(65), "from 0 to 64"),
            ("attention", "denseEvery", json!(1025), "from 0 to 1024"),
            ("attention", "windowTokens", json!(0), "from 1 to 65536"),
            ("attention", "windowTokens", json!(65537), "from 1 to 65536"),
            ("cache", "memoryBudgetMiB", json!(0), "from 1 to 65536"),
            ("cache", "memoryBudgetMiB", json!(65537), "from 1 to 65536"),
            ("completion", "maxTokens", json!(0), "from 1 to 1024"),
            ("completion", "maxTokens", json!(1025), "from 1 to 1024"),
            ("completion", "maxLines", json!(0), "from 1 to 100"),
            ("completion", "maxLines", json!(101), "from 1 to 100"),
            ("completion", "prefixTokens", json!(63), "from 64 to 32768"),
            ("completion", "prefixTokens", json!(32769), "from 64 to 32768"),
            ("completion", "suffixTokens", json!(32769), "from 0 to 32768"),
            ("completion", "debounceMs", json!(10_001), "from 0 to 10000"),
            ("backend", "timeoutMs", json!(99), "from 100 to 600000"),
            ("completion", "maxTokens", json!(-3), "from 1 to 1024"),
            ("completion", "maxTokens", json!(12.5), "from 1 to 1024"),
            ("completion", "maxTokens", json!("12"), "from 1 to 1024"),
            ("attention", "recentLines", json!(true), "from 0 to 4096"),
        ];
        for (section, key, value, range) in cases {
            let mut config = Config::default();
            let before = serde_json::to_value(&config).unwrap();
            let messages = config.apply(&json!({ *section: { *key: value } }));
            let errs = errors(&messages);
            assert_eq!(errs.len(), 1, "{section}.{key} = {value}: {messages:?}");
            let msg = errs[0];
            let old = &before[section][key];
            assert!(msg.contains(&format!("`{section}.{key}`")), "{msg}");
            assert!(msg.contains(&value.to_string()), "{msg}");
            assert!(msg.contains(range), "{msg}");
            assert!(msg.ends_with(&format!("keeping {old}")), "{msg}");
            assert_eq!(serde_json::to_value(&config).unwrap(), before, "{msg}");
        }
    }

    #[test]
    fn threads_range_and_null() {
        let mut config = Config::default();
        for bad in [json!(0), json!(257), json!("4")] {
            let messages = config.apply(&json!({ "threads": bad }));
            assert_eq!(
                errors(&messages),
                [format!(
                    "invalid value {bad} for `threads`: expected an integer from 1 to 256, or null; keeping null"
                )]
            );
            assert_eq!(config.threads, None);
        }
        assert!(config.apply(&json!({ "threads": 8.0 })).is_empty());
        assert_eq!(config.threads, Some(8));
        let messages = config.apply(&json!({ "threads": 0 }));
        assert!(errors(&messages)[0].ends_with("keeping 8"));
        assert_eq!(config.threads, Some(8));
    }

    #[test]
    fn policy_must_be_one_of_three() {
        let mut config = Config::default();
        for name in ["anchor", "full", "window"] {
            assert!(config.apply(&json!({ "attention": { "policy": name } })).is_empty());
            assert_eq!(config.attention.policy.as_str(), name);
        }
        for bad in [json!("Anchor"), json!("sparse"), json!(1)] {
            let messages = config.apply(&json!({ "attention": { "policy": bad } }));
            assert_eq!(
                errors(&messages),
                [format!(
                    "invalid value {bad} for `attention.policy`: expected one of \"anchor\", \"full\", \"window\"; keeping \"window\""
                )]
            );
            assert_eq!(config.attention.policy, PolicyName::Window);
        }
        assert_eq!(PolicyName::parse("full"), Some(PolicyName::Full));
        assert_eq!(PolicyName::parse("FULL"), None);
    }

    #[test]
    fn booleans_and_paths_are_type_checked() {
        let mut config = Config::default();
        let messages = config.apply(&json!({
            "cache": { "enabled": "no" },
            "completion": { "fim": 0 },
            "model": { "path": 42, "adapter": "" },
            "logFile": ["a"]
        }));
        let mut errs = errors(&messages);
        errs.sort_unstable();
        assert_eq!(
            errs,
            [
                "invalid value \"\" for `model.adapter`: expected a non-empty path string, or null; keeping null",
                "invalid value \"no\" for `cache.enabled`: expected true or false; keeping true",
                "invalid value 0 for `completion.fim`: expected true or false; keeping true",
                "invalid value 42 for `model.path`: expected a non-empty path string, or null; keeping null",
                "invalid value [\"a\"] for `logFile`: expected a non-empty path string, or null; keeping null",
            ]
        );
        assert_eq!(config, Config::default());

        config.apply(&json!({ "model": { "path": "/a" } }));
        let messages = config.apply(&json!({ "model": { "path": false } }));
        assert!(errors(&messages)[0].ends_with("keeping \"/a\""));
        assert_eq!(config.model.path, Some(PathBuf::from("/a")));
    }

    #[test]
    fn bad_values_do_not_block_valid_siblings() {
        let mut config = Config::default();
        let messages = config.apply(&json!({
            "attention": { "recentLines": 99999, "sinkTokens": 2, "policy": "nope", "windowTokens": 512 },
            "completion": { "maxTokens": 0, "maxLines": 2 },
            "threads": 4
        }));
        assert_eq!(errors(&messages).len(), 3, "{messages:?}");
        assert_eq!(config.attention.recent_lines, 8);
        assert_eq!(config.attention.sink_tokens, 2);
        assert_eq!(config.attention.policy, PolicyName::Window);
        assert_eq!(config.attention.window_tokens, 512);
        assert_eq!(config.completion.max_tokens, 64);
        assert_eq!(config.completion.max_lines, 2);
        assert_eq!(config.threads, Some(4));
        assert!(messages.iter().all(|m| m.message_type() == MessageType::ERROR));
    }

    #[test]
    fn non_object_sections_and_roots_are_rejected() {
        let mut config = Config::default();
        let messages = config.apply(&json!({ "completion": 5, "cache": [], "threads": 2 }));
        let mut errs = errors(&messages);
        errs.sort_unstable();
        assert_eq!(
            errs,
            [
                "invalid value 5 for `completion`: expected an object; keeping its current values",
                "invalid value [] for `cache`: expected an object; keeping its current values",
            ]
        );
        assert_eq!(config.threads, Some(2));

        let messages = config.apply(&json!("fast please"));
        assert_eq!(
            errors(&messages),
            ["invalid value \"fast please\" for settings: expected an object of settings; keeping all current settings"]
        );
        assert_eq!(config.threads, Some(2));
    }

    #[test]
    fn backend_values_are_checked_and_keys_never_echoed() {
        let mut config = Config::default();
        let messages = config.apply(&json!({ "backend": {
            "kind": "ollama", "url": "ftp://host", "apiKeyEnv": "sk-secret-123", "model": 7, "fallbackToLocal": "yes"
        }}));
        let mut errs = errors(&messages);
        errs.sort_unstable();
        assert_eq!(
            errs,
            [
                "invalid value \"ftp://host\" for `backend.url`: expected an http:// or https:// URL without user, password, query or fragment, or null; keeping null",
                "invalid value \"ollama\" for `backend.kind`: expected one of \"local\", \"openai\", \"llamacpp\"; keeping \"local\"",
                "invalid value \"yes\" for `backend.fallbackToLocal`: expected true or false; keeping false",
                "invalid value 7 for `backend.model`: expected a non-empty string, or null; keeping null",
                "invalid value for `backend.apiKeyEnv`: expected the name of an environment variable (letters, digits and _), not the key itself; keeping null",
            ]
        );
        assert!(messages.iter().all(|m| !m.text().contains("sk-secret")));
        assert_eq!(config, Config::default());

        for bad in ["http://user:pw@host", "http://host/?k=1", "not a url", "http://"] {
            let messages = config.apply(&json!({ "backend": { "url": bad } }));
            assert_eq!(errors(&messages).len(), 1, "{bad}: {messages:?}");
        }
        // A refused URL's credentials are not quoted back.
        let messages = config.apply(&json!({ "backend": { "url": "http://alice:s3cret-pw@gpu:8080" } }));
        assert!(messages[0].text().contains("\"http://[redacted]@gpu:8080\""), "{messages:?}");
        assert!(!messages[0].text().contains("s3cret"), "{messages:?}");
        assert_eq!(config.backend.url, None);
    }

    #[test]
    fn a_remote_kind_needs_a_url() {
        let mut config = Config::default();
        let messages = config.apply(&json!({ "backend": { "kind": "llamacpp" } }));
        assert_eq!(
            errors(&messages),
            ["`backend.kind` \"llamacpp\" needs `backend.url` (e.g. \"http://127.0.0.1:8080\"); keeping \"local\""]
        );
        assert!(!config.backend.is_remote());
        // Kind and URL together, in either order, apply; the URL is normalized.
        assert!(config
            .apply(&json!({ "backend": { "url": "http://127.0.0.1:8080/", "kind": "llamacpp" } }))
            .is_empty());
        assert_eq!(config.backend.kind, BackendKind::LlamaCpp);
        assert_eq!(config.backend.url.as_deref(), Some("http://127.0.0.1:8080"));
        assert!(config.apply(&json!({ "backend": { "url": "https://h.example/llm/" } })).is_empty());
        assert_eq!(config.backend.url.as_deref(), Some("https://h.example/llm"));
        // Dropping the URL of a remote kind is refused as a whole: the kind stays remote and needs it.
        let messages = config.apply(&json!({ "backend": { "url": null } }));
        assert_eq!(errors(&messages).len(), 1, "{messages:?}");
        assert!(config.apply(&json!({ "backend": null })).is_empty());
        assert_eq!(config.backend, BackendConfig::default());
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let mut config = Config::default();
        let long = "x".repeat(500);
        let messages = config.apply(&json!({ "attention": { "policy": long } }));
        let msg = errors(&messages)[0];
        assert!(msg.len() < 200, "{msg}");
        assert!(msg.contains('…'));
        assert_eq!(messages[0].to_string(), msg);
    }
}
