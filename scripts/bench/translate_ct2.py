#!/usr/bin/env python3
"""CTranslate2's side of scripts/bench/translate.sh: translate a test set with a model
exported by `qkv export --format ctranslate2` and print one JSON line like
`qkv bench translate`'s (target tokens/s, BLEU, peak RSS of this process).

    "$PY" scripts/bench/translate_ct2.py --ct2 DIR --tokenizer MODEL_DIR/tokenizer.json \
        --data data/translate-en-es/test.tsv.gz --beam 4 --threads 2 --batch 32 --max-len 255
"""

import argparse
import gzip
import json
import os
import resource
import time

import ctranslate2
import sacrebleu
from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ct2", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--target-tokenizer")
    ap.add_argument("--data", required=True)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--lenpen", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size (examples)")
    ap.add_argument("--max-len", type=int, default=255, help="max_decoding_length")
    ap.add_argument("--compute-type", default="float32")
    ap.add_argument("--output")
    a = ap.parse_args()

    opener = gzip.open if a.data.endswith(".gz") else open
    with opener(a.data, "rt", encoding="utf-8") as f:
        pairs = [line.rstrip("\n").split("\t") for line in f]
    src, ref = [p[0] for p in pairs], [p[1] if len(p) > 1 else "" for p in pairs]
    tok = Tokenizer.from_file(a.tokenizer)
    tgt = Tokenizer.from_file(a.target_tokenizer) if a.target_tokenizer else tok

    tr = ctranslate2.Translator(a.ct2, device="cpu", compute_type=a.compute_type,
                                inter_threads=1, intra_threads=a.threads)
    # As `qkv bench translate`, the clock covers tokenizing, translating and detokenizing.
    t0 = time.perf_counter()
    tokens = [tok.encode(s, add_special_tokens=False).tokens for s in src]
    res = tr.translate_batch(tokens, beam_size=a.beam, length_penalty=a.lenpen,
                             max_decoding_length=a.max_len, max_batch_size=a.batch)
    hyps = [tgt.decode([tgt.token_to_id(t) for t in r.hypotheses[0]]) for r in res]
    seconds = time.perf_counter() - t0
    n_tok = sum(len(r.hypotheses[0]) + 1 for r in res)
    if a.output:
        with open(a.output, "w", encoding="utf-8") as f:
            f.write("\n".join(hyps) + "\n")
    print(json.dumps({
        "impl": "ctranslate2", "version": ctranslate2.__version__, "bench": "translate",
        "compute_type": a.compute_type, "threads": a.threads, "beam": a.beam,
        "max_batch_size": a.batch, "sentences": len(src), "seconds": round(seconds, 3),
        "target_tokens": n_tok, "tokens_per_s": round(n_tok / seconds, 1),
        "bleu": round(sacrebleu.corpus_bleu(hyps, [ref]).score, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }, sort_keys=True))


if __name__ == "__main__":
    main()
