#!/usr/bin/env python3
"""llama.cpp's fill-in-the-middle prompts, token for token, for server/tests/conformance.rs.

    infill-prompts.py models VOCAB_DIR OUT_DIR
    infill-prompts.py record LLAMA_SERVER MODEL.gguf CASES.json OUT.jsonl

`models` writes OUT_DIR/NAME.f32.gguf for the FIM test's models, make-models.py's small
random-weight ones (its `make`: same shapes and seed scheme): `starcoder2`, `deepseek-coder` and
`llama-spm` (no FIM tokens) with llama.cpp's vocabulary fixtures, and two vocabularies that the
fixtures lack and no download offers: `qwen25-coder`, Qwen2.5-Coder's (llama.cpp's qwen2 fixture
is Qwen1.5's, whose ids 151646.. are padding: here they carry Qwen2.5's added tokens with their
ids, `<|fim_prefix|>` .. `<|file_sep|>` among them, typed as llama.cpp's converter writes them),
and `codellama`, Llama 2's SentencePiece vocabulary plus CodeLlama's four infill tokens `▁<PRE>`
`▁<SUF>` `▁<MID>` `▁<EOT>` (ids 32000-32003 here, 32007-32010 in CodeLlama; the ids do not matter,
llama.cpp and we find them by name).

`record` starts llama-server on MODEL (loopback, 1 slot, 4,096 context, batch 2,048), sends every
case of CASES.json to `/infill` (input_prefix = the case's prefix without the bytes our token
healing cuts, input_suffix, input_extra; one token generated) and reads the exact prompt tokens
back from the slot's saved state (`/slots/0?action=save`: the file starts with the slot's
tokens). Writes one JSON line per case: {"case", "status", "tokens"} (tokens: the prompt
`/infill` built; status 501 and no tokens for a model without FIM tokens).
"""

import importlib.util
import json
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
# CodeLlama's infill tokens, appended to Llama 2's vocabulary (ids 32007-32010 in CodeLlama).
CODELLAMA_TOKENS = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]
# Qwen2.5(-Coder)'s added tokens after <|im_end|>, by id, where the Qwen1.5 vocabulary of
# llama.cpp's fixture has padding; type 3 control, 4 user-defined. Qwen2.5's tokenizer_config.json
# has those from 151657 on `special: false`, which llama.cpp's converter writes as user-defined;
# llama.cpp makes the FIM, repo and file ones control tokens at load (with a warning), as we do.
QWEN25_ADDED = {
    151646: ("<|object_ref_start|>", 3), 151647: ("<|object_ref_end|>", 3), 151648: ("<|box_start|>", 3),
    151649: ("<|box_end|>", 3), 151650: ("<|quad_start|>", 3), 151651: ("<|quad_end|>", 3),
    151652: ("<|vision_start|>", 3), 151653: ("<|vision_end|>", 3), 151654: ("<|vision_pad|>", 3),
    151655: ("<|image_pad|>", 3), 151656: ("<|video_pad|>", 3), 151657: ("<tool_call>", 4),
    151658: ("</tool_call>", 4), 151659: ("<|fim_prefix|>", 4), 151660: ("<|fim_middle|>", 4),
    151661: ("<|fim_suffix|>", 4), 151662: ("<|fim_pad|>", 4), 151663: ("<|repo_name|>", 4),
    151664: ("<|file_sep|>", 4),
}
# gguf's token types: 3 = control, 4 = user-defined.
CONTROL = 3
GGSQ = 0x67677371  # llama.cpp's LLAMA_FILE_MAGIC_GGSQ, the slot state file's magic


