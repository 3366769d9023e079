"""`m2d preprocess`: text -> megatron-core indexed datasets that read back as the tokenizer's ids; worker count,
dtype, atomic output and untouched inputs."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from megatron_m2d.cli import main  # noqa: E402
from megatron_m2d.data import tokenize  # noqa: E402
from megatron_m2d.distillation.megatron.preprocess import (  # noqa: E402
    PROSE, preprocess, warn_if_sentencepiece_disagrees)
from megatron_m2d.errors import M2DError  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "megatron_m2d" / "assets"
FIXTURE_TOKENIZER = ASSETS / "fixture-dense"


def write_corpus(root: Path) -> list[str]:
    """.txt and .jsonl documents (blank lines, an empty record, non-ASCII, a lone surrogate, a literal special
    token), in the order preprocess reads them; returns the non-empty documents' texts."""
    (root / "b").mkdir(parents=True)
    macbeth = (ASSETS / "macbeth.txt").read_text()[:6000]
    (root / "a.txt").write_text(macbeth)
    records = [{"text": "First record.\n\nTwo  spaces and tabs\there."}, {"text": "   "},
               {"text": "Ünïcödé — 日本語 🙂 <|endoftext|> end"}, {"text": "lone \ud800 surrogate", "id": 3}]
    (root / "b" / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n"
                                        + "\n".join(json.dumps(r) for r in records[2:]) + "\n")
    (root / "b" / "d.txt").write_text("The last document.")
    return [macbeth, records[0]["text"], records[2]["text"], "lone \ufffd surrogate", "The last document."]


def read_back(prefix: Path) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def expected_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in texts]


