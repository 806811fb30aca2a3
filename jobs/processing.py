"""Pre- and postprocessing settings: flags and config items -> specs, resolved against the model.

In a config, `preprocess` and `postprocess` are lists of items, each a mapping with a `kind`
(or just the kind's name):

    preprocess:
      - {kind: text, column: review, tokenizer: tokenizer.json, max_length: 128}
      - {kind: image, column: jpeg, input: pixels, mean: [0.485, 0.456, 0.406]}
      - {kind: features, columns: ["mean_*", age], input: x, nulls: fill, fill_value: 0}
      - {kind: mypkg.prep:fn, columns: [a, b], inputs: [x]}
    postprocess: [raw, {kind: topk, k: 3, labels: labels.txt}, embedding]

On the command line, a flag that names columns (`--features`, `--text-column`, `--image-column`,
`--preprocess`) replaces the config's preprocessors of its kind; option flags (`--tokenizer`,
`--image-size`, `--nulls`, ...) set their option on every preprocessor of the kinds they apply to.
`--postprocess` replaces the config's list; `--labels`, `--top-k`, ... set their option on every
postprocessor that takes it.
"""

from __future__ import annotations

import argparse
import copy
import posixpath
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from workers.errors import SpecError, StorageError
from workers.functions import is_function_target
from workers.images import PATH_COLUMN
from workers.onnx_pooling import PooledModel, pool_in_graph
from workers.postprocess import (
    POOLINGS,
    POST_KINDS,
    ArgmaxPost,
    EmbeddingPost,
    FunctionPost,
    PostSpec,
    RawPost,
    SigmoidPost,
    TopKPost,
    parse_labels,
)
from workers.preprocess import (
    BAD_IMAGE_POLICIES,
    IMAGE_DECODES,
    LAYOUTS,
    NULL_POLICIES,
    PREP_KINDS,
    FunctionPrep,
    ImagePrep,
    PrepSpec,
    TensorPrep,
    TextPrep,
)
from workers.storage import read_bytes
from workers.tensors import ModelInfo

if TYPE_CHECKING:
    from jobs.spec import JobSpec

INPUT_FORMATS = ("auto", "parquet", "images")


# --- flags ------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers"
                                         ) from exc


