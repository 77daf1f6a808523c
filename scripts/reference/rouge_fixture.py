#!/usr/bin/env python3
"""rouge-score reference values for qkv::metrics::rouge.

Run from the repository root, in a venv with the scorer (it pulls nltk):

    python3 -m venv /tmp/rouge-venv && /tmp/rouge-venv/bin/pip install rouge-score==0.1.2
    /tmp/rouge-venv/bin/python scripts/reference/rouge_fixture.py
    # writes crates/qkv/tests/fixtures/rouge/rouge.json.gz

What it records (the Rust test compares every number to the last bit):
- `stems`: NLTK's PorterStemmer() (the stemmer rouge-score uses) on every distinct token
  longer than three characters of the summarize-bible corpus (passages and summaries, all
  splits), and on words built to reach every rule of the algorithm (stems × suffixes);
- `pairs`: rouge1/rouge2/rougeL precision, recall and F1, with and without the stemmer, of
  real outputs (the two lead baselines of the corpus's README on its test split: the first 6
  words, and the first clause up to `;`, `:` or `.`) and of edge cases (empty sides,
  punctuation only, numbers, repeated words, non-ASCII letters);
- `corpus`: the mean F1 of each baseline on test, the README's table.
"""

import gzip
import json
import os
import re

import nltk
import rouge_score
from nltk.stem import porter
from rouge_score import rouge_scorer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "..", "shared", "data", "summarize-bible")
OUT = os.path.join(ROOT, "crates", "qkv", "tests", "fixtures", "rouge", "rouge.json.gz")
TYPES = ["rouge1", "rouge2", "rougeL"]


def read(split):
    with open(os.path.join(DATA, f"{split}.tsv"), encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def built_words():
    stems = ["relat", "condit", "ration", "valen", "hesit", "digit", "conform", "radic",
             "form", "sensit", "sensib", "callous", "hop", "effect", "electr", "control",
             "rol", "gener", "adjust", "depend", "adopt", "bowdl", "fal", "his", "fiz",
             "fail", "fil", "cr", "sk", "tann", "sing", "plast", "motor", "agr", "feed",
             "bled", "troubl", "siz", "happ", "analog", "triplic", "formaliz", "goodn",
             "revival", "allow", "inference", "airlin", "gyroscop", "adjustab", "defens",
             "irritant", "replac", "adjustm", "dependen", "communism", "activ", "angulat",
             "homolog", "effectiv", "bowdleriz", "probat", "rat", "cease", "controll", "yell",
             "syzyg", "by", "ey", "toy", "play", "obey", "sayy", "ayy", "yy"]
    suffixes = ["", "s", "es", "ies", "ied", "sses", "ss", "ed", "eed", "ing", "at", "bl", "iz",
                "y", "ly", "li", "ational", "tional", "enci", "anci", "izer", "bli", "abli",
                "alli", "entli", "eli", "ousli", "ization", "ation", "ator", "alism",
                "iveness", "fulness", "ousness", "aliti", "iviti", "biliti", "fulli", "logi",
                "icate", "ative", "alize", "iciti", "ical", "ful", "ness", "al", "ance",
                "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "sion",
                "tion", "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize", "e", "ll"]
    words = {s + x for s in stems for x in suffixes}
    words |= {"sky", "skies", "dying", "lying", "tying", "news", "innings", "inning",
              "outings", "outing", "cannings", "canning", "howe", "proceed", "exceed",
              "succeed", "ties", "dies", "lies", "pies", "cried", "died", "tied", "spied"}
    return words


def main():
    stemmer = porter.PorterStemmer()
    splits = {s: read(s) for s in ("train", "valid", "test")}
    words = set()
    for pairs in splits.values():
        for passage, summary in pairs:
            for text in (passage, summary):
                words |= {t for t in re.split(r"[^a-z0-9]+", text.lower()) if len(t) > 3}
    words |= {w for w in built_words() if len(w) > 3}
    stems = [[w, stemmer.stem(w)] for w in sorted(words)]

    scorers = {stem: rouge_scorer.RougeScorer(TYPES, use_stemmer=stem) for stem in (False, True)}

    def scored(target, prediction, kind):
        row = {"kind": kind, "target": target, "prediction": prediction}
        for stem, scorer in scorers.items():
            s = scorer.score(target, prediction)
            # repr strings: Rust's `str::parse` reads them back to the same bits (serde_json's
            # default float parser may be one ulp off).
            row["stem" if stem else "plain"] = {
                t: [repr(float(v)) for v in (s[t].precision, s[t].recall, s[t].fmeasure)]
                for t in TYPES}
        return row

    lead6 = lambda p: " ".join(p.split()[:6])
    clause = lambda p: re.split(r"[;:.]", p)[0]
    rows, corpus = [], {}
    for name, pick in (("first 6 words", lead6), ("first clause", clause)):
        these = [scored(summary, pick(passage), name) for passage, summary in splits["test"]]
        rows += these
        corpus[name] = {t: repr(sum(float(r["stem"][t][2]) for r in these) / len(these))
                        for t in TYPES}
    edge = [
        ("", "", "both empty"),
        ("", "a prediction", "empty target"),
        ("a target", "", "empty prediction"),
        ("...!?", "—;:", "punctuation only"),
        ("In 1,000 years, 3:16", "3 16 in 1000 years", "numbers"),
        ("the the the the cat", "the cat the the", "repeated words"),
        ("Naïve café, İstanbul Kelvin", "naive cafe istanbul kelvin", "non-ASCII letters"),
        ("The LORD is my shepherd; I shall not want.", "the lord is my shepherd", "casing"),
        ("Running runners ran; generously generating generations.",
         "runs run running generation generous", "stemming"),
        ("a b c d e f g", "g f e d c b a", "reversed"),
        ("x", "x", "one token"),
    ]
    rows += [scored(t, p, kind) for t, p, kind in edge]
    fixture = {
        "versions": {"rouge_score": "0.1.2", "nltk": nltk.__version__},
        "stems": stems,
        "pairs": rows,
        "corpus": corpus,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(json.dumps(fixture, ensure_ascii=False).encode())
    print(f"{len(stems)} stems, {len(rows)} pairs; nltk {nltk.__version__}")
    for name, c in corpus.items():
        print(name, " / ".join(f"{100 * float(c[t]):.2f}" for t in TYPES))


if __name__ == "__main__":
    main()
