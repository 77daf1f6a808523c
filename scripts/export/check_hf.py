#!/usr/bin/env python3
"""Export a post-LN qkv translation model to Hugging Face's MarianMT layout and check that
transformers translates the test set exactly as qkv does (greedy).

    cargo build --release
    PY=$(scripts/venv.sh); "$PY" -m pip install transformers
    "$PY" scripts/export/check_hf.py --model runs/x/best --test data/translate-en-es/test.tsv.gz

Steps: `qkv export --format hf` into a temporary directory; `MarianMTModel.from_pretrained`
loads it (every weight must load: no missing or unexpected keys); the tokenizer exported
beside it encodes the sources (EOS appended, as qkv feeds its encoder); `generate` decodes
greedily in batches; `qkv translate --beam 1` decodes the same sources; the outputs are
compared line by line. A line whose output reaches the length limit is counted apart (qkv
caps at a·|source| + b, transformers at one max_length). Exits 1 when any other line differs.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer
from transformers import MarianMTModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--qkv", default=os.path.join(ROOT, "target", "release", "qkv"))
    ap.add_argument("--limit", type=int, default=0, help="first N test lines only")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()

    opener = gzip.open if a.test.endswith(".gz") else open
    with opener(a.test, "rt", encoding="utf-8") as f:
        src = [line.rstrip("\n").split("\t")[0] for line in f]
    if a.limit:
        src = src[: a.limit]
    out = os.path.join(tempfile.mkdtemp(prefix="qkv-hf-"), "marian")
    subprocess.run([a.qkv, "export", "--model", a.model, "--format", "hf", "--out", out],
                   check=True)
    model, info = MarianMTModel.from_pretrained(out, output_loading_info=True)
    model.eval()
    # transformers computes the sinusoidal tables itself (they are never saved).
    bad = {k: [n for n in info.get(k, []) if "embed_positions" not in str(n)]
           for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    print("loaded: %s" % ("every weight" if not bad else bad))

    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    with open(os.path.join(a.model, "decode.json"), encoding="utf-8") as f:
        decode = json.load(f)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    tgt_path = os.path.join(out, "target_tokenizer.json")
    tgt = Tokenizer.from_file(tgt_path) if os.path.exists(tgt_path) else tok
    eos, pad = cfg["eos_token_id"], cfg["pad_token_id"]
    ids = [tok.encode(s, add_special_tokens=False).ids + [eos] for s in src]

    hf_out, capped = [], set()
    for b in range(0, len(ids), a.batch):
        chunk = ids[b:b + a.batch]
        longest = max(len(x) for x in chunk)
        x = torch.tensor([r + [pad] * (longest - len(r)) for r in chunk])
        # qkv's length rule for this batch: a·(longest source) + b positions, EOS included.
        limit = min(int(decode.get("max_len_a", 1.5) * longest) + decode.get("max_len_b", 10),
                    cfg["max_position_embeddings"])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=(x != pad).long(), num_beams=1,
                               do_sample=False, max_length=limit + 1)
        for i, row in enumerate(y.tolist()):
            row = row[1:]  # the decoder start token
            if eos in row:
                row = row[: row.index(eos)]
            else:
                capped.add(b + i)
            if len(row) >= limit - 1:
                capped.add(b + i)
            hf_out.append(tgt.decode(row))

    # qkv in the same batches of `--batch` sources, longest first as it sorts them: given
    # one batch at a time, its length limit is the same as transformers'.
    qkv_out = []
    for b in range(0, len(src), a.batch):
        r = subprocess.run([a.qkv, "translate", "--model", a.model, "--beam", "1"],
                           input="\n".join(src[b:b + a.batch]) + "\n", capture_output=True,
                           text=True, check=True)
        qkv_out.extend(r.stdout.split("\n")[: len(src[b:b + a.batch])])

    differ = [i for i, (p, q) in enumerate(zip(qkv_out, hf_out)) if p != q and i not in capped]
    same = sum(p == q for p, q in zip(qkv_out, hf_out))
    print("%d lines, greedy: %d identical; %d of the others reach the length limit, %d differ"
          % (len(src), same, len(src) - same - len(differ), len(differ)))
    for i in differ[:5]:
        print("line %d\n  qkv:          %s\n  transformers: %s" % (i + 1, qkv_out[i], hf_out[i]))
    sys.exit(0 if not differ and not bad else 1)


if __name__ == "__main__":
    main()
