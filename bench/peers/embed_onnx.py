#!/usr/bin/env python3
"""Sentence-embedding peer for Strata's benchmarks: all-MiniLM-L6-v2 on ONNX Runtime (CPU).

No torch and no exported .onnx file are needed: the BERT graph is built at
start-up with the `onnx` package's helper API from model.safetensors (the same
weights, tokenizer and pooling as embed_numpy.py), then run by onnxruntime's
CPU execution provider with all graph optimisations on.

Two graph flavours (--graph):
  fused     (default) the form onnxruntime's own transformer optimiser gives a
            BERT model: com.microsoft Attention (fused QKV, raw attention mask),
            SkipLayerNormalization, BiasGelu (exact erf GELU), MatMul; the
            embedding LayerNorm is the standard LayerNormalization op.
  standard  plain ONNX opset-17 ops only (MatMul/Add/Reshape/Transpose/Softmax,
            Erf-based GELU, LayerNormalization); onnxruntime fuses what it can.
Both end with mean pooling over the mask and L2 normalisation inside the graph.

Threads: --threads N, else OMP_NUM_THREADS, else onnxruntime's default;
intra-op threads = that number, inter-op = 1, sequential execution.

Same CLI and output as embed_numpy.py (peer "onnxruntime"):
  embed_onnx.py --model-dir DIR --sentences FILE --batch-size N --warmup W --repeat R
  embed_onnx.py --model-dir DIR --check
Extra: --graph fused|standard, --save-onnx PATH (write the built model).
"""

import os

import numpy as np

import embed_numpy as base

OPSET = 17
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper = helper
        self.numpy_helper = numpy_helper
        self.nodes = []
        self.inits = []
        self.n = 0

    def const(self, name, array):
        self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type, inputs, outputs=1, domain=None, **attrs):
        self.n += 1
        outs = [f"{op_type.lower()}_{self.n}_{i}" for i in range(outputs)]
        kw = dict(attrs)
        if domain:
            kw["domain"] = domain
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}", **kw))
        return outs[0] if outputs == 1 else outs


