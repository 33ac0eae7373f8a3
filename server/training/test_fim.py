"""pytest: the training rows (fim.py) in the server's prompt layout, their loss
masks, the engine's masks over FIM rows (R=0 and R=2, no dense layers, rows of
2,048 tokens), and, with torch, a tiny slice of training on the CPU whose
adapter the engine loads.

    target/py-training/bin/python -m pytest -q server/training/test_fim.py
    ANCHORCODER_BIN=target/debug/anchorcoder ... (the engine cross-checks)

numpy + pytest always; the model file and `tokenizers` for the row tests (they
skip without); torch (and safetensors) for the training slice.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

import pytest

np = pytest.importorskip("numpy")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fim  # noqa: E402
from policy import Policy, mask_numpy  # noqa: E402

GGUF = os.environ.get("ANCHORCODER_GGUF",
                      os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
IDS = {"prefix": 8, "suffix": 9, "middle": 10}
# the two variants of issue 17: R=2 and R=0, no dense layers
VARIANTS = [Policy("anchor", 2, 4, 0), Policy("anchor", 0, 4, 0)]


# -- the server's rules, without a tokenizer -----------------------------------
def test_heal_split_mirrors_the_server():
    assert fim.heal_split("x = foo") == " foo"  # an identifier keeps its space
    assert fim.heal_split("x = foo_1") == " foo_1"
    assert fim.heal_split("print(a.") == "."
    assert fim.heal_split("f(a, ") == " "  # a run of spaces
    assert fim.heal_split("    ") == "    "  # a fresh line: its indentation
    assert fim.heal_split("(x)->") == ")->"
    assert fim.heal_split("") == ""
    assert fim.heal_split("héllo") == "héllo"


def test_healing_stays_on_the_cursor_line_and_within_64_bytes():
    text = "def f():\n    return value"
    assert fim.healed_at(text, len(text)) == " value"
    assert fim.healed_at(text, text.index("\n") + 1) == ""  # line start: nothing to heal
    word = "x" * 100
    assert fim.healed_at(word, 100) == "x" * 64
    multi = "é" * 40  # 80 bytes: the 64-byte bound falls on a character boundary
    assert fim.healed_at(multi, 40) == "é" * 32
    odd = "a" + "é" * 40  # 81 bytes: byte 17 is inside a character, floored to its start
    assert fim.healed_at(odd, len(odd)).encode() == ("é" * 32).encode()


def test_suffix_cut_mirrors_fim_tail():
    assert fim.suffix_text("short\n", 256) == "short\n"
    long = "".join(f"line {i:04d}\n" for i in range(200))  # 10 bytes a line
    cut = fim.suffix_text(long, 8)  # 32 bytes -> 3 whole lines
    assert cut == long[:30] and cut.endswith("\n")
    one = "x" * 100
    assert fim.suffix_text(one, 8) == "x" * 32  # no newline: cut at the budget
    # a multi-byte character across the budget is not split
    s = "ab" + "é" * 40
    assert fim.suffix_text(s, 4).encode() == ("ab" + "é" * 7).encode()


def test_loss_and_middle_masks():
    # [pre] p p [suf] s [mid] m m EOT pad pad
    row = np.array([[8, 100, 101, 9, 102, 10, 103, 104, 0, 0, 0]], np.uint16)
    info = np.array([[9, 5, fim.KIND_FIM]], np.int32)
    m = fim.loss_mask(row, info, IDS)
    # targets row[1:] = 100 101 9 102 10 103 104 0 0 0
    assert m[0].tolist() == [True, True, False, True, False, True, True, True, False, False]
    mid = fim.middle_mask(row, info)
    assert mid[0].tolist() == [False] * 5 + [True, True, True, False, False]
    plain = np.array([[5, 6, 7, 0, 11]], np.uint16)
    pinfo = np.array([[5, -1, fim.KIND_PLAIN]], np.int32)
    assert fim.loss_mask(plain, pinfo, IDS).all() and not fim.middle_mask(plain, pinfo).any()


def test_split_files():
    s = np.array([5, 6, 0, 7, 0, 0, 8], np.uint16)
    assert [f.tolist() for f in fim.split_files(s)] == [[5, 6], [7], [8]]


# -- rows with the model's tokenizer -----------------------------------------
@pytest.fixture(scope="module")
def tok():
    if not os.path.exists(GGUF):
        pytest.skip(f"{GGUF} not found")
    pytest.importorskip("tokenizers")
    from gguf_io import GGUFFile
    from tokenizer import build_tokenizer
    g = GGUFFile(GGUF)
    assert fim.fim_ids(g.metadata["tokenizer.ggml.tokens"], g.metadata["tokenizer.ggml.token_type"]) == IDS
    return build_tokenizer(g), g


def enc(tok):
    return lambda t: tok.encode(t, add_special_tokens=False).ids


def source_text():
    """Real code of this repository with no special-token text in it."""
    parts = []
    for name in ("policy.py", "model.py", "pack_carry.py", "test_model.py"):
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            parts.append(f.read())
    text = "\n".join(parts)
    assert "<|" not in text and "<issue" not in text and "<file_sep>" not in text
    return text


def check_fim_row(tok, text, c0, c1, row_len, suffix_tokens=fim.SUFFIX_TOKENS):
    e = enc(tok)
    r = fim.fim_row(e, text, c0, c1, IDS, row_len, suffix_tokens)
    assert r is not None
    row, valid, mid, prefix_text = r
    assert len(row) == row_len and row[0] == IDS["prefix"]
    s = row.index(IDS["suffix"])
    healed = fim.healed_at(text, c0)
    cut = c0 - len(healed)
    # the window: from a line start to the cut, tokenized alone, right after the marker
    ws = cut - len(prefix_text)
    assert text[ws:cut] == prefix_text and (ws == 0 or text[ws - 1] == "\n")
    assert row[1:s] == e(prefix_text)
    # the tail: exactly fim_tail's tokens
    assert row[s:mid + 1] == fim.fim_tail_ids(e, text[c1:], IDS, suffix_tokens)
    # the middle: the healed bytes then the missing text, then <|endoftext|>
    assert row[mid + 1:valid] == e(healed + text[c0:c1]) + [fim.EOT]
    assert all(t == fim.EOT for t in row[valid:])
    return row, valid, mid, prefix_text


def test_fim_rows_are_the_server_layout(tok):
    t, _ = tok
    text = source_text()
    rng = np.random.default_rng(0)
    for _ in range(40):
        pm = fim.pick_middle(rng, text, len(text) // 3)
        check_fim_row(t, text, pm[0], pm[1], 2049)
    # cursor mid-identifier, rest of the line, a small suffix budget (cut at a line end)
    c0 = text.index("def mask_numpy") + len("def mask_nu")
    row, valid, mid, _ = check_fim_row(t, text, c0, text.index("\n", c0), 600, suffix_tokens=16)
    assert valid - mid - 1 >= 2
    # the cursor at the file's end: an empty suffix
    row, valid, mid, _ = check_fim_row(t, text, len(text) - 10, len(text), 2049)
    assert row[mid - 1] == IDS["suffix"]


def test_row_builder(tok):
    t, _ = tok
    e = enc(t)
    text = source_text()
    chunks = text.split("\n\n\n")
    stream = np.concatenate([np.array(e(c) + [fim.EOT], np.uint16) for c in chunks if c.strip()])
    files = fim.split_files(stream)
    b = fim.RowBuilder(t, files, IDS, 257, suffix_tokens=32)
    rows, info = b.build(40, 0.5, seed=3)
    assert rows.shape == (40, 257) and info.shape == (40, 3)
    is_fim = info[:, 2] == fim.KIND_FIM
    assert 8 <= is_fim.sum() <= 32
    assert (rows[is_fim, 0] == IDS["prefix"]).all()
    assert (rows[~is_fim] != IDS["prefix"]).all() and (info[~is_fim, 0] == 257).all()
    for k in np.flatnonzero(is_fim):
        v, mid, _ = info[k]
        assert rows[k, mid] == IDS["middle"] and rows[k, v - 1] == fim.EOT
        assert (rows[k, 1:mid] != IDS["prefix"]).all()
    # plain rows start at a line start of some file
    starts = {tuple(e(c[ws:])[:8]) for c in chunks for ws in fim.line_starts(c)}
    for k in np.flatnonzero(~is_fim):
        assert tuple(rows[k, :8].tolist()) in starts
    again, _ = fim.RowBuilder(t, files, IDS, 257, suffix_tokens=32).build(40, 0.5, seed=3)
    assert np.array_equal(rows, again)


# -- the engine's masks over FIM rows -----------------------------------------
ENGINE_CMD = ("{bin} debug-mask --policy {policy} --recent-lines {recent_lines} --sink-tokens {sink_tokens} "
              "--dense-every {dense_every} --window-tokens {window_tokens} --layers {layers} --file {file} "
              "--max-tokens {max_tokens}")
MARKER_TEXT = {"prefix": "7", "suffix": "8", "middle": "9"}  # one non-anchor token each, never merged


def engine_masks(binary, text, pol, layers, max_tokens):
    from test_policy import _parse_engine
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "row.txt")
        with open(path, "w", newline="", encoding="utf-8") as f:
            f.write(text)
        cmd = ENGINE_CMD.format(bin=shlex.quote(binary), policy=pol.name, recent_lines=pol.recent_lines,
                                sink_tokens=pol.sink_tokens, dense_every=pol.dense_every,
                                window_tokens=pol.window_tokens, layers=layers, file=shlex.quote(path),
                                max_tokens=max_tokens)
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{cmd}\n{res.stderr}"
        return _parse_engine(res.stdout)


def test_fim_row_masks_match_engine(tok):
    """The engine's masks over a FIM row equal the training masks. The engine
    tokenizes special-token text as text, so the row goes to `debug-mask` with
    its three markers spelled as digits: one token each that never merges with
    its neighbours (the pre-tokenizer isolates digits) and, like the markers, is
    no anchor. The engine's tokens must then be the row's with the markers
    swapped for the digits, and its masks those of the row itself."""
    binary = os.environ.get("ANCHORCODER_BIN")
    if not binary:
        pytest.skip("ANCHORCODER_BIN not set")
    t, g = tok
    from gguf_io import anchor_table
    lut = anchor_table(g)
    assert not lut[[IDS[r] for r in fim.FIM_ROLES]].any(), "FIM markers are no anchors"
    e = enc(t)
    digit = {r: e(MARKER_TEXT[r]) for r in fim.FIM_ROLES}
    assert all(len(d) == 1 and not lut[d[0]] for d in digit.values())
    swap = {IDS[r]: digit[r][0] for r in fim.FIM_ROLES}
    text = source_text()
    cases = [(text.index("def kv_fraction") + 9, text.index("def kv_fraction") + 40, 300, 2),
             (len(text) // 2 + 7, len(text) // 2 + 130, 2049, 1)]  # a full 2,048-token row, one layer
    checked = 0
    for c0, c1, row_len, layers in cases:
        row, valid, mid, prefix_text = check_fim_row(t, text, c0, c1, row_len)
        real = row[:valid - 1]  # the server never feeds the final <|endoftext|>
        s = row.index(IDS["suffix"])
        healed = fim.healed_at(text, c0)
        spelled = (MARKER_TEXT["prefix"] + prefix_text + MARKER_TEXT["suffix"]
                   + t.decode(row[s + 1:mid]) + MARKER_TEXT["middle"] + healed + text[c0:c1])
        want_tokens = [swap.get(x, x) for x in real]
        want_anchors = lut[np.array(real, dtype=np.int64)]
        for pol in VARIANTS:
            tokens, anchors, masks = engine_masks(binary, spelled, pol, layers, len(real))
            assert tokens == want_tokens, "the engine tokenizes the row's pieces differently"
            assert [bool(x) for x in anchors] == want_anchors.tolist()
            for l, m in masks.items():
                want = mask_numpy(want_anchors, *pol.layer(l), pol.sink_tokens)
                bad = np.argwhere(m != want)
                assert not len(bad), f"{pol.describe()} layer {l}, row of {row_len}: first {bad[0].tolist()}"
                checked += 1
    print(f"engine cross-check on FIM rows: {checked} layer masks identical")


# -- a tiny slice of training on the CPU (torch) ---------------------------------
def test_training_slice_exports_a_fim_adapter(tok, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from safetensors import safe_open
    import train
    t, g = tok
    e = enc(t)
    text = source_text()
    stream = np.concatenate([np.array(e(c) + [fim.EOT], np.uint16) for c in text.split("\n\n\n") if c.strip()])
    data = tmp_path / "rows"
    data.mkdir()
    meta = {"seq_len": 64, "row_len": 65, "fim_share": 0.5, "suffix_tokens": 16, "fim_ids": IDS,
            "fim_tokens": json.loads(fim.fim_metadata(IDS)), "eot": 0}
    for split, n, seed in (("train", 8, 1), ("val", 4, 2)):
        rows, info = fim.RowBuilder(t, fim.split_files(stream), IDS, 65, 16).build(n, 0.5, seed)
        fim.save_array(str(data / f"{split}_rows"), rows, xz=False)
        np.save(data / f"{split}_info.npy", info)
    (data / "rows_meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    torch.set_num_threads(2)
    train.main(["--gguf", GGUF, "--data", str(data), "--out", str(out), "--layers", "1", "--device", "cpu",
                "--policy", "anchor:R=2:D=0,anchor:R=0:D=0", "--steps-from", "each", "--steps", "2",
                "--warmup", "1", "--batch", "2", "--rank", "4", "--eval-tokens", "128", "--eval-batch", "2",
                "--samples", "0", "--log-every", "1", "--lr", "1e-2"])
    log = json.loads((out / "log.json").read_text())
    assert set(log["runs"]) == {"anchor_r2", "anchor_r0"}
    assert "loss_mid" in log["eval"]["lora_anchor_r0"]["anchor_r0"]
    for name, r in (("anchor_r2", 2), ("anchor_r0", 0)):
        path = out / f"adapter_{name}.safetensors"
        with safe_open(str(path), "pt") as f:
            md = f.metadata()
            assert md["format"] == "anchorcoder-lora" and md["variant"] == name
            pj = json.loads(md["policy_json"])
            assert (pj["policy"], pj["recentLines"], pj["denseEvery"], pj["sinkTokens"]) == ("anchor", r, 0, 4)
            assert json.loads(md["fim_tokens"]) == json.loads(fim.fim_metadata(IDS))
            assert md["token_embd_rows"] == "8,9,10" and "token_embd" in md["targets"].split(",")
            rows = f.get_tensor("token_embd.rows")
            assert tuple(rows.shape) == (3, 576)
            assert tuple(f.get_tensor("blk.0.attn_k.lora_b").shape) == (192, 4)
        # trained: the rows moved away from their start, and differ from each other
        from model import embd_init_rows
        init = embd_init_rows(torch.from_numpy(g.tensor("token_embd.weight")), 3)
        assert (rows - init).abs().max() > 1e-4
        assert (rows[0] - rows[1]).abs().max() > 1e-3
    binary = os.environ.get("ANCHORCODER_BIN")
    if binary:  # the engine loads what the recipe wrote, with FIM on
        src = tmp_path / "doc.py"
        src.write_text("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return \n")
        res = subprocess.run([binary, "complete", str(src), "--line", "6", "--column", "12", "--adapter",
                              str(out / "adapter_anchor_r0.safetensors"), "--max-tokens", "4", "--model", GGUF],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
