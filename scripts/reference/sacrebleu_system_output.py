"""Score a real system output with sacreBLEU and write the expected values as a fixture.

The hypotheses are qkv's default job test translations (configs/translate-en-es.json); the
references are the bundled test set. Run from the repository root:

    "$(scripts/venv.sh)" scripts/reference/sacrebleu_system_output.py runs/translate-en-es/test.hyp
"""
import gzip
import json
import shutil
import sys

import sacrebleu

FIX = "crates/qkv/tests/fixtures/sacrebleu/"
src = sys.argv[1] if len(sys.argv) > 1 else FIX + "en-es-test.hyp"
if src != FIX + "en-es-test.hyp":
    shutil.copy(src, FIX + "en-es-test.hyp")
refs = [l.rstrip("\n").split("\t")[1] for l in gzip.open("data/translate-en-es/test.tsv.gz", "rt", encoding="utf-8")]
hyps = [l.rstrip("\n") for l in open(FIX + "en-es-test.hyp", encoding="utf-8")]
assert len(refs) == len(hyps), (len(refs), len(hyps))
b = sacrebleu.corpus_bleu(hyps, [refs])
c = sacrebleu.corpus_chrf(hyps, [refs])
cpp = sacrebleu.corpus_chrf(hyps, [refs], word_order=2)
out = {
    "sacrebleu_version": sacrebleu.__version__,
    "source": "qkv default job (configs/translate-en-es.json) test translations, scored by sacrebleu",
    "bleu": {"score": b.score, "counts": b.counts, "totals": b.totals, "sys_len": b.sys_len, "ref_len": b.ref_len, "line": str(b)},
    "chrf": {"score": c.score, "line": str(c)},
    "chrf_pp": {"score": cpp.score, "line": str(cpp)},
}
json.dump(out, open(FIX + "en-es-test.json", "w"), indent=1, ensure_ascii=False)
print(out["bleu"]["line"], out["chrf"]["line"], out["chrf_pp"]["line"])
