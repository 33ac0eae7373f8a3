//! `anchorcoder bench`: prefill and decode speed of the default model on this
//! machine, KV-cache bytes of a real ~2,000-line source file under each
//! attention policy, and resident memory — side by side with llama.cpp's
//! `llama-bench` / `llama-server` on the same GGUF, in the same run.
//!
//! Human-readable progress goes to stderr, the results table to stdout, and
//! the last line of stdout is one JSON object with every figure. Nothing here
//! is a timed assertion: the numbers are reported, never tested.
//!
//! KV bytes depend only on the token/anchor structure and the policy, not on
//! the K/V values, so they are computed by replaying the cache's bookkeeping
//! ([`KvCache::begin_chunk`] plus zero [`KvCache::append`]s, one float per
//! entry, scaled by the bytes of the model's K/V rows) instead of running the
//! model over the ~20k-token file seven times; a real forward pass over a
//! prefix checks that the replay gives the same figure.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::engine::document::is_anchor;
use crate::engine::generate::argmax;
use crate::engine::kv_cache::{KvCache, KvPrecision};
use crate::engine::llama::Logits;
use crate::engine::policy::{AttentionPolicy, PolicyKind, PolicySpec};
use crate::engine::Engine;
use crate::models;

/// Target: our prefill and decode speed over llama.cpp's, at least.
const TARGET_SPEED_RATIO: f64 = 0.8;
/// Target: anchor-policy KV bytes over `full`, at most.
const TARGET_KV_RATIO: f64 = 0.2;
/// Target: our resident memory over llama.cpp's, at most.
const TARGET_RSS_RATIO: f64 = 1.3;
/// Target (issue 15): the median cold first suggestion, at most, in ms.
const TARGET_FIRST_MS: f64 = 2500.0;
/// Target (issue 15): our cold first suggestion over llama-server's, at most.
const TARGET_FIRST_RATIO: f64 = 0.4;

/// Flags of `anchorcoder bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The GGUF to measure (default: the default model, pulled on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A real source file for the KV-bytes run (default: a ~2,000-line file
    /// from Python's standard library on this machine).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Use only the first N lines of the file (0 = all of it).
    #[arg(long, default_value_t = 0)]
    pub max_lines: usize,
    /// Folder holding llama.cpp's `llama-bench` (and `llama-server`)
    /// [default: $ANCHORCODER_TOOLS/llama.cpp/bin or ~/.cache/anchorcoder/tools/llama.cpp/bin].
    #[arg(long)]
    pub llama_cpp: Option<PathBuf>,
    /// Build llama.cpp first (runs tests/bench/build-llamacpp.sh) if it is missing.
    #[arg(long)]
    pub build_llama_cpp: bool,
    /// Skip llama.cpp entirely (ratios are then null).
    #[arg(long)]
    pub no_llama_cpp: bool,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Repetitions of each speed test; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Tokens of the prefill prompt (also the depth of the decode test).
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens generated in the decode test.
    #[arg(long, default_value_t = 64)]
    pub decode_tokens: usize,
    /// Tokens of the long prefill prompt (headline policy only; 0 = skip).
    #[arg(long, default_value_t = 2048)]
    pub long_prompt_tokens: usize,
    /// Tokens per forward pass when prefilling (the server's chunk size).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// Tokens of the file run through the real model to check the KV replay (0 = skip).
    #[arg(long, default_value_t = 1000)]
    pub check_tokens: usize,
    /// Attention policy of the headline speed run: anchor, full or window
    /// (`full` is what llama-bench measures).
    #[arg(long, default_value = "full")]
    pub policy: String,
    /// Lines before the current one whose tokens stay fully visible (anchor).
    #[arg(long, default_value_t = 8)]
    pub recent_lines: u32,
    /// Leading tokens always kept (attention sinks).
    #[arg(long, default_value_t = 4)]
    pub sink_tokens: u32,
    /// Every N-th layer dense (0 = none; anchor).
    #[arg(long, default_value_t = 0)]
    pub dense_every: u32,
    /// Tokens of the window (window).
    #[arg(long, default_value_t = 256)]
    pub window_tokens: u32,
    /// Do not also measure the default anchor policy's speed.
    #[arg(long)]
    pub no_anchor_speed: bool,
    /// Files for the cold first-suggestion test (0 = skip): large modules of
    /// Python's standard library, one cursor each (see `first_cases`).
    #[arg(long, default_value_t = 5)]
    pub first_files: usize,
    /// Before each speed measurement, wait up to this many seconds for other
    /// processes to leave the CPUs idle (0 = don't wait).
    #[arg(long, default_value_t = 0)]
    pub wait_idle: u64,
}

