"""Property-based fuzzing of every reader of user files: any bytes give a correct read or one M2DError, never
another exception, a hang or a write. (The indexed-dataset reader, megatron_m2d/distillation/megatron/indexed.py,
has its own fuzz test in tests/test_megatron_data.py.)"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from safetensors.torch import save_file

from megatron_m2d.calibration.store import Statistics
from megatron_m2d.convert.dcp_read import read_metadata
from megatron_m2d.convert.provider import read_provider_config
from megatron_m2d.data.text import read_documents
from megatron_m2d.errors import M2DError
from megatron_m2d.io.model_checks import check_hf_model
from megatron_m2d.testing.tiny import build_tiny_moe

FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                 max_size=4), max_leaves=12)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def reads_cleanly(read, folder: Path):
    """`read()` returns or raises M2DError (one line); nothing under `folder` is created or removed."""
    before = listing(folder)
    try:
        read()
    except M2DError as exc:
        assert "\n" not in str(exc)
    assert listing(folder) == before


def copy_of(source: Path, folder: Path) -> Path:
    """`folder` holding a copy of `source`'s files (made once per test; each example overwrites one file)."""
    if not folder.exists():
        folder.mkdir()
        for file in source.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    return folder


def mutate(data: bytes, edits) -> bytes:
    """Flip, cut and insert bytes at the given positions."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        i = position % len(out)
        if kind == 0:
            out[i] ^= value or 1
        elif kind == 1:
            del out[i:]
        else:
            out[i:i] = bytes([value])
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def real_metadata(tmp_path_factory):
    """The .metadata pickle of a real DCP checkpoint (written by torch's own FileSystemWriter)."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path_factory.mktemp("dcp")
    dcp.save({"w": torch.arange(12.0).view(3, 4), "b": torch.ones(2)}, checkpoint_id=str(folder), no_dist=True)
    return folder


@FUZZ
@given(data=st.binary(max_size=2048))
def test_dcp_metadata_from_any_bytes(data, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / ".metadata").write_bytes(data)
    reads_cleanly(lambda: read_metadata(folder), folder)


@FUZZ
@given(edits=EDITS)
@example(edits=[(0, 14502297, 0)])  # found by CI: a _StorageInfo unpickled without its fields (AttributeError)
def test_dcp_metadata_mutated(real_metadata, edits, tmp_path):
    folder = copy_of(real_metadata, tmp_path / "ckpt")
    (folder / ".metadata").write_bytes(mutate((real_metadata / ".metadata").read_bytes(), edits))
    reads_cleanly(lambda: read_metadata(folder), folder)


@FUZZ
@given(header=JSON, tail=st.binary(max_size=64), declared=st.integers(0, 2**64 - 1))
def test_safetensors_header_from_any_json(header, tail, declared, tmp_path, tiny_moe):
    """A shard whose header is arbitrary JSON (and whose length field may lie) is read or refused."""
    folder = copy_of(tiny_moe, tmp_path / "model")
    encoded = json.dumps(header).encode()
    length = declared if declared % 3 == 0 else len(encoded)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", length) + encoded + tail)
    reads_cleanly(lambda: check_hf_model(folder), folder)


@FUZZ
@given(edits=EDITS)
def test_safetensors_shard_mutated(edits, tmp_path, tiny_moe):
    folder = copy_of(tiny_moe, tmp_path / "model")
    (folder / "model.safetensors").write_bytes(mutate((tiny_moe / "model.safetensors").read_bytes(), edits))

    def read():
        ckpt = check_hf_model(folder)
        for key in ckpt.keys():
            ckpt.get(key)

    reads_cleanly(read, folder)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return build_tiny_moe(tmp_path_factory.mktemp("moe") / "moe", layers=1, hidden=32)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(["num_hidden_layers", "hidden_size", "num_experts", "model_type",
                                               "num_experts_per_tok", "vocab_size", "moe_intermediate_size",
                                               "max_position_embeddings", "head_dim", "rope_scaling"]),
                              JSON, max_size=4))
def test_config_json_with_any_values(fields, tmp_path, tiny_moe):
    folder = copy_of(tiny_moe, tmp_path / "model")
    config = json.loads((tiny_moe / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    reads_cleanly(lambda: check_hf_model(folder, moe=True), folder)


@FUZZ
@given(meta=JSON, layer=st.dictionaries(st.sampled_from(["tokens", "count", "prob_sum", "weight_sum", "reap_sum",
                                                         "gram_gated", "logit_outer"]),
                                        st.lists(st.floats(width=32), min_size=0, max_size=4), max_size=4))
def test_statistics_directory_with_any_content(meta, layer, tmp_path):
    folder = tmp_path / "stats"
    folder.mkdir(exist_ok=True)
    if isinstance(meta, dict):
        meta = {"complete": True, "moe_layers": [0], "top_k": 2, **meta}
    (folder / "meta.json").write_text(json.dumps(meta))
    save_file({k: torch.tensor(v, dtype=torch.float64) for k, v in layer.items()}, folder / "layer_000.safetensors")

    def read():
        stats = Statistics(folder)
        for index in stats.moe_layers:
            stats.layer(index)

    reads_cleanly(read, folder)


@FUZZ
@given(meta=JSON)
def test_provider_config_with_any_json(meta, tmp_path):
    folder = tmp_path / "megatron"
    folder.mkdir(exist_ok=True)
    if isinstance(meta, dict):
        meta = {"format": "m2d-megatron/2", **meta}
    (folder / "m2d_convert.json").write_text(json.dumps(meta))
    reads_cleanly(lambda: read_provider_config(folder), folder)


@FUZZ
@given(lines=st.lists(st.one_of(JSON.map(json.dumps), st.text(max_size=30)), max_size=6))
def test_jsonl_data_with_any_lines(lines, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines))
    reads_cleanly(lambda: read_documents(str(path)), tmp_path)


def test_fuzzing_reaches_the_refusals(tmp_path):
    """The strategies above do produce the inputs that matter: a pickled gadget is one of the byte strings."""
    (tmp_path / ".metadata").write_bytes(pickle.dumps(print))
    with pytest.raises(M2DError, match="refusing"):
        read_metadata(tmp_path)
