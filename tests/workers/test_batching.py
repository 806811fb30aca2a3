"""Length-aware batching: token-budget cuts, windows, order restored exactly, slot shapes."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from workers.batching import (
    ORDER,
    InputOrder,
    TokenBudget,
    exact_batches,
    length_batches,
    token_budget,
)
from workers.errors import BackendError, DataError
from workers.outputs import CARRY_PREFIX, carry_inputs
from workers.rowgroups import Piece
from workers.tensors import TensorMeta
from workers.text import TOKEN_COUNTS

PADS = {"input_ids": 0, "attention_mask": 0}


def budget(**kwargs: int) -> TokenBudget:
    settings = {"rows": 8, "tokens": 64, "window": 1000, "max_length": 32, **kwargs}
    return TokenBudget(inputs=("input_ids", "attention_mask"), **settings)  # type: ignore[arg-type]


def text_pieces(lengths: list[int], piece_rows: int, seed: int = 0) -> list[Piece]:
    """Pieces as the text preprocessor makes them: each padded to its own longest row, the
    row's index in `ids` (every token of row i is i * 1000 + position), the mask carried."""
    pieces = []
    for lo in range(0, len(lengths), piece_rows):
        part = lengths[lo:lo + piece_rows]
        width = max(part)
        ids = np.zeros((len(part), width), np.int64)
        mask = np.zeros((len(part), width), np.int64)
        for i, n in enumerate(part):
            ids[i, :n] = (lo + i) * 1000 + np.arange(1, n + 1)
            mask[i, :n] = 1
        feeds = {"input_ids": ids, "attention_mask": mask,
                 TOKEN_COUNTS: np.array(part, np.int64)}
        kept = pa.table({"uid": pa.array(np.arange(lo, lo + len(part)))})
        pieces.append((feeds, carry_inputs(kept, feeds, ("attention_mask",))))
    return pieces


def test_widths_round_up_to_eight_and_stop_at_max_length() -> None:
    b = budget(max_length=30)
    assert [b.width(n) for n in (0, 1, 8, 9, 24, 25, 29, 30)] == [8, 8, 8, 16, 24, 30, 30, 30]
    assert b.rows_at(8) == 8 and b.rows_at(16) == 4 and b.rows_at(30) == 2


def test_cut_holds_rows_and_tokens_and_gives_an_overlong_row_a_batch_of_its_own() -> None:
    b = budget(rows=4, tokens=48, max_length=64)
    lengths = np.array([1, 2, 3, 5, 7, 9, 10, 11, 30, 50, 60])
    bounds = b.cut(lengths)
    assert bounds[0] == (0, 4)  # four rows of width 8: the row cap binds
    for start, stop in bounds:
        width = b.width(int(lengths[stop - 1]))
        rows = stop - start
        assert rows <= 4
        assert rows * width <= 48 or rows == 1
    assert [(s, e) for s, e in bounds][-2:] == [(9, 10), (10, 11)]  # 56 and 64 wide: alone
    assert [i for s, e in bounds for i in range(s, e)] == list(range(len(lengths)))


def test_largest_batches_bound_every_batch() -> None:
    b = budget(rows=8, tokens=100, max_length=44)
    shapes = b.largest()
    assert (8, 8) in shapes and (2, 44) in shapes
    rng = np.random.default_rng(3)
    lengths = np.sort(rng.integers(0, 45, 500))
    for start, stop in b.cut(lengths):
        width = b.width(int(lengths[stop - 1]))
        assert any(stop - start <= r and width <= w for r, w in shapes if w == width)
    # The widest batch, and the one of the most tokens (3 x 32 = 96 > 2 x 44).
    assert b.warm_up() == [(2, 44), (3, 32)]
    metas = [TensorMeta("input_ids", np.dtype(np.int64), (None, None)),
             TensorMeta("attention_mask", np.dtype(np.int64), (None, None)),
             TensorMeta("extra", np.dtype(np.float32), (None, 3))]
    first = b.shapes(metas, [(8, 8)])
    assert first == [{"input_ids": (8, 8), "attention_mask": (8, 8), "extra": (8, 3)}]
    with pytest.raises(BackendError, match="input 'x' is float32 \\[N,\\?\\]: only token inputs"):
        b.shapes([TensorMeta("x", np.dtype(np.float32), (None, None))])


