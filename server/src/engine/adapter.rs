//! LoRA adapters (our own, trained by `server/training/`), merged into the
//! base weights at load: `W' = W + scale · B · A`.
//!
//! File format: safetensors, `f32` tensors `blk.{l}.{name}.lora_a` `[rank, in]`
//! and `.lora_b` `[out, rank]`, in the GGUF's own layout (Q/K rows permuted
//! as llama.cpp stores them), with metadata `format = anchorcoder-lora`,
//! `scale` (= alpha / rank) and the policy it was trained for.
//!
//! Fill-in-the-middle (optional; adapters without it load as before): metadata
//! `fim_tokens` (JSON, `{"prefix": {"id": 8, "text": "<issue_start>"},
//! "suffix": …, "middle": …}`) gives three of the vocabulary's tokens the FIM
//! roles, and the `f32` tensor `token_embd.rows` `[k, n_embd]` holds their
//! trained embedding rows, for the ids listed in metadata `token_embd_rows`
//! (`"8,9,10"`); the rows replace the base model's (input and tied output).
//! Once merged, the engine's FIM detection uses those tokens
//! ([`Adapter::apply_fim`]), so the server builds its FIM prompt with them.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::policy::{AttentionPolicy, PolicySpec};
use super::tokenizer::{FimIds, Tokenizer};

/// The weight whose rows `token_embd.rows` replaces.
const EMBEDDING: &str = "token_embd";

/// One LoRA pair for a weight `[out, in]`.
struct Pair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    n_in: usize,
    n_out: usize,
}

/// The fill-in-the-middle tokens an adapter was trained with: their ids and
/// the vocabulary strings those ids must have (prefix, suffix, middle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFim {
    pub ids: FimIds,
    pub texts: [String; 3],
}

/// A loaded adapter.
pub struct Adapter {
    pairs: HashMap<String, Pair>,
    /// Embedding rows that replace the base model's: (token id, row).
    rows: Vec<(u32, Vec<f32>)>,
    scale: f32,
    /// The policy it was trained for, when the file says.
    pub policy: Option<AttentionPolicy>,
    /// The FIM tokens it was trained with, when the file names them.
    pub fim: Option<AdapterFim>,
    /// The file's metadata, for status and logs.
    pub metadata: HashMap<String, String>,
}

/// The anchor-trained adapter for the default model, built into the binary
/// (server/assets/adapter_anchor.safetensors; PROVENANCE.md there says how it
/// was trained and evaluated).
const BUILTIN_ANCHOR: &[u8] = include_bytes!("../../assets/adapter_anchor.safetensors");

/// The largest adapter file read: a rank-64 adapter on every weight of a 7B
/// model is ~1.3 GiB in f32.
pub const MAX_ADAPTER_BYTES: u64 = 4 << 30;

/// The largest adapter header (the tensor table as JSON; the safetensors
/// format's own limit).
pub const MAX_ADAPTER_HEADER: u64 = 100 << 20;

/// What [`Adapter::builtin`] is called in status and logs.
pub const BUILTIN_NAME: &str = "builtin:adapter_anchor";

impl Adapter {
    /// Read an adapter file: a regular file (not a FIFO or a device) of at
    /// most [`MAX_ADAPTER_BYTES`], whose header fits in it (checked before
    /// the rest is read).
    pub fn load(path: &Path) -> Result<Adapter> {
        use std::io::Read;
        let name = path.display().to_string();
        let (file, len) = super::open_regular(path, "adapter", MAX_ADAPTER_BYTES)?;
        let mut file = file.take(len);
        let mut head = [0u8; 8];
        file.read_exact(&mut head).map_err(|_| anyhow!("{name} is not an AnchorCoder adapter: too short"))?;
        let n = u64::from_le_bytes(head);
        if n > MAX_ADAPTER_HEADER || n > len - 8 {
            bail!("{name} is not an AnchorCoder adapter: its header claims {n} bytes, the file has {len}");
        }
        let mut bytes = Vec::with_capacity(len as usize);
        bytes.extend_from_slice(&head);
        file.read_to_end(&mut bytes).with_context(|| format!("cannot read adapter {name}"))?;
        Adapter::from_bytes(&bytes, &name)
    }

    /// The built-in anchor adapter for the default model.
    pub fn builtin() -> Result<Adapter> {
        Adapter::from_bytes(BUILTIN_ANCHOR, BUILTIN_NAME)
    }