/// Run the benchmark.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.threads == 0 || args.reps == 0 || args.prompt_tokens == 0 || args.decode_tokens == 0 || args.chunk == 0 {
        bail!("--threads, --reps, --prompt-tokens, --decode-tokens and --chunk must be at least 1");
    }
    // Before any thread pool starts: candle reads RAYON_NUM_THREADS at first
    // use, rayon's global pool at its first job.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    if rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global().is_err() {
        note("warning: rayon's thread pool was already started; --threads may not apply");
    }
    let mut speed_policy = AttentionPolicy::from_spec(&PolicySpec {
        policy: args.policy.parse()?,
        recent_lines: args.recent_lines,
        sink_tokens: args.sink_tokens,
        dense_every: args.dense_every,
        window_tokens: args.window_tokens,
    })?;
    if speed_policy.kind == PolicyKind::Full {
        // Sinks mean nothing under full attention.
        speed_policy = AttentionPolicy::full();
    }
    let anchor_default = AttentionPolicy::standard_anchor();

    // --- inputs -----------------------------------------------------------
    let model_path = match &args.model {
        Some(p) => p.clone(),
        None => pull_default_model()?,
    };
    let file = pick_file(&args)?;
    note(&format!("file: {} ({} lines{})", file.path.display(), file.lines, file.note));

    // --- load -------------------------------------------------------------
    let rss_before = vm_rss_self();
    let t = Instant::now();
    let engine = Engine::load(&model_path)?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_after = vm_rss_self();
    let cfg = engine.model.config().clone();
    note(&format!(
        "model: {} loaded in {load_s:.2} s; VmRSS {} → {}",
        model_path.display(),
        mb_opt(rss_before),
        mb_opt(rss_after)
    ));

    let tokens = engine.tokenizer.encode(&file.text)?;
    let anchors: Vec<bool> = tokens.iter().map(|&t| is_anchor(&engine.tokenizer, t)).collect();
    let n_anchors = anchors.iter().filter(|&&a| a).count();
    note(&format!("file: {} tokens, {} anchors", tokens.len(), n_anchors));
    if tokens.len() < args.prompt_tokens {
        bail!(
            "{} has only {} tokens; the prompt needs {} (pass a longer --file or a smaller --prompt-tokens)",
            file.path.display(),
            tokens.len(),
            args.prompt_tokens
        );
    }
    let prompt = &tokens[..args.prompt_tokens];
    let prompt_anchors = &anchors[..args.prompt_tokens];
    let long_tokens = args.long_prompt_tokens.min(tokens.len()).min(cfg.context_len);
    if long_tokens < args.long_prompt_tokens {
        note(&format!("long prefill: {long_tokens} tokens (the file or the model's context is shorter)"));
    }

    // --- our speed --------------------------------------------------------
    warm_up(&engine, prompt, prompt_anchors)?;
    wait_idle(args.wait_idle);
    let cpu = CpuMeter::start();
    let mut headline = measure_speed(&engine, speed_policy, prompt, prompt_anchors, &args)?;
    if long_tokens > 0 {
        (headline.prefill_long, headline.decode_long) =
            measure_long_prefill(&engine, speed_policy, &tokens[..long_tokens], &anchors[..long_tokens], &args)?;
    }
    let mut speed_runs = vec![(speed_policy, headline)];
    if !args.no_anchor_speed && speed_policy != anchor_default {
        speed_runs.push((anchor_default, measure_speed(&engine, anchor_default, prompt, prompt_anchors, &args)?));
    }
    let ours_other_cpu = cpu.other_share();
    let ours = &speed_runs[0].1;

    // --- our cold first suggestion ------------------------------------------
    let first_cases = if args.first_files > 0 { first_cases(args.first_files) } else { Vec::new() };
    let first_ours = measure_first_ours(&engine, &first_cases)?;

    // --- KV bytes ---------------------------------------------------------
    let n_layers = cfg.n_layers;
    let row_bytes = kv_row_bytes(&engine);
    let mut kv_policies: Vec<(String, AttentionPolicy)> = vec![
        ("full".into(), AttentionPolicy::full()),
        ("anchor".into(), anchor_default),
        ("anchor_R0".into(), anchor(0, 4, 0)),
        ("anchor_R0_D4".into(), anchor(0, 4, 4)),
        ("anchor_R2".into(), anchor(2, 4, 0)),
        ("anchor_R32".into(), anchor(32, 4, 0)),
        ("window_W256".into(), window(256, 4)),
    ];
    // The server's default policy (a window), whatever it is set to.
    let d = crate::config::AttentionConfig::default();
    if d.policy == crate::config::PolicyName::Window {
        kv_policies.push((format!("window_W{}_default", d.window_tokens), window(d.window_tokens, d.sink_tokens)));
    }
    let t = Instant::now();
    let mut kv: Vec<(String, AttentionPolicy, KvFigures)> = kv_policies
        .drain(..)
        .map(|(name, p)| {
            let f = replay_kv(p, n_layers, row_bytes, &anchors, args.chunk);
            (name, p, f)
        })
        .collect();
    // A window as large as what anchor R=8 keeps per layer (sinks aside).
    let anchor_kept_per_layer = kv[1].2.kept_entries / n_layers;
    let w_match = (anchor_kept_per_layer as u32).saturating_sub(anchor_default.sink_tokens).max(1);
    let wm = window(w_match, anchor_default.sink_tokens);
    kv.push((format!("window_W{w_match}"), wm, replay_kv(wm, n_layers, row_bytes, &anchors, args.chunk)));
    if !kv.iter().any(|(_, p, _)| *p == speed_policy) {
        let f = replay_kv(speed_policy, n_layers, row_bytes, &anchors, args.chunk);
        kv.push(("speed_policy".into(), speed_policy, f));
    }
    note(&format!("kv replay of {} policies: {:.2} s", kv.len(), t.elapsed().as_secs_f64()));
    let full_bytes = kv[0].2.kv_bytes;
    let anchor_bytes = kv[1].2.kv_bytes;
    let kv_ratio = ratio(Some(anchor_bytes as f64), Some(full_bytes as f64));

    // Check the replay against a real forward pass over a prefix.
    let mut kv_checks = Vec::new();
    if args.check_tokens > 0 {
        let n = args.check_tokens.min(tokens.len());
        for p in [anchor_default, window(256, 4)] {
            let c = check_kv(&engine, p, &tokens[..n], &anchors[..n], args.chunk)?;
            note(&format!(
                "kv check, {n}-token prefix, {}: forward {} B, replay {} B: {}",
                p.describe(),
                c.forward_bytes,
                c.replay_bytes,
                if c.forward_bytes == c.replay_bytes { "equal" } else { "DIFFERENT" }
            ));
            kv_checks.push(c);
        }
    }

    // --- llama.cpp --------------------------------------------------------
    let lc = if args.no_llama_cpp {
        LlamaCpp::absent("skipped (--no-llama-cpp)".into())
    } else {
        run_llama_cpp(&args, &model_path, long_tokens)
    };
    let first_lc = match (&lc.bin, first_ours.is_empty()) {
        (Some(dir), false) if dir.join("llama-server").is_file() => {
            note(&format!("llama-server: cold first suggestion on {} prompts", first_ours.len()));
            llama_server_first(&dir.join("llama-server"), &model_path, &args, &first_ours)
                .map_err(|e| note(&format!("llama-server first suggestion: {e:#}")))
                .ok()
        }
        _ => None,
    };
    let first_ms = median(&first_ours.iter().map(|f| f.ms).collect::<Vec<_>>());
    let first_lc_ms = first_lc.as_ref().and_then(|v| median(&v.iter().map(|f| f.ms).collect::<Vec<_>>()));
    let first_ratio = ratio(first_ms, first_lc_ms);
    let busy_warning = [("ours", ours_other_cpu), ("llama.cpp", lc.other_cpu)]
        .iter()
        .filter_map(|(who, v)| v.filter(|v| *v > 0.10).map(|v| format!("{who}: {:.0}%", 100.0 * v)))
        .collect::<Vec<_>>();

    // --- report -----------------------------------------------------------
    let prefill_ratio = ratio(ours.prefill(), lc.prefill_tps());
    let decode_ratio = ratio(ours.decode(), lc.decode_tps());
    let decode0_ratio = ratio(ours.decode0(), lc.decode0_tps());
    let prefill_long_ratio = ratio(ours.prefill_long(), lc.prefill_long_tps());
    let decode_long_ratio = ratio(ours.decode_long(), lc.decode_long_tps());
    let rss_ratio = ratio(rss_after.map(|v| v as f64), lc.rss_bytes.map(|v| v as f64));

    let date = utc_date();
    let cpu = cpu_model();
    let other = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{:.0}%", 100.0 * v));
    let out = &mut std::io::stdout().lock();
    writeln!(out)?;
    let sched = sched_policy();
    writeln!(out, "AnchorCoder bench, {date}: {cpu}, {} threads, {sched}", args.threads)?;
    writeln!(
        out,
        "model: {} ({}, {} layers; weights in memory {})",
        model_path.display(),
        mb(std::fs::metadata(&model_path).map(|m| m.len() as usize).unwrap_or(0)),
        cfg.n_layers,
        mb(engine.model.weight_bytes())
    )?;
    writeln!(
        out,
        "file: {} ({} lines, {} tokens, {} anchors){}",
        file.path.display(),
        file.lines,
        tokens.len(),
        n_anchors,
        file.note
    )?;
    writeln!(out, "llama.cpp: {}", lc.summary())?;
    writeln!(out)?;
    writeln!(out, "Speed, tokens/s (median of {}):", args.reps)?;
    let mut header = format!("  {:<26}", "test");
    for (p, _) in &speed_runs {
        header += &format!(" {:>22}", format!("ours {}", short(p)));
    }
    header += &format!(" {:>12} {:>12} {:>9}", "llama FA on", "llama FA off", "ratio");
    writeln!(out, "{header}")?;
    type Row<'a> = (&'a str, fn(&Speed) -> Option<f64>, Option<f64>, Option<f64>, Option<f64>);
    let long_name = format!("prefill {long_tokens}");
    let decode_long_name = format!("decode {} @ depth {long_tokens}", args.decode_tokens);
    let rows: [Row; 5] = [
        (
            "prefill 512",
            Speed::prefill,
            lc.fa_figure(true, |f| f.prefill),
            lc.fa_figure(false, |f| f.prefill),
            prefill_ratio,
        ),
        (
            &long_name,
            Speed::prefill_long,
            lc.fa_figure(true, |f| f.prefill_long),
            lc.fa_figure(false, |f| f.prefill_long),
            prefill_long_ratio,
        ),
        (
            "decode 64 @ depth 512",
            Speed::decode,
            lc.fa_figure(true, |f| f.decode),
            lc.fa_figure(false, |f| f.decode),
            decode_ratio,
        ),
        (
            &decode_long_name,
            Speed::decode_long,
            lc.fa_figure(true, |f| f.decode_long),
            lc.fa_figure(false, |f| f.decode_long),
            decode_long_ratio,
        ),
        (
            "decode 64 @ depth 0",
            Speed::decode0,
            lc.fa_figure(true, |f| f.decode0),
            lc.fa_figure(false, |f| f.decode0),
            decode0_ratio,
        ),
    ];
    for (name, get, on, off, r) in rows {
        if (name == long_name || name == decode_long_name) && long_tokens == 0 {
            continue;
        }
        let name = if name == long_name || name == decode_long_name {
            name.to_string()
        } else {
            name.replace("512", &args.prompt_tokens.to_string()).replace("64", &args.decode_tokens.to_string())
        };
        let mut line = format!("  {name:<26}");
        for (_, s) in &speed_runs {
            line += &format!(" {:>22}", fmt_f(get(s), 1));
        }
        line += &format!(" {:>12} {:>12} {:>9}", fmt_f(on, 1), fmt_f(off, 1), fmt_f(r, 2));
        writeln!(out, "{line}")?;
    }
    writeln!(out, "  (ratio: ours with `{}` over llama.cpp's better flash-attention setting)", short(&speed_policy))?;
    writeln!(
        out,
        "  CPU used by other processes while measuring: ours {}, llama.cpp {}",
        other(ours_other_cpu),
        other(lc.other_cpu)
    )?;
    if !busy_warning.is_empty() {
        writeln!(
            out,
            "  WARNING: other processes were busy during the speed runs ({}): the speeds and ratios are unreliable; \
             rerun on an idle machine (or with --wait-idle 600)",
            busy_warning.join(", ")
        )?;
    }
    writeln!(out)?;
    if !first_ours.is_empty() {
        writeln!(
            out,
            "Cold first suggestion (empty cache; plan, tokenize, prefill, one line), ms: ours {} (`{}`, K/V {}), \
             llama-server {} ({}); ratio {}",
            fmt_f(first_ms, 0),
            first_ours[0].policy,
            first_ours[0].kv,
            fmt_f(first_lc_ms, 0),
            LC_FIRST_SETTINGS,
            fmt_f(first_ratio, 2)
        )?;
        for (i, f) in first_ours.iter().enumerate() {
            let lc = first_lc.as_ref().and_then(|v| v.get(i));
            writeln!(
                out,
                "  {:<16} ours {:>6.0} ms ({} prompt tokens, {} generated)   llama-server {:>6} ms ({} prompt tokens, {} generated)",
                f.name,
                f.ms,
                f.prompt_tokens,
                f.generated,
                fmt_f(lc.map(|l| l.ms), 0),
                lc.and_then(|l| l.prompt_tokens).map_or("?".into(), |n| n.to_string()),
                lc.and_then(|l| l.generated).map_or("?".into(), |n| n.to_string()),
            )?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "Resident memory (VmRSS): ours {} before load, {} loaded; llama.cpp {} ({}); ratio {}",
        mb_opt(rss_before),
        mb_opt(rss_after),
        mb_opt(lc.rss_bytes),
        lc.rss_settings,
        fmt_f(rss_ratio, 2)
    )?;
    writeln!(out)?;
    writeln!(out, "KV cache after the whole file ({} tokens, chunks of {}, compacted):", tokens.len(), args.chunk)?;
    writeln!(
        out,
        "  {:<14} {:<34} {:>12} {:>10} {:>9} {:>11}",
        "name", "policy", "kept entries", "KV MB", "% of full", "peak KV MB"
    )?;
    for (name, p, f) in &kv {
        writeln!(
            out,
            "  {:<14} {:<34} {:>12} {:>10.2} {:>8.1}% {:>11.2}",
            name,
            p.describe(),
            f.kept_entries,
            f.kv_bytes as f64 / 1e6,
            100.0 * f.kv_bytes as f64 / full_bytes.max(1) as f64,
            f.peak_bytes as f64 / 1e6
        )?;
    }
    for c in &kv_checks {
        writeln!(
            out,
            "  check: first {} tokens through the model, {}: {} B forward vs {} B replayed ({})",
            c.tokens,
            c.policy.describe(),
            c.forward_bytes,
            c.replay_bytes,
            if c.forward_bytes == c.replay_bytes { "equal" } else { "DIFFERENT" }
        )?;
    }
    writeln!(out)?;
    let verdict = |v: Option<bool>| match v {
        Some(true) => "PASS",
        Some(false) => "FAIL",
        None => "n/a",
    };
    let prefill_pass = prefill_ratio.map(|r| r >= TARGET_SPEED_RATIO);
    let decode_pass = decode_ratio.map(|r| r >= TARGET_SPEED_RATIO);
    let kv_pass = kv_ratio.map(|r| r <= TARGET_KV_RATIO);
    let rss_pass = rss_ratio.map(|r| r <= TARGET_RSS_RATIO);
    let first_ms_pass = first_ms.map(|v| v <= TARGET_FIRST_MS);
    let first_ratio_pass = first_ratio.map(|r| r <= TARGET_FIRST_RATIO);
    writeln!(out, "Targets:")?;
    let targets_rows = [
        (
            format!("prefill {} >= {TARGET_SPEED_RATIO}x llama.cpp", args.prompt_tokens),
            fmt_f(prefill_ratio, 2),
            prefill_pass,
        ),
        (
            format!("decode @ depth {} >= {TARGET_SPEED_RATIO}x llama.cpp", args.prompt_tokens),
            fmt_f(decode_ratio, 2),
            decode_pass,
        ),
        (format!("anchor KV <= {TARGET_KV_RATIO}x full"), fmt_f(kv_ratio, 3), kv_pass),
        (format!("resident memory <= {TARGET_RSS_RATIO}x llama.cpp"), fmt_f(rss_ratio, 2), rss_pass),
        (format!("first suggestion <= {TARGET_FIRST_MS} ms"), fmt_f(first_ms, 0), first_ms_pass),
        (format!("first suggestion <= {TARGET_FIRST_RATIO}x llama-server"), fmt_f(first_ratio, 2), first_ratio_pass),
    ];
    for (what, value, pass) in targets_rows {
        writeln!(out, "  {what:<36} {value:>6}  {}", verdict(pass))?;
    }

    let kv_map: serde_json::Map<String, Value> = kv.iter().map(|(n, _, f)| (n.clone(), json!(f.kv_bytes))).collect();
    let kv_detail: Vec<Value> = kv
        .iter()
        .map(|(n, p, f)| {
            json!({
                "name": n, "policy": p.to_json(), "describe": p.describe(),
                "kept_entries": f.kept_entries, "kv_bytes": f.kv_bytes, "peak_kv_bytes": f.peak_bytes,
            })
        })
        .collect();
    let speed_json: Vec<Value> = speed_runs
        .iter()
        .map(|(p, s)| {
            json!({
                "policy": p.to_json(), "describe": p.describe(),
                "prefill_tps": s.prefill(), "decode_tps": s.decode(), "decode_tps_depth0": s.decode0(),
                "prefill_samples": s.prefill, "decode_samples": s.decode, "decode_depth0_samples": s.decode0,
                "prefill_tps_long": s.prefill_long(), "prefill_long_samples": s.prefill_long,
                "decode_tps_long": s.decode_long(), "decode_long_samples": s.decode_long,
            })
        })
        .collect();
    let anchor_speed = speed_runs
        .iter()
        .find(|(p, _)| *p == anchor_default)
        .map(|(_, s)| json!({"prefill_tps": s.prefill(), "decode_tps": s.decode(), "decode_tps_depth0": s.decode0()}));
    let kv_check_json: Vec<Value> = kv_checks
        .iter()
        .map(|c| {
            json!({
                "tokens": c.tokens, "policy": c.policy.describe(),
                "forward_bytes": c.forward_bytes, "replay_bytes": c.replay_bytes,
                "equal": c.forward_bytes == c.replay_bytes,
            })
        })
        .collect();
    let targets = json!({
        "prefill_ratio_min": TARGET_SPEED_RATIO, "decode_ratio_min": TARGET_SPEED_RATIO,
        "kv_ratio_max": TARGET_KV_RATIO, "rss_ratio_max": TARGET_RSS_RATIO,
        "prefill_pass": prefill_pass, "decode_pass": decode_pass,
        "kv_pass": kv_pass, "rss_pass": rss_pass,
        "first_suggestion_ms_max": TARGET_FIRST_MS, "first_suggestion_ratio_max": TARGET_FIRST_RATIO,
        "first_suggestion_ms_pass": first_ms_pass, "first_suggestion_ratio_pass": first_ratio_pass,
    });
    let first_json: Vec<Value> = first_ours
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let lc = first_lc.as_ref().and_then(|v| v.get(i));
            json!({
                "file": f.path, "cursor": f.cursor, "ms": f.ms, "prompt_tokens": f.prompt_tokens,
                "generated_tokens": f.generated, "prefill_ms": f.prefill_ms, "decode_ms": f.decode_ms,
                "llama_cpp_ms": lc.map(|l| l.ms), "llama_cpp_prompt_tokens": lc.and_then(|l| l.prompt_tokens),
                "llama_cpp_generated_tokens": lc.and_then(|l| l.generated),
                "llama_cpp_prompt_ms": lc.and_then(|l| l.prompt_ms), "llama_cpp_predicted_ms": lc.and_then(|l| l.predicted_ms),
            })
        })
        .collect();
    let kv_precision = engine.model.kv_precision();
    let kv_bytes_per_token = (!tokens.is_empty()).then(|| full_bytes / tokens.len());
    // Two halves: one json! of every key exceeds the macro's recursion limit.
    let mut report = json!({
        "date": date,
        "cpu": cpu,
        "threads": args.threads,
        "sched": sched,
        "reps": args.reps,
        "model": model_path.display().to_string(),
        "model_file_bytes": std::fs::metadata(&model_path).map(|m| m.len()).ok(),
        "weight_bytes": engine.model.weight_bytes(),
        "load_seconds": load_s,
        "file": file.path.display().to_string(),
        "file_lines": file.lines,
        "file_tokens": tokens.len(),
        "file_anchors": n_anchors,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "policy": speed_policy.describe(),
        "prefill_tps": ours.prefill(),
        "long_prompt_tokens": long_tokens,
        "prefill_tps_2048": ours.prefill_long(),
        "decode_tps": ours.decode(),
        "decode_tps_depth0": ours.decode0(),
        "decode_tps_depth2048": ours.decode_long(),
        "anchor_speed": anchor_speed,
        "other_cpu_share": ours_other_cpu,
        "speed": speed_json,
    });
    let second = json!({
        "llama_cpp": lc.to_json(),
        "prefill_ratio": prefill_ratio,
        "prefill_2048_ratio": prefill_long_ratio,
        "decode_ratio": decode_ratio,
        "decode_depth0_ratio": decode0_ratio,
        "decode_depth2048_ratio": decode_long_ratio,
        "first_suggestion_ms": first_ms,
        "first_suggestion_llama_cpp_ms": first_lc_ms,
        "first_suggestion_ratio": first_ratio,
        "first_suggestion": {
            "files": first_json, "policy": first_ours.first().map(|f| f.policy.clone()),
            "llama_cpp_settings": LC_FIRST_SETTINGS,
        },
        "kv_precision": kv_precision.name(),
        "kv_bytes_per_token": kv_bytes_per_token,
        "kv_bytes": kv_map,
        "kv_policies": kv_detail,
        "kv_ratio_anchor_vs_full": kv_ratio,
        "kv_check": kv_check_json,
        "rss_before_load_bytes": rss_before,
        "rss_bytes": rss_after,
        "rss_ratio": rss_ratio,
        "targets": targets,
    });
    if let (Some(a), Value::Object(b)) = (report.as_object_mut(), second) {
        a.extend(b);
    }
    writeln!(out)?;
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    out.flush()?;
    Ok(())
}

