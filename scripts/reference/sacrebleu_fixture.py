#!/usr/bin/env python3
"""sacreBLEU reference scores for qkv::metrics::sacrebleu.

Run from the repository root:

    PY=$(scripts/venv.sh)
    "$PY" scripts/reference/sacrebleu_fixture.py
    # writes crates/qkv/tests/fixtures/sacrebleu/real_outputs.json

References are the Spanish side of ../shared/data/translate-en-es/test.tsv
(Reina-Valera 1909, public domain).  The "system outputs" are deterministic
perturbations of them (word drops, swaps, substitutions, truncation, casing,
punctuation, entities, odd whitespace, empty lines), so the corpus exercises
every branch of the 13a tokenizer, the brevity penalty and the smoothing code.
A second reference stream (lightly perturbed references, a few of them empty)
exercises multi-reference BLEU and chrF.

Scores come from sacreBLEU's public API; `formatted` is sacreBLEU's own
printed line, which the Rust test compares character for character.
"""

import argparse
import json
import os
import random

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_TSV = os.path.join(ROOT, "..", "shared", "data", "translate-en-es", "test.tsv")
DEFAULT_OUT = os.path.join(ROOT, "crates", "qkv", "tests", "fixtures", "sacrebleu", "real_outputs.json")

N_LINES = 100
MAX_CHARS = 150  # keeps the fixture small (< 60 KB)

# Text that trips individual 13a / chrF rules: entities, <skipped>, numbers with
# separators, digit-dash, brackets, non-ASCII whitespace (NBSP, ideographic
# space, U+001C which Python's str.split() treats as whitespace).
NOISE = ["&amp;", "&quot;hola&quot;", "&lt;b&gt;", "<skipped>", "3.5", "1,000", "10-12",
         "(vida)", "«paz»", "¿qué?", "e.g.", "\u00a0", "\u3000", "\x1c", "\t", "  ", "-\n"]