def _size(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not H,W (or one number)") from exc
    if len(values) == 1:
        values *= 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not H,W (or one number)")
    return values


def add_processing_flags(p: argparse.ArgumentParser) -> None:
    """Flags for the input format, preprocessors and postprocessors."""
    p.add_argument("--input-format", choices=INPUT_FORMATS,
                   help="parquet, or images: a directory of image files, one row per file with "
                   "columns path and image (default auto: images when no file is Parquet)")
    pre = p.add_argument_group("preprocessing (model inputs from feature, text and image columns)")
    pre.add_argument("--features", action="append", metavar="[INPUT=]COLUMNS",
                     help="stack numeric columns (comma-separated names or globs such as "
                     "'mean_*') into one [N, F] input (repeatable)")
    pre.add_argument("--nulls", choices=NULL_POLICIES,
                     help="nulls in feature or text columns: fail the shard naming the column "
                     "(default), or fill them (--fill-value; empty string for text)")
    pre.add_argument("--fill-value", type=float, metavar="X", help="what null features become")
    pre.add_argument("--text-column", metavar="COLUMN",
                     help="tokenize this string column into the model's token inputs")
    pre.add_argument("--tokenizer", metavar="URI", help="Hugging Face tokenizer.json")
    pre.add_argument("--max-length", type=int, metavar="N",
                     help="tokens per row at most (default: the model's sequence length, or 512)")
    pre.add_argument("--truncation", action=argparse.BooleanOptionalAction, default=None,
                     help="cut rows longer than --max-length (default) or fail them")
    pre.add_argument("--image-column", action="append", metavar="[INPUT=]COLUMN",
                     help="decode this binary column of encoded images (repeatable); an image "
                     "directory's column is 'image'")
    pre.add_argument("--image-size", type=_size, metavar="H,W",
                     help="crop size (default: the model input's height and width)")
    pre.add_argument("--resize", type=int, metavar="N",
                     help="resize the shorter side to N before the center crop (default: the "
                     "crop's larger side)")
    pre.add_argument("--mean", type=_floats, metavar="R,G,B", help="per-channel mean of [0,1] "
                     "pixels (default 0)")
    pre.add_argument("--std", type=_floats, metavar="R,G,B", help="per-channel std (default 1)")
    pre.add_argument("--layout", choices=LAYOUTS[1:], help="pixel layout (default: from the "
                     "model input's shape)")
    pre.add_argument("--image-decode", choices=IMAGE_DECODES,
                     help="where images decode: gpu (nvImageCodec on the actor's GPU, straight "
                     "into the batch; pip install '.[gpu]'), cpu (libjpeg-turbo for JPEG, "
                     "Pillow for the rest, on the actor's CPUs), or auto (default: on GPU actors "
                     "with 8+ threads, libjpeg-turbo on their CPUs, resized on the GPU; else "
                     "gpu where nvImageCodec imports and decodes on the actor's GPU)")
    pre.add_argument("--max-image-pixels", type=int, metavar="N",
                     help="an image of more pixels is a bad row, never decoded (default: "
                     "(32 x --resize)^2, at most Pillow's MAX_IMAGE_PIXELS)")
    pre.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES,
                     help="an image that does not decode fails the shard (default), or skip: "
                     "its row is left out and listed in the manifest with its kept columns")
    pre.add_argument("--preprocess", action="append", dest="preprocess_function",
                     metavar="[INPUTS=]MODULE:FUNCTION",
                     help="your function(table) -> array or {input: array}; INPUTS: the model "
                     "inputs it feeds, comma-separated (default: those left)")
    pre.add_argument("--preprocess-columns", metavar="COLUMNS",
                     help="comma-separated columns --preprocess reads")
    pre.add_argument("--preprocess-threads", type=int, metavar="N",
                     help="threads per worker decoding images and tokenizing text (default "
                     "--cpus-per-worker)")
    post = p.add_argument_group("postprocessing (output columns from model outputs)")
    post.add_argument("--postprocess", action="append",
                      metavar="raw|argmax|topk|sigmoid|embedding|MODULE:FUNCTION",
                      help="what the outputs become (repeatable; default raw: every output as "
                      "a column)")
    post.add_argument("--model-output", metavar="NAME",
                      help="the output argmax/topk/sigmoid/embedding read (default: the first)")
    post.add_argument("--labels", metavar="URI", help="class names, one per line in class "
                      "order (or a JSON list, or {\"id2label\": ...})")
    post.add_argument("--top-k", type=int, metavar="K", help="classes topk keeps (default 5)")
    post.add_argument("--threshold", type=float, metavar="P",
                      help="sigmoid probability a label needs (default 0.5)")
    post.add_argument("--softmax", action=argparse.BooleanOptionalAction, default=None,
                      help="argmax/topk scores as softmax probabilities (default) or raw values")
    post.add_argument("--pooling", choices=POOLINGS,
                      help="embedding: mean over the attention mask (default), cls (first "
                      "token), or none ([N, D] output)")
    post.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                      help="embedding: L2-normalize (default)")


