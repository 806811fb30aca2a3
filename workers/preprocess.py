"""Preprocessors: a batch's columns -> model inputs (`tensor`, `features`, `text`, `image`, user function).

Each kind is a frozen spec that crosses from the driver to the actors. The driver `resolve`s a
spec against the model and the input schema (fills defaults from the model, checks column types,
loads the tokenizer) before any actor starts; an actor builds a `Preprocessor` from the resolved
specs and calls it on every table of rows.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workers.convert import check_feed, column_to_tensor
from workers.errors import DataError, SpecError
from workers.functions import is_function_target, load_function
from workers.sched import helper_nice, lower_this_thread
from workers.tensors import TensorMeta
from workers.text import TOKEN_COUNTS, TokenizerFile

if TYPE_CHECKING:
    from workers.gpuimages import GpuImages
    from workers.helpers import HelperProcesses

Batch = dict[str, np.ndarray]
NULL_POLICIES = ("fail", "fill")
LAYOUTS = ("auto", "NCHW", "NHWC")
IMAGE_MODES = ("RGB", "L")
BAD_IMAGE_POLICIES = ("fail", "skip")
#: Where images decode: `cpu`, `gpu` (nvImageCodec, GPU actors), or `auto` (docs/jobs.md).
IMAGE_DECODES = ("auto", "cpu", "gpu")
PADDINGS = ("longest", "max_length")
DEFAULT_MAX_LENGTH = 512  # BERT's position table; a model with a fixed length uses its own
#: The fewest rows of text a helper process is sent at once: each task costs the actor ~0.2 ms
#: (pickling, the pool's threads), and a helper tokenizes a short review in ~40 us.
TASK_ROWS = 256
#: Tables of text tokenized at once on the helper processes (`Preprocessor.concurrency`).
CONCURRENT_TABLES = 3


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise SpecError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"{name} must be an integer >= 1, got {value!r}")


def _names(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v
                                                            for v in value):
        raise SpecError(f"{name} must be a non-empty list of column names, got {value!r}")


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _column_type(schema: pa.Schema, column: str, role: str, source: str) -> pa.DataType:
    index = schema.get_field_index(column)
    if index < 0:
        raise SpecError(f"column '{column}' ({role}) is not in {source}; its columns are "
                        f"{schema.names}")
    return schema.field(index).type


def _one_input(spec_input: str | None, kind: str, flag: str, metas: Mapping[str, TensorMeta],
               free: Sequence[str]) -> str:
    """The model input a single-input preprocessor feeds: the one named, else the only one left."""
    if spec_input is not None:
        if spec_input not in metas:
            raise SpecError(f"the {kind} preprocessor feeds input '{spec_input}', but the model's "
                            f"inputs are {list(metas)}; name one of those")
        return spec_input
    if len(free) == 1:
        return free[0]
    left = f"inputs {list(free)} are left" if free else "no input is left"
    raise SpecError(f"the {kind} preprocessor does not say which model input it feeds, and {left}; "
                    f"name it with {flag} INPUT=COLUMN (or input: in the config)")


def _fixed(meta: TensorMeta, axis: int) -> int | None:
    return meta.shape[axis] if axis < len(meta.shape) else None


class _Spec:
    """Shared behaviour of preprocessor specs."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class TensorPrep(_Spec):
    """A tensor, list or numeric column fed as it is: reshaped to the input's rows and cast."""

    kind: ClassVar[str] = "tensor"
    column: str
    input: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if self.input else ()

    def resolve(self, metas: Mapping[str, TensorMeta], free: Sequence[str], schema: pa.Schema,
                source: str) -> TensorPrep:
        resolved = replace(self, input=_one_input(self.input, "tensor", "--column", metas, free))
        resolved.check_schema(schema, metas, source)
        return resolved

    def check_schema(self, schema: pa.Schema, metas: Mapping[str, TensorMeta], source: str
                     ) -> None:
        kind = _column_type(schema, self.column, f"for model input '{self.input}'", source)
        check_feed(self.column, kind, metas[str(self.input)])