@pytest.mark.parametrize("window", [1000, 37, 8])
def test_length_batches_sort_cut_and_carry_every_row_once(window: int) -> None:
    rng = np.random.default_rng(window)
    lengths = [int(n) for n in rng.integers(1, 33, 173)]
    lengths[5] = 32  # the longest a row gets
    b = budget(window=window)
    seen: list[int] = []
    for batch in length_batches(iter(text_pieces(lengths, 25)), b, PADS):
        assert len(batch) == 1
        feeds, kept = batch[0]
        order = kept.column(ORDER).to_numpy()
        rows = len(order)
        width = feeds["input_ids"].shape[1]
        # Within the budget, as wide as its longest row (rounded up), never wider.
        assert rows <= 8 and (rows * width <= 64 or rows == 1)
        longest = max(lengths[i] for i in order)
        assert width == b.width(longest)
        # Every token of every row is where it was; padding is the pad value.
        for row, i in enumerate(order):
            n = lengths[i]
            np.testing.assert_array_equal(feeds["input_ids"][row, :n], i * 1000 +
                                          np.arange(1, n + 1))
            assert not feeds["input_ids"][row, n:].any()
        assert TOKEN_COUNTS not in feeds
        # The mask is carried again at the batch's width; kept columns follow their rows.
        mask = kept.column(CARRY_PREFIX + "attention_mask").combine_chunks().to_numpy_ndarray()
        np.testing.assert_array_equal(mask, feeds["attention_mask"])
        np.testing.assert_array_equal(kept.column("uid").to_numpy(), order)
        # Batches never mix windows.
        assert len({i // window for i in order}) == 1
        seen.extend(order.tolist())
    assert sorted(seen) == list(range(len(lengths)))


def test_input_order_restores_rows_exactly_from_any_batch_order() -> None:
    rng = np.random.default_rng(9)
    written: list[pa.Table] = []
    sink = InputOrder(written.append)
    # Two windows: 0..59 then 60..99, each in shuffled batches.
    for lo, hi in ((0, 60), (60, 100)):
        rows = rng.permutation(np.arange(lo, hi))
        for part in np.array_split(rows, 7):
            sink(pa.table({"value": pa.array(part * 10), ORDER: pa.array(part)}))
    sink.close()
    table = pa.concat_tables(written)
    assert table.column_names == ["value"]
    np.testing.assert_array_equal(table.column("value").to_numpy(), np.arange(100) * 10)
    assert len(written) == 2  # one write per window


def test_input_order_says_what_is_missing_and_why_widths_cannot_mix() -> None:
    sink = InputOrder(lambda table: None)
    sink(pa.table({"v": [1], ORDER: pa.array([1], pa.int64())}))
    with pytest.raises(BackendError, match=r"1 output row\(s\) after row 0 were never written"):
        sink.close()
    mixed = InputOrder(lambda table: None)
    narrow = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((1, 2, 3), np.float32))
    wide = pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((1, 4, 3), np.float32))
    mixed(pa.table({"h": narrow, ORDER: pa.array([1], pa.int64())}))
    with pytest.raises(DataError, match=r"output column 'h' is extension<arrow.fixed_shape_tensor"
                                        r".* in one batch and .* in another: batches of different "
                                        r"widths cannot be written together.*--postprocess "
                                        r"embedding.*padding: max_length"):
        mixed(pa.table({"h": wide, ORDER: pa.array([0], pa.int64())}))


def test_token_budget_comes_from_the_config_and_only_for_text_of_any_width() -> None:
    from workers.backends.base import BackendConfig
    from workers.preprocess import TextPrep
    from workers.types import WorkerConfig

    metas = [TensorMeta("input_ids", np.dtype(np.int64), (None, None)),
             TensorMeta("attention_mask", np.dtype(np.int64), (None, None))]
    text = TextPrep(column="t", tokenizer="t.json", max_length=128,
                    token_type_ids=None)

    def config(**kwargs: object) -> WorkerConfig:
        return WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(),
                            output_url="o", bindings=(), batch_size=32,
                            preprocess=(text,), **kwargs)  # type: ignore[arg-type]

    assert token_budget(config(), metas) == TokenBudget(
        rows=32, tokens=32 * 64, window=8192, max_length=128,
        inputs=("input_ids", "attention_mask"))
    assert token_budget(config(max_batch_tokens=1000, sort_window=500), metas) == TokenBudget(
        rows=32, tokens=1000, window=500, max_length=128, inputs=("input_ids", "attention_mask"))
    # A CPU engine: every padded token is work, so widths stay exact (37 is 37, not 40).
    cpu = token_budget(config(), metas, gpu=False)
    assert cpu is not None and cpu.multiple == 1 and cpu.width(37) == 37 and cpu.width(200) == 128
    assert token_budget(config(), metas, gpu=True).width(37) == 40  # type: ignore[union-attr]
    fixed = [TensorMeta(m.name, m.dtype, (None, 128)) for m in metas]
    assert token_budget(config(), fixed) is None  # one width: batches need no sorting
    assert token_budget(WorkerConfig(backend="onnxruntime", backend_config=BackendConfig(),
                                     output_url="o", bindings=(("x", "x"),)), metas) is None


def test_exact_batches_unchanged() -> None:
    pieces = [({"x": np.arange(n)}, pa.table({"k": np.arange(n)})) for n in (5, 7, 3)]
    sizes = [sum(k.num_rows for _, k in batch) for batch in exact_batches(iter(pieces), 4)]
    assert sizes == [4, 4, 4, 3]


def test_tensorrt_profiles_cover_every_batch_and_center_on_the_data() -> None:
    b = budget(rows=256, tokens=256 * 64, max_length=128)
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(3.2, 0.5, 4000).astype(int), 1, 300)
    rows, widths = b.profiles(lengths)
    assert len(rows) == len(widths) == 3
    assert widths[0][0] == 1 and widths[-1][2] == 128
    for (_, _, hi), (after, _, _) in itertools.pairwise(widths):
        assert after == hi + 1  # contiguous ranges
    # Every batch the budget cuts fits a profile: its width in range, its rows within max.
    for start, stop in b.cut(np.sort(np.clip(lengths, 1, 128))):
        width = b.width(int(np.sort(np.clip(lengths, 1, 128))[stop - 1]))
        assert any(lo <= width <= hi and stop - start <= r[2]
                   for (lo, _, hi), r in zip(widths, rows, strict=True))
    # Each profile is tuned for its median batch: opt width inside the range.
    assert all(lo <= opt <= hi for lo, opt, hi in widths)
    # No sample: one profile for every width, tuned for the widest.
    assert b.profiles(np.zeros(0)) == (((1, 128, 256),), ((1, 128, 128),))