fn anchor(recent_lines: u32, sink_tokens: u32, dense_every: u32) -> AttentionPolicy {
    AttentionPolicy { kind: PolicyKind::Anchor { recent_lines, dense_every }, sink_tokens }
}

fn window(window_tokens: u32, sink_tokens: u32) -> AttentionPolicy {
    AttentionPolicy { kind: PolicyKind::Window { window_tokens }, sink_tokens }
}

/// A short name for table headers.
fn short(p: &AttentionPolicy) -> String {
    match p.kind {
        PolicyKind::Full => "full".into(),
        PolicyKind::Anchor { recent_lines, dense_every } => {
            if dense_every == 0 {
                format!("anchor R{recent_lines}")
            } else {
                format!("anchor R{recent_lines} D{dense_every}")
            }
        }
        PolicyKind::Window { window_tokens } => format!("window W{window_tokens}"),
    }
}

fn note(s: &str) {
    eprintln!("[bench] {s}");
}

// ---------------------------------------------------------------------------
// Inputs

fn pull_default_model() -> Result<PathBuf> {
    let mut last = String::new();
    models::pull_default(&mut |p| {
        let line = p.to_string();
        if line != last {
            note(&line);
            last = line;
        }
    })
}

struct SourceFile {
    path: PathBuf,
    text: String,
    lines: usize,
    /// How it was chosen or cut, for the report (may be empty).
    note: String,
}

