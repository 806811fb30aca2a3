"""Text example, made here, nothing downloaded: product reviews, a WordPiece tokenizer trained on
them, and a small BERT-style encoder (random weights) exported to ONNX with onnx.helper.

    python -m examples.reviews demo-data/text

writes `reviews/` (Parquet: review_id, product, review), `tokenizer.json` and `encoder.onnx`
(inputs input_ids, attention_mask, token_type_ids [N, T] int64; outputs last_hidden_state
[N, T, 64] and pooler_output [N, 64]). The weights are random, so the embeddings only reflect
which tokens a review shares with others, but every operator is the one a real BERT export uses.
"""

from __future__ import annotations

import argparse
import math
import os
import random
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_PRODUCTS = ["blender", "headphones", "backpack", "kettle", "desk lamp", "phone case", "sneakers",
             "coffee grinder", "rain jacket", "keyboard", "tent", "water bottle", "router",
             "vacuum", "monitor", "toaster", "yoga mat", "drill", "office chair", "e-reader"]
_ASPECTS = ["battery life", "build quality", "price", "delivery", "sound", "fit", "screen",
            "customer service", "packaging", "design", "noise level", "grip", "stitching",
            "setup", "manual", "warranty", "colour", "weight", "durability", "speed"]
_GOOD = ["great", "excellent", "solid", "fantastic", "reliable", "comfortable", "sturdy",
         "quiet", "fast", "beautiful", "well made", "worth every penny", "impressive"]
_BAD = ["terrible", "flimsy", "disappointing", "noisy", "slow", "cheap", "broken", "awful",
        "uncomfortable", "overpriced", "fragile", "useless", "a letdown"]
_OPENERS = ["Honestly,", "Overall", "After two weeks,", "For the money,", "To be fair,",
            "Update:", "Five stars:", "One star:", "As a gift,", "Compared to my old one,"]
_EXTRAS = ["Would buy again.", "Returned it.", "My kids love it!", "Arrived a day late.",
           "Not what the photos show.", "Café owners take note.", "Naïve design, but it works.",
           "10/10", "Meh.", "Customer support replied within 24h.", "Still works after a year.",
           "The box was damaged :(", "Great value for £30."]


def review_texts(rows: int, seed: int = 0) -> list[str]:
    """`rows` reviews from templates: mixed sentiment, punctuation, casing, a little Unicode."""
    rng = random.Random(seed)
    texts = []
    for _ in range(rows):
        product, aspect = rng.choice(_PRODUCTS), rng.choice(_ASPECTS)
        words = _GOOD if rng.random() < 0.6 else _BAD
        parts = [f"{rng.choice(_OPENERS)} the {aspect} of this {product} is {rng.choice(words)}."]
        for _ in range(rng.randint(0, 4)):
            parts.append(rng.choice([
                f"The {rng.choice(_ASPECTS)} is {rng.choice(words)}.",
                f"I {'really ' if rng.random() < 0.3 else ''}{rng.choice(['like', 'hate', 'love'])}"
                f" the {rng.choice(_ASPECTS)}.",
                rng.choice(_EXTRAS),
            ]))
        text = " ".join(parts)
        texts.append(text.upper() if rng.random() < 0.03 else text)
    return texts


