"""The consumed-samples sampler (exact continuation on resume, data-parallel partition), the tensor-parallel
broadcast on 2 gloo processes, and the reader's robustness to corrupt index files (fuzzed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core")

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_m2d.distillation.megatron.batches import MicroBatches  # noqa: E402
from megatron_m2d.distillation.megatron.data import build_gpt_datasets, megatron_tokenizer  # noqa: E402
from megatron_m2d.distillation.megatron.indexed import check_prefix  # noqa: E402
from megatron_m2d.errors import M2DError  # noqa: E402
from tests.megatron_cpu import megatron_cpu, run_gloo  # noqa: F401,E402  (fixture)
from tests.test_megatron_datasets import ASSETS, SEQ, write_prefix  # noqa: E402


class Samples:
    """A dataset whose sample i is filled with i: which samples a batch holds is plain to see."""
    config = type("Config", (), {"sequence_length": SEQ})

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ids = torch.full((SEQ,), i, dtype=torch.int64)
        return {"tokens": ids, "labels": ids + 1, "loss_mask": torch.ones(SEQ), "position_ids": torch.arange(SEQ)}


def drawn(batches: MicroBatches) -> list[list[int]]:
    return [batch["tokens"][:, 0].tolist() for batch in batches]


def test_resumed_sampler_yields_exactly_the_continuation():
    full = drawn(MicroBatches(Samples(103), 0, 3, 0, 1))
    assert sum(full, []) == list(range(102))  # in order; the last window, short of 3 samples, is dropped
    for consumed in (0, 3, 48, 99, 102):
        resumed = MicroBatches(Samples(103), consumed, 3, 0, 1)
        assert len(resumed) == len(full) - consumed // 3
        assert drawn(resumed) == full[consumed // 3:]
        assert resumed.consumed_samples == 102


def test_data_parallel_ranks_partition_each_global_batch():
    micro, dp, global_batch = 2, 3, 12  # 2 micro-batches per step on each of 3 ranks
    ranks = [drawn(MicroBatches(Samples(100), 0, micro, rank, dp)) for rank in range(dp)]
    steps = [sorted(sum((ranks[r][m] for r in range(dp) for m in range(s * 2, s * 2 + 2)), []))
             for s in range(len(ranks[0]) // 2)]
    assert steps == [list(range(s * global_batch, (s + 1) * global_batch)) for s in range(len(steps))]
    # the samples a step sees depend on neither the layout nor a restart
    single = sum(drawn(MicroBatches(Samples(100), 0, 4, 0, 1)), [])
    assert sum(steps, []) == single[:len(sum(steps, []))]
    assert drawn(MicroBatches(Samples(100), 36, micro, 1, dp)) == ranks[1][6:]


def test_batches_are_the_datasets_samples(megatron_cpu, tmp_path):  # noqa: F811
    tokenizer = megatron_tokenizer(ASSETS / "fixture-dense")
    prefix = write_prefix(tmp_path / "a", 10, 100)
    train, _ = build_gpt_datasets(str(prefix), "1", SEQ, 3, 40, 0, tmp_path / "run", tokenizer)
    batches = MicroBatches(train, 8, 4, 1, 2, vocab_size=tokenizer.vocab_size)
    batch = next(batches)
    for row, index in enumerate(range(12, 16)):  # consumed 8, rank 1 of 2 takes samples 12..15
        for key in ("tokens", "labels", "position_ids", "loss_mask"):
            assert batch[key][row].equal(train[index][key].to(batch[key].dtype))
    assert batch["loss_mask"].dtype == torch.float32 and batch["tokens"].dtype == torch.int64
    with pytest.raises(M2DError, match="token id .* outside the student's vocabulary of 50"):
        next(MicroBatches(train, 0, 4, 0, 1, vocab_size=50))


def _tensor_parallel_rank(rank: int, world: int, prefix: str, out: str) -> None:
    """Both ranks of one TP=2 group build (rank 1 gets no dataset) and draw the same micro-batches."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tokenizer = megatron_tokenizer(ASSETS / "fixture-dense")
    train, _ = build_gpt_datasets(prefix, "1", SEQ, 5, 24, 0, Path(out) / "run", tokenizer)
    assert (train is None) == (rank == 1)
    batches = MicroBatches(train, 4, 2, 0, 1, vocab_size=tokenizer.vocab_size)
    torch.save([next(batches) for _ in range(3)], Path(out) / f"rank{rank}.pt")
    if rank == 0:
        torch.save([train[i] for i in range(4, 10)], Path(out) / "samples.pt")
    try:  # a bad batch stops both ranks with the same error (rank 1 only learns it through the broadcast)
        next(MicroBatches(train, 0, 2, 0, 1, vocab_size=20))
    except M2DError as error:
        Path(out, f"error{rank}.txt").write_text(str(error))


def test_tensor_parallel_ranks_receive_rank_0s_batches(tmp_path):
    prefix = write_prefix(tmp_path / "a", 10, 100)
    run_gloo(2, _tensor_parallel_rank, str(prefix), str(tmp_path))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    samples = torch.load(tmp_path / "samples.pt", weights_only=True)
    for step, (a, b) in enumerate(zip(first, second)):
        assert a.keys() == b.keys() and all(a[key].equal(b[key]) for key in a)
        assert a["tokens"].equal(torch.stack([samples[2 * step + row]["tokens"] for row in range(2)]))
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in (0, 1)]
    assert errors[0] == errors[1] and "outside the student's vocabulary of 20" in errors[0]


@pytest.fixture(scope="module")
def clean_prefix(tmp_path_factory) -> tuple[bytes, bytes]:
    prefix = write_prefix(tmp_path_factory.mktemp("fuzz") / "clean", 10, 100, documents=6)
    return Path(f"{prefix}.idx").read_bytes(), Path(f"{prefix}.bin").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupt_index_is_refused_or_readable(clean_prefix, tmp_path, data):
    """Flipped bytes, truncations and extensions of either file: check_prefix refuses them with an M2DError, or
    the pair is consistent, and then megatron-core reads every document within the .bin."""
    idx, bin_ = clean_prefix
    target = data.draw(st.sampled_from(["idx", "bin"]))
    raw = bytearray(idx if target == "idx" else bin_)
    for _ in range(data.draw(st.integers(1, 4))):
        edit = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
        if edit == "flip" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif edit == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        else:
            raw += data.draw(st.binary(min_size=1, max_size=24))
    prefix = tmp_path / f"p{data.draw(st.integers(0, 10**9))}"
    Path(f"{prefix}.idx").write_bytes(bytes(raw) if target == "idx" else idx)
    Path(f"{prefix}.bin").write_bytes(bytes(raw) if target == "bin" else bin_)
    try:
        summary = check_prefix(str(prefix))
    except M2DError as error:
        assert str(error).startswith(f"data prefix {prefix}") and "\n" not in str(error)
        return
    dataset = IndexedDataset(str(prefix))
    assert [len(dataset[i]) for i in range(len(dataset))] == summary.sequence_lengths.tolist()
    assert sum(len(dataset[i]) for i in range(len(dataset))) * np.dtype(summary.dtype).itemsize == \
        Path(f"{prefix}.bin").stat().st_size