fn pick_file(args: &BenchArgs) -> Result<SourceFile> {
    let (path, mut max_lines, mut note) = match &args.file {
        Some(p) => (p.clone(), args.max_lines, String::new()),
        None => {
            let (p, n) = default_source_file()?;
            (p, if args.max_lines > 0 { args.max_lines } else { n }, String::new())
        }
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))?;
    let total = text.lines().count();
    if max_lines == 0 {
        max_lines = total;
    }
    let text = if total > max_lines {
        note = format!(", first {max_lines} of {total} lines");
        let end = text.match_indices('\n').nth(max_lines - 1).map_or(text.len(), |(i, _)| i + 1);
        text[..end].to_string()
    } else {
        text
    };
    let lines = text.lines().count();
    Ok(SourceFile { path, text, lines, note })
}

/// A real ~2,000-line file from this machine's Python standard library: the
/// module (tests excluded) whose length is closest to 2,000 lines within
/// 1,900–2,300, else the shortest longer one, cut to 2,000 lines. Returns the
/// path and how many lines to use.
fn default_source_file() -> Result<(PathBuf, usize)> {
    let stdlib = python_stdlib().ok_or_else(|| {
        anyhow!("no Python standard library found to take a ~2,000-line source file from: pass --file PATH")
    })?;
    let mut candidates: Vec<(PathBuf, usize)> = Vec::new();
    let mut dirs = vec![(stdlib.clone(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if p.is_dir() {
                let skip = depth >= 1
                    || name.starts_with("test")
                    || name.ends_with("_test")
                    || name.starts_with('.')
                    || name.starts_with("__")
                    || matches!(name.as_str(), "site-packages" | "dist-packages" | "lib2to3" | "idlelib");
                if !skip {
                    dirs.push((p, depth + 1));
                }
            } else if name.ends_with(".py") && !name.starts_with("test_") {
                if let Ok(text) = std::fs::read_to_string(&p) {
                    candidates.push((p, text.lines().count()));
                }
            }
        }
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    let best = candidates
        .iter()
        .filter(|(_, n)| (1900..=2300).contains(n))
        .min_by_key(|(_, n)| n.abs_diff(2000))
        .map(|(p, n)| (p.clone(), *n))
        .or_else(|| {
            candidates.iter().filter(|(_, n)| *n > 2300).min_by_key(|(_, n)| *n).map(|(p, _)| (p.clone(), 2000))
        });
    best.ok_or_else(|| anyhow!("no .py file of 2,000 lines or more in {}: pass --file PATH", stdlib.display()))
}

fn python_stdlib() -> Option<PathBuf> {
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args(["-c", "import sysconfig;print(sysconfig.get_paths()['stdlib'])"])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = out {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !s.is_empty() && Path::new(&s).is_dir() {
                return Some(PathBuf::from(s));
            }
        }
    }
    // No interpreter on PATH: the newest /usr/lib/python3.X.
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3."))
                && p.join("os.py").exists()
        })
        .collect();
    found.sort();
    found.pop()
}

// ---------------------------------------------------------------------------
// Our speed

#[derive(Default)]
struct Speed {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    decode0: Vec<f64>,
    /// The long prompt's prefill (`--long-prompt-tokens`; headline policy only).
    prefill_long: Vec<f64>,
    /// Decode right after the long prompt (depth `--long-prompt-tokens`).
    decode_long: Vec<f64>,
}

impl Speed {
    fn prefill(&self) -> Option<f64> {
        median(&self.prefill)
    }
    fn decode(&self) -> Option<f64> {
        median(&self.decode)
    }
    fn decode0(&self) -> Option<f64> {
        median(&self.decode0)
    }
    fn prefill_long(&self) -> Option<f64> {
        median(&self.prefill_long)
    }
    fn decode_long(&self) -> Option<f64> {
        median(&self.decode_long)
    }
}

/// Start the thread pools and touch every weight once, untimed.
fn warm_up(engine: &Engine, prompt: &[u32], anchors: &[bool]) -> Result<()> {
    let n = prompt.len().min(32);
    let mut cache = engine.model.new_cache(AttentionPolicy::full());
    let logits = engine.model.forward(&prompt[..n], &anchors[..n], &mut cache, Logits::Last)?;
    let t = argmax(&logits);
    engine.model.forward(&[t], &[is_anchor(&engine.tokenizer, t)], &mut cache, Logits::Last)?;
    Ok(())
}

