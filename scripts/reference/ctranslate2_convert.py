#!/usr/bin/env python3
"""qkv Seq2Seq → CTranslate2, written with CTranslate2's own spec classes.

The reference twin of `qkv export --format ctranslate2` (crates/qkv/src/export/ctranslate2.rs):
the Rust exporter must write the same bytes as this script, which builds the model with
`ctranslate2.specs.TransformerSpec` and saves it through CTranslate2's serializer.

    PY=$(scripts/venv.sh); "$PY" -m pip install ctranslate2
    "$PY" scripts/reference/ctranslate2_convert.py MODEL_DIR OUT_DIR   # a qkv model directory
    "$PY" scripts/reference/ctranslate2_convert.py --fixtures          # tests/fixtures/ctranslate2/

`--fixtures` converts the golden seq2seq fixtures (tests/fixtures/seq2seq_{post,pre}.safetensors,
computed with PyTorch by make_fixtures.py) with the vocabulary t0, t1, …, checks that
CTranslate2 scores their targets with the log-probabilities PyTorch computed (so the mapping
itself is right, not only equal to the Rust one), and saves each converted model with the
greedy translations CTranslate2 gives its sources (`greedy.json`), which the Rust tests
compare with qkv's own decoding.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open

import ctranslate2
from ctranslate2.specs import common_spec, transformer_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ACTIVATIONS = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}


def sinusoidal_table(max_len, c):
    """qkv's table (kernels/embedding.rs): sin on even, cos on odd columns, computed in
    float64 and rounded to float32."""
    pe = np.zeros((max_len, c), dtype=np.float64)
    for i in range(c):
        pair = (i // 2) * 2
        angle = np.arange(max_len, dtype=np.float64) / 10000.0 ** (pair / c)
        pe[:, i] = np.sin(angle) if i % 2 == 0 else np.cos(angle)
    return pe.astype(np.float32)


def positions(cfg, p, pos_name, types_name):
    """The table CTranslate2 adds at each position: qkv's positions, plus the token-type row
    every token uses (BERT-layout models), which CTranslate2 has no place for."""
    if cfg["positional"] == "sinusoidal":
        table = sinusoidal_table(cfg["max_len"], cfg["d_model"])
    else:
        table = p[pos_name + ".weight"].copy()
    if cfg.get("token_types", 0) > 0:
        table = table + p[types_name + ".weight"][0]
    return table


def norm(spec, p, name):
    spec.gamma = p[name + ".weight"]
    spec.beta = p[name + ".bias"]


def linear(spec, p, name):
    spec.weight = p[name + ".weight"]
    spec.bias = p[name + ".bias"]


def layer(spec, p, prefix, decoder):
    norm(spec.self_attention.layer_norm, p, prefix + ".self_attn_norm")
    linear(spec.self_attention.linear[0], p, prefix + ".self_attn.qkv")
    linear(spec.self_attention.linear[1], p, prefix + ".self_attn.out")
    if decoder:
        norm(spec.attention.layer_norm, p, prefix + ".cross_attn_norm")
        linear(spec.attention.linear[0], p, prefix + ".cross_attn.q")
        linear(spec.attention.linear[1], p, prefix + ".cross_attn.kv")
        linear(spec.attention.linear[2], p, prefix + ".cross_attn.out")
    norm(spec.ffn.layer_norm, p, prefix + ".ffn_norm")
    linear(spec.ffn.linear_0, p, prefix + ".ffn.up")
    linear(spec.ffn.linear_1, p, prefix + ".ffn.down")


def build_spec(cfg, p, src_vocab, tgt_vocab, specials):
    """A TransformerSpec holding a qkv Seq2Seq (config dict, name → float32 array)."""
    if cfg["family"] != "seq2seq":
        raise ValueError("only seq2seq models export to CTranslate2's TransformerSpec")
    pre = cfg["norm"] == "pre"
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg["n_encoder_layers"], cfg["n_decoder_layers"]),
        cfg["n_heads"],
        pre_norm=pre,
        activation=ACTIVATIONS[cfg["activation"]],
        layernorm_embedding=cfg.get("embed_norm", False),
    )
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = p["src_embed.weight"]
    tgt_table = "src_embed.weight" if cfg["share_embeddings"] else "tgt_embed.weight"
    dec.embeddings.weight = p[tgt_table]
    tied = cfg["share_embeddings"] or cfg["tie_output"]
    dec.projection.weight = p[tgt_table] if tied else p["output.weight"]
    for stack, side in ((enc, "src"), (dec, "tgt")):
        stack.scale_embeddings = cfg["scale_embeddings"]
        stack.position_encodings.encodings = positions(cfg, p, side + "_pos", side + "_embed_types")
        if cfg.get("embed_norm", False):
            norm(stack.layernorm_embedding, p, side + "_embed_norm")
    if pre:
        norm(enc.layer_norm, p, "encoder.final_norm")
        norm(dec.layer_norm, p, "decoder.final_norm")
    for i, l in enumerate(enc.layer):
        layer(l, p, "encoder.layers.%d" % i, decoder=False)
    for i, l in enumerate(dec.layer):
        layer(l, p, "decoder.layers.%d" % i, decoder=True)

    spec.config.unk_token = specials["unk"]
    spec.config.bos_token = specials["bos"]
    spec.config.eos_token = specials["eos"]
    spec.config.decoder_start_token = specials["bos"]
    spec.config.add_source_eos = True
    spec.config.layer_norm_epsilon = cfg["layer_norm_eps"]
    spec.register_source_vocabulary(src_vocab)
    spec.register_target_vocabulary(tgt_vocab)
    return spec


def save(spec, out):
    spec.validate()
    spec.optimize(quantization=None)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    spec.save(out)


def vocab_of(tokenizer_json):
    """Tokens by id, and the special tokens as qkv names them (data/tokenizer.rs)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tj = json.load(f)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    v = tok.get_vocab_size(with_added_tokens=True)
    vocab = [tok.id_to_token(i) for i in range(v)]

    def find(names):
        for n in names:
            if tok.token_to_id(n) is not None:
                return n
        raise ValueError("no token of %s in %s" % (names, tokenizer_json))

    specials = {
        "bos": find(["<s>", "[CLS]", "<bos>", "<|endoftext|>"]),
        "eos": find(["</s>", "[SEP]", "<eos>", "<|endoftext|>"]),
        "unk": find(["<unk>", "[UNK]", "<|unk|>"]),
    }
    del tj
    return vocab, specials