@dataclass(frozen=True)
class FeaturesPrep(_Spec):
    """Several numeric columns (any int, float or bool type) stacked into one `[N, F]` input.

    `columns` may hold glob patterns (`mean_*`), expanded in schema order when resolved. Nulls
    fail the shard with the column named (`nulls="fail"`) or become `fill_value` (`"fill"`).
    """

    kind: ClassVar[str] = "features"
    columns: tuple[str, ...] = ()
    input: str | None = None
    nulls: str = "fail"
    fill_value: float = 0.0

    def __post_init__(self) -> None:
        _names("features columns", self.columns)
        _choice("features nulls", self.nulls, NULL_POLICIES)
        if not isinstance(self.fill_value, int | float) or isinstance(self.fill_value, bool):
            raise SpecError(f"features fill_value must be a number, got {self.fill_value!r}")

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if self.input else ()

    def expand(self, schema: pa.Schema, source: str) -> tuple[str, ...]:
        """Column names with glob patterns replaced by the matching columns, each once."""
        out: dict[str, None] = {}
        for pattern in self.columns:
            if any(ch in pattern for ch in "*?["):
                matched = [n for n in schema.names if fnmatch.fnmatchcase(n, pattern)]
                if not matched:
                    raise SpecError(f"features pattern '{pattern}' matches no column of {source}; "
                                    f"its columns are {schema.names}")
                out.update(dict.fromkeys(matched))
            else:
                out[pattern] = None
        return tuple(out)

    def resolve(self, metas: Mapping[str, TensorMeta], free: Sequence[str], schema: pa.Schema,
                source: str) -> FeaturesPrep:
        name = _one_input(self.input, "features", "--features", metas, free)
        resolved = replace(self, input=name, columns=self.expand(schema, source))
        resolved.check_schema(schema, metas, source)
        return resolved

    def check_schema(self, schema: pa.Schema, metas: Mapping[str, TensorMeta], source: str
                     ) -> None:
        meta = metas[str(self.input)]
        if len(meta.shape) != 2:
            raise SpecError(f"the features preprocessor stacks columns into [N, F], but input "
                            f"'{meta.name}' of the model wants {meta.describe()}; feed that input "
                            "with --column, or stack features for a [N, F] input")
        width = meta.shape[1]
        if width is not None and width != len(self.columns):
            raise SpecError(f"the features preprocessor stacks {len(self.columns)} column(s) "
                            f"{list(self.columns)}, but input '{meta.name}' of the model wants "
                            f"{meta.describe()} ({width} features); list exactly {width} columns")
        for column in self.columns:
            kind = _column_type(schema, column, f"a feature of input '{meta.name}'", source)
            if not _is_numeric(kind):
                raise SpecError(f"feature column '{column}' is {kind}, but features must be "
                                "int, float or bool columns; cast it or drop it from the list")
            if pa.types.is_floating(kind) and meta.dtype.kind in "iub":
                raise SpecError(f"feature column '{column}' is {kind}, but input '{meta.name}' of "
                                f"the model wants {meta.describe()}; cast the column to an "
                                "integer type")


