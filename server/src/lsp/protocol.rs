//! Protocol types tower-lsp 0.20 lacks: LSP 3.18 inline completion
//! (`textDocument/inlineCompletion`) and the custom `anchorcoder/status`
//! request.
//!
//! Field names and shapes follow the 3.18 specification; everything is
//! serialized in camelCase. tower-lsp routes these through
//! `LspServiceBuilder::custom_method` with the `METHOD` names below.

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tower_lsp::lsp_types::notification::Notification;
use tower_lsp::lsp_types::request::Request;
use tower_lsp::lsp_types::{
    Command, Position, ProgressToken, Range, TextDocumentIdentifier, TextDocumentPositionParams, Url,
};

/// Marker for the `textDocument/inlineCompletion` request.
#[derive(Debug)]
pub enum InlineCompletionRequest {}

impl Request for InlineCompletionRequest {
    type Params = InlineCompletionParams;
    type Result = Option<InlineCompletionResponse>;
    const METHOD: &'static str = "textDocument/inlineCompletion";
}

/// Params of `textDocument/inlineCompletion`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlineCompletionParams {
    /// The document to complete in.
    pub text_document: TextDocumentIdentifier,
    /// The cursor position.
    pub position: Position,
    /// How and in what situation the completion was requested.
    pub context: InlineCompletionContext,
    /// Optional token for work-done progress reporting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_done_token: Option<ProgressToken>,
}

/// The context in which inline completion was requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlineCompletionContext {
    /// How the completion was triggered.
    pub trigger_kind: InlineCompletionTriggerKind,
    /// The item selected in the completion widget, if one is visible;
    /// returned items must then extend its text and use its range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_completion_info: Option<SelectedCompletionInfo>,
}

/// How inline completion was triggered (serialized as the spec's number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InlineCompletionTriggerKind {
    /// `1`: explicitly by a user gesture; return several items to cycle through.
    Invoked,
    /// `2`: automatically while editing; one item is enough.
    Automatic,
}

impl InlineCompletionTriggerKind {
    /// The number the protocol uses.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::Invoked => 1,
            Self::Automatic => 2,
        }
    }
}

impl Serialize for InlineCompletionTriggerKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.as_u8())
    }
}

impl<'de> Deserialize<'de> for InlineCompletionTriggerKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match i64::deserialize(deserializer)? {
            1 => Ok(Self::Invoked),
            2 => Ok(Self::Automatic),
            other => Err(de::Error::invalid_value(
                de::Unexpected::Signed(other),
                &"an InlineCompletionTriggerKind (1 = Invoked, 2 = Automatic)",
            )),
        }
    }
}

/// The item currently selected in the editor's completion widget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectedCompletionInfo {
    /// The range the selected item would replace.
    pub range: Range,
    /// The text the selected item would insert.
    pub text: String,
}

/// One ghost-text proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlineCompletionItem {
    /// The text that replaces `range` (plain text; we never produce snippets).
    pub insert_text: String,
    /// Text used to decide whether the item is still shown while typing;
    /// `insert_text` is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_text: Option<String>,
    /// The range to replace; must begin and end on the same line. Absent
    /// means an insertion at the request position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
    /// A command run after the item is inserted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
}

impl InlineCompletionItem {
    /// An item inserting `text` at the request position.
    pub fn new(text: impl Into<String>) -> Self {
        Self { insert_text: text.into(), filter_text: None, range: None, command: None }
    }
}

/// A collection of inline completion items.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InlineCompletionList {
    /// The items, best first.
    pub items: Vec<InlineCompletionItem>,
}

/// The result of `textDocument/inlineCompletion`: `InlineCompletionItem[] |
/// InlineCompletionList` (wrap in `Option` for `null`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InlineCompletionResponse {
    /// A bare array of items.
    Array(Vec<InlineCompletionItem>),
    /// An `InlineCompletionList`.
    List(InlineCompletionList),
}

/// Options for the `inlineCompletionProvider` server capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InlineCompletionOptions {
    /// Whether the server reports work-done progress for inline completion.
    #[serde(default)]
    pub work_done_progress: bool,
}

