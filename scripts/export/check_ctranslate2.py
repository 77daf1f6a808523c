#!/usr/bin/env python3
"""Export a qkv translation model to CTranslate2 and check that CTranslate2 translates the
test set exactly as qkv does.

    cargo build --release
    PY=$(scripts/venv.sh); "$PY" -m pip install ctranslate2
    "$PY" scripts/export/check_ctranslate2.py --model runs/translate-en-es/best \
        --test data/translate-en-es/test.tsv.gz [--beam 4] [--threads 2]

Steps: `qkv export --format ctranslate2` into a temporary directory; the same model through
scripts/reference/ctranslate2_convert.py (CTranslate2's own spec writer) must give the same
model.bin, byte for byte; then both engines translate the test sources (beam search with the
model's decode.json length penalty, or greedy with --beam 1) and the outputs are compared line
by line, with each side's BLEU (sacreBLEU) and time. Exits 1 when any line differs.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import ctranslate2
import sacrebleu
from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
import ctranslate2_convert  # noqa: E402


def read_tsv(path):
    opener = gzip.open if path.endswith(".gz") else open
    src, ref = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            src.append(cols[0])
            ref.append(cols[1] if len(cols) > 1 else "")
    return src, ref


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--qkv", default=os.path.join(ROOT, "target", "release", "qkv"))
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N test lines only")
    a = ap.parse_args()

    src, ref = read_tsv(a.test)
    if a.limit:
        src, ref = src[: a.limit], ref[: a.limit]
    with open(os.path.join(a.model, "decode.json"), encoding="utf-8") as f:
        decode = json.load(f)
    with open(os.path.join(a.model, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)

    work = tempfile.mkdtemp(prefix="qkv-ct2-")
    out, ref_out = os.path.join(work, "qkv"), os.path.join(work, "reference")
    subprocess.run([a.qkv, "export", "--model", a.model, "--format", "ctranslate2", "--out", out],
                   check=True)
    ctranslate2_convert.convert_dir(a.model, ref_out)
    with open(os.path.join(out, "model.bin"), "rb") as f1, \
            open(os.path.join(ref_out, "model.bin"), "rb") as f2:
        same_bin = f1.read() == f2.read()
    print("model.bin identical to CTranslate2's spec writer: %s" % same_bin)

    t0 = time.perf_counter()
    qkv = subprocess.run(
        [a.qkv, "--threads", str(a.threads), "translate", "--model", a.model,
         "--beam", str(a.beam)],
        input="\n".join(src) + "\n", capture_output=True, text=True, check=True)
    t_qkv = time.perf_counter() - t0
    qkv_out = qkv.stdout.split("\n")[: len(src)]

    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    tgt_path = os.path.join(a.model, "target_tokenizer.json")
    tgt_tok = Tokenizer.from_file(tgt_path) if os.path.exists(tgt_path) else tok
    tokens = [tok.encode(s, add_special_tokens=False).tokens for s in src]
    tr = ctranslate2.Translator(out, device="cpu", inter_threads=1, intra_threads=a.threads)
    t0 = time.perf_counter()
    res = tr.translate_batch(
        tokens, beam_size=a.beam, length_penalty=decode.get("length_penalty", 1.0),
        max_decoding_length=cfg["max_len"] - 1, max_batch_size=32)
    t_ct2 = time.perf_counter() - t0
    ct2_out = [tgt_tok.decode([tgt_tok.token_to_id(t) for t in r.hypotheses[0]]) for r in res]

    # qkv caps an output at a·|source| + b positions (decode.json; fairseq's --max-len-a/b,
    # the batch's longest source), CTranslate2 at one max_decoding_length, and the two end a
    # capped output differently (qkv forces EOS, CTranslate2 stops without it). A line whose
    # CTranslate2 output reaches the cap of its own source is a run-away either way: counted
    # apart, not compared.
    a_, b_ = decode.get("max_len_a", 1.5), decode.get("max_len_b", 10)
    cap = [min(int(a_ * (len(t) + 1)) + b_, cfg["max_len"]) for t in tokens]
    capped = {i for i, r in enumerate(res) if len(r.hypotheses[0]) >= cap[i] - 1}
    differ = [i for i, (x, y) in enumerate(zip(qkv_out, ct2_out)) if x != y and i not in capped]
    n_tok = sum(len(r.hypotheses[0]) + 1 for r in res)
    print("%d test lines, beam %d, %d threads" % (len(src), a.beam, a.threads))
    print("qkv translate:  %.2f s (process, model load included)  BLEU %.2f" %
          (t_qkv, sacrebleu.corpus_bleu(qkv_out, [ref]).score))
    print("CTranslate2:    %.2f s (translate_batch)  BLEU %.2f  %.0f target tokens/s" %
          (t_ct2, sacrebleu.corpus_bleu(ct2_out, [ref]).score, n_tok / t_ct2))
    same = sum(x == y for x, y in zip(qkv_out, ct2_out))
    print("identical outputs: %d of %d; %d of the others run to the length cap, %d differ" %
          (same, len(src), len(src) - same - len(differ), len(differ)))
    for i in differ[:5]:
        print("line %d\n  qkv: %s\n  ct2: %s" % (i + 1, qkv_out[i], ct2_out[i]))
    sys.exit(0 if same_bin and not differ else 1)


if __name__ == "__main__":
    main()
