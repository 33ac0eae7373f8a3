"""pytest: the attention-mask definition (policy.py) and, when the engine binary
is given, a cross-check against the Rust engine's own masks.

    /tmp/train-venv/bin/python -m pytest -q server/training/test_policy.py
    ANCHORCODER_BIN=target/release/anchorcoder /tmp/train-venv/bin/python -m pytest -q -s server/training/test_policy.py

The engine cross-check runs `$ANCHORCODER_BIN debug-mask ...` (the command line
is a template, ANCHORCODER_MASK_CMD, see ENGINE_CMD below) on a few code files
and policies and compares, layer by layer, the engine's masks with mask_numpy
over the engine's own tokens; if the model file and `tokenizers` are present it
also compares the engine's token ids and anchor flags with tokenizer.py's.
Without ANCHORCODER_BIN the cross-check prints that it skipped.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

import pytest

np = pytest.importorskip("numpy")  # CI without numpy: skip, not a collection error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from policy import ANCHOR, DENSE, WINDOW, Policy, kv_fraction, lines_of, mask_numpy, mask_slow  # noqa: E402

GGUF = os.environ.get("ANCHORCODER_GGUF",
                      os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf"))


def rows(m, q):
    return [k for k in range(m.shape[1]) if m[q, k]]


def random_anchors(rng, t, p=0.12):
    return rng.random(t) < p


# -- the definition, on the engine's own unit-test examples -----------------
def test_line_numbers_count_anchors_before():
    assert lines_of([0, 1, 0, 0, 1, 1, 0]).tolist() == [0, 0, 1, 1, 1, 2, 3]


def test_anchor_r0_sees_sinks_anchors_and_own_line():
    # tokens: 0 1 | 2 3 4\n | 5 6\n | 7 8   (S = 1)
    a = [0, 0, 0, 0, 1, 0, 1, 0, 0]
    m = mask_numpy(a, ANCHOR, 0, 1)
    assert rows(m, 8) == [0, 4, 6, 7, 8]
    assert rows(m, 6) == [0, 4, 5, 6]  # an anchor sees the whole line it ends


def test_recent_lines_widen_the_view():
    m = mask_numpy([0, 1, 0, 1, 0, 1, 0], ANCHOR, 1, 0)
    assert rows(m, 6) == [1, 3, 4, 5, 6]


def test_window():
    m = mask_numpy([0] * 12, WINDOW, 3, 2)
    assert rows(m, 11) == [0, 1, 9, 10, 11]


def test_dense_every_layers():
    p = Policy("anchor", 0, 4, 4)
    assert [l for l in range(10) if p.layer(l)[0] == DENSE] == [0, 4, 8]
    assert all(Policy("anchor", 0, 4, 0).layer(l) == (ANCHOR, 0) for l in range(30))
    assert all(Policy("full").layer(l) == (DENSE, 0) for l in range(30))
    assert all(Policy("window", 0, 4, 0, 64).layer(l) == (WINDOW, 64) for l in range(30))


def test_describe_matches_engine_text():
    assert Policy("anchor", 2, 4, 4).describe() == "anchor(R=2, S=4, dense_every=4)"
    assert Policy("full").describe() == "full"
    assert Policy("window", 0, 4, 0, 256).describe() == "window(W=256, S=4)"
    with pytest.raises(ValueError):
        Policy("sparse")
    with pytest.raises(ValueError):
        Policy("window", window_tokens=0)


# -- properties on random sequences ----------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_vectorised_equals_loop_definition(seed):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 70))
    a = random_anchors(rng, t, p=[0.0, 0.1, 0.5, 1.0][seed % 4])
    for kind, param in [(DENSE, 0), (ANCHOR, 0), (ANCHOR, 1), (ANCHOR, 3), (WINDOW, 1), (WINDOW, 5)]:
        for s in (0, 1, 4):
            assert np.array_equal(mask_numpy(a, kind, param, s), mask_slow(a, kind, param, s)), (kind, param, s)


@pytest.mark.parametrize("seed", range(4))
def test_mask_properties(seed):
    rng = np.random.default_rng(100 + seed)
    t = 80
    a = random_anchors(rng, t)
    line = lines_of(a)
    dense = mask_numpy(a, DENSE, 0, 4)
    assert np.array_equal(dense, np.tril(np.ones((t, t), bool)))
    prev = None
    for r in range(0, 6):
        m = mask_numpy(a, ANCHOR, r, 4)
        assert not np.triu(m, 1).any()  # causal
        assert m.diagonal().all()  # every token sees itself
        assert m[:, :4][np.tril(np.ones((t, 4), bool))].all()  # sinks visible from every later token
        for j in np.nonzero(a)[0]:
            assert m[j:, j].all()  # an anchor is visible to every later token
        for i in range(t):
            for j in range(i + 1):
                if line[i] - line[j] <= r:
                    assert m[i, j]  # own line and R recent lines fully visible
                elif j >= 4 and not a[j]:
                    assert not m[i, j]  # nothing else
        if prev is not None:
            assert not (prev & ~m).any()  # monotone in R
        prev = m
    assert np.array_equal(mask_numpy(a, ANCHOR, t, 0), dense)  # R >= #lines: dense
    assert np.array_equal(mask_numpy(a, WINDOW, t, 0), dense)  # W >= T: dense
    # a token before the first anchor sees everything (its line started at 0)
    first = int(np.argmax(a)) if a.any() else t - 1
    assert np.array_equal(mask_numpy(a, ANCHOR, 0, 0)[: first + 1], dense[: first + 1])


def test_torch_masks_equal_numpy():
    torch = pytest.importorskip("torch")
    from policy import layer_masks_torch
    rng = np.random.default_rng(7)
    b, t = 3, 50
    a = np.stack([random_anchors(rng, t, p) for p in (0.05, 0.2, 0.6)])
    for pol in [Policy("anchor", 0, 4, 4), Policy("anchor", 2, 1, 0), Policy("full"), Policy("window", 0, 4, 0, 7)]:
        ms = layer_masks_torch(pol, torch.from_numpy(a), 9)
        for l, m in enumerate(ms):
            kind, param = pol.layer(l)
            for i in range(b):
                want = mask_numpy(a[i], kind, param, pol.sink_tokens)
                got = np.tril(np.ones((t, t), bool)) if m is None else m[i, 0].numpy()
                assert np.array_equal(got, want), (pol, l, i)


def test_kv_fraction():
    a = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    # end of sequence: next token is on line 3; R = 0 keeps sinks(1) + anchors(3) + line 3 (2 tokens)
    assert kv_fraction(Policy("anchor", 0, 1, 0), a, 1) == pytest.approx((1 + 3 + 2) / 12)
    assert kv_fraction(Policy("full"), a, 4) == 1.0
    assert kv_fraction(Policy("anchor", 0, 1, 2), a, 2) == pytest.approx((12 + 6) / 24)


# -- anchors = tokens whose bytes contain '\n' -------------------------------
def test_anchor_table_from_gguf():
    if not os.path.exists(GGUF):
        pytest.skip(f"{GGUF} not found")
    from gguf_io import GGUFFile, anchor_table, token_bytes
    g = GGUFFile(GGUF)
    lut = anchor_table(g)
    toks = g.metadata["tokenizer.ggml.tokens"]
    by = token_bytes(toks, g.metadata["tokenizer.ggml.token_type"])
    assert lut[toks.index("Ċ")] and lut[toks.index("čĊ")] and lut[toks.index("ĊĠĠĠ")]
    assert not lut[toks.index("def")] and not lut[0] and not lut[1]
    assert lut.sum() == sum(b"\n" in b for b in by)
    try:
        from tokenizer import build_tokenizer
    except ImportError:
        return
    tok = build_tokenizer(g)
    text = "def f(x):\n    return x\r\n\n\n# done\n"
    ids = tok.encode(text).ids
    for i in ids:
        assert lut[i] == ("\n" in tok.decode([i])), toks[i]
    assert "".join(tok.decode([i]) for i in ids) == text
    assert int(lut[ids].sum()) >= 3


# -- cross-check against the Rust engine ------------------------------------
# Expected contract of `anchorcoder debug-mask` (the engine provides it; the
# template can be overridden with ANCHORCODER_MASK_CMD, placeholders in braces):
ENGINE_CMD = ("{bin} debug-mask --policy {policy} --recent-lines {recent_lines} --sink-tokens {sink_tokens} "
              "--dense-every {dense_every} --window-tokens {window_tokens} --layers {layers} --file {file}")
# It prints ONE JSON object on stdout:
#   {"tokens": [ids...],                       # the file's token ids (required)
#    "anchors": [true/false...],               # optional: anchor flag per token
#    "layers": [{"layer": 0, "mask": ["1000", "1100", ...]}, ...]}
# Each mask row q is a string of '0'/'1' (or a list of 0/1/booleans) over keys
# k = 0..n-1. Also accepted: "masks": [mask per layer], or "mask" (a single
# layer, with "layer").

SAMPLES = [
    "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return [l.rstrip() for l in f]\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n\n    println!(\"{:?}\", v);\r\n}\n",
    "x = 1",  # no newline at all
    "\n\n\n    a\n",  # leading anchors inside the sinks
]
# anchor R=0 and R=2 without dense layers: the two variants of issue 17 (FIM rows: test_fim.py)
POLICIES = [Policy("anchor", 0, 4, 0), Policy("anchor", 2, 4, 0), Policy("anchor", 0, 4, 4), Policy("anchor", 2, 1, 3),
            Policy("window", 0, 2, 0, 5), Policy("full", 0, 0, 0)]


def _parse_engine(out: str):
    obj = json.loads(out)
    tokens = obj["tokens"]
    layers = {}
    if "layers" in obj:
        items = obj["layers"]
        if isinstance(items, dict):
            items = [{"layer": int(k), "mask": v} for k, v in items.items()]
        for i, it in enumerate(items):
            if isinstance(it, dict):
                layers[int(it.get("layer", i))] = it["mask"]
            else:
                layers[i] = it
    elif "masks" in obj:
        layers = dict(enumerate(obj["masks"]))
    elif "mask" in obj:
        layers[int(obj.get("layer", 0))] = obj["mask"]
    parsed = {}
    for l, m in layers.items():
        parsed[l] = np.array([[c == "1" for c in row] if isinstance(row, str) else [bool(x) for x in row]
                              for row in m], dtype=bool).reshape(len(tokens), len(tokens))
    return tokens, obj.get("anchors"), parsed


def test_engine_masks_match():
    binary = os.environ.get("ANCHORCODER_BIN")
    if not binary:
        print("SKIPPED engine cross-check: set ANCHORCODER_BIN to the anchorcoder binary")
        pytest.skip("ANCHORCODER_BIN not set")
    from gguf_io import GGUFFile, anchor_table
    g = GGUFFile(GGUF)
    lut = anchor_table(g)
    tok = None
    try:
        from tokenizer import build_tokenizer
        tok = build_tokenizer(g)
    except ImportError:
        pass
    template = os.environ.get("ANCHORCODER_MASK_CMD", ENGINE_CMD)
    n_layers = 9
    checked = 0
    with tempfile.TemporaryDirectory() as td:
        for si, text in enumerate(SAMPLES):
            path = os.path.join(td, f"sample{si}.txt")
            with open(path, "w", newline="") as f:
                f.write(text)
            for pol in POLICIES:
                cmd = template.format(bin=shlex.quote(binary), policy=pol.name, recent_lines=pol.recent_lines,
                                      sink_tokens=pol.sink_tokens, dense_every=pol.dense_every,
                                      window_tokens=pol.window_tokens, layers=n_layers, file=shlex.quote(path))
                res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
                assert res.returncode == 0, f"{cmd}\n{res.stderr}"
                tokens, anchors, masks = _parse_engine(res.stdout)
                if tok is not None:
                    assert tokens == tok.encode(text).ids, f"token ids differ for sample {si}"
                want_a = lut[np.array(tokens, dtype=np.int64)] if tokens else np.zeros(0, bool)
                if anchors is not None:
                    assert [bool(x) for x in anchors] == want_a.tolist(), f"anchors differ, sample {si}"
                assert masks, f"no masks in the engine's output for {cmd}"
                for l, m in masks.items():
                    want = mask_numpy(want_a, *pol.layer(l), pol.sink_tokens)
                    bad = np.argwhere(m != want)
                    assert not len(bad), (f"{pol.describe()} layer {l} sample {si}: {len(bad)} cells differ, "
                                          f"first (q, k) = {bad[0].tolist()}")
                    checked += 1
    print(f"engine cross-check: {checked} layer masks identical")