/// Run `prompt` through a fresh cache in chunks, as the server does
/// (`compact(false)` after each chunk); returns the last token's logits.
fn prefill(engine: &Engine, cache: &mut KvCache, prompt: &[u32], anchors: &[bool], chunk: usize) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    let mut at = 0;
    while at < prompt.len() {
        let end = (at + chunk).min(prompt.len());
        let want = if end == prompt.len() { Logits::Last } else { Logits::None };
        logits = engine.model.forward(&prompt[at..end], &anchors[at..end], cache, want)?;
        cache.compact(false);
        at = end;
    }
    Ok(logits)
}

/// Greedy decoding of `n` tokens after `logits`; returns the elapsed time.
fn decode(engine: &Engine, cache: &mut KvCache, mut logits: Vec<f32>, n: usize) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..n {
        let next = argmax(&logits);
        logits = engine.model.forward(&[next], &[is_anchor(&engine.tokenizer, next)], cache, Logits::Last)?;
    }
    Ok(t.elapsed())
}

fn measure_speed(
    engine: &Engine,
    policy: AttentionPolicy,
    prompt: &[u32],
    anchors: &[bool],
    args: &BenchArgs,
) -> Result<Speed> {
    let mut s = Speed::default();
    let n = args.decode_tokens;
    for rep in 0..args.reps {
        // Prefill (timed), then decode at depth `prompt.len()` on the same cache.
        let mut cache = engine.model.new_cache(policy);
        let t = Instant::now();
        let logits = prefill(engine, &mut cache, prompt, anchors, args.chunk)?;
        s.prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let d = decode(engine, &mut cache, logits, n)?;
        s.decode.push(n as f64 / d.as_secs_f64());
        // Decode from an empty cache (depth 0), starting from the prompt's first token.
        let mut cache = engine.model.new_cache(policy);
        let t = Instant::now();
        let logits = engine.model.forward(&prompt[..1], &anchors[..1], &mut cache, Logits::Last)?;
        let d = t.elapsed() + decode(engine, &mut cache, logits, n - 1)?;
        s.decode0.push(n as f64 / d.as_secs_f64());
        note(&format!(
            "{}: rep {}/{}: prefill {:.1} tok/s, decode@{} {:.1} tok/s, decode@0 {:.1} tok/s",
            policy.describe(),
            rep + 1,
            args.reps,
            s.prefill[rep],
            prompt.len(),
            s.decode[rep],
            s.decode0[rep]
        ));
    }
    Ok(s)
}

/// Prefill of the long prompt (in `--chunk` passes, as [`measure_speed`]),
/// then `--decode-tokens` at that depth: tokens/s per repetition of each.
fn measure_long_prefill(
    engine: &Engine,
    policy: AttentionPolicy,
    prompt: &[u32],
    anchors: &[bool],
    args: &BenchArgs,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut v, mut d) = (Vec::new(), Vec::new());
    for rep in 0..args.reps {
        let mut cache = engine.model.new_cache(policy);
        let t = Instant::now();
        let logits = prefill(engine, &mut cache, prompt, anchors, args.chunk)?;
        v.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let n = args.decode_tokens;
        d.push(n as f64 / decode(engine, &mut cache, logits, n)?.as_secs_f64());
        note(&format!(
            "{}: rep {}/{}: prefill {} {:.1} tok/s, decode@{} {:.1} tok/s",
            policy.describe(),
            rep + 1,
            args.reps,
            prompt.len(),
            v[rep],
            prompt.len(),
            d[rep]
        ));
    }
    Ok((v, d))
}

// ---------------------------------------------------------------------------
// Cold first suggestion

/// llama-server's settings in the first-suggestion test.
const LC_FIRST_SETTINGS: &str =
    "llama-server -c 4096 -np 1, default flash attention; /completion with cache_prompt false, temperature 0, \
     n_predict = completion.maxTokens, stop at a line break";

/// Modules of Python's standard library (real code, the same on every machine
/// with that Python) for the first-suggestion test, in this order.
const FIRST_FILES: [&str; 8] = [
    "argparse.py",
    "inspect.py",
    "subprocess.py",
    "typing.py",
    "dataclasses.py",
    "enum.py",
    "pathlib.py",
    "tarfile.py",
];

/// One cursor in a real file.
struct FirstCase {
    path: PathBuf,
    text: String,
    cursor: usize,
}

/// Up to `n` cases from [`FIRST_FILES`]: the cursor in the middle of the code
/// of the first line at or after 60% of the file with at least 16 bytes of
/// code, so that a full window of text precedes it and the suggestion is one
/// line (text follows the cursor on its line).
fn first_cases(n: usize) -> Vec<FirstCase> {
    let Some(stdlib) = python_stdlib() else {
        note("first suggestion: no Python standard library found; skipped");
        return Vec::new();
    };
    FIRST_FILES
        .iter()
        .filter_map(|name| {
            let path = stdlib.join(name);
            let text = std::fs::read_to_string(&path).ok()?;
            let cursor = first_cursor(&text)?;
            Some(FirstCase { path, text, cursor })
        })
        .take(n)
        .collect()
}

/// See [`first_cases`].
fn first_cursor(text: &str) -> Option<usize> {
    let from = text.floor_char_boundary(text.len() * 3 / 5);
    let mut at = text[from..].find('\n').map(|i| from + i + 1)?;
    for line in text[at..].split_inclusive('\n') {
        let code = line.trim();
        if code.len() >= 16 && !code.starts_with('#') {
            let indent = line.len() - line.trim_start().len();
            return Some(text.floor_char_boundary(at + indent + code.len() / 2));
        }
        at += line.len();
    }
    None
}

/// Our side of one first-suggestion case.
struct FirstOurs {
    name: String,
    path: String,
    cursor: usize,
    ms: f64,
    prompt_tokens: usize,
    generated: usize,
    prefill_ms: f64,
    decode_ms: f64,
    /// The prompt's text (window start to cursor), what llama-server gets.
    prompt_text: String,
    max_tokens: usize,
    single_line: bool,
    policy: String,
    kv: &'static str,
}

/// A cold completion per case through the server's own path: a new document
/// cache under the server's default policy and settings, and the server's
/// pipeline (`completion::Session`: plan, tokenize, prefill, one line).
fn measure_first_ours(engine: &Engine, cases: &[FirstCase]) -> Result<Vec<FirstOurs>> {
    use crate::completion;
    use crate::engine::document::DocumentCache;
    let settings = completion::Settings::from(&crate::config::CompletionConfig::default());
    let d = crate::config::AttentionConfig::default();
    let policy = engine.policy(AttentionPolicy::from_spec(&d)?, true);
    let mut out = Vec::new();
    for c in cases {
        let rope = ropey::Rope::from_str(&c.text);
        let t = Instant::now();
        let mut doc = DocumentCache::new(&engine.model, policy);
        let mut session = completion::Session::default();
        let s = session.complete_local(engine, &mut doc, &rope, c.cursor, &settings, &|| false)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let name = c.path.file_name().map_or(String::new(), |n| n.to_string_lossy().to_string());
        note(&format!(
            "first suggestion, ours: {name}: {ms:.0} ms ({} prompt tokens, {} generated): {:?}",
            doc.tokens().len(),
            s.tokens,
            s.text
        ));
        out.push(FirstOurs {
            name,
            path: c.path.display().to_string(),
            cursor: c.cursor,
            ms,
            prompt_tokens: doc.tokens().len(),
            generated: s.tokens,
            // Up to the first generated token (the prompt, healing, the FIM tail).
            prefill_ms: s.prefill_time.as_secs_f64() * 1e3,
            decode_ms: s.decode_time.as_secs_f64() * 1e3,
            prompt_text: c.text[session.window_start().unwrap_or(0)..c.cursor].to_string(),
            max_tokens: settings.max_tokens,
            single_line: s.single_line,
            policy: policy.describe(),
            kv: doc.kv().precision().name(),
        });
    }
    Ok(out)
}

