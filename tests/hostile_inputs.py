"""Broken inputs, generated from healthy ones: the rows of the bad-input matrix (tests/test_bad_inputs.py).

Each generator takes the healthy input (`base`) and a scratch folder, and returns the path of a broken variant
(a modified copy, or a path that is not there). `BROKEN[kind]` lists (name, generator, what the one-line error
must mention, commands it does not apply to). A new kind of input (an indexed dataset, a plan) adds its own list.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _copy(base: Path, scratch: Path, name: str = "broken") -> Path:
    target = scratch / name
    shutil.copytree(base, target, symlinks=True)
    return target


def _edit_tensors(base: Path, scratch: Path, edit) -> Path:
    """A copy whose single-file or sharded safetensors have `edit(tensors)` applied to every shard."""
    target = _copy(base, scratch)
    for shard in sorted(target.glob("*.safetensors")):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    return target


def _set(pattern: str, value: float):
    def edit(tensors):
        for key in tensors:
            if pattern in key:
                tensors[key] = torch.full_like(tensors[key], value)
    return edit


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _rewrite(name: str, content: bytes | str | None):
    """A copy with file `name` replaced by `content` (None: deleted)."""
    def make(base: Path, scratch: Path) -> Path:
        target = _copy(base, scratch)
        if content is None:
            (target / name).unlink()
        else:
            (target / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return target
    return make


def _missing(name: str):
    return lambda base, scratch: scratch / name


def _file_instead(base: Path, scratch: Path) -> Path:
    (scratch / "a-file").write_text("not a directory\n")
    return scratch / "a-file"


def _empty_dir(base: Path, scratch: Path) -> Path:
    (scratch / "empty").mkdir()
    return scratch / "empty"


def _symlink_loop(base: Path, scratch: Path) -> Path:
    os.symlink(scratch / "loop", scratch / "loop")
    return scratch / "loop"


# ---- HF checkpoints -----------------------------------------------------------------------------------------------

def _pickled_only(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    for shard in target.glob("*.safetensors*"):
        shard.unlink()
    torch.save({"w": torch.zeros(2)}, target / "pytorch_model.bin")
    return target


def _truncated_shard(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    _truncate(next(target.glob("*.safetensors")))
    return target


def _garbage_header(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    shard = next(target.glob("*.safetensors"))
    shard.write_bytes(b"\xff" * 8 + os.urandom(4096))
    return target


def _index_to_missing_shard(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    keys = list(load_file(next(target.glob("*.safetensors"))))
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    (target / "model.safetensors.index.json").write_text(json.dumps(index))
    for shard in target.glob("*.safetensors"):
        shard.unlink()
    return target


def _drop_tensor(pattern: str):
    def edit(tensors):
        for key in [k for k in tensors if pattern in k]:
            del tensors[key]
    return lambda base, scratch: _edit_tensors(base, scratch, edit)


def _reshape_experts(tensors):
    for key in [k for k in tensors if ".mlp.experts." in k and k.endswith("down_proj.weight")]:
        tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])


def _json_edit(name: str, **fields):
    """A copy whose JSON file `name` has `fields` set."""
    def make(base: Path, scratch: Path) -> Path:
        target = _copy(base, scratch)
        content = json.loads((target / name).read_text())
        content.update(fields)
        (target / name).write_text(json.dumps(content))
        return target
    return make


def _config_edit(**fields):
    return _json_edit("config.json", **fields)


def _no_tokenizer(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (target / name).unlink(missing_ok=True)
    return target


MODEL = [
    ("missing", _missing("no-such-model"), "no-such-model", ()),
    ("mistyped_path", _missing("models/nofile.safetensors"), "nofile", ()),
    ("hub_like_name", lambda base, scratch: Path("someorg/some-model-that-is-not-here"), "no such model", ()),
    ("file_not_dir", _file_instead, "a-file", ()),
    ("empty_dir", _empty_dir, "config.json", ()),
    ("symlink_loop", _symlink_loop, "loop", ()),
    ("no_config", _rewrite("config.json", None), "config.json", ()),
    ("config_not_json", _rewrite("config.json", "{not json"), "config", ()),
    ("config_unknown_type", _config_edit(model_type="no-such-architecture"), "config", ()),
    ("config_wrong_layer_count", _config_edit(num_hidden_layers=5), "layer", ()),
    ("pickled_weights_only", _pickled_only, "safetensors", ()),
    ("truncated_shard", _truncated_shard, "safetensors", ()),
    ("garbage_shard_header", _garbage_header, "safetensors", ()),
    ("index_names_missing_shard", _index_to_missing_shard, "missing safetensors shard", ()),
    ("index_not_json", _rewrite("model.safetensors.index.json", "{]"), "index.json", ()),
    # weights are read (and NaN found) by the Megatron backend's conversion, after its GPU check: not on CPU
    ("nan_attention", lambda b, s: _edit_tensors(b, s, _set("layers.1.self_attn.o_proj.weight", float("nan"))),
     "nan", ("distill-megatron",)),
    ("inf_embedding", lambda b, s: _edit_tensors(b, s, _set("embed_tokens.weight", float("inf"))), "nan or inf",
     ("distill-megatron",)),
    ("missing_tensor", _drop_tensor("layers.1.self_attn.o_proj.weight"), "o_proj", ()),
    ("no_tokenizer", _no_tokenizer, "tokenizer", ()),
]
MOE_ONLY = [
    # random-ffn never reads the experts it replaces: NaN there cannot reach its output
    ("nan_experts", lambda b, s: _edit_tensors(b, s, _set("layers.0.mlp.experts.", float("nan"))), "nan",
     ("random-ffn",)),
    ("expert_wrong_shape", lambda b, s: _edit_tensors(b, s, _reshape_experts), "shape", ("random-ffn",)),
    ("router_wrong_shape", lambda b, s: _edit_tensors(b, s, lambda t: t.update(
        {k: torch.zeros(3, 3) for k in list(t) if k.endswith("mlp.gate.weight")})), "shape", ()),
]


# ---- statistics ---------------------------------------------------------------------------------------------------

def _stats_meta(**fields):
    return _json_edit("meta.json", **fields)


def _stats_layer(edit):
    def make(base: Path, scratch: Path) -> Path:
        target = _copy(base, scratch)
        layer = target / "layer_000.safetensors"
        if edit is None:
            layer.unlink()
        elif edit == "truncate":
            _truncate(layer)
        else:
            tensors = load_file(layer)
            edit(tensors)
            save_file(tensors, layer)
        return target
    return make


STATS = [
    ("missing", _missing("no-such-stats"), "no-such-stats", ()),
    ("file_not_dir", _file_instead, "a-file", ()),
    ("no_meta", _rewrite("meta.json", None), "meta.json", ()),
    ("meta_not_json", _rewrite("meta.json", "{"), "meta.json", ()),
    ("incomplete", _stats_meta(complete=False), "incomplete", ()),
    ("other_model", _stats_meta(model_fingerprint="0123456789abcdef"), "another model", ("inspect",)),
    ("layer_missing", _stats_layer(None), "layer 0", ()),
    ("layer_truncated", _stats_layer("truncate"), "layer 0", ()),
    ("nan_statistics", _stats_layer(lambda t: t.update(prob_sum=torch.full_like(t["prob_sum"], float("nan")))),
     "nan", ()),
]


# ---- text data ----------------------------------------------------------------------------------------------------

def _text_file(name: str, content: bytes | str):
    def make(base: Path, scratch: Path) -> Path:
        path = scratch / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return make


DATA = [
    ("mistyped_file", _missing("nofile.txt"), "nofile.txt", ()),
    ("missing_dir", _missing("corpus/missing/"), "missing", ()),
    ("empty_file", _text_file("empty.txt", ""), "empty", ()),
    ("blank_file", _text_file("blank.txt", " \n\n \t\n"), "empty", ()),
    ("unsupported_suffix", _text_file("table.csv", "a,b\n1,2\n"), ".csv", ()),
    ("jsonl_not_json", _text_file("bad.jsonl", '{"text": "fine"}\n{oops\n'), "not valid json", ()),
    ("jsonl_no_text", _text_file("notext.jsonl", '{"body": "x"}\n'), "no field", ()),
    ("dir_without_text", _empty_dir, "no .txt or .jsonl", ()),
    ("too_short", _text_file("short.txt", "hi"), "fewer than", ("preprocess",)),  # a corpus may be small
]


# ---- Megatron checkpoints -----------------------------------------------------------------------------------------

class _Touch:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_metadata(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    (target / ".metadata").write_bytes(pickle.dumps(_Touch(scratch / "MARKER-code-ran")))
    return target


def _truncated_distcp(base: Path, scratch: Path) -> Path:
    target = _copy(base, scratch)
    _truncate(next(target.glob("*.distcp")), 0.6)
    return target


MEGATRON = [
    ("missing", _missing("no-such-checkpoint"), "no-such-checkpoint", ()),
    ("no_metadata", _rewrite(".metadata", None), ".metadata", ()),
    ("metadata_garbage", _rewrite(".metadata", os.urandom(512)), ".metadata", ()),
    ("metadata_code", _crafted_metadata, "refusing", ()),
    ("truncated_distcp", _truncated_distcp, "truncated", ()),
    ("no_provider_config", _rewrite("m2d_convert.json", None), "m2d_convert.json", ()),
    ("provider_config_not_json", _rewrite("m2d_convert.json", "[1, 2"), "m2d_convert.json", ()),
    ("provider_config_wrong_format", _rewrite("m2d_convert.json", '{"format": "m2d-megatron/0"}'), "format", ()),
]

TOKENIZER = [
    ("missing", _missing("no-such-tokenizer"), "no-such-tokenizer", ()),
    ("file_not_dir", _file_instead, "a-file", ()),
    ("no_tokenizer_files", _no_tokenizer, "tokenizer", ()),
    ("tokenizer_json_garbage", _rewrite("tokenizer.json", "{garbage"), "tokenizer", ()),
]

# ---- indexed datasets (a prefix naming PREFIX.bin and PREFIX.idx) -----------------------------------------------

def _dataset(edit):
    """A copy of the healthy prefix's pair under scratch, with `edit(bin_path, idx_path)` applied."""
    def make(base: Path, scratch: Path) -> Path:
        prefix = scratch / "corpus"
        for suffix in (".bin", ".idx"):
            shutil.copy(str(base) + suffix, str(prefix) + suffix)
        edit(Path(str(prefix) + ".bin"), Path(str(prefix) + ".idx"))
        return prefix
    return make


