//! The server's resident memory with many long documents open, each one's
//! cache built: `anchor` and `window` against `full`.
//!
//! Opens `--docs` (20) real Python-stdlib files cut to `--lines` (2,000)
//! lines each in one real `anchorcoder` server, waits until the server has
//! warmed every document's cache (the prompt window at the end of the file:
//! the last 2,048 × 3 bytes), then reads the server's VmRSS and VmHWM and the
//! KV bytes that `anchorcoder/status` reports (`cacheBytes`: allocated, with
//! spare capacity; the documents' `kvBytes`: live rows). Runs once per configuration:
//! `anchor`, `window` and `full` with the cache budget lifted (so that every document
//! stays cached), and with `--default-budget` also `full` under the default
//! 512 MiB budget (what a user gets: the LRU evicts). Prints a table and,
//! last, one JSON object with the ratios.
//!
//! `memory-docs [--docs 20] [--lines 2000] [--policies anchor,window,full] [--default-budget]`
//! (the ratios need all three policies; with fewer, the measurements are printed as they are;
//! ANCHORCODER_BIN picks the binary; tests/bench/memory-docs.sh runs it on a release build).

use std::time::{Duration, Instant};

use anchorcoder_e2e::Server;
use serde_json::{json, Value};

/// Long stdlib modules (data-only ones left out), in order of preference.
const FILES: [&str; 26] = [
    "_pydecimal.py",
    "_pyio.py",
    "argparse.py",
    "datetime.py",
    "difflib.py",
    "doctest.py",
    "email/_header_value_parser.py",
    "enum.py",
    "http/cookiejar.py",
    "idlelib/configdialog.py",
    "inspect.py",
    "ipaddress.py",
    "logging/__init__.py",
    "mailbox.py",
    "pickletools.py",
    "pydoc.py",
    "subprocess.py",
    "tarfile.py",
    "tkinter/__init__.py",
    "turtle.py",
    "typing.py",
    "unittest/mock.py",
    "urllib/request.py",
    "xml/dom/minidom.py",
    "xml/etree/ElementTree.py",
    "zipfile.py",
];

/// The `anchorcoder` server started by this process (its only live child of that name).
fn server_pid() -> u32 {
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|v| v.parse::<u32>().ok()));
        // An earlier configuration's server may linger as a zombie.
        if ppid == Some(me) && state != Some("Z") && head.contains("anchorcoder") {
            return pid;
        }
    }
    panic!("no anchorcoder child process found");
}

/// VmRSS and VmHWM of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `anchorcoder/status`, waiting as long as a warm-up step may take on a busy machine.
fn status(s: &mut Server) -> Value {
    s.request("anchorcoder/status", Value::Null, Duration::from_secs(900))["result"].clone()
}

