#!/usr/bin/env python3
"""Gap-sentence pairs for pretraining a summarizer (PEGASUS, Zhang et al. 2020, §3.1 "GSG").

From the English side of the translation corpus (KJV verses in canonical order; its splits
are whole books, the same books as data/summarize-bible's, so no valid or test passage of
the summarizer is read), cut runs of consecutive verses into pseudo-passages, pick each run's
principal verse (the highest ROUGE-1 F1 against the rest of the run: PEGASUS' "Ind"
selection) and write `run without that verse<TAB>that verse`. A model trained on these learns
to read a passage and write an English sentence about it, which is what the summarizer's
headings are, without seeing a heading.

Usage: scripts/data/gap_sentences.py OUT_DIR   (writes OUT_DIR/{train,valid}.tsv.gz)
Python standard library only; deterministic.
"""
import gzip
import os
import re
import sys
from collections import Counter

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
MAX_WORDS = 400  # as data/summarize-bible's passages
STRIDE = 3  # runs start every 3 verses, so each verse is in about three runs


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_f(a, b):
    ca, cb = Counter(a), Counter(b)
    overlap = sum((ca & cb).values())
    if overlap == 0:
        return 0.0
    p, r = overlap / len(a), overlap / len(b)
    return 2 * p * r / (p + r)


def pairs(verses):
    out = []
    for start in range(0, len(verses), STRIDE):
        length = 4 + (start * 7919) % 7  # 4-10 verses, as the summarizer's passages
        run = verses[start : start + length]
        if len(run) < 3:
            continue
        toks = [words(v) for v in run]

        def score(i):
            rest = [w for j, t in enumerate(toks) if j != i for w in t]
            return rouge1_f(toks[i], rest) if toks[i] and rest else 0.0

        best = max(range(len(run)), key=score)
        source = " ".join(v for j, v in enumerate(run) if j != best)
        if len(source.split()) > MAX_WORDS:
            continue
        out.append((source, run[best]))
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    for split in ("train", "valid"):
        path = os.path.join(ROOT, "data", "translate-en-es", f"{split}.tsv.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            verses = [line.split("\t")[0].replace("¶", "").strip() for line in f]
        made = pairs([v for v in verses if v])
        text = "".join(f"{source}\t{target}\n" for source, target in made)
        # mtime 0 and no file name in the header: the same input gives the same bytes.
        with open(os.path.join(out_dir, f"{split}.tsv.gz"), "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                f.write(text.encode("utf-8"))
        print(f"{split}: {len(made)} pairs from {len(verses)} verses", file=sys.stderr)


if __name__ == "__main__":
    main()