/// The value of the `inlineCompletionProvider` capability: `boolean |
/// InlineCompletionOptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InlineCompletionProvider {
    /// `true` / `false`.
    Simple(bool),
    /// `{"workDoneProgress": ...}`.
    Options(InlineCompletionOptions),
}

/// Name of the server capability announcing inline completion.
pub const INLINE_COMPLETION_PROVIDER: &str = "inlineCompletionProvider";

/// Sets `capabilities.inlineCompletionProvider` in a serialized
/// `InitializeResult`; lsp-types 0.94's `ServerCapabilities` has no such
/// field, so it must be added to the JSON. Does nothing when `result` has no
/// `capabilities` object.
pub fn set_inline_completion_provider(result: &mut Value, provider: InlineCompletionProvider) {
    if let Some(capabilities) = result.get_mut("capabilities").and_then(Value::as_object_mut) {
        capabilities.insert(
            INLINE_COMPLETION_PROVIDER.to_owned(),
            serde_json::to_value(provider).expect("capability serializes"),
        );
    }
}

/// The custom `anchorcoder/didMoveCursor` notification: where the user's
/// cursor rests, sent by the editor (debounced) when the cursor moves or the
/// user switches documents, so that the server warms that document's cache
/// for that place before the first keystroke. The LSP itself never tells a
/// server where the cursor is. Params: `TextDocumentPositionParams`.
#[derive(Debug)]
pub enum DidMoveCursor {}

impl Notification for DidMoveCursor {
    type Params = TextDocumentPositionParams;
    const METHOD: &'static str = "anchorcoder/didMoveCursor";
}

/// Marker for the custom `anchorcoder/status` request (no params).
#[derive(Debug)]
pub enum StatusRequest {}

impl Request for StatusRequest {
    type Params = ();
    type Result = StatusResult;
    const METHOD: &'static str = "anchorcoder/status";
}

/// Result of `anchorcoder/status`: a snapshot of the server's state.
///
/// Add fields freely: every field has a default when deserializing, and
/// ad-hoc entries can go in `extra` (flattened into the top-level object).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusResult {
    /// The model and its loading state.
    pub model: ModelStatus,
    /// The attention policy in effect (engine-defined shape).
    pub policy: Value,
    /// Per-document KV cache state.
    pub documents: Vec<DocumentCacheStatus>,
    /// Bytes held by all KV caches.
    pub cache_bytes: u64,
    /// The KV cache memory budget in bytes.
    pub cache_budget_bytes: u64,
    /// Completion requests waiting for the worker.
    pub queue_depth: usize,
    /// Latencies of the most recent completions, oldest first, in milliseconds.
    pub last_latencies_ms: Vec<f64>,
    /// Where completions come from: `{"kind": "local"}`, or a remote
    /// engine's `state` (unknown / reachable / slow / down), `latencyMs`,
    /// `lastError`, `endpoint` and counts (shape defined by the backend).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub backend: Value,
    /// Further fields, serialized at the top level.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Which model is used and whether it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ModelStatus {
    /// Local path of the model weights, once known.
    pub path: Option<String>,
    /// Where the model choice came from.
    pub source: ModelSource,
    /// Loading state.
    pub state: ModelState,
    /// The failure, when `state` is `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where the model choice came from (serialized lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelSource {
    /// The built-in default model.
    #[default]
    Default,
    /// The user's `model.path` setting.
    User,
}

/// The model's loading state (serialized lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelState {
    /// Weights are being read.
    #[default]
    Loading,
    /// Weights are being downloaded.
    Pulling,
    /// Ready to complete.
    Ready,
    /// Loading failed; see `ModelStatus::error`.
    Error,
    /// Not loaded: a remote engine serves completions.
    Unloaded,
}