    /// The adapter a `model.adapter` setting asks for: unset or `"none"` →
    /// none; `"builtin"` → the built-in anchor adapter (for the default model);
    /// anything else → that file.
    pub fn choose(setting: Option<&Path>) -> Result<Option<Adapter>> {
        let Some(path) = setting else { return Ok(None) };
        match path.to_str() {
            Some("none") => Ok(None),
            Some("builtin") => Adapter::builtin().map(Some),
            _ => Adapter::load(path).map(Some),
        }
    }

    /// Parse an adapter from the bytes of a safetensors file; `name` is for
    /// error messages.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Adapter> {
        let bad = |why: &str| anyhow!("{name} is not an AnchorCoder adapter: {why}");
        let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("too short"))?.try_into()?) as usize;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(bytes.get(8..8usize.saturating_add(n)).ok_or_else(|| bad("truncated header"))?)
                .map_err(|_| bad("invalid header"))?;
        let metadata: HashMap<String, String> = header
            .get("__metadata__")
            .and_then(|m| m.as_object())
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
            .unwrap_or_default();
        if metadata.get("format").map(String::as_str) != Some("anchorcoder-lora") {
            return Err(bad("metadata `format` is not `anchorcoder-lora`"));
        }
        let scale: f32 = metadata.get("scale").and_then(|s| s.parse().ok()).ok_or_else(|| bad("no `scale`"))?;
        let data = &bytes[8 + n..];
        let mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
        for (t, info) in header.iter().filter(|(k, _)| *k != "__metadata__") {
            if info.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
                bail!("{name}: tensor {t} is not F32");
            }
            let shape: Vec<usize> = info["shape"]
                .as_array()
                .ok_or_else(|| bad("shape"))?
                .iter()
                .map(|d| d.as_u64().unwrap_or(0) as usize)
                .collect();
            let off = info["data_offsets"].as_array().filter(|o| o.len() == 2).ok_or_else(|| bad("offsets"))?;
            let (s, e) = (off[0].as_u64().unwrap_or(0) as usize, off[1].as_u64().unwrap_or(0) as usize);
            let raw = data.get(s..e).ok_or_else(|| bad("tensor data out of bounds"))?;
            if shape.len() != 2 || Some(raw.len()) != shape.iter().try_fold(4usize, |a, &d| a.checked_mul(d)) {
                return Err(bad("tensor size does not match its shape"));
            }
            let v = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.insert(t.clone(), (shape, v));
        }
        let mut pairs = HashMap::new();
        for (name, (shape_a, a)) in &tensors {
            let Some(base) = name.strip_suffix(".lora_a") else { continue };
            let (shape_b, b) = tensors.get(&format!("{base}.lora_b")).ok_or_else(|| bad("lora_a without lora_b"))?;
            let (rank, n_in) = (shape_a[0], shape_a[1]);
            let n_out = shape_b[0];
            if shape_b[1] != rank {
                return Err(bad("lora_a and lora_b ranks differ"));
            }
            pairs.insert(base.to_string(), Pair { a: a.clone(), b: b.clone(), rank, n_in, n_out });
        }
        let rows = match (tensors.get("token_embd.rows"), metadata.get("token_embd_rows")) {
            (None, None) => Vec::new(),
            (Some((shape, v)), Some(ids)) => {
                let ids: Vec<u32> = ids
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("metadata `token_embd_rows` is not a list of token ids"))?;
                let (k, dim) = match shape[..] {
                    [k, dim] => (k, dim),
                    _ => return Err(bad("`token_embd.rows` is not [rows, n_embd]")),
                };
                if ids.len() != k || dim == 0 {
                    return Err(bad("`token_embd.rows` and metadata `token_embd_rows` disagree on the row count"));
                }
                ids.into_iter().zip(v.chunks_exact(dim)).map(|(id, r)| (id, r.to_vec())).collect()
            }
            _ => return Err(bad("`token_embd.rows` needs metadata `token_embd_rows` (and the other way round)")),
        };
        if pairs.is_empty() && rows.is_empty() {
            return Err(bad("no lora_a/lora_b pairs"));
        }
        let fim = match metadata.get("fim_tokens") {
            None => None,
            Some(j) => Some(parse_fim(j).ok_or_else(|| {
                bad("metadata `fim_tokens` is not {\"prefix\"|\"suffix\"|\"middle\": {\"id\": N, \"text\": \"…\"}}")
            })?),
        };
        let policy =
            metadata.get("policy_json").and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok()).and_then(|v| {
                let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as u32;
                AttentionPolicy::from_spec(&PolicySpec {
                    policy: v.get("policy")?.as_str()?.parse().ok()?,
                    recent_lines: u("recentLines"),
                    sink_tokens: u("sinkTokens"),
                    dense_every: u("denseEvery"),
                    window_tokens: u("windowTokens"),
                })
                .ok()
            });
        Ok(Adapter { pairs, rows, scale, policy, fim, metadata })
    }

    /// Names of the weights it changes (e.g. `blk.0.attn_q`; `token_embd`
    /// when it replaces embedding rows).
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        let rows = (!self.rows.is_empty() && !self.pairs.contains_key(EMBEDDING)).then_some(EMBEDDING);
        self.pairs.keys().map(String::as_str).chain(rows)
    }

    /// Give `tok` this adapter's FIM tokens (nothing when it names none), after
    /// checking that the vocabulary has them where the adapter says: an adapter
    /// trained for another vocabulary is an error, not a silent misuse.
    pub fn apply_fim(&self, tok: &mut Tokenizer) -> Result<()> {
        let Some(f) = &self.fim else { return Ok(()) };
        let ids = [f.ids.prefix, f.ids.suffix, f.ids.middle];
        for ((role, id), text) in ["prefix", "suffix", "middle"].into_iter().zip(ids).zip(&f.texts) {
            let found = tok.id_to_token(id).filter(|_| (id as usize) < tok.vocab_size());
            if found.as_deref() != Some(text.as_str()) {
                bail!(
                    "the adapter's FIM {role} token is id {id} `{text}`, but the model's vocabulary has {} there: \
                     the adapter was trained for another model",
                    found.map_or("no such id".to_string(), |t| format!("`{t}`"))
                );
            }
        }
        tok.set_fim(f.ids);
        Ok(())
    }

    /// Apply this adapter to weight `name` (`[n_out, n_in]`, row-major): add
    /// its LoRA delta, and for `token_embd` put its embedding rows in place;
    /// returns whether it changed anything. Errors on a shape mismatch.
    pub fn merge_into(&self, name: &str, w: &mut [f32], n_out: usize, n_in: usize) -> Result<bool> {
        let rows = name == EMBEDDING && !self.rows.is_empty();
        if rows {
            for (id, r) in &self.rows {
                if r.len() != n_in || *id as usize >= n_out || w.len() != n_out * n_in {
                    bail!(
                        "adapter embedding row for token {id} has {} values, the model's embedding is {n_out}×{n_in}",
                        r.len()
                    );
                }
            }
        }
        let Some(p) = self.pairs.get(name) else {
            if rows {
                self.put_rows(w, n_in);
            }
            return Ok(rows);
        };
        if (p.n_out, p.n_in) != (n_out, n_in) || w.len() != n_out * n_in {
            bail!("adapter tensor {name} is {}×{}, the model's weight {n_out}×{n_in}", p.n_out, p.n_in);
        }
        // w += scale · B[out, rank] · A[rank, in]
        // SAFETY: slices sized as checked above; row-major strides.
        unsafe {
            gemm::gemm(
                n_out,
                n_in,
                p.rank,
                w.as_mut_ptr(),
                1,
                n_in as isize,
                true,
                p.b.as_ptr(),
                1,
                p.rank as isize,
                p.a.as_ptr(),
                1,
                n_in as isize,
                1.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if rows {
            self.put_rows(w, n_in);
        }
        Ok(true)
    }

    fn put_rows(&self, w: &mut [f32], n_in: usize) {
        for (id, r) in &self.rows {
            let at = *id as usize * n_in;
            w[at..at + n_in].copy_from_slice(r);
        }
    }
}

/// `fim_tokens` metadata → ids and texts; None when malformed or when two
/// roles share a token.
fn parse_fim(json: &str) -> Option<AdapterFim> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let role = |r: &str| -> Option<(u32, String)> {
        let e = v.get(r)?;
        Some((u32::try_from(e.get("id")?.as_u64()?).ok()?, e.get("text")?.as_str()?.to_string()))
    };
    let ((p, pt), (s, st), (m, mt)) = (role("prefix")?, role("suffix")?, role("middle")?);
    (p != s && s != m && p != m)
        .then_some(AdapterFim { ids: FimIds { prefix: p, suffix: s, middle: m }, texts: [pt, st, mt] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_adapter(path: &Path, a: &[f32], b: &[f32], rank: usize, n_in: usize, n_out: usize) {
        let la = a.len() * 4;
        let header = serde_json::json!({
            "__metadata__": {"format": "anchorcoder-lora", "scale": "0.5",
                "policy_json": "{\"policy\": \"anchor\", \"recentLines\": 0, \"denseEvery\": 4, \"sinkTokens\": 4}"},
            "blk.0.attn_q.lora_a": {"dtype": "F32", "shape": [rank, n_in], "data_offsets": [0, la]},
            "blk.0.attn_q.lora_b": {"dtype": "F32", "shape": [n_out, rank], "data_offsets": [la, la + b.len() * 4]},
        })
        .to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        for x in a.iter().chain(b) {
            bytes.extend(x.to_le_bytes());
        }
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn merge_adds_scaled_b_times_a() {
        let (rank, n_in, n_out) = (2, 3, 4);
        let a: Vec<f32> = (0..rank * n_in).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b: Vec<f32> = (0..n_out * rank).map(|i| 1.0 - i as f32 * 0.25).collect();
        let path = std::env::temp_dir().join(format!("anchorcoder-adapter-{}.safetensors", std::process::id()));
        write_adapter(&path, &a, &b, rank, n_in, n_out);
        let ad = Adapter::load(&path).unwrap();
        assert_eq!(ad.policy.unwrap().describe(), "anchor(R=0, S=4, dense_every=4)");
        let mut w = vec![1.0f32; n_out * n_in];
        assert!(ad.merge_into("blk.0.attn_q", &mut w, n_out, n_in).unwrap());
        for o in 0..n_out {
            for i in 0..n_in {
                let d: f32 = (0..rank).map(|r| b[o * rank + r] * a[r * n_in + i]).sum();
                assert!((w[o * n_in + i] - (1.0 + 0.5 * d)).abs() < 1e-6);
            }
        }
        assert!(!ad.merge_into("blk.0.attn_k", &mut w, n_out, n_in).unwrap());
        assert!(ad.merge_into("blk.0.attn_q", &mut w, n_in, n_out).is_err());
        std::fs::write(&path, b"not an adapter").unwrap();
        assert!(Adapter::load(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}

#[cfg(test)]
mod fim_tests {
    //! Adapters that name FIM tokens and carry their embedding rows.
    use super::*;
    use crate::completion::{fim_tail, lead_tokens, Settings};
    use crate::engine::document::tests::test_tokenizer_with_specials;
    use crate::engine::llama::tests::tiny_config;
    use crate::engine::llama::Llama;
    use crate::engine::Engine;

    /// A safetensors file: metadata and f32 tensors (name, shape, values).
    fn safetensors(meta: serde_json::Value, tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        let mut header = serde_json::json!({ "__metadata__": meta });
        let mut off = 0;
        for (name, shape, v) in tensors {
            header[*name] =
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + v.len() * 4]});
            off += v.len() * 4;
        }
        let header = header.to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        for (_, _, v) in tensors {
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
        bytes
    }

    fn fim_json(ids: [u32; 3], texts: [&str; 3]) -> String {
        serde_json::json!({
            "prefix": {"id": ids[0], "text": texts[0]},
            "suffix": {"id": ids[1], "text": texts[1]},
            "middle": {"id": ids[2], "text": texts[2]},
        })
        .to_string()
    }

    /// An adapter with one LoRA pair (`blk.0.attn_q`, 4×3, all zero unless
    /// `with_pair` is false: then none) and the rows `rows` for `ids`.
    fn fim_adapter(ids: [u32; 3], texts: [&str; 3], rows: &[Vec<f32>], with_pair: bool) -> Vec<u8> {
        let dim = rows[0].len();
        let mut t: Vec<(&str, Vec<usize>, Vec<f32>)> =
            vec![("token_embd.rows", vec![rows.len(), dim], rows.iter().flatten().copied().collect())];
        if with_pair {
            t.push(("blk.0.attn_q.lora_a", vec![1, 3], vec![0.0; 3]));
            t.push(("blk.0.attn_q.lora_b", vec![4, 1], vec![0.0; 4]));
        }
        let ids_s = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        safetensors(
            serde_json::json!({"format": "anchorcoder-lora", "scale": "2.0", "fim_tokens": fim_json(ids, texts),
                "token_embd_rows": ids_s,
                "policy_json": "{\"policy\": \"anchor\", \"recentLines\": 0, \"denseEvery\": 0, \"sinkTokens\": 4}"}),
            &t,
        )
    }

    const NAMES: [&str; 3] = ["<issue_start>", "<issue_comment>", "<issue_closed>"];

    #[test]
    fn fim_adapter_names_its_tokens_and_replaces_their_embedding_rows() {
        let rows: Vec<Vec<f32>> = (0..3).map(|r| (0..4).map(|i| (10 * r + i) as f32).collect()).collect();
        let ad = Adapter::from_bytes(&fim_adapter([1, 3, 2], NAMES, &rows, true), "test").unwrap();
        let f = ad.fim.clone().expect("the adapter names FIM tokens");
        assert_eq!(f.ids, FimIds { prefix: 1, suffix: 3, middle: 2 });
        assert_eq!(f.texts, NAMES.map(String::from));
        assert_eq!(ad.policy.unwrap().describe(), "anchor(R=0, S=4, dense_every=0)");
        let mut targets: Vec<&str> = ad.targets().collect();
        targets.sort();
        assert_eq!(targets, ["blk.0.attn_q", "token_embd"]);

        // token_embd: rows 1, 3, 2 become the adapter's, the others stay.
        let (n_out, n_in) = (5, 4);
        let mut w: Vec<f32> = (0..n_out * n_in).map(|i| -(i as f32)).collect();
        assert!(ad.merge_into("token_embd", &mut w, n_out, n_in).unwrap());
        assert_eq!(&w[4..8], &rows[0][..]);
        assert_eq!(&w[12..16], &rows[1][..]);
        assert_eq!(&w[8..12], &rows[2][..]);
        assert_eq!(&w[..4], &[0.0, -1.0, -2.0, -3.0]);
        assert_eq!(&w[16..], &[-16.0, -17.0, -18.0, -19.0]);
        // Another width, or an id past the vocabulary, is an error.
        assert!(ad.merge_into("token_embd", &mut [0.0; 15], 5, 3).is_err());
        assert!(ad.merge_into("token_embd", &mut [0.0; 8], 2, 4).is_err());
        // An adapter of embedding rows only is an adapter.
        let rows_only = Adapter::from_bytes(&fim_adapter([1, 3, 2], NAMES, &rows, false), "test").unwrap();
        assert_eq!(rows_only.targets().collect::<Vec<_>>(), ["token_embd"]);
    }

    #[test]
    fn malformed_fim_adapter_metadata_is_an_error() {
        let rows = vec![vec![0.0f32; 4]; 3];
        let ok = fim_adapter([1, 3, 2], NAMES, &rows, true);
        assert!(Adapter::from_bytes(&ok, "t").is_ok());
        // two roles on one token
        assert!(Adapter::from_bytes(&fim_adapter([1, 1, 2], NAMES, &rows, true), "t").is_err());
        // three ids, two rows
        let two = safetensors(
            serde_json::json!({"format": "anchorcoder-lora", "scale": "2.0", "token_embd_rows": "1,2,3"}),
            &[("token_embd.rows", vec![2, 4], vec![0.0; 8])],
        );
        assert!(Adapter::from_bytes(&two, "t").is_err());
        // rows without their ids
        let bare = safetensors(
            serde_json::json!({"format": "anchorcoder-lora", "scale": "2.0"}),
            &[("token_embd.rows", vec![1, 4], vec![0.0; 4])],
        );
        assert!(Adapter::from_bytes(&bare, "t").is_err());
        let bad_json = safetensors(
            serde_json::json!({"format": "anchorcoder-lora", "scale": "2.0", "fim_tokens": "{\"prefix\": 1}"}),
            &[("blk.0.attn_q.lora_a", vec![1, 3], vec![0.0; 3]), ("blk.0.attn_q.lora_b", vec![4, 1], vec![0.0; 4])],
        );
        assert!(Adapter::from_bytes(&bad_json, "t").is_err());
    }

    /// Old adapters (the built-in one too) name no FIM tokens and change no
    /// embedding rows: a merge leaves the tokenizer's FIM detection as it was.
    #[test]
    fn adapters_without_fim_metadata_leave_fim_detection_alone() {
        let builtin = Adapter::builtin().unwrap();
        assert!(builtin.fim.is_none());
        assert!(builtin.targets().all(|t| t != "token_embd"));
        let mut tok = test_tokenizer_with_specials(&[]);
        builtin.apply_fim(&mut tok).unwrap();
        assert_eq!(tok.fim_ids(), None);
    }

    /// Merged, an adapter's FIM tokens are the ones the server's prompt uses:
    /// `<fim_prefix>` leads the cached prompt, the tail is `<fim_suffix>` …
    /// `<fim_middle>`; a vocabulary without those tokens at those ids refuses it.
    #[test]
    fn merged_fim_adapter_gives_the_server_its_fim_layout() {
        let mut tok = test_tokenizer_with_specials(&NAMES);
        assert_eq!(tok.fim_ids(), None, "the test vocabulary has no FIM tokens of its own");
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let ids = [id(NAMES[0]), id(NAMES[1]), id(NAMES[2])];
        let rows = vec![vec![0.5f32; 8]; 3];
        let ad = Adapter::from_bytes(&fim_adapter(ids, NAMES, &rows, true), "test").unwrap();

        // Wrong text at an id, or an id past the vocabulary: refused, tokenizer untouched.
        let wrong = Adapter::from_bytes(&fim_adapter([ids[0], ids[1], 5], NAMES, &rows, true), "t").unwrap();
        let e = wrong.apply_fim(&mut tok).unwrap_err().to_string();
        assert!(e.contains("middle") && e.contains("another model"), "{e}");
        let past = tok.vocab_size() as u32;
        let far = Adapter::from_bytes(&fim_adapter([ids[0], ids[1], past], NAMES, &rows, true), "t").unwrap();
        assert!(far.apply_fim(&mut tok).is_err());
        assert_eq!(tok.fim_ids(), None);

        ad.apply_fim(&mut tok).unwrap();
        let f = FimIds { prefix: ids[0], suffix: ids[1], middle: ids[2] };
        assert_eq!(tok.fim_ids(), Some(f));
        assert!(ids.iter().all(|&i| tok.is_special(i)));
        let model = Llama::random(tiny_config(tok.vocab_size()), 4).unwrap();
        let engine = Engine { model, tokenizer: tok, path: "test".into(), adapter_policy: ad.policy };
        let s = Settings::default();
        assert_eq!(lead_tokens(&engine, &s), vec![f.prefix]);
        let tail = fim_tail(&engine, "    return x\n", &s).unwrap();
        assert_eq!((tail[0], *tail.last().unwrap()), (f.suffix, f.middle));
        assert_eq!(engine.tokenizer.decode(&tail[1..tail.len() - 1]), "    return x\n");
    }

    /// The default model with an adapter of FIM rows only: FIM on with SmolLM2's
    /// issue markers, their embedding rows replaced, every other logit as before.
    #[test]
    #[ignore = "real model: needs `anchorcoder model pull`; scripts/test runs it (cargo test -- --include-ignored)"]
    fn fim_adapter_on_the_default_model() {
        use crate::engine::document::DocumentCache;
        use crate::engine::policy::AttentionPolicy;
        let path = crate::models::test_model();
        let rows: Vec<Vec<f32>> =
            (0..3).map(|r| (0..576).map(|i| ((i * 7 + r * 13) % 17) as f32 * 0.01).collect()).collect();
        let bytes = fim_adapter([8, 9, 10], NAMES, &rows, false);
        let adapted = Engine::load_adapted(&path, Some(Adapter::from_bytes(&bytes, "test").unwrap())).unwrap();
        let base = Engine::load(&path).unwrap();
        assert_eq!(base.tokenizer.fim_ids(), None, "SmolLM2 has no FIM tokens of its own");
        assert_eq!(adapted.tokenizer.fim_ids(), Some(FimIds { prefix: 8, suffix: 9, middle: 10 }));
        assert_eq!(lead_tokens(&adapted, &Settings::default()), vec![8]);
        let policy = AttentionPolicy::full();
        let logits = |e: &Engine, lead: &[u32]| {
            let mut d = DocumentCache::new(&e.model, policy);
            d.set_lead(&e.tokenizer, lead);
            d.set_text(&e.tokenizer, "def add(a, b):\n    return").unwrap();
            d.logits(&e.model, 256, &|| false).unwrap().unwrap()
        };
        let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        // Without FIM tokens in the prompt the model is the base model (the
        // embedding is requantized to Q8_0 from its Q8_0 values: exact or nearly),
        // but for the FIM tokens' own logits (the output matrix is the embedding).
        let (mut a, mut b) = (logits(&adapted, &[]), logits(&base, &[]));
        assert!(max_diff(&a[8..11], &b[8..11]) > 0.1);
        a.drain(8..11);
        b.drain(8..11);
        let plain = max_diff(&a, &b);
        assert!(plain < 1e-3, "rows other than the FIM tokens' changed: {plain}");
        // With the FIM prefix token leading, its new row changes the outcome.
        let led = max_diff(&logits(&adapted, &[8]), &logits(&base, &[8]));
        assert!(led > 0.1, "the FIM row was not replaced ({led})");
    }
}
