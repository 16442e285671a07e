#!/usr/bin/env python3
"""Sentence-embedding peer for Strata's benchmarks: all-MiniLM-L6-v2 in numpy.

A plain, competent float32 implementation of what sentence-transformers does
for this model, without torch:

  tokenizer.json (WordPiece via the `tokenizers` package), truncation to 256
  tokens (sentence-transformers' max_seq_length for this model), no fixed
  padding: each batch is padded to its longest sentence; BERT forward
  (word + position + token-type embeddings, LayerNorm, 6 layers of multi-head
  self-attention with the attention mask and a GELU(erf) feed-forward, post-LN
  residuals), mean pooling over the attention mask, L2 normalisation.

Weights come from model.safetensors through safetensors' numpy API. Speed
choices: float32 throughout, Q/K/V fused into one GEMM with 1/sqrt(d) folded
into the query weights, batched matmuls for attention, in-place elementwise
ops, and (like sentence-transformers' encode) sentences sorted by length
before batching so padding stays small (--no-sort keeps file order).

Threads: numpy's BLAS follows OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, which
must be set before numpy loads; --threads N sets both for you.
OPENBLAS_CORETYPE is dropped so OpenBLAS picks the best kernels for this CPU
(--keep-blas-coretype honours it); "blas_core" in the output names them.

Usage:
  embed_numpy.py --model-dir DIR --sentences FILE --batch-size N --warmup W --repeat R
      prints one JSON line:
      {"peer":"numpy","batch_size":N,"sentences":K,"seconds":S,"sentences_per_s":X,"threads":T,...}
      K = sentences in FILE (one per line, blank lines skipped); W untimed
      passes over all K, then R timed passes; S = mean seconds of one timed
      pass (tokenisation included); X = K / S.
  embed_numpy.py --model-dir DIR --check
      prints the cosine of "The cat sits on the mat" / "A feline rests on the
      rug" (reference 0.5607) and exits 1 if it is off by more than 0.005.
"""

import argparse
import ctypes
import json
import os
import sys
import time

CHECK_PAIR = ("The cat sits on the mat", "A feline rests on the rug")
CHECK_REFERENCE = 0.5607
CHECK_TOLERANCE = 0.005
MAX_SEQ_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


import blas_env  # noqa: E402  (sets BLAS threads and core type before numpy loads)

blas_env.apply()

import numpy as np  # noqa: E402


