"""Reading indexed datasets for training: weighted blends, seeds, the index cache in the run directory, and
one-line errors for bad prefixes, splits and tokenizers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_m2d.distillation.megatron.data import build_gpt_datasets, megatron_tokenizer, parse_blend  # noqa: E402
from megatron_m2d.distillation.megatron.preprocess import preprocess  # noqa: E402
from megatron_m2d.errors import M2DError  # noqa: E402
from tests.megatron_cpu import megatron_cpu  # noqa: F401,E402  (fixture)

ASSETS = Path(__file__).resolve().parent.parent / "megatron_m2d" / "assets"
SEQ = 32
RANGES = {"a": (10, 100), "b": (1000, 1100)}  # each prefix's token ids, so a sample tells where it came from


def write_prefix(prefix: Path, low: int, high: int, documents: int = 40, seed: int = 0) -> Path:
    """An indexed dataset of random documents with ids in [low, high), each ended by eod 0."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        document = np.append(rng.integers(low, high, rng.integers(20, 80)), 0)
        builder.add_document(document, [len(document)])
    builder.finalize(f"{prefix}.idx")
    return prefix


@pytest.fixture(scope="module")
def tokenizer():
    return megatron_tokenizer(ASSETS / "fixture-dense")  # 4,096 ids, eod 0


@pytest.fixture
def prefixes(tmp_path):
    (tmp_path / "data").mkdir()
    return {name: write_prefix(tmp_path / "data" / name, *ids, seed=i) for i, (name, ids) in enumerate(RANGES.items())}


def source(tokens) -> str:
    """The prefix a sample's ids come from (ids 0 are end-of-document tokens, in both)."""
    ids = np.asarray(tokens)[np.asarray(tokens) != 0]
    found = {name for name, (low, high) in RANGES.items() if ((ids >= low) & (ids < high)).all()}
    assert len(found) == 1, "a sample mixes prefixes"
    return found.pop()


def test_blend_draws_in_its_weights_proportion(megatron_cpu, prefixes, tokenizer, tmp_path):  # noqa: F811
    data = [0.3, str(prefixes["a"]), 0.7, str(prefixes["b"])]
    train, _ = build_gpt_datasets(data, "1,0,0", SEQ, 1234, 400, 0, tmp_path / "run" / "cache", tokenizer)
    drawn = [source(train[i]["tokens"]) for i in range(len(train))]
    assert len(drawn) == 400 and [train[i]["dataset_id"] for i in range(400)] == [d == "b" for d in drawn]
    # megatron-core builds the blend greedily (each draw goes to the prefix furthest below its share), so after
    # every n draws each prefix's count is within one sample of weight x n: the tolerance is 1 sample, at every n
    counts = np.cumsum(np.asarray(drawn) == "a")
    assert np.abs(counts - 0.3 * np.arange(1, 401)).max() <= 1
    assert train[5]["tokens"].shape == (SEQ,) and train[5]["labels"].shape == (SEQ,)
    assert "attention_mask" not in train[5]  # causal is implied: no s x s mask per sample
    assert train[5]["labels"][:-1].equal(train[5]["tokens"][1:])


def test_sample_order_is_a_function_of_the_seed(megatron_cpu, prefixes, tokenizer, tmp_path):  # noqa: F811
    def order(seed, run):
        train, valid = build_gpt_datasets(f"1 {prefixes['a']} 1 {prefixes['b']}", "90,10,0", SEQ, seed, 64, 8,
                                          tmp_path / run, tokenizer)
        return [train[i]["tokens"].tolist() for i in range(64)], [valid[i]["tokens"].tolist() for i in range(8)]

    first = order(1, "r1")
    assert order(1, "r2") == first  # another run directory (no shared cache): the same samples
    assert order(1, "r1") == first  # from the cache
    assert order(2, "r3")[0] != first[0]
    assert first[1] not in (first[0][i:i + 8] for i in range(57))  # validation samples are their own