def sentencepiece_dir(tmp_path: Path) -> Path:
    """Mixtral's sentencepiece model (32,000 tokens), shipped by mistral-common, as a Llama-style HF directory
    with no tokenizer.json: what a Mixtral or Llama-2 checkpoint carries."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        pytest.skip("mistral-common (the offline source of a real sentencepiece model) is not installed")
    model = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    out = tmp_path / "mixtral-tokenizer"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(model.read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    return out


def test_reads_back_the_tokenizers_ids(tmp_path):
    texts = write_corpus(tmp_path / "corpus")
    (tmp_path / "out").mkdir()
    summary = preprocess([tmp_path / "corpus"], tmp_path / "out" / "train", FIXTURE_TOKENIZER, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_TOKENIZER)
    assert read_back(tmp_path / "out" / "train") == expected_ids(tokenizer, texts)
    assert IndexedDataset(str(tmp_path / "out" / "train")).index.dtype == np.uint16  # 4,096 ids fit
    assert summary["documents"] == 5 and summary["empty_documents_skipped"] == 1
    assert summary["tokens"] == sum(map(len, expected_ids(tokenizer, texts)))


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    directory = sentencepiece_dir(tmp_path)
    texts = write_corpus(tmp_path / "corpus")
    preprocess([tmp_path / "corpus"], tmp_path / "sp", directory, add_bos=True, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert read_back(tmp_path / "sp") == [[1] + ids for ids in expected_ids(tokenizer, texts)]  # <s> ... </s>
    # the ids are the sentencepiece model's own on ordinary prose (transformers' conversion departs from it only
    # on runs of spaces and a leading space)
    processor = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert read_back(tmp_path / "sp")[0] == [1] + processor.encode(texts[0]) + [2]
    assert not warn_if_sentencepiece_disagrees(directory, tokenizer)
    # without tokenizer_config.json, transformers' generic conversion dropped the dummy prefix before 5.24 (it keeps
    # it since): warned exactly when its ids depart from the model's
    (directory / "tokenizer_config.json").unlink()
    generic = AutoTokenizer.from_pretrained(directory)
    departs = generic(PROSE, add_special_tokens=False)["input_ids"] != processor.encode(PROSE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_if_sentencepiece_disagrees(directory, generic) == departs
    assert sum("add a tokenizer_config.json naming its class" in str(w.message) for w in caught) == int(departs)
    # a tokenizer whose first token of a document differs from the model's is warned about, whatever the version
    def first_token_off(text, add_special_tokens):
        return {"input_ids": processor.encode(text)[1:]}

    with pytest.warns(UserWarning, match="add a tokenizer_config.json naming its class"):
        assert warn_if_sentencepiece_disagrees(directory, first_token_off)


def test_big_vocabulary_needs_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>").save_pretrained(tmp_path / "big")
    (tmp_path / "t.txt").write_text("w0 w65534 w65535 w69999 w123")
    preprocess([tmp_path / "t.txt"], tmp_path / "big-data", tmp_path / "big", progress=False)
    assert IndexedDataset(str(tmp_path / "big-data")).index.dtype == np.int32
    assert read_back(tmp_path / "big-data") == [[2, 65536, 65537, 70001, 125, 0]]


def test_worker_count_does_not_change_the_output(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = (ASSETS / "julius_caesar.txt").read_text().split("\n\n")
    for part in range(3):
        (corpus / f"part{part}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[part::3]))
    (corpus / "play.txt").write_text((ASSETS / "macbeth.txt").read_text()[:20000])
    monkeypatch.setattr(tokenize, "TASK_BYTES", 2000)  # many small tasks, so workers finish out of order
    outputs = {}
    for workers in (1, 2, 3):
        preprocess([corpus], tmp_path / f"w{workers}", FIXTURE_TOKENIZER, workers=workers, progress=False)
        outputs[workers] = [(tmp_path / f"w{workers}{suffix}").read_bytes() for suffix in (".bin", ".idx")]
    assert outputs[1] == outputs[2] == outputs[3]
    assert len(IndexedDataset(str(tmp_path / "w1"))) == sum(1 for t in lines if t.strip()) + 1


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_inputs_are_sacred_and_output_is_atomic(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    before = tree_digest(corpus)
    with pytest.raises(M2DError, match="inside the input directory"):
        preprocess([corpus], corpus / "b" / "out", FIXTURE_TOKENIZER, progress=False)
    (corpus / "b" / "z.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(M2DError, match=r"z.jsonl:2: no field 'text'"):
        preprocess([corpus], tmp_path / "data", FIXTURE_TOKENIZER, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no temporary left behind
    (corpus / "b" / "z.jsonl").unlink()
    assert tree_digest(corpus) == before
    preprocess([corpus], tmp_path / "data", FIXTURE_TOKENIZER, progress=False)
    with pytest.raises(M2DError, match="exists; pass --overwrite"):
        preprocess([corpus], tmp_path / "data", FIXTURE_TOKENIZER, progress=False)
    preprocess([corpus / "a.txt"], tmp_path / "data", FIXTURE_TOKENIZER, overwrite=True, progress=False)
    assert len(read_back(tmp_path / "data")) == 1
    assert tree_digest(corpus) == before


def test_oversized_document_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize, "MAX_DOCUMENT_BYTES", 1000)
    (tmp_path / "big.jsonl").write_text('{"text": "small"}\n' + json.dumps({"text": "x" * 2000}) + "\n")
    with pytest.raises(M2DError, match=r"big.jsonl:2: a document of 0.0 MiB, more than"):
        preprocess([tmp_path / "big.jsonl"], tmp_path / "out", FIXTURE_TOKENIZER, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl"]


@pytest.mark.parametrize("argv,message", [
    (["--input", "missing-dir"], "--input missing-dir: no such file or directory"),  # the validation layer's
    (["--input", "{corpus}", "--workers", "0"], "--workers must be at least 1"),
    (["--input", "{corpus}", "--tokenizer", "{corpus}"], "has no tokenizer"),
    (["--input", "{empty}"], "hold no documents"),
    (["--input", "{corpus}", "--tokenizer", "{broken}"], "cannot load the tokenizer of"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text((FIXTURE_TOKENIZER / "tokenizer_config.json").read_text())
    (tmp_path / "broken" / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    argv = [a.format(corpus=tmp_path / "corpus", empty=tmp_path / "empty", broken=tmp_path / "broken") for a in argv]
    base = {"--tokenizer": str(FIXTURE_TOKENIZER), "--out": str(tmp_path / "out")}
    argv += [item for flag, value in base.items() if flag not in argv for item in (flag, value)]
    assert main(["preprocess", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2d: error: ") and message in err and err.count("\n") == 1
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_cli_writes_the_dataset(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    assert main(["preprocess", "--input", str(tmp_path / "corpus" / "b"), str(tmp_path / "corpus" / "a.txt"),
                 "--tokenizer", str(FIXTURE_TOKENIZER), "--out", str(tmp_path / "d"), "--workers", "2",
                 "--no-progress"]) == 0
    assert "5 documents" in capsys.readouterr().out
    summary = json.loads((tmp_path / "d.m2d.json").read_text())
    assert summary["inputs"][-1].endswith("a.txt") and summary["tokenizer"]["vocab_size"] == 4096