def _openblas_call(symbols, restype):
    """Calls the first of `symbols` found in the OpenBLAS numpy has loaded."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        libs = set()
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in symbols:
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn.restype = restype
                return fn()
    return None


def blas_threads():
    """Threads numpy's OpenBLAS really uses (asks the loaded library)."""
    n = _openblas_call(("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                        "openblas_get_num_threads", "scipy_openblas_get_num_threads"), ctypes.c_int)
    if n is not None:
        return int(n)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


def blas_core():
    """The kernel family OpenBLAS chose (e.g. "SkylakeX", "Haswell"), or None."""
    name = _openblas_call(("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                           "openblas_get_corename", "scipy_openblas_get_corename"), ctypes.c_char_p)
    return name.decode() if name else None


def read_sentences(path):
    with open(path, encoding="utf-8") as f:
        sentences = [line.strip() for line in f]
    sentences = [s for s in sentences if s]
    if not sentences:
        sys.exit(f"no sentences in {path}")
    return sentences


class Tokenizer:
    """WordPiece from tokenizer.json; no fixed padding, truncation to max_length."""

    def __init__(self, model_dir, max_length):
        from tokenizers import Tokenizer as HfTokenizer

        self.tok = HfTokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.no_padding()  # the file pads to 128; pad per batch instead
        self.tok.enable_truncation(max_length)

    def encode(self, sentences):
        """Returns (ids int64 [B,T], mask float32 [B,T]) padded to the batch's longest."""
        encs = self.tok.encode_batch(sentences)
        t = max(len(e.ids) for e in encs)
        ids = np.zeros((len(encs), t), dtype=np.int64)
        mask = np.zeros((len(encs), t), dtype=np.float32)
        for i, e in enumerate(encs):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1.0
        return ids, mask

    def lengths(self, sentences):
        return [len(e.ids) for e in self.tok.encode_batch(sentences)]


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("hidden_act", "gelu") != "gelu":
        sys.exit(f"unsupported hidden_act {cfg.get('hidden_act')}")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        sys.exit("only absolute position embeddings are supported")
    return cfg


def load_weights(model_dir):
    """All tensors of model.safetensors as float32 numpy arrays, 'bert.' prefix dropped."""
    from safetensors.numpy import load_file

    raw = load_file(os.path.join(model_dir, "model.safetensors"))
    out = {}
    for k, v in raw.items():
        if k.startswith("bert."):
            k = k[len("bert."):]
        out[k] = v
    return out


# erf in float32: the rational approximation Eigen and XLA use for float erf
# (odd degree-13 numerator over even degree-8 denominator, input clamped to
# [-4, 4]). Max abs error 4.5e-7 against float64 erf over [-6, 6]: float32
# accuracy, so GELU stays the exact (erf) form BERT uses, not the tanh
# approximation. numpy has no erf; scipy.special.erf computes in float64 and
# is ~6x slower here, which would make this peer a strawman.
_ERF_ALPHA = [np.float32(c) for c in (
    -1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
    -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)]
_ERF_BETA = [np.float32(c) for c in (
    -1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
    -1.45660718464996e-05)]


def erf(x, out=None):
    """float32 erf of x, written to out (may be x itself)."""
    x = np.clip(x, np.float32(-4.0), np.float32(4.0), out=out)
    x2 = x * x
    p = x2 * _ERF_ALPHA[6]
    for c in _ERF_ALPHA[5:0:-1]:
        p += c
        p *= x2
    p += _ERF_ALPHA[0]
    p *= x
    q = x2 * _ERF_BETA[4]
    for c in _ERF_BETA[3:0:-1]:
        q += c
        q *= x2
    q += _ERF_BETA[0]
    return np.divide(p, q, out=x)


GELU_CHUNK_ROWS = 64  # keeps each elementwise pass in cache


def gelu_(f):
    """In place: f = 0.5 * f * (1 + erf(f / sqrt(2))), in row chunks."""
    sqrt_half, one, half = np.float32(np.sqrt(0.5)), np.float32(1.0), np.float32(0.5)
    for i in range(0, f.shape[0], GELU_CHUNK_ROWS):
        c = f[i:i + GELU_CHUNK_ROWS]
        g = c * sqrt_half
        erf(g, out=g)
        g += one
        g *= half
        c *= g
    return f


class MiniLM:
    def __init__(self, model_dir):
        cfg = load_config(model_dir)
        w = load_weights(model_dir)
        f32 = np.float32
        self.hidden = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.head_dim = self.hidden // self.heads
        self.eps = f32(cfg.get("layer_norm_eps", 1e-12))
        self.max_pos = cfg["max_position_embeddings"]

        self.word = np.ascontiguousarray(w["embeddings.word_embeddings.weight"], dtype=f32)
        # Token types are all 0 for single sentences: fold type 0 into positions.
        self.pos_type = np.ascontiguousarray(
            w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0],
            dtype=f32)
        self.emb_ln = (w["embeddings.LayerNorm.weight"].astype(f32), w["embeddings.LayerNorm.bias"].astype(f32))

        scale = f32(1.0 / np.sqrt(self.head_dim))
        self.layers = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            g = lambda name: w[p + name].astype(f32)  # noqa: E731
            wq = g("attention.self.query.weight") * scale
            bq = g("attention.self.query.bias") * scale
            # torch Linear stores [out, in]; y = x @ W.T + b. Keep W.T contiguous.
            wqkv = np.ascontiguousarray(np.concatenate(
                [wq, g("attention.self.key.weight"), g("attention.self.value.weight")], axis=0).T)
            bqkv = np.concatenate([bq, g("attention.self.key.bias"), g("attention.self.value.bias")])
            self.layers.append(dict(
                wqkv=wqkv, bqkv=bqkv,
                wo=np.ascontiguousarray(g("attention.output.dense.weight").T),
                bo=g("attention.output.dense.bias"),
                ln1=(g("attention.output.LayerNorm.weight"), g("attention.output.LayerNorm.bias")),
                w1=np.ascontiguousarray(g("intermediate.dense.weight").T),
                b1=g("intermediate.dense.bias"),
                w2=np.ascontiguousarray(g("output.dense.weight").T),
                b2=g("output.dense.bias"),
                ln2=(g("output.LayerNorm.weight"), g("output.LayerNorm.bias")),
            ))

    def _layernorm(self, x, ln):
        mean = x.mean(axis=-1, keepdims=True)
        x -= mean
        var = np.mean(np.square(x), axis=-1, keepdims=True)
        var += self.eps
        np.sqrt(var, out=var)
        x /= var
        x *= ln[0]
        x += ln[1]
        return x

    def forward(self, ids, mask):
        """ids [B,T] int64, mask [B,T] float32 -> L2-normalised embeddings [B,H] float32."""
        b, t = ids.shape
        if t > self.max_pos:
            raise ValueError(f"sequence of {t} tokens exceeds {self.max_pos} positions")
        h, nh, d = self.hidden, self.heads, self.head_dim
        x = self.word[ids]  # [B,T,H], a fresh array
        x += self.pos_type[:t]
        x = self._layernorm(x.reshape(b * t, h), self.emb_ln)
        # Additive attention bias: 0 for real tokens, a large negative for padding.
        bias = ((mask - 1.0) * np.float32(1e9))[:, None, None, :]  # [B,1,1,T]
        for L in self.layers:
            qkv = x @ L["wqkv"]
            qkv += L["bqkv"]
            qkv = qkv.reshape(b, t, 3, nh, d).transpose(2, 0, 3, 1, 4)  # [3,B,nh,T,d] (view)
            q, k, v = qkv[0], qkv[1], qkv[2]
            s = q @ k.transpose(0, 1, 3, 2)  # [B,nh,T,T]
            s += bias
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b * t, h)  # [B*T,H]
            a = ctx @ L["wo"]
            a += L["bo"]
            a += x
            x = self._layernorm(a, L["ln1"])
            f = x @ L["w1"]  # [B*T, I]
            f += L["b1"]
            gelu_(f)  # exact (erf) GELU
            o = f @ L["w2"]
            o += L["b2"]
            o += x
            x = self._layernorm(o, L["ln2"])
        x = x.reshape(b, t, h)
        # mean pooling over the mask, then L2 normalisation
        summed = np.einsum("bth,bt->bh", x, mask, optimize=False)
        counts = np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        emb = summed / counts
        norm = np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), np.float32(1e-12))
        return (emb / norm).astype(np.float32, copy=False)


