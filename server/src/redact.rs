//! One redaction step for every text that leaves the process: JSON-RPC
//! errors, `window/showMessage` / `window/logMessage`, `anchorcoder/status`
//! and the log file.
//!
//! Two kinds of secret are masked with [`MASK`]:
//! - **registered values**: the API key read from `backend.apiKeyEnv` is
//!   registered the moment it is read ([`register_secret`]), so an engine
//!   that echoes the request headers in an error body cannot bring it back
//!   out through a message;
//! - **generic patterns**, whatever their value: the value of an
//!   `Authorization:` (or `X-Api-Key:`) header, in header, JSON or
//!   `key=value` form, the token after `Bearer`, and the user and password
//!   of a URL (`http://user:password@host` → `http://[redacted]@host`).
//!
//! The registry only grows (a key that was ever read stays masked after a
//! configuration change) and holds at most [`MAX_SECRETS`] values.

use std::sync::RwLock;

/// What a secret is replaced with.
pub const MASK: &str = "[redacted]";

/// Values shorter than this are not registered: masking every "abc" in every
/// message would do more harm than a key that short could suffer.
pub const MIN_SECRET_LEN: usize = 4;

/// The most values the registry keeps (the oldest are not dropped; new ones
/// past this are ignored — one key per configuration change, a few at most).
pub const MAX_SECRETS: usize = 64;

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Header names whose values are always masked (matched case-insensitively;
/// `proxy-authorization` is covered by `authorization`).
const SECRET_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// Mask `value` in everything [`redact`] sees from now on (also its JSON- and
/// percent-escaped spellings, in case an engine echoes it that way).
pub fn register_secret(value: &str) {
    let value = value.trim();
    if value.len() < MIN_SECRET_LEN {
        return;
    }
    let json = serde_json::to_string(value).unwrap_or_default();
    let json = json.trim_matches('"').to_string();
    let percent: String = value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    for v in [value.to_string(), json, percent] {
        if !secrets.contains(&v) && secrets.len() < MAX_SECRETS {
            secrets.push(v);
        }
    }
    // Longest first, so a value that contains another is masked whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every registered secret, header credential, bearer token and
/// URL password replaced by [`MASK`].
pub fn redact(text: &str) -> String {
    let mut out = text.to_string();
    {
        let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        for s in secrets.iter() {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
    }
    let out = mask_header_values(&out);
    let out = mask_bearer_tokens(&out);
    mask_url_userinfo(&out)
}

/// [`redact`] every string in a JSON value (keys stay: they are ours).
pub fn redact_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => {
            let r = redact(s);
            if r != *s {
                *s = r;
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(redact_json),
        _ => {}
    }
}

/// Whether `b` may be part of a token (a key, a password): printable, not a
/// quote, separator or bracket.
fn token_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'\\' | b',' | b';' | b')' | b'}' | b']' | b'>' | b'`')
}

/// `Authorization: Basic xyz`, `"authorization": "Bearer xyz"`,
/// `x-api-key=xyz`: everything after the separator up to the end of the line
/// or the closing quote.
fn mask_header_values(text: &str) -> String {
    let lower = text.to_ascii_lowercase().into_bytes();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let Some(name) = SECRET_HEADERS.iter().find(|h| lower[i..].starts_with(h.as_bytes())) else {
            i += 1;
            continue;
        };
        // Separator: optional closing quote, spaces, then `:` or `=`.
        let mut j = i + name.len();
        while j < bytes.len() && matches!(bytes[j], b'"' | b'\'' | b'\\') {
            j += 1;
        }
        while j < bytes.len() && bytes[j] == b' ' {
            j += 1;
        }
        if j >= bytes.len() || !matches!(bytes[j], b':' | b'=') {
            i += name.len();
            continue;
        }
        j += 1;
        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t') {
            j += 1;
        }
        // An opening quote (possibly JSON-escaped) ends the value at its twin.
        let mut quote = None;
        while j < bytes.len() && matches!(bytes[j], b'"' | b'\'' | b'\\') {
            if bytes[j] != b'\\' {
                quote = Some(bytes[j]);
            }
            j += 1;
        }
        let start = j;
        while j < bytes.len()
            && !matches!(bytes[j], b'\n' | b'\r')
            && Some(bytes[j]) != quote
            && !(quote.is_some() && bytes[j] == b'\\')
            && !(quote.is_none() && matches!(bytes[j], b',' | b';' | b'}' | b']' | b'"'))
        {
            j += 1;
        }
        if j > start {
            out.push_str(&text[copied..start]);
            out.push_str(MASK);
            copied = j;
        }
        i = j.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// The token after `Bearer ` (any case).
fn mask_bearer_tokens(text: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(at) = lower[from..].find("bearer").map(|k| from + k) {
        let mut j = at + "bearer".len();
        let spaces = j;
        while j < bytes.len() && matches!(bytes[j], b' ' | b'\t' | b'+') {
            j += 1;
        }
        let start = j;
        while j < bytes.len() && token_byte(bytes[j]) {
            j += 1;
        }
        // "bearer" must stand alone and be followed by blanks and a token,
        // which is not already masked; in prose ("a bearer of news") only a
        // long token counts, after the header's spelling ("Bearer") any.
        let alone = at == 0 || !bytes[at - 1].is_ascii_alphanumeric();
        let header = bytes[at] == b'B';
        let token = j > start && (header || j - start >= 8) && !text[start..j].starts_with(MASK);
        if alone && start > spaces && token {
            out.push_str(&text[copied..start]);
            out.push_str(MASK);
            copied = j;
        }
        from = j.max(at + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// `scheme://user:password@host` → `scheme://[redacted]@host`.
fn mask_url_userinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(at) = text[from..].find("://").map(|k| from + k) {
        let start = at + 3;
        let mut j = start;
        let mut last_at = None;
        while j < bytes.len()
            && !matches!(bytes[j], b'/' | b'?' | b'#' | b'"' | b'\'' | b'`' | b'<' | b'>' | b'\\')
            && !bytes[j].is_ascii_whitespace()
        {
            if bytes[j] == b'@' {
                last_at = Some(j);
            }
            j += 1;
        }
        if let Some(end) = last_at.filter(|&e| e > start && &text[start..e] != MASK) {
            out.push_str(&text[copied..start]);
            out.push_str(MASK);
            copied = end;
        }
        from = j.max(start);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_are_masked_in_every_spelling() {
        register_secret("sk-redact-unit-4711/\"x");
        let echoed = r#"{"error":"bad key","headers":{"x-key":"sk-redact-unit-4711/\"x"}} raw sk-redact-unit-4711/"x pct sk-redact-unit-4711%2F%22x"#;
        let r = redact(echoed);
        assert!(!r.contains("sk-redact-unit-4711"), "{r}");
        assert_eq!(r.matches(MASK).count(), 3, "{r}");
        // Too short to register: not masked.
        register_secret("abc");
        assert_eq!(redact("abc"), "abc");
    }

    #[test]
    fn authorization_headers_are_masked_in_any_form() {
        let cases = [
            ("authorization: Bearer xyz123\nhost: h", "authorization: [redacted]\nhost: h"),
            ("Authorization: Basic dXNlcjpwdw==", "Authorization: [redacted]"),
            (r#"{"authorization":"Token abc","accept":"*/*"}"#, r#"{"authorization":"[redacted]","accept":"*/*"}"#),
            (r#"{\"Authorization\": \"Bearer q\", \"a\": 1}"#, r#"{\"Authorization\": \"[redacted]\", \"a\": 1}"#),
            ("proxy-authorization=abc; x=1", "proxy-authorization=[redacted]; x=1"),
            ("X-Api-Key: k-1", "X-Api-Key: [redacted]"),
            ("got bearer abc.def-ghi from", "got bearer [redacted] from"),
            ("got bearer abc from", "got bearer abc from"),
            ("Bearer\tsk-1", "Bearer\t[redacted]"),
            ("é authorization: é x\nñ", "é authorization: [redacted]\nñ"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact(raw), want, "{raw}");
        }
        // Ordinary words stay.
        for keep in [
            "the remote engine refused the API key from $ANCHORCODER_KEY (HTTP 401: Invalid API Key)",
            "no authorization header was sent",
            "a bearer of news",
            "`backend.apiKeyEnv`",
        ] {
            assert_eq!(redact(keep), keep);
        }
    }

    #[test]
    fn json_strings_are_masked_keys_kept() {
        let mut v = serde_json::json!({"apiKey": "from $K", "lastError": ["see http://u:p@h"], "n": 1});
        redact_json(&mut v);
        assert_eq!(v, serde_json::json!({"apiKey": "from $K", "lastError": ["see http://[redacted]@h"], "n": 1}));
    }

    #[test]
    fn url_credentials_are_masked() {
        assert_eq!(
            redact("invalid value \"http://user:pw@host:8080/x\" for `backend.url`"),
            "invalid value \"http://[redacted]@host:8080/x\" for `backend.url`"
        );
        assert_eq!(redact("https://tok@h and https://a:b@c@d/p"), "https://[redacted]@h and https://[redacted]@d/p");
        assert_eq!(redact("http://host:1/a@b"), "http://host:1/a@b", "an @ in the path is not userinfo");
        assert_eq!(redact("mail me@example.com"), "mail me@example.com");
        assert_eq!(redact(&redact("http://u:p@h")), "http://[redacted]@h", "idempotent");
    }
}