def make_models_module():
    spec = importlib.util.spec_from_file_location("make_models", HERE / "make-models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_vocab(src: Path, dst: Path, arch: str, edit) -> None:
    """A vocabulary-only GGUF: every tokenizer.* key of `src`, the token lists passed through
    `edit(tokens, scores, types)` (lists changed in place; scores None where the file has none)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(src)
    f = reader.fields
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    lists = [list(f[k].contents()) if k in f else None for k in keys]  # BPE vocabularies have no scores
    edit(*lists)
    edited = {k: v for k, v in zip(keys, lists) if v is not None}
    w = GGUFWriter(str(dst), arch)
    for field in f.values():
        if not field.name.startswith("tokenizer."):
            continue
        vtype, value = field.types[0], edited.get(field.name, None)
        value = field.contents() if value is None else value
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[1] if len(field.types) > 1 else GGUFValueType.STRING
            w.add_key_value(field.name, value, vtype, sub_type=sub)
        else:
            w.add_key_value(field.name, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def qwen25_coder_vocab(tokens, scores, types) -> None:
    """Qwen1.5's vocabulary (llama.cpp's ggml-vocab-qwen2.gguf) → Qwen2.5-Coder's: same ids and
    merges, the added tokens named."""
    for i, (name, kind) in QWEN25_ADDED.items():
        if not tokens[i].startswith("[PAD"):
            raise SystemExit(f"qwen2 vocabulary: id {i} is {tokens[i]!r}, not padding")
        tokens[i], types[i] = name, kind


def codellama_vocab(tokens, scores, types) -> None:
    tokens += CODELLAMA_TOKENS
    if scores is not None:
        scores += [0.0] * len(CODELLAMA_TOKENS)
    types += [CONTROL] * len(CODELLAMA_TOKENS)


def models(vocab_dir: Path, out_dir: Path) -> None:
    """The models of the FIM test, make-models.py's small random-weight ones (shapes, seed
    scheme): Qwen2.5-Coder's and CodeLlama's vocabularies (written here), StarCoder2's and
    DeepSeek-Coder's (llama.cpp's fixtures have their FIM tokens), and Llama 2's (none)."""
    mm = make_models_module()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_vocab(vocab_dir / "ggml-vocab-llama-spm.gguf", t / "ggml-vocab-codellama.gguf", "llama", codellama_vocab)
        write_vocab(vocab_dir / "ggml-vocab-qwen2.gguf", t / "ggml-vocab-qwen25-coder.gguf", "qwen2", qwen25_coder_vocab)
        mm.make("qwen25-coder", "qwen2", "qwen25-coder", {"tied": True}, t, out_dir)
        mm.make("codellama", "llama", "codellama", {}, t, out_dir)
    for name in ("starcoder2", "deepseek-coder", "llama-spm"):
        arch, vocab, opts = mm.MODELS[name]
        mm.make(name, arch, vocab, opts, vocab_dir, out_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120.0):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def slot_tokens(path: Path) -> list:
    """The tokens at the head of a saved slot state (llama_state_seq_save_file), as the server
    packs them (server_tokens::serialize: -1, version 1, count + ids, media keys)."""
    data = path.read_bytes()
    magic, _version, n = struct.unpack_from("<III", data, 0)
    if magic != GGSQ:
        raise SystemExit(f"{path}: not a llama.cpp slot state (magic {magic:#x})")
    words = list(struct.unpack_from(f"<{n}i", data, 12))
    if words and words[0] == -1:  # packed: -1, version, count, ids
        if words[1] != 1:
            raise SystemExit(f"{path}: unknown server_tokens state version {words[1]}")
        count = words[2] & 0xFFFFFFFF
        return words[3 : 3 + count]
    return words  # a plain token list (older servers)


def record(server: str, model: Path, cases_path: Path, out: Path) -> None:
    cases = json.loads(cases_path.read_text())["cases"]
    with tempfile.TemporaryDirectory() as slots:
        port = free_port()
        log = open(out.with_suffix(".server.log"), "w")
        proc = subprocess.Popen(
            [server, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-b", "2048",
             "-np", "1", "-t", "2", "--slot-save-path", slots + "/", "--no-webui"],
            stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"llama-server exited ({proc.returncode}); see {log.name}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"llama-server did not become healthy; see {log.name}")
                time.sleep(0.5)
            with open(out, "w") as f:
                for case in cases:
                    prefix, heal = case["prefix"], case["heal"]
                    if not prefix.endswith(heal):
                        raise SystemExit(f"case {case['name']}: prefix does not end with heal")
                    body = {
                        "input_prefix": prefix[: len(prefix) - len(heal)],
                        "input_suffix": case["suffix"],
                        "input_extra": case.get("extra", []),
                        "n_predict": 1,
                        "temperature": 0,
                        "cache_prompt": False,
                    }
                    status, answer = post(base + "/infill", body)
                    rec = {"case": case["name"], "status": status}
                    if status == 200:
                        n = int(answer["tokens_evaluated"])
                        name = f"{case['name']}.bin"
                        s, a = post(base + "/slots/0?action=save", {"filename": name})
                        if s != 200:
                            raise SystemExit(f"slot save failed ({s}): {a}")
                        tokens = slot_tokens(Path(slots) / name)
                        if len(tokens) < n:
                            raise SystemExit(f"case {case['name']}: the slot holds {len(tokens)} < {n} tokens")
                        rec["tokens"] = tokens[:n]
                    else:
                        rec["error"] = answer.get("error", answer)
                    f.write(json.dumps(rec) + "\n")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "models":
        models(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 6 and sys.argv[1] == "record":
        record(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