/// llama-server's side of one case.
struct FirstLc {
    ms: f64,
    prompt_tokens: Option<u64>,
    generated: Option<u64>,
    prompt_ms: Option<f64>,
    predicted_ms: Option<f64>,
}

/// Start `llama-server`, answer one untimed warm-up request, then time one
/// `/completion` per case (the same prompt text, an empty cache each time).
fn llama_server_first(server: &Path, model: &Path, args: &BenchArgs, cases: &[FirstOurs]) -> Result<Vec<FirstLc>> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::env::temp_dir().join(format!("anchorcoder-bench-llama-first-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log)?;
    let mut child = Command::new(server)
        .arg("-m")
        .arg(model)
        .args(["-c", "4096", "-np", "1", "-t", &args.threads.to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("cannot start llama-server")?;
    let result = (|| -> Result<Vec<FirstLc>> {
        wait_ready(&mut child, port, &log)?;
        let body = |prompt: &str, n: usize, single: bool| {
            let mut b = json!({"prompt": prompt, "n_predict": n, "cache_prompt": false, "temperature": 0.0});
            if single {
                b["stop"] = json!(["\n"]);
            }
            b
        };
        http_post_json(port, "/completion", &body("def main():\n", 4, true))?;
        let mut out = Vec::new();
        for c in cases {
            let t = Instant::now();
            let v = http_post_json(port, "/completion", &body(&c.prompt_text, c.max_tokens, c.single_line))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let f = FirstLc {
                ms,
                prompt_tokens: v["tokens_evaluated"].as_u64().or_else(|| v["timings"]["prompt_n"].as_u64()),
                generated: v["tokens_predicted"].as_u64().or_else(|| v["timings"]["predicted_n"].as_u64()),
                prompt_ms: v["timings"]["prompt_ms"].as_f64(),
                predicted_ms: v["timings"]["predicted_ms"].as_f64(),
            };
            note(&format!(
                "first suggestion, llama-server: {}: {ms:.0} ms ({:?} prompt tokens, {:?} generated): {:?}",
                c.name,
                f.prompt_tokens,
                f.generated,
                v["content"].as_str().unwrap_or("")
            ));
            out.push(f);
        }
        Ok(out)
    })();
    let _ = child.kill();
    let _ = child.wait();
    if result.is_ok() {
        let _ = std::fs::remove_file(&log);
    }
    result
}

/// POST `body` as JSON to `127.0.0.1:port` and parse the JSON answer (HTTP/1.1,
/// one request per connection; a 200 with a `Content-Length` body expected).
fn http_post_json(port: u16, path: &str, body: &Value) -> Result<Value> {
    let body = serde_json::to_vec(body)?;
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("cannot connect to llama-server")?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(&body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header in llama-server's answer"))?;
    if head.split_whitespace().nth(1) != Some("200") {
        bail!(
            "llama-server answered {}: {}",
            head.lines().next().unwrap_or(""),
            rest.chars().take(300).collect::<String>()
        );
    }
    serde_json::from_str(rest)
        .with_context(|| format!("llama-server's answer is not JSON: {}", rest.chars().take(200).collect::<String>()))
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    Some(if s.len() % 2 == 1 { s[m] } else { (s[m - 1] + s[m]) / 2.0 })
}

// ---------------------------------------------------------------------------
// KV bytes

struct KvFigures {
    kept_entries: usize,
    /// Live K/V bytes after the whole input and a forced compaction.
    kv_bytes: usize,
    /// Most live K/V bytes right after any chunk, before its compaction.
    peak_bytes: usize,
}

/// Bytes one token's K (or V) takes in one layer of `engine`'s caches: every
/// KV head's row in the precision new caches store (a `q8` row's scale included).
fn kv_row_bytes(engine: &Engine) -> usize {
    let cfg = engine.model.config();
    cfg.n_kv_heads * engine.model.kv_precision().row_bytes(cfg.head_dim)
}

/// Replay the cache's bookkeeping for `anchors` (chunks of `chunk`, the
/// server's `compact(false)` after each, `compact(true)` at the end) with one
/// `f32` per entry, and scale the byte figures to `row_bytes` (see
/// [`kv_row_bytes`]) per kept K or V entry.
fn replay_kv(policy: AttentionPolicy, n_layers: usize, row_bytes: usize, anchors: &[bool], chunk: usize) -> KvFigures {
    let mut cache = KvCache::with_precision(policy, n_layers, 1, 1, KvPrecision::F32);
    let zeros = vec![0f32; chunk];
    let mut peak = 0;
    for ch in anchors.chunks(chunk) {
        cache.begin_chunk(ch);
        for l in 0..n_layers {
            cache.append(l, &zeros[..ch.len()], &zeros[..ch.len()]);
        }
        peak = peak.max(cache.stats().kv_bytes);
        cache.compact(false);
    }
    cache.compact(true);
    let s = cache.stats();
    // An f32 entry is 4 bytes of K or V.
    let scale = |bytes: usize| bytes / 4 * row_bytes;
    KvFigures { kept_entries: s.kept_entries, kv_bytes: scale(s.kv_bytes), peak_bytes: scale(peak) }
}

struct KvCheck {
    tokens: usize,
    policy: AttentionPolicy,
    forward_bytes: usize,
    replay_bytes: usize,
}

/// KV bytes of `tokens` through the real model vs the replay.
fn check_kv(
    engine: &Engine,
    policy: AttentionPolicy,
    tokens: &[u32],
    anchors: &[bool],
    chunk: usize,
) -> Result<KvCheck> {
    let mut cache = engine.model.new_cache(policy);
    prefill(engine, &mut cache, tokens, anchors, chunk)?;
    cache.compact(true);
    let replay = replay_kv(policy, engine.model.config().n_layers, kv_row_bytes(engine), anchors, chunk);
    Ok(KvCheck { tokens: tokens.len(), policy, forward_bytes: cache.stats().kv_bytes, replay_bytes: replay.kv_bytes })
}

// ---------------------------------------------------------------------------
// llama.cpp

#[derive(Clone, Copy, Default, Debug)]
struct LcFigures {
    prefill: Option<f64>,
    /// Prefill of the long prompt (pp2048).
    prefill_long: Option<f64>,
    decode: Option<f64>,
    decode0: Option<f64>,
    /// Decode at the long prompt's depth (tg64 @ d2048).
    decode_long: Option<f64>,
}

struct LlamaCpp {
    bin: Option<PathBuf>,
    commit: Option<String>,
    fa_on: LcFigures,
    fa_off: LcFigures,
    depth_supported: bool,
    rss_bytes: Option<u64>,
    rss_settings: String,
    errors: Vec<String>,
    /// Share of the CPUs other processes used while llama-bench ran.
    other_cpu: Option<f64>,
}

impl LlamaCpp {
    fn absent(why: String) -> Self {
        LlamaCpp {
            bin: None,
            commit: None,
            fa_on: LcFigures::default(),
            fa_off: LcFigures::default(),
            depth_supported: false,
            rss_bytes: None,
            rss_settings: "not measured".into(),
            errors: vec![why],
            other_cpu: None,
        }
    }

    fn fa_figure(&self, on: bool, f: impl Fn(&LcFigures) -> Option<f64>) -> Option<f64> {
        f(if on { &self.fa_on } else { &self.fa_off })
    }

    fn best(&self, f: impl Fn(&LcFigures) -> Option<f64>) -> Option<f64> {
        match (f(&self.fa_on), f(&self.fa_off)) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn prefill_tps(&self) -> Option<f64> {
        self.best(|f| f.prefill)
    }
    fn decode_tps(&self) -> Option<f64> {
        self.best(|f| f.decode)
    }
    fn decode0_tps(&self) -> Option<f64> {
        self.best(|f| f.decode0)
    }
    fn prefill_long_tps(&self) -> Option<f64> {
        self.best(|f| f.prefill_long)
    }
    fn decode_long_tps(&self) -> Option<f64> {
        self.best(|f| f.decode_long)
    }

    fn summary(&self) -> String {
        match &self.bin {
            Some(b) => {
                let mut s = format!("{} (commit {})", b.display(), self.commit.as_deref().unwrap_or("?"));
                if !self.depth_supported {
                    s += "; this llama-bench has no -d: decode@depth figures are null";
                }
                for e in &self.errors {
                    s += &format!("; {e}");
                }
                s
            }
            None => format!("not measured: {}", self.errors.join("; ")),
        }
    }

    fn to_json(&self) -> Value {
        let fig = |f: &LcFigures| json!({"prefill_tps": f.prefill, "prefill_tps_2048": f.prefill_long, "decode_tps": f.decode, "decode_tps_depth0": f.decode0, "decode_tps_depth2048": f.decode_long});
        json!({
            "bin_dir": self.bin.as_ref().map(|b| b.display().to_string()),
            "commit": self.commit,
            "prefill_tps": self.prefill_tps(),
            "prefill_tps_2048": self.prefill_long_tps(),
            "decode_tps": self.decode_tps(),
            "decode_tps_depth0": self.decode0_tps(),
            "decode_tps_depth2048": self.decode_long_tps(),
            "flash_attn_on": fig(&self.fa_on),
            "flash_attn_off": fig(&self.fa_off),
            "rss_bytes": self.rss_bytes,
            "rss_settings": self.rss_settings,
            "other_cpu_share": self.other_cpu,
            "errors": self.errors,
        })
    }
}

fn default_llama_cpp_dir() -> PathBuf {
    let tools =
        std::env::var_os("ANCHORCODER_TOOLS").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".cache/anchorcoder/tools")
        });
    tools.join("llama.cpp").join("bin")
}

fn run_llama_cpp(args: &BenchArgs, model: &Path, long_tokens: usize) -> LlamaCpp {
    let dir = args.llama_cpp.clone().unwrap_or_else(default_llama_cpp_dir);
    if !dir.join("llama-bench").is_file() && args.build_llama_cpp {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bench/build-llamacpp.sh");
        note(&format!("building llama.cpp with {} (several minutes)", script.display()));
        let mut cmd = Command::new("bash");
        cmd.arg(&script).stdout(Stdio::piped());
        if let Some(d) = &args.llama_cpp {
            // The script installs into $ANCHORCODER_TOOLS/llama.cpp/bin.
            if let Some(tools) = d.parent().and_then(|p| p.parent()) {
                cmd.env("ANCHORCODER_TOOLS", tools);
            }
        }
        match cmd.output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => note(&format!("build-llamacpp.sh failed ({})", o.status)),
            Err(e) => note(&format!("cannot run {}: {e}", script.display())),
        }
    }
    let bench = dir.join("llama-bench");
    if !bench.is_file() {
        let why = format!(
            "llama-bench not found in {} (build it with tests/bench/build-llamacpp.sh or \
             `anchorcoder bench --build-llama-cpp`, or pass --llama-cpp DIR); llama.cpp figures and ratios are null",
            dir.display()
        );
        note(&why);
        return LlamaCpp::absent(why);
    }
    let mut lc = LlamaCpp::absent(String::new());
    lc.errors.clear();
    lc.bin = Some(dir.clone());
    lc.commit =
        std::fs::read_to_string(dir.join("../SOURCE")).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());

    let help = Command::new(&bench)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr));
    let help = help.unwrap_or_default();
    lc.depth_supported = help.contains("--n-depth");
    let (fa_on, fa_off) = if help.contains("<on|off") { ("on", "off") } else { ("1", "0") };
    let common = |cmd: &mut Command| {
        cmd.arg("-m").arg(model).args(["-t", &args.threads.to_string(), "-r", &args.reps.to_string()]).args([
            "-fa",
            &format!("{fa_on},{fa_off}"),
            "-o",
            "jsonl",
        ]);
    };
    wait_idle(args.wait_idle);
    let cpu = CpuMeter::start();
    // pp512 and tg64 from an empty context.
    let mut c1 = Command::new(&bench);
    common(&mut c1);
    let prompts = if long_tokens > 0 && long_tokens != args.prompt_tokens {
        format!("{},{long_tokens}", args.prompt_tokens)
    } else {
        args.prompt_tokens.to_string()
    };
    c1.args(["-p", &prompts, "-n", &args.decode_tokens.to_string()]);
    note("running llama-bench: prefill and decode at depth 0, flash attention on and off");
    match run_llama_bench(c1) {
        Ok(rows) => {
            for r in rows {
                let fig = if r.flash_attn { &mut lc.fa_on } else { &mut lc.fa_off };
                if r.n_prompt > 0 && r.n_gen == 0 {
                    if r.n_prompt == long_tokens as u64 {
                        fig.prefill_long = Some(r.tps);
                    }
                    if r.n_prompt == args.prompt_tokens as u64 {
                        fig.prefill = Some(r.tps);
                    }
                } else if r.n_gen > 0 && r.n_prompt == 0 {
                    fig.decode0 = Some(r.tps);
                }
            }
        }
        Err(e) => lc.errors.push(format!("llama-bench: {e:#}")),
    }
    // tg64 after a 512-token context (and after the long prompt's).
    if lc.depth_supported {
        let mut c2 = Command::new(&bench);
        common(&mut c2);
        let depths = if long_tokens > 0 && long_tokens != args.prompt_tokens {
            format!("{},{long_tokens}", args.prompt_tokens)
        } else {
            args.prompt_tokens.to_string()
        };
        c2.args(["-p", "0", "-n", &args.decode_tokens.to_string(), "-d", &depths]);
        note(&format!("running llama-bench: decode at depth {depths}, flash attention on and off"));
        match run_llama_bench(c2) {
            Ok(rows) => {
                for r in rows.into_iter().filter(|r| r.n_gen > 0 && r.n_depth > 0) {
                    let fig = if r.flash_attn { &mut lc.fa_on } else { &mut lc.fa_off };
                    if r.n_depth == args.prompt_tokens as u64 {
                        fig.decode = Some(r.tps);
                    }
                    if r.n_depth == long_tokens as u64 {
                        fig.decode_long = Some(r.tps);
                    }
                }
            }
            Err(e) => lc.errors.push(format!("llama-bench -d: {e:#}")),
        }
    }
    lc.other_cpu = cpu.other_share();
    note(&format!("llama.cpp FA on: {:?}; FA off: {:?}", lc.fa_on, lc.fa_off));

    // Resident memory of llama-server holding the same model.
    let server = dir.join("llama-server");
    if server.is_file() {
        let settings =
            format!("llama-server -c {} -np 1 -t {}, default mmap, after warm-up", args.prompt_tokens, args.threads);
        note(&format!("measuring resident memory of {settings}"));
        match llama_server_rss(&server, model, args) {
            Ok(rss) => {
                lc.rss_bytes = Some(rss);
                lc.rss_settings = settings;
            }
            Err(e) => lc.errors.push(format!("llama-server RSS: {e:#}")),
        }
    } else {
        lc.errors.push(format!("no llama-server in {}: rss_ratio is null", dir.display()));
    }
    lc
}

