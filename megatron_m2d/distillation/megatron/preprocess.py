"""Text -> megatron-core indexed dataset (`PREFIX.bin` + `PREFIX.idx`) with the student's tokenizer.

Megatron-LM's tools/preprocess_data.py is not in the megatron-core wheel (and imports megatron.training); its core
is megatron-core's `IndexedDatasetBuilder`, which we feed here. The differences are deliberate: documents are
tokenized without the tokenizer's own special tokens and closed by its end-of-document token (exactly as the HF
backend packs its data, so both backends see the same ids), reading is bounded in memory (Megatron-LM's
`Pool.imap` reads ahead without limit), and the output is atomic.

Beside the pair we write `PREFIX.m2d.json`: counts, the token dtype and the tokenizer's fingerprint, which
`data.build_datasets` checks against the student's tokenizer before training on the data.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm.auto import tqdm

from megatron_m2d.data.tokenize import DocumentEncoder, Encoded, Task, encode_in_worker, input_files, read_tasks, \
    start_worker
from megatron_m2d.errors import M2DError
from megatron_m2d.io.checkpoint import load_tokenizer

SUFFIXES = (".bin", ".idx", ".m2d.json")
META_FORMAT = "m2d-indexed-dataset/1"


def output_paths(prefix: str | Path) -> list[Path]:
    return [Path(f"{prefix}{suffix}") for suffix in SUFFIXES]


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's ids: vocabulary size, end-of-document id and a hash of the vocabulary
    (token -> id), so re-saved copies of one tokenizer agree and a different tokenizer does not."""
    import hashlib

    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "eod": tokenizer.eos_token_id,
            "vocab_sha256": hashlib.sha256(vocab.encode("utf-8", errors="surrogatepass")).hexdigest()}


