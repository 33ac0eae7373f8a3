#!/usr/bin/env python3
"""Write server/tests/fixtures/tokenizer_llamacpp.json: token ids produced by llama.cpp's
`llama-tokenize` for a set of texts, so that the Rust tokenizer can be checked against it
(server/src/engine/tokenizer.rs, test `matches_llamacpp_fixture`).

Regenerate (needs the default model and a llama.cpp build; Python stdlib only):

    tests/bench/build-llamacpp.sh                  # once, prints the bin dir
    python3 tests/bench/make-tokenizer-fixture.py  # from the repository root

Options: --llama-bin DIR (default: the last line printed by build-llamacpp.sh),
--model PATH (default: $ANCHORCODER_MODEL, else the default model in the cache),
--out PATH.

Each entry is {"name", "text", "ids"} and, for entries made with another pre-tokenizer,
"pre". Those use a vocab-only copy of the default GGUF whose `tokenizer.ggml.pre` is changed
(same vocabulary and merges, llama.cpp's regexes for that pre type), so the Rust side can check
its rebuild of other pre-tokenizers against llama.cpp too.

llama-tokenize runs with --no-escape (the text is used verbatim), --no-bos and
--no-parse-special (special-token strings in the text are plain text, as for documents).
The texts are real files from this machine (Python stdlib, Rust crate sources, npm's own
JavaScript), cut to excerpts at line boundaries, plus synthetic strings.
"""

import argparse
import glob
import json
import os
import struct
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXCERPT_BYTES = 20_000
VARIANT_EXCERPT_BYTES = 4_000
# Other llama.cpp pre-tokenizer types checked with the default vocabulary.
VARIANT_PRES = ["gpt-2", "llama-bpe", "qwen2", "qwen35", "dbrx"]


def default_model():
    if os.environ.get("ANCHORCODER_MODEL"):
        return os.environ["ANCHORCODER_MODEL"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "anchorcoder", "models", DEFAULT_MODEL_FILE)


def llama_bin_dir():
    out = subprocess.run(
        [os.path.join(REPO, "tests", "bench", "build-llamacpp.sh")],
        check=True, stdout=subprocess.PIPE, text=True, timeout=3600,
    ).stdout
    return out.strip().splitlines()[-1]


def excerpt(path, limit):
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(data) > limit:
        cut = data.rfind(b"\n", 0, limit)
        data = data[: cut + 1 if cut > 0 else limit]
    text = data.decode("utf-8", errors="strict")
    return text


def first(pattern):
    hits = sorted(glob.glob(os.path.expanduser(pattern)))
    return hits[-1] if hits else None