struct BenchRow {
    n_prompt: u64,
    n_gen: u64,
    n_depth: u64,
    flash_attn: bool,
    /// Median of the samples (llama-bench's mean if it gave none).
    tps: f64,
}

fn run_llama_bench(mut cmd: Command) -> Result<Vec<BenchRow>> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().context("cannot start llama-bench")?;
    let out = wait_output(child, Duration::from_secs(1800))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        bail!("exited with {}: {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| l.starts_with('{')) {
        let v: Value = serde_json::from_str(line).with_context(|| format!("bad JSON line from llama-bench: {line}"))?;
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let flash_attn = match v.get("flash_attn") {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) => n.as_i64().unwrap_or(0) > 0,
            Some(Value::String(s)) => matches!(s.as_str(), "on" | "1" | "true"),
            _ => false,
        };
        let samples: Vec<f64> = v
            .get("samples_ts")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let tps = median(&samples)
            .or_else(|| v.get("avg_ts").and_then(Value::as_f64))
            .ok_or_else(|| anyhow!("llama-bench row without avg_ts: {line}"))?;
        rows.push(BenchRow { n_prompt: u("n_prompt"), n_gen: u("n_gen"), n_depth: u("n_depth"), flash_attn, tps });
    }
    if rows.is_empty() {
        bail!("no JSON rows in llama-bench's output");
    }
    Ok(rows)
}