@dataclass(frozen=True)
class TextPrep(_Spec):
    """A string column tokenized with a `tokenizer.json` into `input_ids`, `attention_mask`, ...

    Rows are truncated to `max_length` and padded to the batch's longest row, or to the model's
    sequence length when the model fixes it. `attention_mask` and `token_type_ids` are fed only
    when the model has inputs of those names. `tokenizer_json` is the file's text, read by the
    driver so actors never need the file.

    Unset, `max_length` is the tokenizer's own limit (`tokenizer_limit`: its truncation setting,
    or `model_max_length` from the `tokenizer_config.json` beside it), capped at the model's
    (its fixed sequence length, or `model_positions`: the rows of its position embedding). A
    `max_length` above the model's limit is an error: positions past it have no embedding.
    """

    kind: ClassVar[str] = "text"
    column: str = ""
    tokenizer: str = ""
    max_length: int | None = None
    truncation: bool = True
    padding: str = "longest"
    nulls: str = "fail"
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    token_type_ids: str | None = "token_type_ids"
    tokenizer_json: str = field(default="", repr=False, compare=False)
    #: Filled by the driver before `resolve` (never set by the user): the tokenizer's limit and
    #: the model's position-embedding size, each with where it comes from.
    tokenizer_limit: tuple[int, str] | None = field(default=None, repr=False, compare=False)
    model_positions: tuple[int, str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise SpecError("the text preprocessor needs the text column; pass --text-column "
                            "COLUMN (or column: in the config)")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise SpecError("the text preprocessor needs a tokenizer; pass --tokenizer "
                            "tokenizer.json (or tokenizer: in the config)")
        if self.max_length is not None:
            _positive_int("text max_length", self.max_length)
        _choice("text padding", self.padding, PADDINGS)
        _choice("text nulls", self.nulls, NULL_POLICIES)
        if not isinstance(self.truncation, bool):
            raise SpecError(f"text truncation must be true or false, got {self.truncation!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(n for n in (self.input_ids, self.attention_mask, self.token_type_ids) if n)

    def resolve(self, metas: Mapping[str, TensorMeta], free: Sequence[str], schema: pa.Schema,
                source: str) -> TextPrep:
        if self.input_ids not in metas:
            raise SpecError(f"the text preprocessor feeds token ids to input '{self.input_ids}', "
                            f"but the model's inputs are {list(metas)}; set input_ids: to the "
                            "model's token-ids input")
        optional: dict[str, str | None] = {}
        for key, default in (("attention_mask", "attention_mask"),
                             ("token_type_ids", "token_type_ids")):
            name = getattr(self, key)
            if name is not None and name not in metas:
                if name != default:
                    raise SpecError(f"the text preprocessor feeds {key} to input '{name}', but "
                                    f"the model's inputs are {list(metas)}; set {key}: to one "
                                    "of those, or to null")
                name = None  # the model does without it
            optional[key] = name
        fixed = {d for n in (self.input_ids, *optional.values())
                 if n and (d := _fixed(metas[n], 1)) is not None}
        if len(fixed) > 1:
            raise SpecError(f"the model's token inputs have different sequence lengths {sorted(fixed)}"
                            "; they must agree")
        length = fixed.pop() if fixed else None
        limit = self.model_limit(length, metas[self.input_ids])
        if self.max_length is not None:
            if limit is not None and self.max_length > limit[0]:
                raise SpecError(f"text max_length {self.max_length} (--max-length) is above the "
                                f"model's limit of {limit[0]} tokens ({limit[1]}); set "
                                f"--max-length {limit[0]} or less")
            max_length = self.max_length
        else:
            known = [v for v in (self.tokenizer_limit, limit) if v is not None]
            max_length = min(v[0] for v in known) if known else DEFAULT_MAX_LENGTH
        resolved = replace(self, max_length=max_length, attention_mask=optional["attention_mask"],
                           token_type_ids=optional["token_type_ids"])
        resolved.check_schema(schema, metas, source)
        return resolved

    def token_width(self, metas: Mapping[str, TensorMeta]) -> int | None:
        """The widest batch this (resolved) spec makes when the width follows the rows; None
        when every batch has one width (the model fixes it, or padding: max_length)."""
        if self.padding == "max_length" or _fixed(metas[self.input_ids], 1) is not None:
            return None
        return self.max_length or DEFAULT_MAX_LENGTH

    def model_limit(self, length: int | None, ids: TensorMeta) -> tuple[int, str] | None:
        """The most tokens the model takes, and why: its fixed length, else its position table."""
        if length is not None:
            return length, f"input '{ids.name}' is {ids.describe()}"
        return self.model_positions

    def limits_text(self) -> str:
        """The resolved `max_length` and the limits it was chosen from, for the job's log."""
        known = [f"{v[0]} ({v[1]})" for v in (self.tokenizer_limit, self.model_positions) if v]
        return f"max_length {self.max_length}" + (f"; limits: {', '.join(known)}" if known else "")

    def check_schema(self, schema: pa.Schema, metas: Mapping[str, TensorMeta], source: str
                     ) -> None:
        kind = _column_type(schema, self.column, "the text to tokenize", source)
        if not _is_string(kind):
            raise SpecError(f"text column '{self.column}' is {kind}, but the text preprocessor "
                            "tokenizes strings; pick a string column or cast it")
        for name in self.inputs:
            meta = metas[name]
            if len(meta.shape) != 2 or meta.dtype.kind not in "iu":
                raise SpecError(f"the text preprocessor feeds int [N, L] token arrays, but input "
                                f"'{name}' of the model wants {meta.describe()}; feed that input "
                                "another way")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        text = out.pop("tokenizer_json")
        # Derived from the tokenizer and the model, both already in the job's identity.
        out.pop("tokenizer_limit")
        out.pop("model_positions")
        out["tokenizer_sha256"] = hashlib.sha256(text.encode()).hexdigest() if text else None
        return out


@dataclass(frozen=True)
class ImagePrep(_Spec):
    """A binary column of encoded images (JPEG, PNG, ...) -> normalized pixels for one input.

    Each image is decoded, converted to RGB (or L for one-channel models), its shorter side
    resized to `resize`, center-cropped to `size` (height, width), scaled to [0, 1] and
    normalized by `mean`/`std` per channel, laid out NCHW or NHWC in the input's dtype. Unset
    fields come from the model's input shape. `on_error="skip"` drops a row whose image does
    not decode (recorded in the manifest) instead of failing the shard.

    `draft`: a JPEG larger than needed decodes at a reduced scale (libjpeg's DCT scaling, the
    largest reduction that keeps the resized size), then resizes the rest of the way.
    `max_pixels`: images with more pixels are bad rows, never decoded (default
    `workers.images.default_max_pixels(resize)`). `decode`: `cpu`, `gpu` (nvImageCodec on the
    actor's GPU, straight into the device batch), or `auto` (gpu where nvImageCodec imports
    and decodes on the actor's GPU, else cpu).
    """

    kind: ClassVar[str] = "image"
    column: str = ""
    input: str | None = None
    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "auto"
    mode: str | None = None
    on_error: str = "fail"
    draft: bool = True
    max_pixels: int | None = None
    decode: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise SpecError("the image preprocessor needs the image column; pass --image-column "
                            "COLUMN (or column: in the config)")
        if self.size is not None:
            if not isinstance(self.size, tuple) or len(self.size) != 2:
                raise SpecError(f"image size must be [height, width], got {self.size!r}")
            for value in self.size:
                _positive_int("image size", value)
        if self.resize is not None:
            _positive_int("image resize", self.resize)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, tuple) or not value or not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
                raise SpecError(f"image {name} must be a list of numbers (one per channel), "
                                f"got {value!r}")
        if self.std is not None and any(v == 0 for v in self.std):
            raise SpecError(f"image std must not contain 0, got {list(self.std)}")
        _choice("image layout", self.layout, LAYOUTS)
        if self.mode is not None:
            _choice("image mode", self.mode, IMAGE_MODES)
        _choice("image on_error", self.on_error, BAD_IMAGE_POLICIES)
        _choice("image decode", self.decode, IMAGE_DECODES)
        if self.max_pixels is not None:
            _positive_int("image max_pixels", self.max_pixels)
        if not isinstance(self.draft, bool):
            raise SpecError(f"image draft must be true or false, got {self.draft!r}")

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.column,)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input,) if self.input else ()

    def _layout(self, meta: TensorMeta) -> str:
        if len(meta.shape) != 4:
            raise SpecError(f"the image preprocessor makes [N, C, H, W] or [N, H, W, C] pixels, "
                            f"but input '{meta.name}' of the model wants {meta.describe()}; feed "
                            "it another way")
        if self.layout != "auto":
            return self.layout
        first, last = meta.shape[1] in (1, 3), meta.shape[3] in (1, 3)
        if first and not last:
            return "NCHW"
        if last and not first:
            return "NHWC"
        raise SpecError(f"cannot tell whether input '{meta.name}' ({meta.describe()}) is NCHW or "
                        "NHWC; pass --layout NCHW or --layout NHWC")

    def resolve(self, metas: Mapping[str, TensorMeta], free: Sequence[str], schema: pa.Schema,
                source: str) -> ImagePrep:
        meta = metas[_one_input(self.input, "image", "--image-column", metas, free)]
        layout = self._layout(meta)
        c_axis, h_axis, w_axis = (1, 2, 3) if layout == "NCHW" else (3, 1, 2)
        channels = meta.shape[c_axis]
        if channels not in (None, 1, 3):
            raise SpecError(f"input '{meta.name}' ({meta.describe()}, {layout}) has {channels} "
                            "channels; the image preprocessor makes 3 (RGB) or 1 (L)")
        mode = self.mode or ("L" if channels == 1 else "RGB")
        want = 1 if mode == "L" else 3
        if channels is not None and channels != want:
            raise SpecError(f"image mode {mode} gives {want} channel(s), but input '{meta.name}' "
                            f"wants {channels} ({meta.describe()}, {layout}); set mode to "
                            f"{'L' if channels == 1 else 'RGB'}")
        model_size = (meta.shape[h_axis], meta.shape[w_axis])
        size = self.size
        if size is None:
            if None in model_size:
                raise SpecError(f"input '{meta.name}' ({meta.describe()}) has a dynamic height or "
                                "width; pass --image-size H,W (or size: in the config)")
            size = (int(model_size[0] or 0), int(model_size[1] or 0))
        elif any(m is not None and m != s for m, s in zip(model_size, size, strict=True)):
            raise SpecError(f"image size {list(size)} does not fit input '{meta.name}' "
                            f"({meta.describe()}, {layout}); set size to the model's height "
                            "and width")
        resize = self.resize or max(size)
        if resize < max(size):
            raise SpecError(f"image resize {resize} is smaller than the crop {list(size)}; the "
                            f"shorter side must be resized to at least {max(size)}")
        mean = self.mean or (0.0,) * want
        std = self.std or (1.0,) * want
        for name, value in (("mean", mean), ("std", std)):
            if len(value) != want:
                raise SpecError(f"image {name} has {len(value)} value(s), but mode {mode} has "
                                f"{want} channel(s); give one per channel")
        if meta.dtype.kind in "iub" and (self.mean or self.std):
            raise SpecError(f"input '{meta.name}' wants {meta.describe()}: raw integer pixels, "
                            "which cannot be normalized; drop mean and std")
        from workers.images import default_max_pixels

        resolved = replace(self, input=meta.name, size=size, resize=resize, mean=tuple(mean),
                           std=tuple(std), layout=layout, mode=mode,
                           max_pixels=self.max_pixels or default_max_pixels(resize))
        resolved.check_schema(schema, metas, source)
        return resolved

    def check_schema(self, schema: pa.Schema, metas: Mapping[str, TensorMeta], source: str
                     ) -> None:
        kind = _column_type(schema, self.column, "the encoded images", source)
        if not _is_binary(kind):
            raise SpecError(f"image column '{self.column}' is {kind}, but the image preprocessor "
                            "decodes binary columns of encoded images (JPEG, PNG); pick a binary "
                            "column, or feed decoded pixels with --column")