def test_index_cache_lives_in_the_run_directory(megatron_cpu, prefixes, tokenizer, tmp_path):  # noqa: F811
    def digest(root: Path) -> dict:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}

    before = digest(tmp_path / "data")
    cache = tmp_path / "run" / "dataset-cache"
    first, _ = build_gpt_datasets(str(prefixes["a"]), "1", SEQ, 0, 50, 0, cache, tokenizer)
    expected = [first[i]["tokens"].tolist() for i in range(50)]
    assert digest(tmp_path / "data") == before  # nothing beside the user's data (megatron-core's default)
    assert any(cache.glob("*-GPTDataset-train-shuffle_index.npy"))
    # a run killed while megatron-core wrote an index, and an index holding objects (allow_pickle=True):
    # both sets are rebuilt, and the samples are the same
    shuffle = next(cache.glob("*shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[:-3])
    sample = next(cache.glob("*sample_index.npy"))
    np.save(sample, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    again, _ = build_gpt_datasets(str(prefixes["a"]), "1", SEQ, 0, 50, 0, cache, tokenizer)
    assert [again[i]["tokens"].tolist() for i in range(50)] == expected


@pytest.mark.parametrize("data,message", [
    ("", "expected dataset prefixes"),
    ([0.5, "p1", "p2"], "must alternate"),
    ({"prefixes": ["p1", "p2"], "weights": [1.0]}, "one number per prefix"),
    ([0.0, "p1", 1.0, "p2"], "positive and finite"),
    ([float("nan"), "p1"], "positive and finite"),
    ({"paths": ["p1"]}, "needs 'prefixes'"),
])
def test_bad_blends(data, message):
    with pytest.raises(M2DError, match=message):
        parse_blend(data)


def test_run_config_sizes_the_splits(megatron_cpu, prefixes, tokenizer, tmp_path):  # noqa: F811
    from types import SimpleNamespace

    from megatron_m2d.distillation.megatron.data import build_datasets

    config = SimpleNamespace(data=[str(prefixes["a"])], split="80,20,0", seq_len=SEQ, seed=0, steps=5,
                             global_batch=4, eval_every=2, eval_iters=1, out=str(tmp_path / "run"))
    train, valid = build_datasets(config, tokenizer)
    assert (train.num_samples, valid.num_samples) == (20, 12)  # 5 steps x 4; (5 // 2 + 1) evaluations x 1 x 4
    assert any((tmp_path / "run" / "dataset-cache").glob("*-GPTDataset-valid-shuffle_index.npy"))
    assert build_datasets(SimpleNamespace(**{**vars(config), "eval_every": 0}), tokenizer)[1] is None


def test_blend_forms():
    assert parse_blend("0.7 /d/p1 0.3 /d/p2") == (["/d/p1", "/d/p2"], [0.7, 0.3])
    assert parse_blend(["/d/p1", "/d/p2"]) == (["/d/p1", "/d/p2"], None)
    assert parse_blend({"prefixes": ["/d/p1"], "weights": [2]}) == (["/d/p1"], None)  # one prefix: no blend


def bad_prefix(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(prefix, expected message) of a broken dataset of `kind`."""
    prefix = write_prefix(tmp_path / kind, 10, 100)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if kind == "missing":
        return str(tmp_path / "nothing-here"), "nothing-here.idx and nothing-here.bin not found"
    if kind == "no-bin":
        bin_.unlink()
        return str(prefix), "no-bin.bin not found"
    if kind == "truncated-bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
        return str(prefix), "truncated, or not the .bin of this .idx"
    if kind == "truncated-idx":
        idx.write_bytes(idx.read_bytes()[:-8])
        return str(prefix), "corrupt or truncated index"
    if kind == "not-an-index":
        idx.write_bytes(b"{'json': true}")
        return str(prefix), "not a megatron indexed-dataset index"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["missing", "no-bin", "truncated-bin", "truncated-idx", "not-an-index"])
def test_bad_prefix_is_one_line(megatron_cpu, kind, tokenizer, tmp_path):  # noqa: F811
    prefix, message = bad_prefix(kind, tmp_path)
    with pytest.raises(M2DError, match=message) as error:
        build_gpt_datasets(prefix, "1", SEQ, 0, 10, 0, tmp_path / "run", tokenizer)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_split_and_tokenizer_errors(megatron_cpu, prefixes, tokenizer, tmp_path):  # noqa: F811
    with pytest.raises(M2DError, match="valid share of split '99.9,0.1,0' holds 0 of 40 documents"):
        build_gpt_datasets(str(prefixes["a"]), "99.9,0.1,0", SEQ, 0, 10, 10, tmp_path / "run", tokenizer)
    with pytest.raises(M2DError, match="leaves no validation share"):
        build_gpt_datasets(str(prefixes["a"]), "100,0,0", SEQ, 0, 10, 10, tmp_path / "run", tokenizer)
    with pytest.raises(M2DError, match="split: expected up to three"):
        build_gpt_datasets(str(prefixes["a"]), "1e-3,x", SEQ, 0, 10, 0, tmp_path / "run", tokenizer)
    # data tokenized with another tokenizer (the byte-level one of the tests) is refused before training
    from megatron_m2d.testing.tiny import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "bytes")
    (tmp_path / "text.txt").write_text((ASSETS / "macbeth.txt").read_text()[:5000])
    preprocess([tmp_path / "text.txt"], tmp_path / "other", tmp_path / "bytes", progress=False)
    with pytest.raises(M2DError, match="tokenized with another tokenizer .* run `m2d preprocess` again"):
        build_gpt_datasets(str(tmp_path / "other"), "1", SEQ, 0, 10, 0, tmp_path / "run", tokenizer)
    assert build_gpt_datasets(str(tmp_path / "other"), "1", SEQ, 0, 10, 0, tmp_path / "run",
                              megatron_tokenizer(tmp_path / "bytes"))[0] is not None
