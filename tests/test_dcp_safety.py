"""A crafted Megatron checkpoint runs no code: `.metadata` admits named DCP classes only, object entries go through
torch's weights_only unpickler. Every payload below is first shown to be live (plain `pickle.loads` of the same
bytes creates the marker file), then refused with one line and no marker."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess

import pytest
import torch
from torch.distributed.checkpoint.metadata import Metadata

from megatron_m2d.convert.dcp_read import read_metadata
from megatron_m2d.errors import M2DError
from tests.megatron_cpu import megatron_cpu  # noqa: F401  (fixture)


class Call:
    """Pickles as `func(*args)`: the classic __reduce__ gadget."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _str(text: str) -> bytes:
    data = text.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(data)]) + data if len(data) < 256 else \
        pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def _stack_global(module: str, name: str) -> bytes:
    return _str(module) + _str(name) + pickle.STACK_GLOBAL


def payloads(marker: str) -> dict[str, bytes]:
    """name -> pickle bytes that, unpickled plainly, create `marker`."""
    touch = f"touch {marker}"
    proto = pickle.PROTO + b"\x04"
    return {
        "reduce_os_system": pickle.dumps(Call(os.system, touch)),
        "reduce_subprocess": pickle.dumps(Call(subprocess.call, ["touch", marker])),
        "reduce_builtins_eval": pickle.dumps(Call(eval, f"__import__('pathlib').Path({marker!r}).touch()")),
        "reduce_builtins_exec": pickle.dumps(Call(exec, f"open({marker!r}, 'w').close()")),
        # getattr(PosixPath(marker), 'touch')(): reaches a method through an admitted class
        "getattr_gadget": proto + _stack_global("builtins", "getattr") + _stack_global("pathlib", "PosixPath")
        + _str(marker) + pickle.TUPLE1 + pickle.REDUCE + _str("touch") + pickle.TUPLE2 + pickle.REDUCE
        + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP,
        # a module's attribute path: DCP's filesystem module imports os, so `os.system` resolves through it
        "module_attribute_gadget": proto + _stack_global("torch.distributed.checkpoint.filesystem", "os.system")
        + _str(touch) + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP,
        "module_attribute_global_opcode": proto + b"ctorch.distributed.checkpoint.filesystem\nos.system\n(V"
        + touch.encode() + b"\ntR.",
        "inst_opcode": b"(V" + touch.encode() + b"\nios\nsystem\n.",
        # nested: inside DCP's own classes and containers, where a reader might only check the top level
        "nested_in_metadata": pickle.dumps(Metadata(state_dict_metadata={"w": [(Call(os.system, touch),)]})),
        "nested_in_dict_of_lists": pickle.dumps({"a": [1, {"b": (Call(subprocess.call, ["touch", marker]),)}]}),
    }


def _plain_unpickle_runs(data: bytes, marker) -> bool:
    try:
        pickle.loads(data)
    except Exception:  # noqa: BLE001 -- some gadgets fail after running (os.system returns an int to call)
        pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


@pytest.mark.parametrize("kind", list(payloads("m")))
def test_crafted_metadata_is_refused_and_runs_nothing(kind, tmp_path):
    marker = tmp_path / "marker"
    data = payloads(str(marker))[kind]
    assert _plain_unpickle_runs(data, marker), "the payload must be live for this test to mean anything"
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / ".metadata").write_bytes(data)
    with pytest.raises(M2DError) as refused:
        read_metadata(checkpoint)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(checkpoint / ".metadata") in message, message
    assert not marker.exists()


def test_persistent_ids_are_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(pickle.PROTO + b"\x02" + _str("storage") + pickle.BINPERSID + pickle.STOP)
    with pytest.raises(M2DError, match="not readable DCP metadata"):
        read_metadata(tmp_path)


def test_storage_entries_cannot_point_outside_the_checkpoint(megatron_cpu, tiny, tmp_path):  # noqa: F811
    """A valid pickle whose storage entry names `../secret` or a byte range past the file's end."""
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    checkpoint = hf_to_megatron_checkpoint(tiny("qwen3_moe"), tmp_path / "megatron", progress=False)
    original = read_metadata(checkpoint)
    (tmp_path / "secret").write_bytes(b"x" * 10_000_000)
    for field, value, message in (("relative_path", "../secret", "not a file name inside the checkpoint"),
                                  ("relative_path", "/etc/passwd", "not a file name inside the checkpoint"),
                                  ("length", 1 << 40, "truncated or corrupt")):
        metadata = pickle.loads(pickle.dumps(original))  # a fresh copy: DCP's own classes, plain data
        info = next(iter(metadata.storage_data.values()))
        setattr(info, field, value)
        (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(M2DError, match=message):
            read_metadata(checkpoint)
    (checkpoint / ".metadata").write_bytes(pickle.dumps(original))
    assert read_metadata(checkpoint).state_dict_metadata.keys() == original.state_dict_metadata.keys()


def test_cli_refuses_every_payload_with_one_line(megatron_cpu, tiny, tmp_path, capsys):  # noqa: F811
    from megatron_m2d.cli import main
    from megatron_m2d.convert.checkpoint import hf_to_megatron_checkpoint

    checkpoint = hf_to_megatron_checkpoint(tiny("qwen3_moe"), tmp_path / "megatron", progress=False)
    marker, out = tmp_path / "marker", tmp_path / "back"
    for kind, data in payloads(str(marker)).items():
        (checkpoint / ".metadata").write_bytes(data)
        capsys.readouterr()
        assert main(["convert", "megatron-to-hf", "--model", str(checkpoint), "--out", str(out)]) == 2, kind
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("m2d: error: "), (kind, err)
        assert not marker.exists() and not out.exists(), kind
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".back")] == [], kind


def test_object_entries_go_through_torchs_restricted_unpickler(megatron_cpu, tiny, tmp_path,  # noqa: F811
                                                               monkeypatch):
    """A checkpoint whose `_extra_state` entries are torch.save'd gadgets (DCP's default planner would
    torch.load them with weights_only=False) is refused by load_checkpoint, and nothing runs."""
    from megatron_m2d.convert import checkpoint as convert
    from megatron_m2d.convert.dcp_stream import ObjectChunk
    from megatron_m2d.convert.provider import load_checkpoint, model_provider

    marker = tmp_path / "marker"
    build = convert._meta_model_chunks

    def poisoned(*args, **kwargs):
        chunks, objects = build(*args, **kwargs)
        return chunks, [ObjectChunk(o.key, Call(os.system, f"touch {marker}")) for o in objects]

    monkeypatch.setattr(convert, "_meta_model_chunks", poisoned)
    checkpoint = convert.hf_to_megatron_checkpoint(tiny("qwen3_moe"), tmp_path / "megatron", progress=False)
    monkeypatch.undo()
    model = model_provider(checkpoint, use_te=False)()
    with pytest.raises(M2DError, match="refusing checkpoint object .*_extra_state"):
        load_checkpoint(model, checkpoint)
    assert not marker.exists()
    buffer = io.BytesIO()  # the same bytes through plain torch.load would have run it
    torch.save([Call(os.system, f"touch {marker}")], buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=False)
    assert marker.exists()