def real_files():
    """(name, path) for real sources on this machine; names are portable descriptions."""
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    npm = first("/usr/lib/node_modules/npm") or first("/usr/local/lib/node_modules/npm")
    try:
        root = subprocess.run(["npm", "root", "-g"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, timeout=60).stdout.strip()
        if root and os.path.isdir(os.path.join(root, "npm")):
            npm = os.path.join(root, "npm")
    except (OSError, subprocess.SubprocessError):
        pass
    cargo = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
    reg = os.path.join(cargo, "registry", "src", "*")
    cands = [
        ("py/textwrap.py", os.path.join(stdlib, "textwrap.py")),
        ("py/json/decoder.py", os.path.join(stdlib, "json", "decoder.py")),
        ("py/difflib.py", os.path.join(stdlib, "difflib.py")),
        ("py/dataclasses.py", os.path.join(stdlib, "dataclasses.py")),
        ("py/asyncio/base_events.py", os.path.join(stdlib, "asyncio", "base_events.py")),
        ("rs/anyhow/lib.rs", first(os.path.join(reg, "anyhow-1.*", "src", "lib.rs"))),
        ("rs/serde_json/de.rs", first(os.path.join(reg, "serde_json-1.*", "src", "de.rs"))),
        ("rs/tokenizers/bpe/model.rs",
         first(os.path.join(reg, "tokenizers-0.22.*", "src", "models", "bpe", "model.rs"))),
        ("rs/candle-core/gguf_file.rs",
         first(os.path.join(reg, "candle-core-0.11.*", "src", "quantized", "gguf_file.rs"))),
        ("rs/regex-syntax/unicode.rs",
         first(os.path.join(reg, "regex-syntax-0.8.*", "src", "unicode.rs"))),
    ]
    if npm:
        cands += [
            ("js/npm/lib/npm.js", os.path.join(npm, "lib", "npm.js")),
            ("js/npm/lib/commands/install.js", os.path.join(npm, "lib", "commands", "install.js")),
            ("js/semver/classes/range.js",
             os.path.join(npm, "node_modules", "semver", "classes", "range.js")),
            ("md/npm/README.md", os.path.join(npm, "README.md")),
        ]
    cands.append(("c/stdio.h", "/usr/include/stdio.h"))
    return [(n, p) for n, p in cands if p and os.path.isfile(p)]


def synthetic():
    specials = "".join([
        "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>\n", "<file_sep><filename>a.py\n",
        "<repo_name>x<reponame>y<gh_stars>10", "<jupyter_code>print(1)<jupyter_output>",
    ])
    return [
        ("syn/special-token-strings", "s = '" + specials + "'\n" + specials),
        ("syn/crlf", "def f(x):\r\n    return x\r\n\r\n\r\nclass A:\r\n\tpass\r\n"),
        ("syn/tabs", "\tif (x) {\n\t\t\treturn y;\t// tab\t\tafter\n\t}\n\t\n"),
        ("syn/40-spaces", "x = 1\n" + " " * 40 + "y = 2\n" + " " * 40 + "\n" + " " * 41 + "z"),
        ("syn/whitespace-runs", "a" + " " * 7 + "b\n\n\n\n  \n \t \n" + " " * 16 + "\n\n"),
        ("syn/digits", "1234567 12345678901234567890 3.14159 1e-9 0xDEADBEEF 1_000_000 v2.0.1"),
        ("syn/unicode-digits", "١٢٣٤ ۱۲۳ १२३ ½ ² ³ Ⅻ ⑤ 𝟙𝟚𝟛"),
        ("syn/latin", "héllo wörld — “quotes” ‘single’ … naïve café Ünïcödé ß ø Œ"),
        ("syn/cjk", "日本語のテキスト、中文字符。한국어 텍스트! 漢字かなカナ"),
        ("syn/emoji", "emoji 🦀🐍👩‍💻 flags 🇫🇷🇯🇵 skin 👍🏽 family 👨‍👩‍👧‍👦 ✔︎"),
        ("syn/scripts", "Привет мир; Γειά σου; שלום; مرحبا; नमस्ते; สวัสดี; ሰላም"),
        ("syn/combining", "e\u0301 a\u0308 n\u0303 \u1100\u1161 Zalgo: Z\u0351\u0324a\u0300l"),
        ("syn/odd-spaces",
         "nbsp\u00a0x em\u2003x zwsp\u200bx bom\ufeffx nel\u0085x ls\u2028x ideo\u3000x"),
        ("syn/controls", "\u0000\u0001\u0007\u001b[31mred\u001b[0m\u007f\u0008"),
        ("syn/contractions", "can't won't it's I'LL we'Re they'VE she'd O'Neil 's 'd"),
        ("syn/punct-runs", "!!!??? ... ---> <=> ::: ;;; ((())) [[{}]] /* */ // ## @@ $$ %%"),
        ("syn/long-repeat", "=" * 300 + "\n" + "ab" * 200 + "\n" + "-" * 79 + "\n"),
        ("syn/trailing-ws", "end with spaces   "),
        ("syn/trailing-newlines", "x\n\n\n"),
        ("syn/leading-ws", "   \n\t\tleading"),
        ("syn/single-space", " "),
        ("syn/mixed-code", "fn main() {\n    let v: Vec<u8> = b\"\\x00\\xff\".to_vec(); // ü\n"
                          "    println!(\"{v:?} {}\", 42);\n}\n"),
    ]


# ---- vocab-only GGUF with another tokenizer.ggml.pre (pure Python GGUF v2/v3 rewriter) ----

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(buf, pos, vtype):
    if vtype in _SCALAR:
        return pos + _SCALAR[vtype]
    if vtype == 8:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR:
            return pos + count * _SCALAR[etype]
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def _gguf_string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def write_variant_gguf(src, dst, pre):
    """Copy src's metadata (no tensors) to dst with tokenizer.ggml.pre = pre."""
    with open(src, "rb") as f:
        head = f.read(64 << 20)  # metadata of a small model is far below this
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", head, 0)
    if magic != b"GGUF" or version < 2:
        raise SystemExit(f"{src}: not a GGUF v2+ file")
    pos = 24
    kvs = []
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", head, pos)
        key = head[pos + 8: pos + 8 + klen].decode("utf-8")
        start = pos
        pos += 8 + klen
        (vtype,) = struct.unpack_from("<I", head, pos)
        pos = _skip_value(head, pos + 4, vtype)
        if key == "tokenizer.ggml.pre":
            kvs.append(_gguf_string(key) + struct.pack("<I", 8) + _gguf_string(pre))
        else:
            kvs.append(head[start:pos])
    with open(dst, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", version, 0, len(kvs)))
        for kv in kvs:
            f.write(kv)
        size = f.tell()
        f.write(b"\0" * ((-size) % 32))


def tokenize(tool, model, text, workdir):
    path = os.path.join(workdir, "sample.txt")
    with open(path, "wb") as f:
        f.write(text.encode("utf-8"))
    cmd = [tool, "-m", model, "-f", path, "--ids", "--log-disable", "--no-bos",
           "--no-parse-special", "--no-escape"]
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr.decode(errors='replace')[-2000:]}")
    lines = [l for l in res.stdout.decode().splitlines() if l.startswith("[")]
    if not lines:
        raise SystemExit(f"no ids from llama-tokenize:\n{res.stdout.decode(errors='replace')}")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin")
    ap.add_argument("--model", default=default_model())
    ap.add_argument("--out", default=os.path.join(REPO, "server", "tests", "fixtures",
                                                  "tokenizer_llamacpp.json"))
    args = ap.parse_args()
    if not os.path.isfile(args.model):
        raise SystemExit(f"model not found at {args.model}; run `anchorcoder model pull`")
    bindir = args.llama_bin or llama_bin_dir()
    tool = os.path.join(bindir, "llama-tokenize")
    if not os.access(tool, os.X_OK):
        raise SystemExit(f"{tool} not found; run tests/bench/build-llamacpp.sh")

    reals = []
    for name, path in real_files():
        text = excerpt(path, EXCERPT_BYTES)
        if text:
            reals.append((name, text))
    if len(reals) < 8:
        raise SystemExit(f"only {len(reals)} real source files found: {[n for n, _ in reals]}")
    # One real file with CRLF line ends.
    reals.append((reals[0][0] + " (CRLF)", reals[0][1].replace("\n", "\r\n")))
    syn = synthetic()

    samples = []
    with tempfile.TemporaryDirectory(prefix="anchorcoder-fixture-") as work:
        for name, text in reals + syn:
            samples.append({"name": name, "text": text, "ids": tokenize(tool, args.model, text, work)})
        variant_texts = syn + [(n, t[:VARIANT_EXCERPT_BYTES].rsplit("\n", 1)[0] + "\n")
                               for n, t in reals[:4]]
        for pre in VARIANT_PRES:
            vpath = os.path.join(work, f"vocab-{pre}.gguf")
            write_variant_gguf(args.model, vpath, pre)
            for name, text in variant_texts:
                samples.append({"name": f"{name} [{pre}]", "pre": pre, "text": text,
                                "ids": tokenize(tool, vpath, text, work)})

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    body = "[\n" + ",\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n]\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(body)
    n_tok = sum(len(s["ids"]) for s in samples)
    print(f"wrote {args.out}: {len(samples)} samples, {n_tok} tokens, {len(body.encode())} bytes",
          file=sys.stderr)


if __name__ == "__main__":
    main()