/// Wait until the `llama-server` in `child` answers /health on `port` (at most
/// 180 s); an error naming its `log` when it exits first or takes longer.
fn wait_ready(child: &mut Child, port: u16, log: &Path) -> Result<()> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            bail!("llama-server exited early ({st}); see {}", log.display());
        }
        if health_ok(port) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("llama-server did not become ready within 180 s; see {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait for `child` for at most `limit`, polling every `poll`: its exit
/// status, or `None` when it ran past the limit (it is killed and reaped).
pub(crate) fn wait_timeout(child: &mut Child, limit: Duration, poll: Duration) -> Result<Option<ExitStatus>> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(poll);
    }
}

/// Wait for `child` with a time limit, collecting its output.
fn wait_output(mut child: Child, limit: Duration) -> Result<std::process::Output> {
    // Drain the pipes on threads so a chatty child cannot block.
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let ho = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let he = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let Some(status) = wait_timeout(&mut child, limit, Duration::from_millis(100))? else {
        bail!("timed out after {} s", limit.as_secs());
    };
    Ok(std::process::Output { status, stdout: ho.join().unwrap_or_default(), stderr: he.join().unwrap_or_default() })
}

/// Start `llama-server` on the model, wait until it answers /health (after
/// its warm-up run), read its VmRSS, and stop it.
fn llama_server_rss(server: &Path, model: &Path, args: &BenchArgs) -> Result<u64> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let log = std::env::temp_dir().join(format!("anchorcoder-bench-llama-server-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log)?;
    let mut child = Command::new(server)
        .arg("-m")
        .arg(model)
        .args(["-c", &args.prompt_tokens.to_string(), "-np", "1", "-t", &args.threads.to_string()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .context("cannot start llama-server")?;
    let result = (|| -> Result<u64> {
        wait_ready(&mut child, port, &log)?;
        std::thread::sleep(Duration::from_millis(500));
        vm_rss_of(&format!("/proc/{}/status", child.id()))
            .ok_or_else(|| anyhow!("cannot read VmRSS of llama-server (pid {})", child.id()))
    })();
    let _ = child.kill();
    let _ = child.wait();
    if result.is_ok() {
        let _ = std::fs::remove_file(&log);
    }
    result
}

fn health_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/") && head.split_whitespace().nth(1) == Some("200")
}

// ---------------------------------------------------------------------------
// Contention

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// Busy CPU ticks of the whole machine and of this process with its reaped
/// children, to tell how much CPU other processes took during a measurement.
struct CpuMeter {
    t: Instant,
    machine: u64,
    own: u64,
}

impl CpuMeter {
    fn start() -> CpuMeter {
        CpuMeter { t: Instant::now(), machine: machine_busy_ticks().unwrap_or(0), own: own_ticks().unwrap_or(0) }
    }

    /// Share (0..1) of all CPUs' time that other processes used since `start`.
    fn other_share(&self) -> Option<f64> {
        let (m, o) = (machine_busy_ticks()?, own_ticks()?);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = self.t.elapsed().as_secs_f64();
        if wall <= 0.0 || self.machine == 0 {
            return None;
        }
        let others = m.saturating_sub(self.machine) as f64 - o.saturating_sub(self.own) as f64;
        Some((others.max(0.0) / USER_HZ / (wall * cpus)).min(1.0))
    }
}

/// user + nice + system + irq + softirq + steal ticks of all CPUs.
fn machine_busy_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = s.lines().next()?.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5).unwrap_or(&0) + f.get(6).unwrap_or(&0) + f.get(7).unwrap_or(&0))
}

/// utime + stime + cutime + cstime of this process.
fn own_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let g = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some(g(14)? + g(15)? + g(16)? + g(17)?)
}

/// This process's scheduling policy and nice value, e.g. `SCHED_RR` or
/// `SCHED_OTHER nice 0`, from /proc/self/stat.
fn sched_policy() -> String {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else { return "unknown".into() };
    let Some(i) = s.rfind(')') else { return "unknown".into() };
    let f: Vec<&str> = s[i + 2..].split_whitespace().collect();
    let g = |n: usize| f.get(n - 3).copied().unwrap_or("?");
    let (prio, nice, policy) = (g(40), g(19), g(41));
    match policy {
        "0" => format!("SCHED_OTHER nice {nice}"),
        "1" => format!("SCHED_FIFO priority {prio}"),
        "2" => format!("SCHED_RR priority {prio}"),
        "3" => format!("SCHED_BATCH nice {nice}"),
        "5" => "SCHED_IDLE".into(),
        p => format!("policy {p}"),
    }
}

/// Wait (up to `secs`) until other processes use under 10% of the CPUs over a
/// 2-second window.
fn wait_idle(secs: u64) {
    if secs == 0 {
        return;
    }
    let t = Instant::now();
    loop {
        let m = CpuMeter::start();
        std::thread::sleep(Duration::from_secs(2));
        match m.other_share() {
            Some(v) if v < 0.10 => return,
            None => return,
            Some(v) => {
                if t.elapsed() > Duration::from_secs(secs) {
                    note(&format!("machine still busy ({:.0}% used by others); measuring anyway", 100.0 * v));
                    return;
                }
                note(&format!("waiting for an idle machine ({:.0}% used by others)", 100.0 * v));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn vm_rss_self() -> Option<u64> {
    vm_rss_of("/proc/self/status")
}

/// VmRSS in bytes from a /proc/PID/status file.
fn vm_rss_of(status: &str) -> Option<u64> {
    let s = std::fs::read_to_string(status).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_f(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn mb_opt(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "n/a".into(), |b| mb(b as usize))
}

fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown CPU".to_string(), |s| s.trim().to_string());
    let flags: Vec<&str> =
        info.lines().find(|l| l.starts_with("flags")).map(|l| l.split_whitespace().collect()).unwrap_or_default();
    let feats: Vec<&str> =
        ["avx2", "avx512f", "avx512_vnni", "amx_tile"].into_iter().filter(|f| flags.contains(f)).collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{name} ({cores} cores available; {})", feats.join(" "))
}

/// Today's UTC date, YYYY-MM-DD.
fn utc_date() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    // Civil from days (H. Hinnant).
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_cursor_is_mid_line_after_three_fifths() {
        let text: String = (0..100)
            .map(|i| {
                if i == 61 {
                    "# a comment line long enough\n".to_string()
                } else if i % 2 == 0 {
                    "\n".into()
                } else {
                    format!("    value_{i:03} = compute({i})\n")
                }
            })
            .collect();
        let c = first_cursor(&text).unwrap();
        assert!(c >= text.len() * 3 / 5);
        let line_start = text[..c].rfind('\n').unwrap() + 1;
        let line = &text[line_start..line_start + text[line_start..].find('\n').unwrap()];
        assert_eq!(line, "    value_063 = compute(63)", "comments and blank lines are skipped");
        // Code on both sides of the cursor: a one-line suggestion.
        assert!(!text[line_start..c].trim().is_empty() && !text[c..line_start + line.len()].trim().is_empty());
        assert_eq!(first_cursor("short\n"), None);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn replay_matches_the_policy_arithmetic() {
        // 100 lines of 10 tokens, the last of each an anchor.
        let anchors: Vec<bool> = (0..1000).map(|i| i % 10 == 9).collect();
        // Rows of 16 bytes (8 f16 values, say).
        let full = replay_kv(AttentionPolicy::full(), 4, 16, &anchors, 128);
        assert_eq!(full.kept_entries, 4 * 1000);
        // K and V.
        assert_eq!(full.kv_bytes, 4 * 1000 * 16 * 2);
        // R=0: sinks (4), the 100 anchors, none of the open line (the last
        // token is an anchor, so the next line is empty).
        let a = replay_kv(anchor(0, 4, 0), 4, 8, &anchors, 128);
        assert_eq!(a.kept_entries, 4 * (4 + 100));
        // A window keeps sinks + the W − 1 tokens before the next one (which
        // joins the window when it arrives) per layer.
        let w = replay_kv(window(50, 4), 4, 8, &anchors, 128);
        assert_eq!(w.kept_entries, 4 * (4 + 49));
        assert!(w.peak_bytes >= w.kv_bytes);
        assert_eq!(w.kv_bytes, 4 * (4 + 49) * 8 * 2);
    }

    #[test]
    fn utc_date_is_well_formed() {
        let d = utc_date();
        assert_eq!(d.len(), 10);
        assert_eq!(&d[4..5], "-");
    }
}