fn measure(name: &str, options: Value, docs: &[(String, String)]) -> Value {
    let mut s = Server::start(&[]);
    s.initialize(options, json!({"general": {"positionEncodings": ["utf-8"]}}));
    let pid = server_pid();
    // Loaded model, no documents yet.
    let t = Instant::now();
    while status(&mut s)["model"]["state"] != "ready" {
        assert!(t.elapsed() < Duration::from_secs(300), "the model did not load");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (rss_loaded, _) = rss(pid);
    for (uri, text) in docs {
        s.open(uri, "python", text);
    }
    // Warm: nothing queued and no document with tokens left to prefill, twice in a row.
    let mut quiet = 0;
    let status = loop {
        std::thread::sleep(Duration::from_secs(1));
        let st = status(&mut s);
        let ready = st["queueDepth"] == 0
            && st["documents"].as_array().is_some_and(|a| !a.is_empty() && a.iter().all(|d| d["pendingTokens"] == 0));
        quiet = if ready { quiet + 1 } else { 0 };
        if quiet >= 2 {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(1800), "documents did not warm within 30 min: {st}");
    };
    let (rss_warm, hwm) = rss(pid);
    let cached = status["documents"].as_array().map_or(0, Vec::len);
    let tokens: u64 = status["documents"].as_array().unwrap().iter().filter_map(|d| d["tokens"].as_u64()).sum();
    // Allocated K/V (live rows plus spare capacity) and the live rows alone.
    let kv = status["cacheBytes"].as_u64().unwrap_or(0);
    let live: u64 = status["documents"].as_array().unwrap().iter().filter_map(|d| d["kvBytes"].as_u64()).sum();
    s.shutdown();
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{name:<24} {cached:>3} of {:>2} cached, {tokens:>6} tokens, KV {:>7.1} MB allocated ({:.1} MB live), RSS {:>7.1} MB (loaded, no documents: {:.1} MB; peak {:.1} MB), warm after {:.0}s",
        docs.len(),
        mb(kv),
        mb(live),
        mb(rss_warm),
        mb(rss_loaded),
        mb(hwm),
        t.elapsed().as_secs_f64()
    );
    json!({"documents_cached": cached, "tokens": tokens, "kv_bytes": kv, "kv_live_bytes": live, "rss_bytes": rss_warm,
           "rss_loaded_bytes": rss_loaded, "peak_rss_bytes": hwm})
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, d: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(d)
    };
    let (n, lines) = (flag("--docs", 20), flag("--lines", 2000));
    let default_budget = args.iter().any(|a| a == "--default-budget");
    let stdlib = {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let docs: Vec<(String, String)> = FILES
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(format!("{stdlib}/{f}")).ok()?;
            let cut: Vec<&str> = text.split_inclusive('\n').take(lines).collect();
            (cut.len() == lines).then(|| (format!("file:///tmp/anchorcoder-memory/{f}"), cut.concat()))
        })
        .take(n)
        .collect();
    assert_eq!(docs.len(), n, "not enough stdlib files of {lines}+ lines");
    eprintln!("{n} documents of {lines} lines ({} bytes in all)", docs.iter().map(|d| d.1.len()).sum::<usize>());

    let threads = 2;
    let unbounded = json!({"memoryBudgetMiB": 65536});
    // Each policy named explicitly, with the server's default knobs.
    let run = |policy: &str| {
        measure(
            &format!("{policy} (budget lifted)"),
            json!({"threads": threads, "attention": {"policy": policy}, "cache": unbounded}),
            docs.as_slice(),
        )
    };
    let policies = args
        .iter()
        .position(|a| a == "--policies")
        .and_then(|i| args.get(i + 1))
        .map_or("anchor,window,full", String::as_str);
    let mut measured = serde_json::Map::new();
    for policy in policies.split(',') {
        measured.insert(policy.to_owned(), run(policy));
    }
    let [Some(anchor), Some(window), Some(full)] = ["anchor", "window", "full"].map(|p| measured.get(p).cloned())
    else {
        println!("{}", Value::Object(measured));
        return;
    };
    let ratio = |a: &Value, b: &Value, k: &str| a[k].as_f64().unwrap() / b[k].as_f64().unwrap();
    let mut report = json!({
        "documents": n, "lines": lines, "anchor": anchor, "window": window, "full": full,
    });
    for (name, m) in [("anchor", &anchor), ("window", &window)] {
        report[format!("rss_ratio_{name}_over_full")] = json!(ratio(m, &full, "rss_bytes"));
        report[format!("kv_ratio_{name}_over_full")] = json!(ratio(m, &full, "kv_bytes"));
        report[format!("kv_live_ratio_{name}_over_full")] = json!(ratio(m, &full, "kv_live_bytes"));
    }
    if default_budget {
        let f = measure("full (512 MiB budget)", json!({"threads": threads, "attention": {"policy": "full"}}), &docs);
        report["rss_ratio_anchor_over_full_default_budget"] = json!(ratio(&anchor, &f, "rss_bytes"));
        report["rss_ratio_window_over_full_default_budget"] = json!(ratio(&window, &f, "rss_bytes"));
        report["full_default_budget"] = f;
    }
    for name in ["anchor", "window"] {
        println!(
            "RSS {name} / full: {:.3} (KV allocated {:.3}, live {:.3})",
            report[format!("rss_ratio_{name}_over_full")].as_f64().unwrap(),
            report[format!("kv_ratio_{name}_over_full")].as_f64().unwrap(),
            report[format!("kv_live_ratio_{name}_over_full")].as_f64().unwrap()
        );
    }
    println!("{report}");
}