@dataclass(frozen=True)
class FunctionPrep(_Spec):
    """A user function `module:function` called with a table of `columns`.

    It returns an array (when it feeds one input) or a mapping of input name -> array, each with
    one row per table row; arrays are cast to the inputs' dtypes and checked against their shapes.
    By default it feeds every model input no other preprocessor feeds.
    """

    kind: ClassVar[str] = "function"
    function: str = ""
    columns: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.function, str) or not is_function_target(self.function):
            raise SpecError(f"preprocess function {self.function!r} is not an import path; write "
                            "module.path:function")
        _names(f"the columns of preprocess function '{self.function}'", self.columns)

    def resolve(self, metas: Mapping[str, TensorMeta], free: Sequence[str], schema: pa.Schema,
                source: str) -> FunctionPrep:
        unknown = [n for n in self.inputs if n not in metas]
        if unknown:
            raise SpecError(f"preprocess function '{self.function}' feeds input(s) {unknown}, but "
                            f"the model's inputs are {list(metas)}")
        inputs = self.inputs or tuple(free)
        if not inputs:
            raise SpecError(f"preprocess function '{self.function}' has no model input left to "
                            "feed; name its inputs, or feed fewer inputs with other preprocessors")
        load_function(self.function, "preprocess function")
        resolved = replace(self, inputs=inputs)
        resolved.check_schema(schema, metas, source)
        return resolved

    def check_schema(self, schema: pa.Schema, metas: Mapping[str, TensorMeta], source: str
                     ) -> None:
        for column in self.columns:
            _column_type(schema, column, f"read by preprocess function '{self.function}'", source)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.function, "columns": list(self.columns), "inputs": list(self.inputs)}


