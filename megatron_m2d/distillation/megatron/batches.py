"""Micro-batches for one data-parallel rank: the consumed-samples sampler and the tensor-parallel broadcast.

Both exist in Megatron-LM (MegatronPretrainingSampler, get_batch_on_this_tp_rank) but in megatron.training,
which the megatron-core wheel does not ship; these are the same rules, small.

Order: the dataset is read in index order (the dataset's own shuffle, fixed by the seed, is the randomness).
Each step of the sampler takes the next micro_batch x dp_size samples; data-parallel rank r takes the r-th
micro_batch of them. So the global order depends on neither the parallel layout nor a restart: started at
`consumed_samples = N`, the sampler yields exactly what an uninterrupted run yields after N samples.

Broadcast: only tensor-parallel rank 0 holds the dataset. It reads the micro-batch, checks its ids against the
vocabulary and sends tokens, labels, loss mask and positions as one int64 tensor over its tensor-parallel group,
with a status word, so that a bad batch stops every rank of the group with the same one-line error.
"""

from __future__ import annotations

import torch

from megatron_m2d.errors import M2DError

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class MicroBatches:
    """Iterator of this rank's micro-batches: dicts of [micro_batch, seq_len] tensors tokens, labels (int64),
    loss_mask (float32) and position_ids (int64) on `device`. `consumed_samples` counts the samples taken by all
    data-parallel ranks so far (what a checkpoint saves).

    dataset: the GPTDataset/BlendedDataset on tensor-parallel rank 0, None on the other tensor-parallel ranks.
    tp_group / tp_source: the group to broadcast over and its rank 0 (global rank); by default megatron-core's
    tensor-parallel group when its parallel state is initialized, else no broadcast.
    vocab_size: ids at or above it (or negative) stop the run: data tokenized with another tokenizer.
    """

    def __init__(self, dataset, consumed_samples: int, micro_batch: int, dp_rank: int, dp_size: int, *,
                 seq_len: int | None = None, vocab_size: int | None = None, tp_group=None, tp_source: int | None = None,
                 device: torch.device | str | None = None):
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or consumed_samples < 0:
            raise ValueError(f"micro_batch={micro_batch}, dp_rank={dp_rank}, dp_size={dp_size}, "
                             f"consumed_samples={consumed_samples}")
        self.dataset, self.micro_batch, self.dp_rank, self.dp_size = dataset, micro_batch, dp_rank, dp_size
        self.consumed_samples, self.vocab_size = consumed_samples, vocab_size
        self.device = torch.device(device) if device is not None else _default_device()
        self.tp_group, self.tp_source = _tensor_parallel_group(tp_group, tp_source)
        self.reads = self.tp_group is None or torch.distributed.get_rank() == self.tp_source
        if self.reads and dataset is None:
            raise ValueError("the reading rank (tensor-parallel rank 0) needs the dataset")
        # the sample count and length travel once, so that every rank knows when the data ends
        shape = torch.tensor([len(dataset), _seq_len(dataset, seq_len)] if self.reads else [0, 0],
                             dtype=torch.int64, device=self.device)
        self._broadcast(shape)
        self.total_samples, self.seq_len = int(shape[0]), int(shape[1])

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Micro-batches left (a last window smaller than micro_batch x dp_size is dropped, as Megatron-LM does)."""
        return max(0, (self.total_samples - self.consumed_samples) // (self.micro_batch * self.dp_size))

    def __next__(self) -> dict[str, torch.Tensor]:
        window = self.micro_batch * self.dp_size
        if self.consumed_samples + window > self.total_samples:
            raise StopIteration
        first = self.consumed_samples + self.dp_rank * self.micro_batch
        packed = self._read(range(first, first + self.micro_batch)) if self.reads else \
            torch.empty(4 * self.micro_batch * self.seq_len + 2, dtype=torch.int64, device=self.device)
        self._broadcast(packed)
        self.consumed_samples += window
        return self._unpack(packed)

    def _read(self, indices: range) -> torch.Tensor:
        samples = [self.dataset[int(i)] for i in indices]
        stacked = [torch.stack([torch.as_tensor(sample[key]) for sample in samples]).to(torch.int64) for key in KEYS]
        status = torch.zeros(2, dtype=torch.int64)
        if self.vocab_size is not None:
            ids = torch.cat([stacked[0].flatten(), stacked[1].flatten()])
            bad = ids[(ids < 0) | (ids >= self.vocab_size)]
            if len(bad):
                status[:] = torch.tensor([1, int(bad[0])])
        return torch.cat([*(tensor.flatten() for tensor in stacked), status]).to(self.device)

    def _unpack(self, packed: torch.Tensor) -> dict[str, torch.Tensor]:
        if int(packed[-2]) != 0:
            raise M2DError(f"data: token id {int(packed[-1])} near sample {self.consumed_samples} is outside the "
                           f"student's vocabulary of {self.vocab_size}: the data was tokenized with another "
                           "tokenizer (run `m2d preprocess` with the student's)")
        shape = (self.micro_batch, self.seq_len)
        parts = packed[:-2].view(len(KEYS), *shape)
        batch = dict(zip(KEYS, parts.unbind(0)))
        batch["loss_mask"] = batch["loss_mask"].to(torch.float32)  # exactly 0 or 1, carried as int64
        return batch

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.tp_group is not None:
            torch.distributed.broadcast(tensor, self.tp_source, group=self.tp_group)


def _seq_len(dataset, seq_len: int | None) -> int:
    if seq_len is not None:
        return seq_len
    return int(dataset.config.sequence_length)  # GPTDataset and BlendedDataset both carry their config


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _tensor_parallel_group(group, source):
    if group is not None:
        if source is None:
            raise ValueError("tp_group needs tp_source (the global rank of its tensor-parallel rank 0)")
        return group, source
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None, None
    return parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_src_rank()