class NumpyEmbedder:
    peer = "numpy"

    def __init__(self, model_dir, max_length=MAX_SEQ_LENGTH):
        self.tokenizer = Tokenizer(model_dir, max_length)
        self.model = MiniLM(model_dir)

    def embed_batch(self, sentences):
        ids, mask = self.tokenizer.encode(sentences)
        return self.model.forward(ids, mask)

    def threads(self):
        return blas_threads()

    def extra_fields(self):
        return {"blas_core": blas_core()}


def embed_all(embedder, sentences, batch_size, order):
    out = [None] * len(sentences)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        embs = embedder.embed_batch([sentences[j] for j in idx])
        for j, e in zip(idx, embs):
            out[j] = e
    return out


def length_order(embedder, sentences, sort):
    """Longest first, as sentence-transformers' encode does; or file order."""
    if not sort:
        return list(range(len(sentences)))
    lengths = embedder.tokenizer.lengths(sentences)
    return sorted(range(len(sentences)), key=lambda i: -lengths[i])


def check(embedder):
    a, b = embedder.embed_batch(list(CHECK_PAIR))  # one padded batch: exercises the mask
    cos_batched = float(np.dot(a, b))
    a1 = embedder.embed_batch([CHECK_PAIR[0]])[0]
    b1 = embedder.embed_batch([CHECK_PAIR[1]])[0]
    cos_single = float(np.dot(a1, b1))
    ok = abs(cos_batched - CHECK_REFERENCE) <= CHECK_TOLERANCE and abs(cos_single - CHECK_REFERENCE) <= CHECK_TOLERANCE
    print(json.dumps({
        "peer": embedder.peer, "check": "cosine", "pair": list(CHECK_PAIR),
        "cosine": round(cos_batched, 6), "cosine_unbatched": round(cos_single, 6),
        "expected": CHECK_REFERENCE, "tolerance": CHECK_TOLERANCE, "ok": ok,
    }))
    assert ok, f"cosine {cos_batched:.4f}/{cos_single:.4f} is not within {CHECK_TOLERANCE} of {CHECK_REFERENCE}"