def _split(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _items(value: Any, name: str, source: str) -> list[dict[str, Any]]:
    """A config list of processor items, each as a fresh dict (a bare string is its kind)."""
    if value is None:
        return []
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, Sequence):
        raise SpecError(f"{name} in {source} must be a list of items, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append({"kind": item})
        elif isinstance(item, Mapping):
            out.append({str(k).replace("-", "_"): copy.deepcopy(v) for k, v in item.items()})
        else:
            raise SpecError(f"{name}[{i}] in {source} must be a mapping with a kind, or a kind's "
                            f"name; got {item!r}")
    return out


def _kind(item: Mapping[str, Any]) -> str:
    kind = str(item.get("kind", ""))
    return "function" if is_function_target(kind) else kind


# Option flags: (dest, flag, item key, kinds it applies to).
_PRE_OPTIONS = (
    ("nulls", "--nulls", "nulls", ("features", "text")),
    ("fill_value", "--fill-value", "fill_value", ("features",)),
    ("tokenizer", "--tokenizer", "tokenizer", ("text",)),
    ("max_length", "--max-length", "max_length", ("text",)),
    ("truncation", "--truncation", "truncation", ("text",)),
    ("image_size", "--image-size", "size", ("image",)),
    ("resize", "--resize", "resize", ("image",)),
    ("mean", "--mean", "mean", ("image",)),
    ("std", "--std", "std", ("image",)),
    ("layout", "--layout", "layout", ("image",)),
    ("on_bad_image", "--on-bad-image", "on_error", ("image",)),
    ("image_decode", "--image-decode", "decode", ("image",)),
    ("max_image_pixels", "--max-image-pixels", "max_pixels", ("image",)),
    ("preprocess_columns", "--preprocess-columns", "columns", ("function",)),
)
_POST_OPTIONS = (
    ("model_output", "--model-output", "output", ("argmax", "topk", "sigmoid", "embedding")),
    ("labels", "--labels", "labels", ("argmax", "topk", "sigmoid")),
    ("top_k", "--top-k", "k", ("topk",)),
    ("threshold", "--threshold", "threshold", ("sigmoid",)),
    ("softmax", "--softmax", "softmax", ("argmax", "topk")),
    ("pooling", "--pooling", "pooling", ("embedding",)),
    ("normalize", "--normalize", "normalize", ("embedding",)),
)
_ADD_HINT = {"features": "--features COLUMNS", "text": "--text-column COLUMN",
             "image": "--image-column COLUMN", "function": "--preprocess MODULE:FUNCTION",
             "argmax": "--postprocess argmax", "topk": "--postprocess topk",
             "sigmoid": "--postprocess sigmoid", "embedding": "--postprocess embedding"}


def function_items(value: Any, section: str, source: str) -> list[tuple[str, str]]:
    """`(where, module:function)` of every user-function item in a config's `section` list."""
    return [(f"{section}[{i}]", str(item["kind"]))
            for i, item in enumerate(_items(value, section, source))
            if _kind(item) == "function"]


def command_line_functions(args: argparse.Namespace) -> set[str]:
    """The `module:function` targets the command line itself names (--preprocess/--postprocess)."""
    named = {_input_and(value)[1] for value in getattr(args, "preprocess_function", None) or []}
    named |= {value for value in getattr(args, "postprocess", None) or []
              if is_function_target(value)}
    return named


def _input_and(value: str) -> tuple[str | None, str]:
    name, sep, rest = value.partition("=")
    return (name.strip() or None, rest.strip()) if sep else (None, value.strip())


def apply_processing_flags(settings: dict[str, Any], args: argparse.Namespace,
                           source: str = "flags") -> None:
    """Fold the processing flags in `args` into `settings['preprocess'/'postprocess']` (in place)."""
    pre = _items(settings.get("preprocess"), "preprocess", source)
    made: dict[str, list[dict[str, Any]]] = {}
    for value in getattr(args, "features", None) or []:
        name, columns = _input_and(value)
        made.setdefault("features", []).append({"kind": "features", "columns": _split(columns),
                                                **({"input": name} if name else {})})
    if getattr(args, "text_column", None):
        made["text"] = [{"kind": "text", "column": args.text_column}]
    for value in getattr(args, "image_column", None) or []:
        name, column = _input_and(value)
        made.setdefault("image", []).append({"kind": "image", "column": column,
                                             **({"input": name} if name else {})})
    for value in getattr(args, "preprocess_function", None) or []:
        names, function = _input_and(value)
        made.setdefault("function", []).append({"kind": function,
                                                **({"inputs": _split(names)} if names else {})})
    for kind, items in made.items():
        # Keep a preset's or the config's options for this kind (its tokenizer, say).
        before = [i for i in pre if _kind(i) == kind]
        if len(before) == 1 and len(items) == 1:
            items[0] = {**before[0], **items[0]}
        pre = [i for i in pre if _kind(i) != kind] + items
    _apply_options(pre, args, _PRE_OPTIONS, "preprocessor")
    settings["preprocess"] = pre

    post = _items(settings.get("postprocess"), "postprocess", source)
    _apply_options(post, args, _POST_OPTIONS, "postprocessor")
    settings["postprocess"] = post


def _apply_options(items: list[dict[str, Any]], args: argparse.Namespace,
                   options: Sequence[tuple[str, str, str, tuple[str, ...]]], what: str) -> None:
    for dest, flag, key, kinds in options:
        value = getattr(args, dest, None)
        if value is None:
            continue
        targets = [i for i in items if _kind(i) in kinds]
        if not targets:
            hints = " or ".join(_ADD_HINT[k] for k in kinds)
            raise SpecError(f"{flag} applies to a {'/'.join(kinds)} {what}, and the job has none; "
                            f"add one with {hints}")
        if key == "columns":
            value = _split(value)
        for item in targets:
            item[key] = value


# --- config items -> specs --------------------------------------------------------------------


def _build(cls: type[Any], item: Mapping[str, Any], where: str, rename: Mapping[str, str]
           ) -> Any:
    data = {rename.get(k, k): v for k, v in item.items() if k != "kind"}
    # Filled by the driver, never set by the user.
    allowed = {f.name for f in fields(cls)} - {"tokenizer_json", "label_names",
                                               "tokenizer_limit", "model_positions"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SpecError(f"{where} has unknown setting(s) {unknown}; its settings are "
                        f"{sorted(allowed)}")
    for f in fields(cls):
        value = data.get(f.name)
        if isinstance(value, list):
            data[f.name] = tuple(value)
        elif isinstance(value, str) and f.name in ("columns", "inputs", "outputs"):
            data[f.name] = (value,)
    try:
        return cls(**data)
    except (SpecError, TypeError) as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _parse_items(value: Any, section: str, kinds: Mapping[str, type[Any]],
                 rename: Mapping[str, str], source: str) -> tuple[Any, ...]:
    """Config items (or specs already built) of `section` -> specs of `kinds`.

    An item whose kind is `module.path:function` is a user function (the `function` kind);
    `rename` maps setting names to field names for the built-in kinds.
    """
    if isinstance(value, tuple) and all(isinstance(v, tuple(kinds.values())) for v in value):
        return value
    specs: list[Any] = []
    for i, item in enumerate(_items(value, section, source)):
        kind = _kind(item)
        where = f"{section}[{i}] ({item.get('kind')}) in {source}"
        if kind == "function":
            data = dict(item)
            data.setdefault("function", str(item["kind"]))
            specs.append(_build(kinds["function"], data, where, {}))
        elif kind in kinds:
            specs.append(_build(kinds[kind], item, where, rename))
        else:
            raise SpecError(f"{where}: unknown kind {item.get('kind')!r}; kinds are "
                            f"{', '.join(k for k in kinds if k != 'function')} or "
                            "module.path:function")
    return tuple(specs)


def parse_preprocess(value: Any, source: str = "settings") -> tuple[PrepSpec, ...]:
    """Config items (or specs) -> preprocessor specs."""
    return _parse_items(value, "preprocess", PREP_KINDS, {}, source)


def parse_postprocess(value: Any, source: str = "settings") -> tuple[PostSpec, ...]:
    """Config items (or specs) -> postprocessor specs."""
    return _parse_items(value, "postprocess", POST_KINDS, {"top_k": "k"}, source)


# --- resolution against the model and the input ------------------------------------------------


@dataclass(frozen=True)
class Processing:
    """A job's processing, resolved: what feeds each model input, what the outputs become."""

    bindings: tuple[tuple[str, str], ...]  # inputs fed by a column as it is (tensor)
    preprocess: tuple[PrepSpec, ...]  # every model input's preprocessor, tensor ones included
    postprocess: tuple[PostSpec, ...]
    keep: tuple[str, ...]
    output_columns: tuple[str, ...]  # known output column names (user functions' are not)

    @property
    def is_default(self) -> bool:
        """True when nothing beyond today's tensor columns and raw outputs is configured."""
        return (all(isinstance(p, TensorPrep) for p in self.preprocess)
                and all(isinstance(p, RawPost) for p in self.postprocess))

    def to_json(self) -> dict[str, Any]:
        return {"preprocess": [p.to_json() for p in self.preprocess if not isinstance(p, TensorPrep)],
                "postprocess": [p.to_json() for p in self.postprocess]}


def _read_text(uri: str, what: str, flag: str, storage: Mapping[str, Any]) -> str:
    try:
        return read_bytes(uri, storage).decode()
    except StorageError as exc:
        raise SpecError(f"{what} '{uri}' cannot be read ({exc}); check {flag}") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(f"{what} '{uri}' is not UTF-8 text ({exc}); check {flag}") from exc


def _tokenizer_config(tokenizer_uri: str, storage: Mapping[str, Any]) -> str | None:
    """The `tokenizer_config.json` beside a `tokenizer.json` (it holds `model_max_length`)."""
    uri = posixpath.join(posixpath.dirname(tokenizer_uri), "tokenizer_config.json")
    try:
        return read_bytes(uri, storage).decode()
    except (StorageError, UnicodeDecodeError):  # optional: most tokenizers come without one
        return None


def resolve_processing(spec: JobSpec, model: ModelInfo, schema: pa.Schema, source: str,
                       resolve_bindings: Callable[..., tuple[tuple[str, str], ...]],
                       images_input: bool = False) -> Processing:
    """Fill every preprocessor's and postprocessor's defaults from the model, check them against
    `schema`, load the tokenizer and labels, and bind the inputs no preprocessor feeds."""
    from workers.text import load_tokenizer, tokenizer_limit

    metas = {m.name: m for m in model.inputs}
    column_map = spec.column_map
    claimed: dict[str, str] = {name: f"--column {name}={col}" for name, col in column_map.items()
                               if name in metas}

    def claim(names: Sequence[str], who: str) -> None:
        for name in names:
            if name in claimed:
                raise SpecError(f"model input '{name}' is fed by both {claimed[name]} and {who}; "
                                "feed each input once")
            claimed[name] = who

    def free() -> list[str]:
        left = [n for n in metas if n not in claimed]
        # An input with a column of its own name is most likely meant to read that column.
        unnamed = [n for n in left if schema.get_field_index(n) < 0]
        return unnamed if len(left) > 1 and unnamed else left

    preps = list(spec.preprocess)
    resolved: list[PrepSpec | None] = [None] * len(preps)
    # Preprocessors that name their inputs go first, so the others take what is left.
    order = sorted(range(len(preps)), key=lambda i: 0 if _names_inputs(preps[i]) else 1)
    for i in order:
        prep = preps[i]
        if isinstance(prep, TextPrep):
            text = prep.tokenizer_json or _read_text(prep.tokenizer, "tokenizer", "--tokenizer",
                                                     spec.storage)
            load_tokenizer(text, f"'{prep.tokenizer}'")
            prep = TextPrep(**{**{f.name: getattr(prep, f.name) for f in fields(prep)},
                               "tokenizer_json": text,
                               "tokenizer_limit": tokenizer_limit(
                                   text, _tokenizer_config(prep.tokenizer, spec.storage)),
                               "model_positions": model.positions})
        done = prep.resolve(metas, free(), schema, source)
        claim(done.inputs, f"the {prep.kind} preprocessor"
              + (f" '{prep.function}'" if isinstance(prep, FunctionPrep) else ""))
        resolved[i] = done
    preprocess = tuple(p for p in resolved if p is not None)
    bindings = resolve_bindings(column_map, model, schema, source,
                                fed={n for p in preprocess for n in p.inputs})

    keep = tuple(spec.keep)
    if images_input and PATH_COLUMN not in keep:
        keep = (PATH_COLUMN, *keep)  # an image directory's rows are known by their file
    if any(isinstance(p, ImagePrep) and p.on_error == "skip" for p in preprocess) and not keep:
        raise SpecError("on_error: skip records each dropped row by its kept columns, and the job "
                        "keeps none; add --keep ID_COLUMN so failed rows can be found")

    outputs = {m.name: m for m in model.outputs}
    posts: list[PostSpec] = []
    for post in spec.postprocess or (RawPost(),):
        labels_uri = getattr(post, "labels", None)
        if labels_uri and not getattr(post, "label_names", ()):
            text = _read_text(labels_uri, "labels file", "--labels", spec.storage)
            post = _with_labels(post, parse_labels(text, f"'{labels_uri}'"))
        if isinstance(post, EmbeddingPost):
            if post.mask and post.mask != "attention_mask" and post.mask not in metas:
                raise SpecError(f"embedding mask input '{post.mask}' is not one of the model's "
                                f"inputs {list(metas)}; name the attention-mask input, or null")
            posts.append(post.resolve(outputs, metas))
        else:
            posts.append(post.resolve(outputs))
    names: list[str] = []
    for post in posts:
        for name in post.column_types(outputs):
            if name in names:
                raise SpecError(f"two postprocessors make column '{name}'; give one a prefix "
                                "(prefix: in the config)")
            names.append(name)
    return Processing(bindings=bindings, preprocess=(*_tensor_preps(bindings), *preprocess),
                      postprocess=tuple(posts), keep=keep, output_columns=tuple(names))


@dataclass(frozen=True)
class GraphPooling:
    """What `pool_embeddings_in_graph` did: the model and processing to run, and a line saying
    where the pooling runs (empty when no postprocessor pools)."""

    model_bytes: bytes
    processing: Processing
    pooled: PooledModel | None
    note: str


def pool_embeddings_in_graph(model_bytes: bytes, processing: Processing) -> GraphPooling:
    """Move the first mean or cls embedding postprocessor's pooling into the model's graph.

    The rewritten model outputs the pooled `[N, D]` vectors in place of the `[N, T, D]` hidden
    states (see `workers.onnx_pooling`), and that postprocessor then reads them with pooling
    `none` (normalizing on the host as before). Skipped, with the reason in the note, where
    another postprocessor reads the hidden states or every output (raw, a function), or where
    the graph cannot be rewritten (external data, a rank other than 3, no mask input).
    """
    posts = processing.postprocess
    index = next((i for i, p in enumerate(posts)
                  if isinstance(p, EmbeddingPost) and p.pooling in ("mean", "cls")), None)
    if index is None:
        return GraphPooling(model_bytes, processing, None, "")
    post = posts[index]
    assert isinstance(post, EmbeddingPost) and post.output is not None  # resolved
    others = posts[:index] + posts[index + 1:]
    if any(isinstance(p, FunctionPost) for p in others):
        result: PooledModel | str = "a postprocess function reads every output"
    else:
        keep = {name for p in others for name in _outputs_read(p)}
        result = pool_in_graph(model_bytes, post.output, post.pooling, post.mask, keep)
    if isinstance(result, str):
        return GraphPooling(model_bytes, processing, None,
                            f"{post.pooling} pooling of output '{post.output}' runs on the host: "
                            f"{result}")
    pooled = replace(post, output=result.output, pooling="none", mask=None)
    processing = replace(processing, postprocess=(*others[:index], pooled, *others[index:]))
    return GraphPooling(result.model_bytes, processing, result, result.describe())


def _outputs_read(post: PostSpec) -> tuple[str, ...]:
    """The model outputs a resolved postprocessor (not a function) reads."""
    if isinstance(post, RawPost):
        return post.outputs  # resolved: all of them, unless told
    if isinstance(post, FunctionPost):
        raise ValueError("a postprocess function reads every output")
    return (post.output,) if post.output else ()


def _names_inputs(prep: PrepSpec) -> bool:
    if isinstance(prep, TextPrep):
        return True
    if isinstance(prep, FunctionPrep):
        return bool(prep.inputs)
    return prep.input is not None


def _tensor_preps(bindings: Sequence[tuple[str, str]]) -> tuple[TensorPrep, ...]:
    return tuple(TensorPrep(column=column, input=name) for name, column in bindings)


def _with_labels(post: PostSpec, names: tuple[str, ...]) -> PostSpec:
    if isinstance(post, ArgmaxPost | TopKPost | SigmoidPost):
        return type(post)(**{**{f.name: getattr(post, f.name) for f in fields(post)},
                             "label_names": names})
    return post


def check_preprocess_schema(preprocess: Sequence[PrepSpec], model: ModelInfo, schema: pa.Schema,
                            source: str) -> str | None:
    """Why a file with `schema` cannot feed these resolved preprocessors, or None if it can."""
    metas = {m.name: m for m in model.inputs}
    for prep in preprocess:
        if isinstance(prep, TensorPrep):
            continue  # the tensor bindings are checked with the kept columns
        try:
            prep.check_schema(schema, metas, source)
        except SpecError as exc:
            return f"schema differs: {exc}"
    return None


def output_clash(keep: Collection[str], output_columns: Collection[str]) -> None:
    """Kept columns must not share a name with an output column."""
    clash = sorted(set(keep) & set(output_columns))
    if clash:
        raise SpecError(f"--keep column(s) {clash} have the name of output column(s); outputs "
                        "become columns of those names, so keep a different column (or give the "
                        "postprocessor a prefix)")