def make_tokenizer(texts: list[str], vocab_size: int = 1000) -> Any:
    """A BERT-style WordPiece tokenizer (lowercasing, [CLS] ... [SEP]) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def encoder_model(vocab_size: int, hidden: int = 64, heads: int = 4, layers: int = 2,
                  ffn: int = 128, max_positions: int = 512, seed: int = 0,
                  sequence: int | str = "sequence") -> onnx.ModelProto:
    """A BERT-style encoder with random weights: embeddings, `layers` transformer blocks, pooler.

    `sequence` fixes the token dimension when an int (as exports for TensorRT often do).
    """
    rng = np.random.default_rng(seed)
    head = hidden // heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, scale: float = 0.02) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, value: Any, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def layer_norm(x: str, name: str) -> str:
        scale = const(f"{name}.gamma", np.ones(hidden))
        bias = const(f"{name}.beta", np.zeros(hidden))
        return node("LayerNormalization", [x, scale, bias], f"{name}.out", axis=-1,
                    epsilon=1e-12)

    def dense(x: str, name: str, d_in: int, d_out: int) -> str:
        mm = node("MatMul", [x, weight(f"{name}.w", d_in, d_out)], f"{name}.mm")
        return node("Add", [mm, const(f"{name}.b", np.zeros(d_out))], f"{name}.out")

    const("one_i", 1, np.int64)
    const("zero_i", 0, np.int64)
    const("one_f", 1.0)
    const("mask_min", -10000.0)
    const("heads_shape", [0, 0, heads, head], np.int64)
    const("hidden_shape", [0, 0, hidden], np.int64)
    const("mask_axes", [1, 2], np.int64)
    const("half", 0.5)
    const("sqrt2", math.sqrt(2.0))
    const("attn_scale", 1.0 / math.sqrt(head))

    words = node("Gather", [weight("word_emb", vocab_size, hidden), "input_ids"], "words")
    shape = node("Shape", ["input_ids"], "ids_shape")
    length = node("Gather", [shape, "one_i"], "seq_len", axis=0)
    positions = node("Range", ["zero_i", length, "one_i"], "positions")
    pos = node("Gather", [weight("pos_emb", max_positions, hidden), positions], "pos")
    types = node("Gather", [weight("type_emb", 2, hidden), "token_type_ids"], "types")
    emb = node("Add", [node("Add", [words, pos], "wp"), types], "emb")
    h = layer_norm(emb, "emb_ln")

    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask_4d = node("Unsqueeze", [mask_f, "mask_axes"], "mask_4d")
    inverted = node("Sub", ["one_f", mask_4d], "mask_inv")
    bias = node("Mul", [inverted, "mask_min"], "mask_bias")

    for i in range(layers):
        p = f"layer{i}"

        def split_heads(x: str, name: str, perm: list[int]) -> str:
            r = node("Reshape", [x, "heads_shape"], f"{name}.r")
            return node("Transpose", [r], f"{name}.t", perm=perm)

        q = split_heads(dense(h, f"{p}.q", hidden, hidden), f"{p}.qh", [0, 2, 1, 3])
        k = split_heads(dense(h, f"{p}.k", hidden, hidden), f"{p}.kh", [0, 2, 3, 1])
        v = split_heads(dense(h, f"{p}.v", hidden, hidden), f"{p}.vh", [0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), "attn_scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, bias], f"{p}.masked")], f"{p}.probs",
                     axis=-1)
        context = node("Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctx_t",
                       perm=[0, 2, 1, 3])
        merged = node("Reshape", [context, "hidden_shape"], f"{p}.merged")
        attn = dense(merged, f"{p}.o", hidden, hidden)
        h1 = layer_norm(node("Add", [h, attn], f"{p}.res1"), f"{p}.ln1")
        up = dense(h1, f"{p}.up", hidden, ffn)
        erf = node("Erf", [node("Div", [up, "sqrt2"], f"{p}.div")], f"{p}.erf")
        gelu = node("Mul", [node("Mul", [up, "half"], f"{p}.halfx"),
                            node("Add", [erf, "one_f"], f"{p}.erf1")], f"{p}.gelu")
        down = dense(gelu, f"{p}.down", ffn, hidden)
        h = layer_norm(node("Add", [h1, down], f"{p}.res2"), f"{p}.ln2")

    node("Identity", [h], "last_hidden_state")
    first = node("Gather", [h, "zero_i"], "first_token", axis=1)
    node("Tanh", [dense(first, "pooler", hidden, hidden)], "pooler_output")

    token = ["batch", sequence]
    graph = helper.make_graph(
        nodes, "tiny_bert",
        [helper.make_tensor_value_info(n, TensorProto.INT64, token)
         for n in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                       ["batch", sequence, hidden]),
         helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="examples.reviews")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_reviews(directory: str, rows: int = 2000, files: int = 2, row_group_rows: int = 250,
                  seed: int = 0) -> list[str]:
    """Parquet files of reviews: review_id (int64), product (string), review (string)."""
    os.makedirs(directory, exist_ok=True)
    texts = review_texts(rows, seed)
    rng = random.Random(seed + 1)
    per_file = -(-rows // files)
    paths = []
    for i in range(files):
        lo, hi = i * per_file, min(rows, (i + 1) * per_file)
        table = pa.table({
            "review_id": pa.array(np.arange(lo, hi, dtype=np.int64)),
            "product": pa.array([rng.choice(_PRODUCTS) for _ in range(lo, hi)]),
            "review": pa.array(texts[lo:hi]),
        })
        path = os.path.join(directory, f"reviews-{i:03d}.parquet")
        pq.write_table(table, path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def make(out: str, rows: int = 2000, seed: int = 0) -> dict[str, str]:
    """Write the whole example under `out`; returns the paths it wrote."""
    os.makedirs(out, exist_ok=True)
    tokenizer = make_tokenizer(review_texts(5000, seed + 100))
    tokenizer_path = os.path.join(out, "tokenizer.json")
    tokenizer.save(tokenizer_path)
    model_path = os.path.join(out, "encoder.onnx")
    onnx.save(encoder_model(tokenizer.get_vocab_size(), seed=seed), model_path)
    data = os.path.join(out, "reviews")
    write_reviews(data, rows=rows, seed=seed)
    return {"tokenizer": tokenizer_path, "model": model_path, "input": data}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.reviews", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write into")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    for name, path in make(args.out, rows=args.rows).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