PrepSpec = TensorPrep | FeaturesPrep | TextPrep | ImagePrep | FunctionPrep
PREP_KINDS: dict[str, type[PrepSpec]] = {cls.kind: cls for cls in (
    TensorPrep, FeaturesPrep, TextPrep, ImagePrep, FunctionPrep)}


# --- running in the actor ---------------------------------------------------------------------


@dataclass
class Prepared:
    """Model inputs for the rows that survived, and the rows (batch index) that did not, with why."""

    feeds: Batch
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (column, reason)
    rows: int = 0

    def good_rows(self) -> np.ndarray:
        """Indices of the rows the feeds hold."""
        return np.setdiff1d(np.arange(self.rows), np.fromiter(self.failed, np.int64))


Step = Callable[[pa.Table, int], tuple[Batch, dict[int, tuple[str, str]]]]


def stack_features(table: pa.Table, columns: Sequence[str], meta: TensorMeta, nulls: str = "fail",
                   fill_value: float = 0.0, offset: int = 0) -> np.ndarray:
    """Stack numeric columns into `[N, len(columns)]` of the input's dtype, nulls per the policy."""
    out = np.empty((table.num_rows, len(columns)), meta.dtype)
    for j, name in enumerate(columns):
        column = table.column(name)
        if column.null_count:
            if nulls == "fail":
                first = int(pc.index(column.is_null(), True).as_py())
                raise DataError(f"feature column '{name}' has {column.null_count} null value(s) "
                                f"(the first at row {offset + first} of the shard); fill or filter "
                                "them, or set nulls: fill (--nulls fill --fill-value X)")
            column = pc.if_else(column.is_null(), pa.scalar(float(fill_value), pa.float64()),
                                column.cast(pa.float64()))
        out[:, j] = column.to_numpy()
    return out


