#!/usr/bin/env python3
"""Train LoRA adapters (q, k, v, o of every layer) for an attention policy.

--policy takes one policy or a comma list (e.g. "anchor,full", or specs such as
"anchor:R=2:D=0,anchor:R=0:D=0"): the policies are then trained one after the
other from the same base weights, on the same data in the same order, for the
same number of steps (the first policy's step count is reused; --steps-from each
gives every policy its own time budget instead), and every adapter is evaluated
on the held-out data under every policy's masks, next to the base model.

--data is either prepare_data.py's token streams (rows cut from them) or fim.py's
prebuilt rows (rows_meta.json there): rows in the server's prompt layout, about
half of them fill-in-the-middle, with a loss mask (no padding, no FIM markers as
targets); the FIM markers' embedding rows are then trained with the LoRA and the
adapter names them (metadata `fim_tokens`, tensor `token_embd.rows`).

Writes to --out:
  adapter_<name>.safetensors     (name: the policy, e.g. anchor, or anchor_r2 for a spec)
                                 LoRA tensors blk.{l}.attn_{q,k,v,output}.lora_{a,b}
                                 (and blk.{l}.ffn_{gate,up,down} with --mlp-rank)
                                 (float32; lora_a [rank, in], lora_b [out, rank], GGUF
                                 layout: W' = W + (alpha/rank) * lora_b @ lora_a, with
                                 attn_q/attn_k in the GGUF's permuted row order) and
                                 metadata (alpha, rank, policy, ...)
  log.json                       config, per-step losses, evaluations, samples
(written after each phase, so a run killed at its time limit still leaves what
it finished).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fim  # noqa: E402
from model import adapter_bytes, build_model, greedy, policy_masks  # noqa: E402
from policy import Policy, kv_fraction  # noqa: E402
from prepare_data import load_tokens  # noqa: E402

MIB = 2 ** 20
IGNORE = -100

DEFAULT_GGUF = os.path.expanduser("~/.cache/anchorcoder/models/SmolLM2-135M-Instruct.Q4_1.gguf")
SAMPLE_PROMPTS = [
    "import os\nimport sys\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a file.\"\"\"\n    with open(path) as f:\n        return",
    "use std::collections::HashMap;\n\nfn count_words(text: &str) -> HashMap<String, usize> {\n    let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n       ",
    "function debounce(fn, ms) {\n  let timer = null;\n  return function (...args) {\n   ",
]
# (prefix, suffix) in the server's FIM layout
FIM_SAMPLES = [
    ("def mean(xs):\n    \"\"\"Average of a non-empty list.\"\"\"\n    total = ", "\n    return total / len(xs)\n"),
    ("fn parse_port(s: &str) -> Option<u16> {\n    let n: u32 = s.trim().parse().ok()?;\n    ",
     "\n}\n\nfn main() {\n    println!(\"{:?}\", parse_port(\"8080\"));\n}\n"),
]


def policy_name(spec: str, pol: Policy) -> str:
    """File-name-safe variant name: a plain policy name stays as is (anchor,
    full); a spec gets its parameters (anchor_r2, anchor_r0_d4, window_w256)."""
    if ":" not in spec:
        return spec
    if pol.name == "anchor":
        return f"anchor_r{pol.recent_lines}" + (f"_d{pol.dense_every}" if pol.dense_every else "") + \
            (f"_s{pol.sink_tokens}" if pol.sink_tokens != 4 else "")
    if pol.name == "window":
        return f"window_w{pol.window_tokens}"
    return pol.name


def rows_of(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping rows of seq_len + 1 tokens (inputs = row[:-1], targets = row[1:])."""
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class Runner:
    def __init__(self, args):
        self.args = args
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.amp = self.cuda or args.amp  # bf16 autocast
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        t0 = self.t_program = time.time()
        self.rows_meta = None
        if fim.has_rows(args.data):
            with open(os.path.join(args.data, "rows_meta.json")) as f:
                self.rows_meta = json.load(f)
            args.seq_len = self.rows_meta["seq_len"]
        self.fim_ids = self.rows_meta["fim_ids"] if self.rows_meta and not args.no_fim_embd else None
        embd_ids = [self.fim_ids[r] for r in fim.FIM_ROLES] if self.fim_ids else None
        self.g, self.model, self.lut = build_model(args.gguf, self.dev, torch.float32, args.rank, args.alpha,
                                                   n_layers=args.layers, mlp_rank=args.mlp_rank, embd_ids=embd_ids)
        self.n_layers = self.model.cfg.n_layers
        size = adapter_bytes(self.model.cfg, args.rank, args.mlp_rank, len(embd_ids or []), self.n_layers)
        if size > args.max_adapter_mib * MIB:
            raise SystemExit(f"the adapter would be {size / MIB:.2f} MiB (rank {args.rank}, MLP rank {args.mlp_rank}), "
                             f"over --max-adapter-mib {args.max_adapter_mib}: lower the rank")
        self.log = {"args": vars(args), "device": torch.cuda.get_device_name() if self.cuda else "cpu",
                    "torch": torch.__version__, "load_s": round(time.time() - t0, 1), "runs": {}, "eval": {}}
        print(f"loaded {args.gguf} ({self.n_layers} layers) on {self.log['device']} in {self.log['load_s']}s",
              flush=True)
        self.log["adapter_bytes_expected"] = size
        if self.rows_meta:
            self.train_rows = fim.load_array(os.path.join(args.data, "train_rows"))
            self.train_info = np.load(os.path.join(args.data, "train_info.npy"))
            n_val = max(1, args.eval_tokens // args.seq_len)
            self.val_rows = fim.load_array(os.path.join(args.data, "val_rows"))[:n_val]
            self.val_info = np.load(os.path.join(args.data, "val_info.npy"))[:n_val]
            ids = self.rows_meta["fim_ids"]
            self.train_mask = fim.loss_mask(self.train_rows, self.train_info, ids)
            self.val_mask = fim.loss_mask(self.val_rows, self.val_info, ids)
            self.val_mid = fim.middle_mask(self.val_rows, self.val_info)
            self.log["data"] = {"rows": args.data, "rows_meta": self.rows_meta, "train_rows": len(self.train_rows),
                                "val_rows_used": len(self.val_rows)}
            print(f"data: {len(self.train_rows)} prebuilt rows of {args.seq_len} "
                  f"({int((self.train_info[:, 2] == fim.KIND_FIM).sum())} FIM; FIM tokens {ids}), "
                  f"{len(self.val_rows)} val rows", flush=True)
        else:
            tr = load_tokens(os.path.join(args.data, "train"))
            va = load_tokens(os.path.join(args.data, "val"))
            self.train_rows = rows_of(tr, args.seq_len)
            self.val_rows = rows_of(va, args.seq_len)[: max(1, args.eval_tokens // args.seq_len)]
            self.train_mask = self.val_mask = self.val_mid = None
            self.log["data"] = {"train_tokens": int(tr.size), "val_tokens": int(va.size),
                                "train_rows": len(self.train_rows), "val_rows_used": len(self.val_rows)}
            print(f"data: {tr.size:,} train tokens ({len(self.train_rows)} rows of {args.seq_len}), "
                  f"{va.size:,} val tokens ({len(self.val_rows)} rows used)", flush=True)
        rng = np.random.default_rng(args.seed)
        self.order = rng.permutation(len(self.train_rows))
        self.policies = {}
        for spec in args.policy.split(","):
            pol = self.policy_from_spec(spec) if ":" in spec else self.policy(spec)
            self.policies[policy_name(spec, pol)] = pol
        # evaluate under each trained policy's masks, plus full, plus any extra
        self.eval_policies = dict(self.policies)
        self.eval_policies.setdefault("full", self.policy("full"))
        for spec in filter(None, args.extra_eval.split(",")):
            pol = self.policy_from_spec(spec)
            if all(pol != q for q in self.eval_policies.values()):
                self.eval_policies[spec] = pol

    def policy(self, name: str) -> Policy:
        a = self.args
        return Policy(name, a.recent_lines if name == "anchor" else 0, a.sink_tokens,
                      a.dense_every if name == "anchor" else 0, a.window_tokens if name == "window" else 0)

    def policy_from_spec(self, spec: str) -> Policy:
        """e.g. anchor:R=0:D=0:S=4 or window:W=256"""
        parts = spec.split(":")
        kw = dict(kv.split("=") for kv in parts[1:])
        return Policy(parts[0], int(kw.get("R", 0)), int(kw.get("S", self.args.sink_tokens)),
                      int(kw.get("D", 0)), int(kw.get("W", 0)))

    def masks(self, policy: Policy, x):
        ms = policy_masks(policy, self.lut, x, self.n_layers)
        if self.amp:  # additive bf16 masks: what SDPA's memory-efficient kernel takes
            conv = {}
            out = []
            for m in ms:
                if m is None:
                    out.append(None)
                    continue
                if id(m) not in conv:
                    conv[id(m)] = torch.zeros(m.shape, dtype=torch.bfloat16, device=m.device).masked_fill_(
                        ~m, float("-inf"))
                out.append(conv[id(m)])
            ms = out
        return ms

    def loss_fn(self, policy: Policy, batch: torch.Tensor, reduction="mean", mask=None):
        """Next-token cross-entropy; `mask` [B, T] (bool): the targets that count."""
        x, y = batch[:, :-1], batch[:, 1:]
        if mask is not None:
            y = y.masked_fill(~mask, IGNORE)
        with torch.autocast(device_type=self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(x, self.masks(policy, x))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction, ignore_index=IGNORE)
        return loss, logits

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rows.astype(np.int64)).to(self.dev, non_blocking=True)

    def mask_of(self, m, idx) -> torch.Tensor | None:
        return None if m is None else torch.from_numpy(np.ascontiguousarray(m[idx])).to(self.dev, non_blocking=True)

    @torch.no_grad()
    def evaluate(self, policy: Policy) -> dict:
        self.model.eval()
        a = self.args
        sums = {k: 0.0 for k in ("tot", "acc", "n", "tot_tail", "acc_tail", "n_tail", "tot_mid", "acc_mid", "n_mid")}
        kvf = []
        half = a.seq_len // 2
        for i in range(0, len(self.val_rows), a.eval_batch):
            idx = slice(i, i + a.eval_batch)
            rows = self.val_rows[idx]
            b = self.batch(rows)
            m = self.mask_of(self.val_mask, idx)
            m = torch.ones_like(b[:, 1:], dtype=torch.bool) if m is None else m
            mid = self.mask_of(self.val_mid, idx)
            loss, logits = self.loss_fn(policy, b, reduction="none", mask=m)
            loss = loss.view(b.shape[0], -1)
            hit = (logits.argmax(-1) == b[:, 1:]).float()
            tail = torch.zeros_like(m)
            tail[:, half:] = True
            for key, sel in (("", m), ("_tail", m & tail), ("_mid", None if mid is None else m & mid)):
                if sel is None:
                    continue
                sums["tot" + key] += loss[sel].sum().item()
                sums["acc" + key] += hit[sel].sum().item()
                sums["n" + key] += sel.sum().item()
            for k, r in enumerate(rows):
                valid = int(self.val_info[i + k, 0]) - 1 if self.val_mask is not None else len(r) - 1
                kvf.append(kv_fraction(policy, self.lut[torch.from_numpy(r[:valid].astype(np.int64)).to(self.dev)]
                                       .cpu().numpy(), self.n_layers))
        out = {}
        for key in ("", "_tail", "_mid"):
            if sums["n" + key]:
                out["loss" + key] = round(sums["tot" + key] / sums["n" + key], 4)
                out["acc" + key] = round(sums["acc" + key] / sums["n" + key], 4)
        out["kv_fraction"] = round(float(np.mean(kvf)), 4)
        out["tokens"] = int(sums["n"])
        out["middle_tokens"] = int(sums["n_mid"])
        return out

    def eval_all(self, tag: str):
        self.log["eval"][tag] = {}
        for pname, pol in self.eval_policies.items():
            t0 = time.time()
            r = self.evaluate(pol)
            r["policy"] = pol.describe()
            r["s"] = round(time.time() - t0, 1)
            self.log["eval"][tag][pname] = r
            mid = f" FIM middle: loss {r['loss_mid']:.4f} acc {r['acc_mid']:.4f}" if "loss_mid" in r else ""
            print(f"eval {tag:>14} under {pol.describe():<34} loss {r['loss']:.4f} acc {r['acc']:.4f} "
                  f"(2nd half: loss {r['loss_tail']:.4f} acc {r['acc_tail']:.4f}){mid} kv {r['kv_fraction']:.3f} "
                  f"[{r['s']}s]", flush=True)
        self.save_log()

    def samples(self, tag: str, policy: Policy):
        if not self.args.samples:
            return
        try:
            from tokenizer import build_tokenizer
            tok = build_tokenizer(self.g)
        except Exception as e:  # tokenizers missing: skip samples
            print(f"samples skipped: {e}")
            return
        out = []
        prompts = [tok.encode(p).ids for p in SAMPLE_PROMPTS]
        if self.fim_ids:  # the server's FIM layout (no healing: the prefixes end at a token boundary)
            f = self.fim_ids
            prompts += [[f["prefix"]] + tok.encode(p).ids + fim.fim_tail_ids(lambda t: tok.encode(t).ids, s, f)
                        for p, s in FIM_SAMPLES]
        for ids in prompts:
            gen = greedy(self.model, self.lut, policy, ids, self.args.samples, self.dev, autocast=self.amp)
            out.append(tok.decode(gen[len(ids):], skip_special_tokens=False))
        self.log.setdefault("samples", {})[f"{tag} under {policy.describe()}"] = out
        print(f"samples {tag} under {policy.describe()}: {json.dumps(out)}", flush=True)
        self.save_log()

    def past_deadline(self) -> bool:
        return bool(self.args.max_total_s) and time.time() - self.t_program > self.args.max_total_s

    def save_log(self):
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "log.json"), "w") as f:
            json.dump(self.log, f, indent=1)

    def train(self, pname: str, total_steps: int | None, budget_s: float | None) -> int:
        a = self.args
        policy = self.policies[pname]
        self.model.reset_lora(a.seed)
        self.model.train()
        params = self.model.lora_parameters()
        embd = [p for n, p in self.model.named_parameters() if n == "embd_rows"]
        groups = [{"params": [p for p in params if all(p is not e for e in embd)], "lr_mult": 1.0}]
        if embd:
            groups.append({"params": embd, "lr_mult": a.embd_lr_mult})
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay,
                                **({"fused": True} if self.cuda else {}))
        steps = total_steps or a.steps
        run = {"policy": policy.describe(), "policy_json": policy.to_json(), "losses": [], "lrs": []}
        self.log["runs"][pname] = run
        t_start = time.time()
        t_calib = None
        step = 0
        ema = None
        print(f"train {pname}: {policy.describe()}, up to {steps} steps, batch {a.batch}x{a.seq_len}"
              + (f", time budget {budget_s:.0f}s" if budget_s else ""), flush=True)
        while step < steps:
            if self.past_deadline():
                print(f"  stopping at step {step}: --max-total-s reached", flush=True)
                run["stopped_by_deadline"] = True
                break
            lr = lr_at(step, steps, a.lr, a.warmup, a.min_lr_ratio)
            for gr in opt.param_groups:
                gr["lr"] = lr * gr["lr_mult"]
            idx = [self.order[(step * a.batch + i) % len(self.order)] for i in range(a.batch)]
            loss, _ = self.loss_fn(policy, self.batch(self.train_rows[idx]), mask=self.mask_of(self.train_mask, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, a.clip)
            opt.step()
            step += 1
            lv = loss.item()
            run["losses"].append(round(lv, 4))
            run["lrs"].append(lr)
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            # calibrate the step count on the time budget (the first policy, or each with --steps-from each)
            if budget_s and total_steps is None:
                if step == a.calib_from:
                    t_calib = time.time()
                elif t_calib is not None and step == a.calib_from + a.calib_steps:
                    per = (time.time() - t_calib) / a.calib_steps
                    left = budget_s - (time.time() - t_start)
                    if a.max_total_s:  # finish the schedule before the program's deadline, too
                        left = min(left, a.max_total_s - (time.time() - self.t_program) - 2 * per)
                    steps = max(step, min(a.steps, step + int(left / per)))
                    run["sec_per_step"] = round(per, 4)
                    print(f"  calibrated: {per:.3f}s/step -> {steps} steps in {budget_s:.0f}s "
                          f"({steps * a.batch * a.seq_len:,} tokens)", flush=True)
                # hard stop at 110% of the budget whatever the estimate said
                if time.time() - t_start > 1.1 * budget_s:
                    print(f"  hard stop at step {step} (budget exceeded)", flush=True)
                    break
            if step % a.log_every == 0 or step == steps:
                el = time.time() - t_start
                print(f"  step {step:5d}/{steps} loss {lv:.4f} (ema {ema:.4f}) lr {lr:.2e} |g| {gn:.3f} "
                      f"{step * a.batch * a.seq_len / el:,.0f} tok/s {el:.0f}s", flush=True)
        run["steps"] = step
        run["train_s"] = round(time.time() - t_start, 1)
        run["tokens"] = step * a.batch * a.seq_len
        self.export(pname, policy, step)
        return step

    def export(self, pname: str, policy: Policy, steps: int):
        from safetensors.torch import save_file
        a = self.args
        targets = "attn_q,attn_k,attn_v,attn_output" + (",ffn_gate,ffn_up,ffn_down" if a.mlp_rank else "")
        meta = {"format": "anchorcoder-lora", "alpha": str(a.alpha), "rank": str(a.rank),
                "scale": str(a.alpha / a.rank), "policy": policy.name, "variant": pname,
                "policy_describe": policy.describe(),
                "policy_json": json.dumps(policy.to_json()), "base_model": os.path.basename(a.gguf),
                "layout": "gguf: W[out,in], y = W x; attn_q/attn_k rows in the GGUF's permuted (interleaved-pair "
                          "RoPE) order; merge W' = W + (alpha/rank) * lora_b @ lora_a",
                "targets": targets, "n_layers": str(self.n_layers),
                "steps": str(steps), "seq_len": str(a.seq_len), "batch": str(a.batch), "lr": str(a.lr)}
        if a.mlp_rank:
            meta["mlp_rank"] = str(a.mlp_rank)
        if self.rows_meta:
            meta["data"] = (f"rows of {a.seq_len} in the server's layout, {self.rows_meta['fim_share']:.0%} "
                            f"fill-in-the-middle (PSM, suffixTokens {self.rows_meta['suffix_tokens']})")
        if self.fim_ids:
            # the FIM roles and their trained rows (which replace the base model's rows)
            meta["fim_tokens"] = fim.fim_metadata(self.fim_ids)
            meta["token_embd_rows"] = ",".join(str(i) for i in self.model.embd_ids)
            meta["targets"] += ",token_embd"
        os.makedirs(a.out, exist_ok=True)
        path = os.path.join(a.out, f"adapter_{pname}.safetensors")
        save_file(self.model.lora_state(), path, metadata=meta)
        self.log["runs"][pname]["adapter"] = os.path.basename(path)
        self.log["runs"][pname]["adapter_bytes"] = os.path.getsize(path)
        print(f"  wrote {path} ({os.path.getsize(path) / 2**20:.2f} MiB)", flush=True)
        if os.path.getsize(path) > a.max_adapter_mib * MIB:
            print(f"  WARNING: over --max-adapter-mib {a.max_adapter_mib}", flush=True)
        self.save_log()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "latest"))
    ap.add_argument("--policy", default="anchor", help="anchor | full | window, or a comma list: anchor,full")
    ap.add_argument("--recent-lines", type=int, default=0)
    ap.add_argument("--sink-tokens", type=int, default=4)
    ap.add_argument("--dense-every", type=int, default=0)
    ap.add_argument("--window-tokens", type=int, default=0)
    ap.add_argument("--extra-eval", default="", help="more eval policies, e.g. anchor:R=0:D=0,window:W=128")
    ap.add_argument("--steps", type=int, default=1000, help="max steps (all policies train the same number)")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds for the FIRST policy's training; its "
                    "step count (calibrated after a few steps) is reused for the others; 0 = just --steps")
    ap.add_argument("--calib-from", type=int, default=5)
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--steps-from", choices=("first", "each"), default="first", help="first: every policy trains "
                    "the first one's calibrated step count; each: every policy calibrates its own on --time-budget")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=0, help="LoRA alpha (default 2 * rank)")
    ap.add_argument("--mlp-rank", type=int, default=0, help="LoRA rank on ffn_gate/up/down (0: attention only); "
                    "same scale alpha/rank")
    ap.add_argument("--max-adapter-mib", type=float, default=16.0, help="refuse ranks whose adapter is larger "
                    "(the engine's limit)")
    ap.add_argument("--embd-lr-mult", type=float, default=1.0, help="learning rate of the FIM embedding rows, "
                    "as a multiple of --lr")
    ap.add_argument("--no-fim-embd", action="store_true", help="with prebuilt FIM rows: do not train (nor "
                    "store) the FIM tokens' embedding rows")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=262144, help="held-out tokens evaluated")
    ap.add_argument("--no-base-eval", action="store_true")
    ap.add_argument("--samples", type=int, default=24, help="greedy tokens per sample prompt (0 = none)")
    ap.add_argument("--layers", type=int, default=None, help="use only the first N blocks (CPU smoke tests)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast + additive masks on CPU too (tests the "
                    "GPU code path; always on for cuda)")
    ap.add_argument("--max-total-s", type=float, default=0, help="stop training (and still export and evaluate) "
                    "once the whole program has run this long; 0 = no limit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    args = ap.parse_args(argv)
    if not args.alpha:
        args.alpha = 2.0 * args.rank
    torch.manual_seed(args.seed)

    t0 = time.time()
    r = Runner(args)
    if not args.no_base_eval:
        r.model.set_lora_enabled(False)
        r.eval_all("base")
        for pol in r.policies.values():
            r.samples("base", pol)
        r.model.set_lora_enabled(True)
    steps = None
    for i, pname in enumerate(r.policies):
        if r.past_deadline():
            print(f"skipping {pname}: --max-total-s reached", flush=True)
            continue
        done = r.train(pname, steps, args.time_budget or None)
        if args.steps_from == "first":
            steps = steps or done
        r.eval_all(f"lora_{pname}")
        r.samples(f"lora_{pname}", r.policies[pname])
    r.log["total_s"] = round(time.time() - t0, 1)
    r.save_log()
    print(f"done in {r.log['total_s']}s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