DATASET = [
    ("missing_prefix", _missing("no-such-corpus"), "not found", ()),
    ("no_idx", _dataset(lambda b, i: i.unlink()), r"\.idx", ()),
    ("no_bin", _dataset(lambda b, i: b.unlink()), r"\.bin", ()),
    ("truncated_bin", _dataset(lambda b, i: _truncate(b, 0.3)), r"\.bin", ()),
    ("truncated_idx", _dataset(lambda b, i: _truncate(i, 0.5)), r"\.idx", ()),
    ("garbage_idx", _dataset(lambda b, i: i.write_bytes(os.urandom(256))), r"\.idx", ()),
]

CONFIG_ONLY = [row for row in MODEL if row[0] in ("missing", "mistyped_path", "file_not_dir", "empty_dir",
                                                   "no_config", "config_not_json", "config_unknown_type")]

BROKEN = {"model": MODEL, "moe": MODEL + MOE_ONLY, "model_config": CONFIG_ONLY, "tokenizer": TOKENIZER,
          "stats": STATS, "data": DATA, "megatron": MEGATRON, "dataset": DATASET}


def error_lines(stderr: str) -> list[str]:
    """stderr as a user reads it: progress-bar frames (tqdm's 'NN%|', split at its carriage returns) are not
    error output."""
    return [line for line in stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]


def tree_hash(path: Path) -> str:
    """Names, bytes and symlink targets under `path` (a file or a folder): inputs must be left as they were."""
    import hashlib

    digest = hashlib.sha256()
    path = Path(path)
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if not path.exists():
        return "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*"))
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        if file.is_symlink():
            digest.update(os.readlink(file).encode())
        elif file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()
