"""Text sources: .txt, .jsonl, directories, hub names; packing into blocks; clear errors."""

from __future__ import annotations

import json
import sys

import pytest

from megatron_m2d.data.text import read_documents, token_blocks
from megatron_m2d.errors import M2DError
from megatron_m2d.testing.tiny import byte_tokenizer


def test_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x")
    assert read_documents(str(tmp_path)) == ["first document", "second", "third"]
    assert read_documents(str(tmp_path / "sub" / "b.jsonl")) == ["second", "third"]


def test_blocks_are_packed_with_end_of_text_and_seeded(tmp_path):
    tokenizer = byte_tokenizer()
    for d in range(6):
        (tmp_path / f"{d}.txt").write_text(f"document number {d} " * 5)
    blocks = token_blocks(tokenizer, str(tmp_path), tokens=200, seq_len=50, seed=0)
    assert blocks.shape == (4, 50)
    assert (blocks == tokenizer.eos_token_id).any()  # documents are joined by the end-of-text token
    assert token_blocks(tokenizer, str(tmp_path), 200, 50, seed=0).equal(blocks)
    assert not token_blocks(tokenizer, str(tmp_path), 200, 50, seed=1).equal(blocks)
    # a short source gives fewer blocks, never a partial one
    assert token_blocks(tokenizer, str(tmp_path), 10**6, 50).shape[1] == 50


@pytest.mark.parametrize("content,message", [('{"text": "ok"}\nnot json\n', ":2: not valid JSON"),
                                             ('{"body": "x"}\n', "no field 'text'"),
                                             ('{"text": null}\n{"text": 5}\n', ":2: field 'text' holds a int")])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(M2DError, match=message):
        read_documents(str(tmp_path / "d.jsonl"))


def test_hub_name_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(M2DError, match="not a local file or directory"):
        read_documents("wikitext:wikitext-2-raw-v1")


def test_too_little_text_for_one_block(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    with pytest.raises(M2DError, match="fewer than one block"):
        token_blocks(byte_tokenizer(), str(tmp_path), 100, 64)


def test_named_sources_keep_roles_apart():
    from megatron_m2d.data.text import NAMED_SOURCES, _hash_role, resolve

    fixture = {role: resolve("fixture", role)[0] for role in ("train", "calibration", "eval")}
    assert len(set(fixture.values())) == 3
    assert resolve("wikitext2", "eval") == ("wikitext:wikitext-2-raw-v1", "test")
    assert resolve("wikitext2", "calibration")[1] != resolve("wikitext2", "train")[1]
    # FineWeb-Edu has one split: every document goes to exactly one role, stably, about 90/5/5
    docs = [f"document {i} about something" for i in range(4000)]
    roles = [_hash_role(d) for d in docs]
    assert roles == [_hash_role(d) for d in docs]
    share = {r: roles.count(r) / len(roles) for r in ("train", "calibration", "eval")}
    assert 0.86 < share["train"] < 0.94 and 0.03 < share["eval"] < 0.07
    assert set(NAMED_SOURCES["fineweb-edu"]) == {"train", "calibration", "eval"}


def test_fixture_source_reads_the_bundled_plays():
    assert "MACBETH" in read_documents("fixture", role="calibration")[0][:200]
    assert "JULIUS CAESAR" in read_documents("fixture", role="eval")[0][:400].upper()
    assert len(read_documents("fixture", role="train")) == 3