def perturb(words, vocab, rng, kind):
    w = list(words)
    if kind == 0:  # identical
        return " ".join(w)
    if kind == 1:  # drop ~20% of the words
        return " ".join(x for x in w if rng.random() > 0.2)
    if kind == 2:  # swap a few adjacent pairs
        for _ in range(max(1, len(w) // 5)):
            i = rng.randrange(max(1, len(w) - 1))
            w[i:i + 2] = w[i:i + 2][::-1]
        return " ".join(w)
    if kind == 3:  # substitute ~25% with other words of the corpus
        return " ".join(rng.choice(vocab) if rng.random() < 0.25 else x for x in w)
    if kind == 4:  # casing
        return " ".join(x.upper() if rng.random() < 0.3 else x.lower() for x in w)
    if kind == 5:  # punctuation: strip it, change it, or detach the final period
        s = " ".join(w)
        choice = rng.randrange(3)
        if choice == 0:
            return "".join(c for c in s if c not in ",.;:")
        if choice == 1:
            return s.replace(",", ";").replace(":", ",")
        return s.rstrip(".") + " ."
    if kind == 6:  # truncation (short output, brevity penalty)
        return " ".join(w[: max(1, len(w) // 2)])
    if kind == 7:  # longer output: repeated and inserted words
        for _ in range(3):
            w.insert(rng.randrange(len(w) + 1), rng.choice(w))
        return " ".join(w)
    if kind == 8:  # noise tokens and odd whitespace
        for _ in range(3):
            w.insert(rng.randrange(len(w) + 1), rng.choice(NOISE))
        return " ".join(w) + rng.choice(["", " ", "\n", " \u00a0"])
    # kind 9: several perturbations at once
    s = perturb(words, vocab, rng, 1).split()
    return perturb(s, vocab, rng, 2 if rng.random() < 0.5 else 3)


def word_salad(words, vocab, rng):
    """Two reference words out of order around a random one: unigram matches
    but (almost surely) no trigram, and no 4-gram at all."""
    plain = [x for x in words if x.isalpha()]
    i, j = sorted(rng.sample(range(len(plain)), 2))
    return f"{plain[j]} {rng.choice([v for v in vocab if v.isalpha()])} {plain[i]}"


SALAD = [i for i in range(N_LINES) if i % 13 == 3 and i % 17 != 5 and i % 29 != 11]


def make_corpus(tsv):
    with open(tsv, encoding="utf-8") as f:
        refs = [line.rstrip("\n").split("\t")[1] for line in f]
    refs = [r for r in refs if len(r) <= MAX_CHARS][:N_LINES]
    vocab = sorted({w for r in refs for w in r.split()})
    rng = random.Random(20240607)
    hyps, refs2 = [], []
    for i, r in enumerate(refs):
        words = r.split()
        if i % 17 == 5:
            hyps.append("")
        elif i % 29 == 11:
            hyps.append("   ")
        elif i % 13 == 3:
            hyps.append(word_salad(words, vocab, rng))
        else:
            hyps.append(perturb(words, vocab, rng, i % 10))
        # second reference: a light paraphrase, sometimes absent (empty)
        refs2.append("" if i % 23 == 7 else perturb(words, vocab, rng, rng.choice([0, 3, 5])))
    return hyps, [refs, refs2]


def bleu_entry(hyps, refs, segments=None, **kw):
    """`segments`: score only these segment indices (None: all of them)."""
    if segments is not None:
        hyps = [hyps[i] for i in segments]
        refs = [[stream[i] for i in segments] for stream in refs]
    s = BLEU(**kw).corpus_score(hyps, refs)
    entry = {
        "options": kw,
        "segments": segments,
        "num_refs": len(refs),
        "score": s.score,
        "precisions": s.precisions,
        "bp": s.bp,
        "sys_len": s.sys_len,
        "ref_len": s.ref_len,
        "formatted": str(s),
    }
    # add-k adds k to the counts sacreBLEU reports; keep only raw statistics.
    if kw.get("smooth_method") != "add-k":
        entry["counts"], entry["totals"] = s.counts, s.totals
    return entry


def chrf_entry(hyps, refs, **kw):
    s = CHRF(**kw).corpus_score(hyps, refs)
    return {"options": kw, "num_refs": len(refs), "score": s.score, "formatted": str(s)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tsv", default=DEFAULT_TSV)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    hyps, refs = make_corpus(args.tsv)
    one = refs[:1]
    bleu = [
        bleu_entry(hyps, one),
        bleu_entry(hyps, refs),
        bleu_entry(hyps, one, tokenize="none"),
        bleu_entry(hyps, one, lowercase=True),
        bleu_entry(hyps, one, tokenize="none", lowercase=True),
        bleu_entry(hyps, one, smooth_method="none"),
        bleu_entry(hyps, one, smooth_method="floor"),
        bleu_entry(hyps, one, smooth_method="floor", smooth_value=0.5),
        bleu_entry(hyps, one, smooth_method="add-k"),
        bleu_entry(hyps, one, smooth_method="add-k", smooth_value=2),
        bleu_entry(hyps, one, effective_order=True),
        bleu_entry(hyps, one, max_ngram_order=2),
    ]
    # The word-salad lines alone: no 4-grams at all, few or no higher-order
    # matches, so every smoothing / effective-order branch decides the score.
    for kw in [{}, {"effective_order": True}, {"smooth_method": "none"},
               {"smooth_method": "none", "effective_order": True},
               {"smooth_method": "floor"}, {"smooth_method": "floor", "effective_order": True},
               {"smooth_method": "add-k"}, {"smooth_method": "add-k", "effective_order": True}]:
        bleu.append(bleu_entry(hyps, one, segments=SALAD, **kw))
    chrf = [
        chrf_entry(hyps, one),
        chrf_entry(hyps, refs),
        chrf_entry(hyps, one, word_order=2),
        chrf_entry(hyps, refs, word_order=2),
        chrf_entry(hyps, one, lowercase=True),
        chrf_entry(hyps, one, whitespace=True),
        chrf_entry(hyps, one, eps_smoothing=True),
        chrf_entry(hyps, one, word_order=2, beta=1, eps_smoothing=True),
    ]
    sentence_bleu = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs[0])]
    sentence_chrf = [sacrebleu.sentence_chrf(h, [r], word_order=2).score
                     for h, r in zip(hyps, refs[0])]

    out = {
        "sacrebleu_version": sacrebleu.__version__,
        "note": "Generated by scripts/reference/sacrebleu_fixture.py; refs[k][i] is the "
                "k-th reference of segment i. sentence_bleu: sacrebleu.sentence_bleu "
                "defaults (13a, exp, effective order); sentence_chrf: chrF++.",
        "hyps": hyps,
        "refs": refs,
        "bleu": bleu,
        "chrf": chrf,
        "sentence_bleu": sentence_bleu,
        "sentence_chrf": sentence_chrf,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