def bench(embedder, args):
    sentences = read_sentences(args.sentences)
    order = length_order(embedder, sentences, not args.no_sort)
    tokens = sum(embedder.tokenizer.lengths(sentences))
    for _ in range(args.warmup):
        embed_all(embedder, sentences, args.batch_size, order)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        embed_all(embedder, sentences, args.batch_size, order)
        times.append(time.perf_counter() - t0)
    seconds = sum(times) / len(times)
    print(json.dumps({
        "peer": embedder.peer,
        "batch_size": args.batch_size,
        "sentences": len(sentences),
        "seconds": round(seconds, 6),
        "sentences_per_s": round(len(sentences) / seconds, 3),
        "threads": embedder.threads(),
        "repeat": args.repeat,
        "warmup": args.warmup,
        "seconds_min": round(min(times), 6),
        "tokens": tokens,
        "sorted_by_length": not args.no_sort,
        "max_length": args.max_length,
        **getattr(embedder, "extra_fields", dict)(),
    }))


def parse_args(argv=None, description=__doc__, add_arguments=None):
    ap = argparse.ArgumentParser(description=description.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="dir with model.safetensors, tokenizer.json, config.json")
    ap.add_argument("--sentences", help="text file, one sentence per line")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes over all sentences")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes; seconds is their mean")
    ap.add_argument("--threads", type=int, help="sets OMP_NUM_THREADS/OPENBLAS_NUM_THREADS before numpy loads")
    ap.add_argument("--max-length", type=int, default=MAX_SEQ_LENGTH, help="truncation in tokens (default 256)")
    ap.add_argument("--no-sort", action="store_true", help="batch in file order instead of longest first")
    ap.add_argument("--check", action="store_true", help="assert the reference cosine and exit")
    ap.add_argument("--keep-blas-coretype", action="store_true",
                    help="honour OPENBLAS_CORETYPE from the environment (default: let OpenBLAS detect the CPU)")
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    if not args.check and not args.sentences:
        ap.error("--sentences is required unless --check")
    if args.batch_size < 1 or args.repeat < 1 or args.warmup < 0:
        ap.error("--batch-size and --repeat must be >= 1, --warmup >= 0")
    return args


def run(make_embedder, argv=None, description=__doc__, add_arguments=None):
    args = parse_args(argv, description, add_arguments)
    embedder = make_embedder(args)
    if args.check:
        check(embedder)
    else:
        bench(embedder, args)


if __name__ == "__main__":
    run(lambda a: NumpyEmbedder(a.model_dir, a.max_length))