def build_model(model_dir, flavour="fused"):
    """Returns an onnx.ModelProto for MiniLM-style BERT + mean pooling + L2 norm."""
    from onnx import TensorProto, helper

    cfg = base.load_config(model_dir)
    w = base.load_weights(model_dir)
    f32 = np.float32
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg.get("layer_norm_eps", 1e-12))

    g = GraphBuilder()
    ids, mask = "input_ids", "attention_mask"

    word = g.const("word_embeddings", w["embeddings.word_embeddings.weight"].astype(f32))
    pos_type = g.const("pos_type_embeddings", (w["embeddings.position_embeddings.weight"]
                                               + w["embeddings.token_type_embeddings.weight"][0]).astype(f32))
    g.const("zero_1d", np.array([0], dtype=np.int64))
    g.const("axis0_1d", np.array([0], dtype=np.int64))
    g.const("axis1_1d", np.array([1], dtype=np.int64))

    # embeddings: word[ids] + (position + type 0)[:T], LayerNorm
    x = g.op("Gather", [word, ids])  # [B,T,H]
    seq_len = g.op("Shape", [ids], start=1, end=2)  # [T]
    pos = g.op("Slice", [pos_type, "zero_1d", seq_len, "axis0_1d"])  # [T,H]
    x = g.op("Add", [x, pos])
    x = g.op("LayerNormalization", [x, g.const("emb_ln_w", w["embeddings.LayerNorm.weight"].astype(f32)),
                                    g.const("emb_ln_b", w["embeddings.LayerNorm.bias"].astype(f32))],
             axis=-1, epsilon=eps)

    mask_f = g.op("Cast", [mask], to=TensorProto.FLOAT)  # [B,T]
    if flavour == "fused":
        mask_i32 = g.op("Cast", [mask], to=TensorProto.INT32)
    else:
        # additive bias [B,1,1,T]: 0 for tokens, -1e9 for padding
        one = g.const("one_f", np.array(1.0, dtype=f32))
        big = g.const("big_f", np.array(1e9, dtype=f32))
        bias = g.op("Mul", [g.op("Sub", [mask_f, one]), big])
        bias = g.op("Unsqueeze", [bias, g.const("axes_12", np.array([1, 2], dtype=np.int64))])
        qkv_shape = g.const("qkv_shape", np.array([0, 0, 3, heads, head_dim], dtype=np.int64))
        merge_shape = g.const("merge_shape", np.array([0, 0, hidden], dtype=np.int64))
        scale = f32(1.0 / np.sqrt(head_dim))
        sqrt_half = g.const("sqrt_half", np.array(np.sqrt(0.5), dtype=f32))
        half = g.const("half_f", np.array(0.5, dtype=f32))

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        t = lambda name: w[p + name].astype(f32)  # noqa: E731
        c = lambda name, arr: g.const(f"l{i}_{name}", arr)  # noqa: E731
        wq, wk, wv = t("attention.self.query.weight"), t("attention.self.key.weight"), t("attention.self.value.weight")
        bq, bk, bv = t("attention.self.query.bias"), t("attention.self.key.bias"), t("attention.self.value.bias")
        wo = np.ascontiguousarray(t("attention.output.dense.weight").T)
        bo = t("attention.output.dense.bias")
        ln1w, ln1b = t("attention.output.LayerNorm.weight"), t("attention.output.LayerNorm.bias")
        w1 = np.ascontiguousarray(t("intermediate.dense.weight").T)
        b1 = t("intermediate.dense.bias")
        w2 = np.ascontiguousarray(t("output.dense.weight").T)
        b2 = t("output.dense.bias")
        ln2w, ln2b = t("output.LayerNorm.weight"), t("output.LayerNorm.bias")

        if flavour == "fused":
            wqkv = np.ascontiguousarray(np.concatenate([wq, wk, wv], axis=0).T)  # [H,3H]
            bqkv = np.concatenate([bq, bk, bv])
            att = g.op("Attention", [x, c("wqkv", wqkv), c("bqkv", bqkv), mask_i32],
                       domain=MS_DOMAIN, num_heads=heads)
            proj = g.op("MatMul", [att, c("wo", wo)])
            # LN(proj + bo + x)
            x = g.op("SkipLayerNormalization", [proj, x, c("ln1_w", ln1w), c("ln1_b", ln1b), c("bo", bo)],
                     domain=MS_DOMAIN, epsilon=eps)
            h = g.op("MatMul", [x, c("w1", w1)])
            h = g.op("BiasGelu", [h, c("b1", b1)], domain=MS_DOMAIN)  # exact erf GELU
            o = g.op("MatMul", [h, c("w2", w2)])
            x = g.op("SkipLayerNormalization", [o, x, c("ln2_w", ln2w), c("ln2_b", ln2b), c("b2", b2)],
                     domain=MS_DOMAIN, epsilon=eps)
        else:
            wqkv = np.ascontiguousarray(np.concatenate([wq * scale, wk, wv], axis=0).T)
            bqkv = np.concatenate([bq * scale, bk, bv])
            qkv = g.op("Add", [g.op("MatMul", [x, c("wqkv", wqkv)]), c("bqkv", bqkv)])  # [B,T,3H]
            qkv = g.op("Reshape", [qkv, qkv_shape])  # [B,T,3,nh,d]
            qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3,B,nh,T,d]
            q, k, v = g.op("Split", [qkv], outputs=3, axis=0)
            q, k, v = (g.op("Squeeze", [a, "axis0_1d"]) for a in (q, k, v))
            kt = g.op("Transpose", [k], perm=[0, 1, 3, 2])
            s = g.op("Add", [g.op("MatMul", [q, kt]), bias])
            s = g.op("Softmax", [s], axis=-1)
            ctx = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[0, 2, 1, 3])  # [B,T,nh,d]
            ctx = g.op("Reshape", [ctx, merge_shape])
            a = g.op("Add", [g.op("MatMul", [ctx, c("wo", wo)]), c("bo", bo)])
            x = g.op("LayerNormalization", [g.op("Add", [a, x]), c("ln1_w", ln1w), c("ln1_b", ln1b)],
                     axis=-1, epsilon=eps)
            h = g.op("Add", [g.op("MatMul", [x, c("w1", w1)]), c("b1", b1)])
            e = g.op("Add", [g.op("Erf", [g.op("Mul", [h, sqrt_half])]), one])
            h = g.op("Mul", [g.op("Mul", [h, e]), half])
            o = g.op("Add", [g.op("MatMul", [h, c("w2", w2)]), c("b2", b2)])
            x = g.op("LayerNormalization", [g.op("Add", [o, x]), c("ln2_w", ln2w), c("ln2_b", ln2b)],
                     axis=-1, epsilon=eps)

    # mean pooling over the mask, L2 normalisation
    m3 = g.op("Unsqueeze", [mask_f, g.const("axis2_1d", np.array([2], dtype=np.int64))])  # [B,T,1]
    summed = g.op("ReduceSum", [g.op("Mul", [x, m3]), "axis1_1d"], keepdims=0)  # [B,H]
    count = g.op("Max", [g.op("ReduceSum", [mask_f, "axis1_1d"], keepdims=1),
                         g.const("tiny", np.array(1e-9, dtype=f32))])  # [B,1]
    emb = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [emb], axes=[1], keepdims=1),
                        g.const("tiny_norm", np.array(1e-12, dtype=f32))])
    out = g.op("Div", [emb, norm])
    g.nodes.append(helper.make_node("Identity", [out], ["sentence_embedding"], name="output"))

    graph = helper.make_graph(
        g.nodes, f"minilm_{flavour}",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if flavour == "fused":
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="strata-bench-peers")
    model.ir_version = 8
    return model


def resolve_threads(args):
    if args.threads:
        return int(args.threads)
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else 0  # 0 = onnxruntime's default


class OnnxEmbedder:
    peer = "onnxruntime"

    def __init__(self, args):
        import onnxruntime as ort

        self.tokenizer = base.Tokenizer(args.model_dir, args.max_length)
        model = build_model(args.model_dir, args.graph)
        if args.save_onnx:
            import onnx

            onnx.save(model, args.save_onnx)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._threads = resolve_threads(args)
        if self._threads:
            so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.graph = args.graph

    def embed_batch(self, sentences):
        ids, mask = self.tokenizer.encode(sentences)
        (emb,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask.astype(np.int64)})
        return emb

    def threads(self):
        return self._threads or (os.cpu_count() or 1)

    def extra_fields(self):
        return {"graph": self.graph, "onnxruntime": self.version}


def add_arguments(ap):
    ap.add_argument("--graph", choices=("fused", "standard"), default="fused",
                    help="contrib-op graph as onnxruntime's transformer optimiser makes it, or plain ONNX ops")
    ap.add_argument("--save-onnx", metavar="PATH", help="also write the built model to PATH")


def main():
    base.run(OnnxEmbedder, description=__doc__, add_arguments=add_arguments)


if __name__ == "__main__":
    main()