def preprocess(inputs: list[str | Path], out_prefix: str | Path, tokenizer_dir: str | Path, workers: int = 1,
               field: str = "text", add_bos: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize every document of `inputs` (.txt/.jsonl files or directories) into the indexed dataset
    `out_prefix`.bin/.idx; returns the summary that is also written to `out_prefix`.m2d.json."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if workers < 1:
        raise M2DError(f"--workers must be >= 1, got {workers}")
    files = input_files(inputs)
    outputs = _check_outputs(Path(out_prefix), inputs, files, overwrite)
    tokenizer = load_tokenizer(tokenizer_dir)
    warn_if_sentencepiece_disagrees(tokenizer_dir, tokenizer)
    eod = tokenizer.eos_token_id
    if eod is None:
        raise M2DError(f"the tokenizer of {tokenizer_dir} has no end-of-text (eos) token to end documents with")
    bos = tokenizer.bos_token_id if add_bos else None
    if add_bos and bos is None:
        raise M2DError(f"--add-bos: the tokenizer of {tokenizer_dir} has no beginning-of-text (bos) token")
    vocab_size = len(tokenizer)
    dtype = DType.optimal_dtype(vocab_size)  # uint16 below 65,500 ids, else int32 (Qwen's 151,936 needs it)
    encoder = DocumentEncoder(tokenizer, eod, bos, field)

    temporaries = [path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in outputs]
    start, documents, tokens, empty = time.perf_counter(), 0, 0, 0
    try:
        builder = IndexedDatasetBuilder(str(temporaries[0]), dtype=dtype)
        total = sum(file.stat().st_size for file in files)
        with _encoded(files, encoder, workers) as results, \
                tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
            for task, encoded in results:
                _check_ids(encoded.tokens, vocab_size, task)
                ids = encoded.tokens.astype(dtype)
                ends = np.cumsum(encoded.lengths)
                for begin, end in zip(ends - encoded.lengths, ends):
                    builder.add_document(ids[begin:end], [int(end - begin)])
                documents, tokens, empty = documents + len(ends), tokens + len(ids), empty + encoded.empty
                bar.update(task.nbytes)
                bar.set_postfix(tokens=f"{tokens:.3g}", refresh=False)
        if documents == 0:
            raise M2DError("the inputs hold no documents (every file or record is empty)")
        builder.finalize(str(temporaries[1]))
        seconds = time.perf_counter() - start
        summary = {"format": META_FORMAT, "documents": documents, "tokens": tokens, "empty_documents_skipped": empty,
                   "dtype": np.dtype(dtype).name, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "tokenizer_source": str(tokenizer_dir), "bos": bos, "field": field,
                   "inputs": [str(file) for file in files], "input_bytes": total, "workers": workers,
                   "seconds": round(seconds, 3)}
        temporaries[2].write_text(json.dumps(summary, indent=1) + "\n")
        _publish(temporaries, outputs)
    except BaseException:
        if "builder" in locals():
            builder.data_file.close()
        for path in temporaries:
            path.unlink(missing_ok=True)
        raise
    return summary


PROSE = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."


def warn_if_sentencepiece_disagrees(tokenizer_dir: str | Path, tokenizer) -> bool:
    """A directory with a sentencepiece tokenizer.model and no tokenizer.json is converted by transformers; without
    a tokenizer_config.json naming the class, the generic conversion of transformers <= 5.23 drops sentencepiece's
    dummy prefix (5.24 keeps it), so the first token of every document differs from the ids the model was trained
    with. Warn when the two disagree on plain prose (the data stays what transformers' inference would feed the
    model)."""
    directory = Path(tokenizer_dir)
    if not (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file():
        return False
    try:
        import sentencepiece

        expected = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).encode(PROSE)
    except Exception:  # not importable, or not a sentencepiece model: nothing to compare with
        return False
    if tokenizer(PROSE, add_special_tokens=False)["input_ids"] == expected:
        return False
    warnings.warn(f"the tokenizer transformers builds from {directory / 'tokenizer.model'} gives other ids than the "
                  "sentencepiece model itself on plain prose (at least each document's first token): add a "
                  "tokenizer_config.json naming its class (\"tokenizer_class\": \"LlamaTokenizer\" for Llama-2, "
                  "Mistral, Mixtral) so that data, training and inference agree", stacklevel=2)
    return True


def _check_outputs(prefix: Path, inputs: list, files: list[Path], overwrite: bool) -> list[Path]:
    if prefix.name in ("", ".", "..") or prefix.is_dir():
        raise M2DError(f"--out {prefix} is a directory: give a prefix such as {prefix}/corpus (writes corpus.bin, "
                       "corpus.idx)")
    if not prefix.parent.is_dir():
        raise M2DError(f"directory of --out {prefix} does not exist: {prefix.parent}")
    outputs = output_paths(prefix)
    existing = [path for path in outputs if path.exists()]
    if existing and not overwrite:
        raise M2DError(f"{existing[0]} exists; pass --overwrite to replace the dataset {prefix}")
    parent = prefix.parent.resolve()
    for item in inputs:  # inputs are sacred: never write beside them inside an input directory, nor over one
        source = Path(item).resolve()
        if source.is_dir() and (parent == source or source in parent.parents):
            raise M2DError(f"--out {prefix} lies inside the input directory {item}: write the dataset elsewhere")
    sources = {file.resolve() for file in files}
    for path in outputs:
        if path.resolve() in sources:
            raise M2DError(f"--out {prefix} would overwrite the input {path}")
    return outputs


def _check_ids(tokens: np.ndarray, vocab_size: int, task: Task) -> None:
    """Ids outside the vocabulary would wrap silently in a narrow dtype: refuse them (an inconsistent tokenizer)."""
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = int(tokens.max() if tokens.max() >= vocab_size else tokens.min())
        raise M2DError(f"the tokenizer produced id {bad} for {task.path} (near line {task.first_line}), outside its "
                       f"own vocabulary of {vocab_size}: its files are inconsistent")


class _encoded:
    """(task, Encoded) pairs in input order. One worker encodes in this process; more run in worker processes
    with a bounded number of tasks in flight (memory stays at a few tasks per worker whatever the input size)."""

    def __init__(self, files: list[Path], encoder: DocumentEncoder, workers: int):
        self.files, self.encoder, self.workers, self.pool = files, encoder, workers, None

    def __enter__(self) -> Iterator[tuple[Task, Encoded]]:
        if self.workers == 1:
            return ((task, self.encoder(task)) for task in read_tasks(self.files))
        # fork, not spawn: spawn re-runs the caller's __main__ in every worker (`python -m megatron_m2d` would
        # start the CLI again) and imports torch anew in each. Nothing in this process has started the
        # tokenizer's thread pool, and the pool's processes start before its manager thread.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=start_worker,
                                        initargs=(self.encoder,))
        return self._ordered()

    def _ordered(self) -> Iterator[tuple[Task, Encoded]]:
        pending: collections.deque = collections.deque()
        try:
            for task in read_tasks(self.files):
                pending.append((task, self.pool.submit(encode_in_worker, task)))
                if len(pending) >= 2 * self.workers:
                    task, future = pending.popleft()
                    yield task, future.result()
            while pending:
                task, future = pending.popleft()
                yield task, future.result()
        except BrokenProcessPool:
            raise M2DError("a tokenizer worker process died (out of memory? try fewer --workers)") from None

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _publish(temporaries: list[Path], outputs: list[Path]) -> None:
    """Rename into place: the old summary and index go first and the new index and summary land last, so a crash
    in between leaves a prefix without .idx (refused as missing), never a new .bin read through an old .idx."""
    bin_tmp, idx_tmp, meta_tmp = temporaries
    bin_out, idx_out, meta_out = outputs
    meta_out.unlink(missing_ok=True)
    idx_out.unlink(missing_ok=True)
    os.replace(bin_tmp, bin_out)
    os.replace(idx_tmp, idx_out)
    os.replace(meta_tmp, meta_out)


def read_summary(prefix: str | Path) -> dict | None:
    """The `.m2d.json` summary of a prefix we preprocessed; None for data made by other tools."""
    path = Path(f"{prefix}.m2d.json")
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise M2DError(f"corrupt {path}: {exc}") from None
    if not isinstance(summary, dict) or summary.get("format") != META_FORMAT:
        raise M2DError(f"{path} is not an m2d dataset summary (format {META_FORMAT})")
    return summary