def convert_dir(model_dir, out):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    p = load_file(os.path.join(model_dir, "model.safetensors"))
    src_vocab, specials = vocab_of(os.path.join(model_dir, "tokenizer.json"))
    tgt_path = os.path.join(model_dir, "target_tokenizer.json")
    tgt_vocab = vocab_of(tgt_path)[0] if os.path.exists(tgt_path) else src_vocab
    save(build_spec(cfg, p, src_vocab, tgt_vocab, specials), out)


# ------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------

FIXTURE_SPECIALS = {"bos": "t1", "eos": "t2", "unk": "t3"}


def fixture(name, out_root):
    path = os.path.join(ROOT, "tests", "fixtures", name + ".safetensors")
    with safe_open(path, "np") as f:
        cfg = json.loads(f.metadata()["config"])
    t = load_file(path)
    p = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    vs, vt = cfg["vocab_size"], cfg["tgt_vocab_size"] or cfg["vocab_size"]
    src_vocab = ["t%d" % i for i in range(vs)]
    tgt_vocab = ["t%d" % i for i in range(vt)]
    spec = build_spec(cfg, p, src_vocab, tgt_vocab, FIXTURE_SPECIALS)
    out = os.path.join(out_root, name)
    save(spec, out)

    pad = cfg["pad_id"]
    src = [[("t%d" % i) for i in row if i != pad] for row in t["input.src"]]
    tgt_in = [[int(i) for i in row if i != pad] for row in t["input.tgt_in"]]
    tgt_out = t["input.tgt_out"]
    logits = t["output.logits"].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)

    # Score every fixture target with CTranslate2: the fixture's sources already end where
    # they end (no EOS appended) and its decoder inputs start with their own first token.
    check_dir = tempfile.mkdtemp()
    try:
        shutil.copytree(out, check_dir, dirs_exist_ok=True)
        with open(os.path.join(check_dir, "config.json"), encoding="utf-8") as f:
            c = json.load(f)
        c["add_source_eos"] = False
        c["decoder_start_token"] = None
        with open(os.path.join(check_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(c, f)
        tr = ctranslate2.Translator(check_dir, device="cpu")
        targets = [["t%d" % i for i in row] for row in tgt_in]
        worst = 0.0
        for b, res in enumerate(tr.score_batch(src, targets)):
            # log_probs[j] scores the token after decoder input j: the fixture's next token,
            # and last the EOS (t2) CTranslate2 appends, read from the same logits row.
            n = len(tgt_in[b])
            assert len(res.log_probs) == n
            for j, lp in enumerate(res.log_probs):
                token = tgt_out[b, j] if j < n - 1 else 2
                worst = max(worst, abs(lp - logp[b, j, token]))
        print("%s: CTranslate2 scores the fixture targets within %.2e of PyTorch" % (name, worst))
        if worst > 1e-4:
            sys.exit("%s: the converted model does not compute what PyTorch does" % name)
    finally:
        shutil.rmtree(check_dir)

    # Greedy translations of the sources (EOS appended by CTranslate2 from config.json), kept
    # for the Rust tests. Each output is capped at the fixture's max_len positions.
    tr = ctranslate2.Translator(out, device="cpu")
    res = tr.translate_batch(src, beam_size=1, max_decoding_length=cfg["max_len"] - 1,
                             return_scores=True)
    greedy = {
        "source": [[int(s[1:]) for s in row] for row in src],
        "output": [[int(s[1:]) for s in r.hypotheses[0]] for r in res],
    }
    with open(os.path.join(out, "greedy.json"), "w", encoding="utf-8") as f:
        json.dump(greedy, f)
        f.write("\n")
    print("%s: greedy outputs %s" % (name, greedy["output"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--fixtures", action="store_true")
    a = ap.parse_args()
    if a.fixtures:
        root = os.path.join(ROOT, "tests", "fixtures", "ctranslate2")
        for name in ("seq2seq_post", "seq2seq_pre"):
            fixture(name, root)
    elif a.model_dir and a.out:
        convert_dir(a.model_dir, a.out)
    else:
        ap.error("give MODEL_DIR OUT_DIR, or --fixtures")


if __name__ == "__main__":
    main()
