//! LoRA adapters (our own, trained by `server/training/`), merged into the
//! base weights at load: `W' = W + scale · B · A`.
//!
//! File format: safetensors, `f32` tensors `blk.{l}.{name}.lora_a` `[rank, in]`
//! and `.lora_b` `[out, rank]`, in the GGUF's own layout (Q/K rows permuted
//! as llama.cpp stores them), with metadata `format = anchorcoder-lora`,
//! `scale` (= alpha / rank) and the policy it was trained for.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::policy::AttentionPolicy;

/// One LoRA pair for a weight `[out, in]`.
struct Pair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    n_in: usize,
    n_out: usize,
}

/// A loaded adapter.
pub struct Adapter {
    pairs: HashMap<String, Pair>,
    scale: f32,
    /// The policy it was trained for, when the file says.
    pub policy: Option<AttentionPolicy>,
    /// The file's metadata, for status and logs.
    pub metadata: HashMap<String, String>,
}

/// The anchor-trained adapter for the default model, built into the binary
/// (server/assets/adapter_anchor.safetensors; PROVENANCE.md there says how it
/// was trained and evaluated).
const BUILTIN_ANCHOR: &[u8] = include_bytes!("../../assets/adapter_anchor.safetensors");

/// What [`Adapter::builtin`] is called in status and logs.
pub const BUILTIN_NAME: &str = "builtin:adapter_anchor";

impl Adapter {
    /// Read an adapter file.
    pub fn load(path: &Path) -> Result<Adapter> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read adapter {}", path.display()))?;
        Adapter::from_bytes(&bytes, &path.display().to_string())
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
            serde_json::from_slice(bytes.get(8..8 + n).ok_or_else(|| bad("truncated header"))?)
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
            let off = info["data_offsets"].as_array().ok_or_else(|| bad("offsets"))?;
            let (s, e) = (off[0].as_u64().unwrap_or(0) as usize, off[1].as_u64().unwrap_or(0) as usize);
            let raw = data.get(s..e).ok_or_else(|| bad("tensor data out of bounds"))?;
            if raw.len() != shape.iter().product::<usize>() * 4 {
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
        if pairs.is_empty() {
            return Err(bad("no lora_a/lora_b pairs"));
        }
        let policy =
            metadata.get("policy_json").and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok()).and_then(|v| {
                let u = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as u32;
                AttentionPolicy::from_parts(
                    v.get("policy")?.as_str()?,
                    u("recentLines"),
                    u("sinkTokens"),
                    u("denseEvery"),
                    u("windowTokens"),
                )
                .ok()
            });
        Ok(Adapter { pairs, scale, policy, metadata })
    }

    /// Names of the weights it changes (e.g. `blk.0.attn_q`).
    pub fn targets(&self) -> impl Iterator<Item = &str> {
        self.pairs.keys().map(String::as_str)
    }

    /// Add this adapter's delta for weight `name` (`[n_out, n_in]`, row-major)
    /// to `w`; returns whether the adapter has one. Errors on a shape mismatch.
    pub fn merge_into(&self, name: &str, w: &mut [f32], n_out: usize, n_in: usize) -> Result<bool> {
        let Some(p) = self.pairs.get(name) else { return Ok(false) };
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
        Ok(true)
    }
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
    }
}