/// KV cache state of one open document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentCacheStatus {
    /// The document.
    pub uri: Url,
    /// Tokens of the document's prompt covered by the cache.
    pub tokens: usize,
    /// Anchor tokens kept by the policy.
    pub anchors: usize,
    /// Tokens whose keys/values are kept after compression.
    pub kept_tokens: usize,
    /// Bytes of KV cache held for the document.
    pub kv_bytes: u64,
    /// Tokens waiting to be prefilled after recent edits.
    pub pending_tokens: usize,
    /// Prompt tokens whose K/V the last completion reused.
    #[serde(default)]
    pub reused_tokens: usize,
    /// Tokens of project context (other files) at the head of its prompt.
    #[serde(default)]
    pub context_tokens: usize,
    /// The files that context came from, least relevant first.
    #[serde(default)]
    pub context_files: Vec<ContextFileStatus>,
}

/// One file of a document's project context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextFileStatus {
    /// The path as the prompt shows it (relative to the workspace root).
    pub path: String,
    /// Bytes of its chunks in the prompt.
    pub bytes: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// Deserializes `value`, checks it serializes back to the same JSON, returns it.
    fn round_trip<T: Serialize + DeserializeOwned>(value: Value) -> T {
        let parsed: T = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), value);
        parsed
    }

    #[test]
    fn params_match_spec_shape() {
        let params: InlineCompletionParams = round_trip(json!({
            "textDocument": { "uri": "file:///src/main.rs" },
            "position": { "line": 3, "character": 14 },
            "context": {
                "triggerKind": 2,
                "selectedCompletionInfo": {
                    "range": {
                        "start": { "line": 3, "character": 7 },
                        "end": { "line": 3, "character": 8 }
                    },
                    "text": ".log"
                }
            },
            "workDoneToken": "tok-1"
        }));
        assert_eq!(params.text_document.uri.as_str(), "file:///src/main.rs");
        assert_eq!(params.position, Position::new(3, 14));
        assert_eq!(params.context.trigger_kind, InlineCompletionTriggerKind::Automatic);
        let selected = params.context.selected_completion_info.unwrap();
        assert_eq!(selected.text, ".log");
        assert_eq!(selected.range.start, Position::new(3, 7));
        assert_eq!(params.work_done_token, Some(ProgressToken::String("tok-1".into())));

        let minimal: InlineCompletionParams = round_trip(json!({
            "textDocument": { "uri": "file:///a.py" },
            "position": { "line": 0, "character": 0 },
            "context": { "triggerKind": 1 }
        }));
        assert_eq!(minimal.context.trigger_kind, InlineCompletionTriggerKind::Invoked);
        assert!(minimal.context.selected_completion_info.is_none());
        assert!(minimal.work_done_token.is_none());
    }

    #[test]
    fn trigger_kind_is_a_number() {
        assert_eq!(serde_json::to_string(&InlineCompletionTriggerKind::Invoked).unwrap(), "1");
        assert_eq!(serde_json::to_string(&InlineCompletionTriggerKind::Automatic).unwrap(), "2");
        for bad in [json!(0), json!(3), json!("1"), json!(-1)] {
            assert!(serde_json::from_value::<InlineCompletionTriggerKind>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn items_and_list_match_spec_shape() {
        let list: InlineCompletionList = round_trip(json!({
            "items": [
                {
                    "insertText": "log(\"done\");",
                    "filterText": "console.log",
                    "range": {
                        "start": { "line": 1, "character": 8 },
                        "end": { "line": 1, "character": 8 }
                    },
                    "command": { "title": "Accepted", "command": "anchorcoder.accepted", "arguments": [7] }
                },
                { "insertText": "x" }
            ]
        }));
        assert_eq!(list.items.len(), 2);
        assert_eq!(list.items[1], InlineCompletionItem::new("x"));
        assert_eq!(list.items[0].command.as_ref().unwrap().command, "anchorcoder.accepted");

        // Optional fields are omitted, not null.
        assert_eq!(
            serde_json::to_value(InlineCompletionItem::new("a\n  b")).unwrap(),
            json!({ "insertText": "a\n  b" })
        );

        let as_list: Option<InlineCompletionResponse> = round_trip(json!({ "items": [] }));
        assert_eq!(as_list, Some(InlineCompletionResponse::List(InlineCompletionList::default())));
        let as_array: Option<InlineCompletionResponse> = round_trip(json!([{ "insertText": "y" }]));
        assert_eq!(as_array, Some(InlineCompletionResponse::Array(vec![InlineCompletionItem::new("y")])));
        let none: Option<InlineCompletionResponse> = round_trip(Value::Null);
        assert_eq!(none, None);
    }

    #[test]
    fn capability_shapes() {
        let options: InlineCompletionProvider = round_trip(json!({ "workDoneProgress": false }));
        assert_eq!(options, InlineCompletionProvider::Options(InlineCompletionOptions::default()));
        let on: InlineCompletionProvider = round_trip(json!({ "workDoneProgress": true }));
        assert_eq!(on, InlineCompletionProvider::Options(InlineCompletionOptions { work_done_progress: true }));
        let simple: InlineCompletionProvider = round_trip(json!(true));
        assert_eq!(simple, InlineCompletionProvider::Simple(true));
        // `{}` is valid per spec (workDoneProgress is optional).
        assert_eq!(
            serde_json::from_value::<InlineCompletionProvider>(json!({})).unwrap(),
            InlineCompletionProvider::Options(InlineCompletionOptions::default())
        );

        let mut result = json!({ "capabilities": { "textDocumentSync": 2 }, "serverInfo": { "name": "anchorcoder" } });
        set_inline_completion_provider(&mut result, InlineCompletionProvider::Simple(true));
        assert_eq!(
            result,
            json!({
                "capabilities": { "textDocumentSync": 2, "inlineCompletionProvider": true },
                "serverInfo": { "name": "anchorcoder" }
            })
        );
        let mut no_caps = json!({});
        set_inline_completion_provider(&mut no_caps, InlineCompletionProvider::Simple(true));
        assert_eq!(no_caps, json!({}));
    }

    #[test]
    fn request_methods() {
        assert_eq!(InlineCompletionRequest::METHOD, "textDocument/inlineCompletion");
        assert_eq!(StatusRequest::METHOD, "anchorcoder/status");
        assert_eq!(DidMoveCursor::METHOD, "anchorcoder/didMoveCursor");
    }

    #[test]
    fn status_round_trips() {
        let status: StatusResult = round_trip(json!({
            "model": {
                "path": "/models/coder.gguf",
                "source": "user",
                "state": "error",
                "error": "file not found"
            },
            "policy": { "kind": "anchor", "recentLines": 8 },
            "documents": [{
                "uri": "file:///src/lib.rs",
                "tokens": 1500,
                "anchors": 40,
                "keptTokens": 300,
                "kvBytes": 1048576,
                "pendingTokens": 12, "reusedTokens": 0,
                "contextTokens": 90, "contextFiles": [{ "path": "src/util.rs", "bytes": 310 }]
            }],
            "cacheBytes": 1048576,
            "cacheBudgetBytes": 536870912,
            "queueDepth": 1,
            "lastLatenciesMs": [12.5, 40.0],
            "uptimeS": 31
        }));
        assert_eq!(status.model.source, ModelSource::User);
        assert_eq!(status.model.state, ModelState::Error);
        assert_eq!(status.model.error.as_deref(), Some("file not found"));
        assert_eq!(status.documents[0].kept_tokens, 300);
        assert_eq!(status.documents[0].context_files, [ContextFileStatus { path: "src/util.rs".into(), bytes: 310 }]);
        assert_eq!(status.last_latencies_ms, [12.5, 40.0]);
        assert_eq!(status.extra["uptimeS"], json!(31));

        let ready = serde_json::to_value(StatusResult {
            model: ModelStatus { path: None, source: ModelSource::Default, state: ModelState::Pulling, error: None },
            ..StatusResult::default()
        })
        .unwrap();
        assert_eq!(
            ready,
            json!({
                "model": { "path": null, "source": "default", "state": "pulling" },
                "policy": null,
                "documents": [],
                "cacheBytes": 0,
                "cacheBudgetBytes": 0,
                "queueDepth": 0,
                "lastLatenciesMs": []
            })
        );
        // Missing fields default, so older/newer peers still parse.
        let sparse: StatusResult = serde_json::from_value(json!({ "queueDepth": 3 })).unwrap();
        assert_eq!(sparse.queue_depth, 3);
        assert_eq!(sparse.model.state, ModelState::Loading);
    }
}