def _check_fed(function: str, name: str, value: Any, meta: TensorMeta, rows: int) -> np.ndarray:
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise DataError(f"preprocess function '{function}' returned {type(value).__name__} for "
                        f"input '{name}', which is not an array ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise DataError(f"preprocess function '{function}' returned {array.dtype} for input "
                        f"'{name}'; return numbers ({meta.describe()})")
    if array.ndim != len(meta.shape) or array.shape[0] != rows or any(
            want is not None and got != want
            for got, want in zip(array.shape[1:], meta.row_shape, strict=True)):
        raise DataError(f"preprocess function '{function}' returned shape {list(array.shape)} for "
                        f"input '{name}' and a batch of {rows} rows; the model wants "
                        f"{meta.describe()} with N={rows}")
    return np.ascontiguousarray(array, dtype=meta.dtype)


class Preprocessor:
    """Runs resolved preprocessor specs over tables of rows; the heavy ones share a thread pool.

    Call it with a table and the table's first row index in the shard (for messages). Close it
    (or use `with`) to stop the pool.
    """

    def __init__(self, specs: Sequence[PrepSpec], metas: Mapping[str, TensorMeta],
                 threads: int = 1, images: GpuImages | None = None,
                 processes: HelperProcesses | None = None, image_tables: int = 1) -> None:
        """`images`: the actor's GPU image decoding; inputs it decodes become device fills.
        `processes`: helper processes its owner keeps (an actor's, for all its shards), which
        tokenize text and decode the images Pillow decodes when `threads` > 1; without them,
        this preprocessor starts its own at first use and closes them.
        `image_tables`: tables of images its owner may decode at once on the CPU threads
        (`concurrency`; `workers.sched.IMAGE_TABLES` in an actor).
        """
        from workers.helpers import HelperProcesses

        self.specs = tuple(specs)
        self.metas = dict(metas)
        self.threads = max(1, threads)
        self.images = images
        #: True when an input is much larger than its column (decoded images, token arrays).
        self.expands = any(isinstance(s, ImagePrep | TextPrep) for s in self.specs)
        #: Token inputs whose width follows the rows (text of any length), and the value each
        #: is padded with; their feeds come with the rows' token counts (`text.TOKEN_COUNTS`).
        self.token_pads: dict[str, int] = {}
        # Below the threads that feed the GPU (`workers.sched`): decoding takes what they leave.
        self._pool: Executor | None = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="prep",
                               initializer=lower_this_thread, initargs=(helper_nice(),))
            if self.expands and self.threads > 1 else None)
        # Tokenizing and the formats Pillow decodes (not JPEG) go to helper processes: both
        # hold the GIL for most of their work (`workers.helpers`).
        helped = self._pool is not None and uses_helpers(self.specs)
        self._own_processes = helped and processes is None
        self._processes = (processes or HelperProcesses(self.threads)) if helped else None
        self._token_files: list[TokenizerFile] = []
        self._steps: list[Step] = [self._build(spec) for spec in self.specs]
        #: Tables its owner may prepare at once (`workers.sources.ShardInputs`), when every step
        #: is safe to run on several threads: text on helper processes, and images the CPU
        #: threads decode (not nvImageCodec's, which keeps one decoder; no user functions: they
        #: may not be thread-safe).
        self.concurrency = 1
        if self._processes is not None and tokenizes(self.specs) and all(
                isinstance(s, TextPrep | TensorPrep | FeaturesPrep) for s in self.specs):
            self.concurrency = CONCURRENT_TABLES
        elif self._pool is not None and (images is None or images.decoder == "turbo") and all(
                isinstance(s, ImagePrep | TensorPrep | FeaturesPrep) for s in self.specs):
            # Images the CPU threads decode (libjpeg-turbo, Pillow), whole or for the GPU to
            # resize: one table at a time, the threads idle at every table's end while its
            # slowest chunk finishes and while the next is sliced and handed out.
            self.concurrency = max(1, image_tables)

    def _build(self, spec: PrepSpec) -> Step:
        if isinstance(spec, TensorPrep):
            return self._tensor(spec)
        if isinstance(spec, FeaturesPrep):
            return self._features(spec)
        if isinstance(spec, TextPrep):
            return self._text(spec)
        if isinstance(spec, ImagePrep):
            return self._image(spec)
        return self._function(spec)

    def _meta(self, name: str | None) -> TensorMeta:
        if name is None or name not in self.metas:
            raise SpecError(f"preprocessor input {name!r} is not one of the model's inputs "
                            f"{list(self.metas)}; resolve the specs against the model first")
        return self.metas[name]

    def _tensor(self, spec: TensorPrep) -> Step:
        meta = self._meta(spec.input)

        def run(table: pa.Table, offset: int) -> tuple[Batch, dict[int, tuple[str, str]]]:
            return {meta.name: column_to_tensor(spec.column, table.column(spec.column), meta)}, {}
        return run

    def _features(self, spec: FeaturesPrep) -> Step:
        meta = self._meta(spec.input)

        def run(table: pa.Table, offset: int) -> tuple[Batch, dict[int, tuple[str, str]]]:
            return {meta.name: stack_features(table, spec.columns, meta, spec.nulls,
                                              spec.fill_value, offset)}, {}
        return run

    def _text(self, spec: TextPrep) -> Step:
        from workers.storage import read_bytes
        from workers.text import TextEncoder

        metas = {n: self._meta(n) for n in spec.inputs}
        text = spec.tokenizer_json or read_bytes(spec.tokenizer).decode()
        dynamic = spec.token_width(metas) is not None
        length = None if dynamic else _fixed(metas[spec.input_ids], 1) or spec.max_length
        encoder = TextEncoder(text, f"'{spec.tokenizer}'", spec.max_length or DEFAULT_MAX_LENGTH,
                              spec.truncation, length)
        names = {"ids": spec.input_ids, "attention_mask": spec.attention_mask,
                 "type_ids": spec.token_type_ids}
        keys = tuple(k for k, n in names.items() if n is not None)
        pads = encoder.pads
        if dynamic:
            # Rows of any length: the batcher may sort them and cut each batch at its own width.
            self.token_pads.update({n: pads[k] for k, n in names.items() if n is not None})
        dtype = metas[spec.input_ids].dtype
        helper = None
        if self._processes is not None:
            helper = TokenizerFile(text, f"'{spec.tokenizer}'", encoder.max_length,
                                   spec.truncation, length)
            self._token_files.append(helper)

        def run(table: pa.Table, offset: int) -> tuple[Batch, dict[int, tuple[str, str]]]:
            column = table.column(spec.column)
            if column.null_count:
                if spec.nulls == "fail":
                    first = int(pc.index(column.is_null(), True).as_py())
                    raise DataError(f"text column '{spec.column}' has {column.null_count} null "
                                    f"value(s) (the first at row {offset + first} of the shard); "
                                    "fill or filter them, or set nulls: fill (--nulls fill) to "
                                    "tokenize them as empty strings")
                column = pc.fill_null(column, "")
            ragged = self._encode(encoder, helper, column.to_pylist(), spec.column, offset, keys)
            feeds = {names[k]: v for k, v in ragged.padded(encoder.width(ragged.lengths), pads,
                                                           dtype).items()}
            out = {n: v.astype(metas[n].dtype, copy=False) for n, v in feeds.items()
                   if n is not None}
            if dynamic:
                out[TOKEN_COUNTS] = ragged.lengths
            return out, {}
        return run

    def _encode(self, encoder: Any, helper: TokenizerFile | None, texts: list[str], column: str,
                offset: int, keys: tuple[str, ...]) -> Any:
        """Rows tokenized unpadded, in chunks: on the helper processes when there are some
        (`workers.helpers`: tokenizing holds the GIL for most of a short row's cost), else on
        the thread pool, so one chunk's conversion to arrays (which holds the GIL) at least
        overlaps the next chunk's tokenizing (which does not)."""
        from workers.text import Ragged, encode_in_helper

        step = max(TASK_ROWS, -(-len(texts) // self.threads))
        if self._pool is None or len(texts) <= step:
            return encoder.encode_ragged(texts, column, offset, keys)
        if self._processes is not None and helper is not None:  # helpers imply the pool
            pool = self._processes.pool()
            futures = [pool.submit(encode_in_helper, *helper.args, texts[lo:lo + step], column,
                                   offset + lo, keys)
                       for lo in range(0, len(texts), step)]
        else:
            futures = [self._pool.submit(encoder.encode_ragged, texts[lo:lo + step], column,
                                         offset + lo, keys)
                       for lo in range(0, len(texts), step)]
        return Ragged.concat([f.result() for f in futures])

    def _image(self, spec: ImagePrep) -> Step:
        from workers.images import PATH_COLUMN, ImageDecoder

        meta = self._meta(spec.input)
        if spec.size is None or spec.resize is None or spec.mode is None or spec.layout == "auto":
            raise SpecError(f"image preprocessor for column '{spec.column}' is not resolved "
                            "against the model; resolve it first")
        on_gpu = self.images is not None and meta.name in self.images.inputs
        # On the GPU path the CPU decodes only the rows the GPU cannot, to raw pixels that the
        # GPU normalizes with the rest.
        decoder = ImageDecoder(spec.mode, spec.size, spec.resize, spec.draft, self._pool,
                               self.threads, mean=None if on_gpu else spec.mean,
                               std=None if on_gpu else spec.std,
                               layout="NHWC" if on_gpu else spec.layout,
                               dtype=np.dtype(np.uint8) if on_gpu else meta.dtype,
                               max_pixels=spec.max_pixels, processes=self._processes)
        images = self.images

        def run(table: pa.Table, offset: int) -> tuple[Batch, dict[int, tuple[str, str]]]:
            values = table.column(spec.column).to_pylist()
            if images is not None and on_gpu:
                pixels, bad = images.decode(meta.name, values, decoder)
            else:
                pixels, bad = decoder.decode(values)
            if bad and spec.on_error == "fail":
                row, reason = next(iter(sorted(bad.items())))
                where = (f" ('{table.column(PATH_COLUMN)[row].as_py()}')"
                         if PATH_COLUMN in table.column_names else "")
                raise DataError(f"image column '{spec.column}' row {offset + row} of the shard"
                                f"{where}: {reason}; {len(bad)} bad image(s) in this batch; set "
                                "on_error: skip (--on-bad-image skip) to drop bad rows and "
                                "record them")
            failed = {row: (spec.column, reason) for row, reason in bad.items()}
            return {meta.name: pixels}, failed
        return run

    def _function(self, spec: FunctionPrep) -> Step:
        fn = load_function(spec.function, "preprocess function")
        metas = {n: self._meta(n) for n in spec.inputs}

        def run(table: pa.Table, offset: int) -> tuple[Batch, dict[int, tuple[str, str]]]:
            rows = table.num_rows
            result = fn(table.select(list(spec.columns)))
            if not isinstance(result, Mapping):
                if len(metas) != 1:
                    raise DataError(f"preprocess function '{spec.function}' returned "
                                    f"{type(result).__name__}, but it feeds {list(metas)}; return "
                                    "a dict of input name -> array")
                result = {next(iter(metas)): result}
            if set(result) != set(metas):
                raise DataError(f"preprocess function '{spec.function}' returned inputs "
                                f"{sorted(map(str, result))}, but it feeds {sorted(metas)}; return "
                                "exactly those")
            return {name: _check_fed(spec.function, name, result[name], meta, rows)
                    for name, meta in metas.items()}, {}
        return run

    def __call__(self, table: pa.Table, offset: int = 0) -> Prepared:
        """Model inputs for `table`; rows that failed (only with on_error=skip) are dropped."""
        feeds: Batch = {}
        failed: dict[int, tuple[str, str]] = {}
        for step in self._steps:
            fed, bad = step(table, offset)
            if TOKEN_COUNTS in feeds and TOKEN_COUNTS in fed:  # two text columns: the longer
                fed[TOKEN_COUNTS] = np.maximum(feeds[TOKEN_COUNTS], fed[TOKEN_COUNTS])
            feeds.update(fed)
            for row, why in bad.items():
                failed.setdefault(row, why)
        prepared = Prepared(feeds, failed, table.num_rows)
        if failed:
            keep = prepared.good_rows()
            prepared.feeds = {name: np.ascontiguousarray(array[keep])
                              for name, array in feeds.items()}
        return prepared

    def close(self) -> None:
        for file in self._token_files:
            file.close()
        if self._processes is not None and self._own_processes:
            self._processes.close()
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def uses_helpers(specs: Sequence[PrepSpec]) -> bool:
    """True when these specs may send work to helper processes (text; images Pillow decodes)."""
    return any(isinstance(s, ImagePrep | TextPrep) for s in specs)


def tokenizes(specs: Sequence[PrepSpec]) -> bool:
    """True when these specs tokenize text (all of it goes to helper processes, given some)."""
    return any(isinstance(s, TextPrep) for s in specs)


def tensor_preps(bindings: Sequence[tuple[str, str]]) -> tuple[TensorPrep, ...]:
    """Today's (model input, column) bindings as tensor preprocessors."""
    return tuple(TensorPrep(column=column, input=name) for name, column in bindings)

