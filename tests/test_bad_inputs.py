"""The bad-input matrix: every subcommand against generated broken models, statistics, data, Megatron checkpoints,
arguments and output paths. For each case: a non-zero exit, exactly one line on stderr starting `m2d: error:`
that names the problem (no traceback, not the catch-all for bugs), every input unchanged (hashed before and
after), nothing at the output path and nothing left beside it.

Adding a command: a row in COMMANDS (its argv, with {placeholders} for its inputs and {out}) and, for a new kind of
input, a list of broken variants in tests/hostile_inputs.py. Argument checks go in ARGUMENTS.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from megatron_m2d.cli import main
from tests.hostile_inputs import BROKEN, error_lines, tree_hash

SMALL_CALIBRATION = ["--tokens", "256", "--seq-len", "64"]


@dataclass(frozen=True)
class Command:
    argv: list[str]
    inputs: dict[str, str]  # placeholder -> kind of input (a key of BROKEN)
    resumable: bool = False  # writes into an existing --out (sweep, distill): no "exists" refusal
    overwrite: bool = True  # takes --overwrite
    needs: str | None = None  # an optional module the command needs

    def fill(self, paths: dict[str, Path], out: Path, extra=()) -> list[str]:
        return [a.format(**{k: str(v) for k, v in paths.items()}, out=str(out)) for a in self.argv] + list(extra)


COMMANDS = {
    "calibrate": Command(["calibrate", "--model", "{moe}", "--data", "{data}", *SMALL_CALIBRATION, "--out", "{out}"],
                         {"moe": "moe", "data": "data"}),
    "inspect": Command(["inspect", "{stats}", "--plot", "{out}"], {"stats": "stats"}, resumable=True,
                       overwrite=False),
    "densify": Command(["densify", "--model", "{moe}", "--stats", "{stats}", "--scoring", "reap", "--out", "{out}"],
                       {"moe": "moe", "stats": "stats"}),
    "densify-calibrating": Command(["densify", "--model", "{moe}", "--data", "{data}", *SMALL_CALIBRATION,
                                    "--scoring", "gld_reap", "--out", "{out}"], {"moe": "moe", "data": "data"}),
    "sweep": Command(["sweep", "--model", "{moe}", "--stats", "{stats}", "--scorings", "reap,random", "--groupings",
                      "round_robin", "--scalings", "uniform", "--eval-data", "{data}", "--eval-tokens", "256",
                      "--seq-len", "64", "--out", "{out}"], {"moe": "moe", "stats": "stats", "data": "data"},
                     resumable=True, overwrite=False),
    "d2d": Command(["d2d", "--model", "{dense}", "--width", "16", "--data", "{data}", *SMALL_CALIBRATION,
                    "--out", "{out}"], {"dense": "model", "data": "data"}),
    "random-ffn": Command(["random-ffn", "--model", "{moe}", "--out", "{out}"], {"moe": "moe"}),
    "eval": Command(["eval", "--model", "{student}", "--data", "{data}", "--seq-len", "64", "--max-tokens", "256",
                     "--out", "{out}"], {"student": "model", "data": "data"}),
    "distill": Command(["distill", "--teacher", "{moe}", "--student", "{student}", "--data", "{data}", "--steps",
                        "1", "--seq-len", "64", "--micro-batch", "2", "--train-tokens", "512", "--out", "{out}"],
                       {"moe": "moe", "student": "model", "data": "data"}, resumable=True, overwrite=False),
    # the Megatron backend's models are checked before anything runs; its dataset pairs are checked by the engine
    # after the GPU check (so on a GPU machine only: DATASET rows join here there), and fuzzed in
    # tests/test_megatron_data.py
    "distill-megatron": Command(["distill", "--backend", "megatron", "--teacher", "{moe}", "--student", "{student}",
                                 "--data", "{dataset}", "--steps", "1", "--seq-len", "64", "--out", "{out}"],
                                {"moe": "model", "student": "model",
                                 **({"dataset": "dataset"} if torch.cuda.is_available() else {})},
                                resumable=True, overwrite=False, needs="megatron.core"),
    "hf-to-megatron": Command(["convert", "hf-to-megatron", "--model", "{student}", "--out", "{out}"],
                              {"student": "model"}, needs="megatron.core"),
    "preprocess": Command(["preprocess", "--input", "{data}", "--tokenizer", "{student}", "--workers", "1",
                           "--no-progress", "--out", "{out}"], {"data": "data", "student": "tokenizer"},
                          needs="megatron.core"),
    "plan": Command(["plan", "--gpus", "8", "--teacher", "{moe}", "--student", "{student}"],
                    {"moe": "model_config", "student": "model_config"}, needs="megatron.core"),
    "megatron-to-hf": Command(["convert", "megatron-to-hf", "--model", "{megatron}", "--out", "{out}"],
                              {"megatron": "megatron"}, needs="megatron.core"),
}

# (command, extra flags, what the error must mention): the same flag gets the same rule in every command
ARGUMENTS = [
    ("calibrate", ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("calibrate", ["--tokens", "0"], "--tokens must be at least 1"),
    ("calibrate", ["--seq-len", "1"], "--seq-len must be at least 2"),
    ("calibrate", ["--seq-len", "100000"], "exceeds the 512 positions"),
    ("calibrate", ["--device", "gpu0"], "--device"),
    ("calibrate", ["--dtype", "float8"], "--dtype"),
    ("calibrate", ["--seed", "-1"], "--seed must be at least 0"),
    ("densify", ["--select", "99"], "exceeds the 8 experts"),
    ("densify", ["--groups", "0"], "--groups must be at least 1"),
    ("densify", ["--select", "1", "--groups", "2"], "smaller than --groups"),
    ("densify", ["--merge-alpha", "2"], "--merge-alpha must be at most 1"),
    ("densify", ["--kernel-lambda", "0"], "--kernel-lambda must be greater than 0"),
    ("densify", ["--max-shard-gb", "0"], "--max-shard-gb must be greater than 0"),
    ("densify", ["--scoring", "best"], "invalid choice"),
    ("sweep", ["--select", "99"], "exceeds the 8 experts"),
    ("sweep", ["--select", "2,x"], "comma-separated integers"),
    ("sweep", ["--groups", "0"], "--groups must be at least 1"),
    ("sweep", ["--scorings", "nope"], "unknown scoring"),
    ("d2d", ["--width", "0"], "--width must be at least 1"),
    ("d2d", ["--width", "100000"], "--width must lie in"),
    ("random-ffn", ["--groups", "0"], "--groups must be at least 1"),
    ("random-ffn", ["--groups", "99"], "exceeds|at most|experts"),
    ("eval", ["--method", "sliding", "--stride", "0"], "--stride must be at least 1"),
    ("eval", ["--seq-len", "1"], "--seq-len must be at least 2"),
    ("eval", ["--max-tokens", "0"], "--max-tokens must be at least 2"),
    ("distill", ["--save-every", "0"], "--save-every must be at least 1"),
    ("distill", ["--lr", "-1"], "--lr must be greater than 0"),
    ("distill", ["--lr", "nan"], "--lr must be a finite number"),
    ("distill", ["--steps", "0"], "--steps must be at least 1"),
    ("distill", ["--kd-weight", "2"], "--kd-weight must be at most 1"),
    ("distill", ["--temperature", "0"], "--temperature must be greater than 0"),
    ("distill", ["--min-lr", "1"], "--min-lr 1 exceeds --lr"),
    ("distill", ["--teacher-top-k", "99"], "exceeds the teacher"),
    ("distill", ["--seq-len", "4096"], "exceeds the 512 positions"),
    ("hf-to-megatron", ["--tp", "0"], "--tp must be at least 1"),
    ("hf-to-megatron", ["--tp", "3"], "does not divide"),
    ("hf-to-megatron", ["--vpp", "0"], "--vpp must be at least 1"),
    ("calibrate", ["--no-such-flag"], "unrecognized arguments"),
    ("plan", ["--gpus", "0"], "--gpus must be at least 1"),
    ("plan", ["--mfu", "0"], "--mfu must be greater than 0"),
]


def matrix_ids():
    """Every (command, input placeholder, broken variant) the table defines, plus argument and output rows."""
    rows = []
    for name, command in COMMANDS.items():
        for placeholder, kind in command.inputs.items():
            for variant, _, _, excluded in BROKEN[kind]:
                if name not in excluded:
                    rows.append(("input", name, placeholder, variant))
    rows += [("argument", name, " ".join(flags), expect) for name, flags, expect in ARGUMENTS]
    for name, command in COMMANDS.items():
        if "{out}" in command.argv:
            for kind in OUTPUT_CASES:
                if not (kind == "exists" and command.resumable):
                    rows.append(("output", name, kind, ""))
    return rows


# output rows: where --out points, relative to the command's first input; what the error says
OUTPUT_CASES = {
    "is_input": ("{input}", "is"), "inside_input": ("{input}/sub", "lies inside"),
    "contains_input": ("{input_parent}", "contains"), "symlink_to_input": ("link", "is"),
    "inside_symlinked_input": ("linkdir/sub", "lies inside"),
    "parent_missing": ("{scratch}/no/such/folder/out", "does not exist"),
    "exists": ("{scratch}/taken", "exists|is a directory"),
}


def _hashes(paths) -> dict[str, str]:
    return {str(p): tree_hash(p) for p in paths}


@pytest.mark.parametrize("row", matrix_ids(), ids=lambda r: "-".join(str(x) for x in r))
def test_bad_input(row, healthy, tmp_path, capsys):
    group, name, what, detail = row
    command = COMMANDS[name]
    if command.needs:
        pytest.importorskip(command.needs)
    paths, scratch = dict(healthy), tmp_path
    out = scratch / ("out.png" if name == "inspect" else "out")
    extra: list[str] = []
    if group == "input":
        variant = next(v for v in BROKEN[command.inputs[what]] if v[0] == detail)
        paths[what] = variant[1](healthy[what], scratch)
        expect = variant[2]
    elif group == "argument":
        extra, expect = what.split(), detail
    else:
        out, extra, expect = _output_case(what, command, paths, scratch)
    watched = [p for p in {*healthy.values(), *paths.values()} if Path(p).is_absolute()]
    before = _hashes(watched)
    out_before = tree_hash(out)
    beside_before = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    capsys.readouterr()
    code = main(command.fill(paths, out, extra))
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code != 0, f"accepted: {row}"
    assert len(lines) == 1 and lines[0].startswith("m2d: error: "), lines
    assert "Traceback" not in err and "unexpected" not in lines[0], lines[0]
    assert re.search(expect, lines[0], re.IGNORECASE), f"{lines[0]!r} does not mention {expect!r}"
    assert _hashes(watched) == before, "an input was changed"
    assert tree_hash(out) == out_before, "something was written at the output path"
    beside_after = sorted(p.name for p in out.parent.iterdir()) if out.parent.is_dir() else None
    assert beside_after == beside_before, "left beside the output: " + str(set(beside_after) - set(beside_before))
    assert not list(scratch.rglob("MARKER-code-ran")), "a crafted checkpoint ran code"


def _output_case(kind: str, command: Command, paths: dict, scratch: Path) -> tuple[Path, list[str], str]:
    """(--out, the flags that go with it, what the refusal says) for output row `kind`."""
    placeholder = next(iter(command.inputs))
    source = scratch / "input-copy"  # a private copy: nothing shared is at risk if a check fails
    shutil.copytree(paths[placeholder], source, symlinks=True)
    paths[placeholder] = source
    template, expect = OUTPUT_CASES[kind]
    (scratch / "link").symlink_to(source)
    (scratch / "linkdir").symlink_to(source)
    (scratch / "taken").mkdir()
    out = Path(template.format(input=source, input_parent=scratch, scratch=scratch))
    out = out if out.is_absolute() else scratch / out
    flags = ["--overwrite"] if command.overwrite and kind != "exists" else []
    return out, flags, expect


def _close_process_group() -> None:
    """A conversion that got as far as megatron-core leaves its gloo group: closed for the next row."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_process_group_left():
    yield
    _close_process_group()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """One healthy input of every kind, built once: the matrix breaks copies of these."""
    from megatron_m2d.calibration.run import calibrate
    from megatron_m2d.densification.run import densify
    from megatron_m2d.testing.tiny import build_tiny_moe, write_sample_text
    from tests.test_sweep_baselines import dense_teacher

    root = tmp_path_factory.mktemp("healthy")
    moe = build_tiny_moe(root / "moe")
    data = write_sample_text(root / "text")
    stats = calibrate(moe, str(data), root / "stats", tokens=256, seq_len=64, progress=False).path
    student = densify(moe, root / "student", "reap", stats=stats, progress=False).path
    paths = {"moe": moe, "data": data, "stats": stats, "student": student, "dense": dense_teacher(root / "dense")}
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return paths
    assert main(["convert", "hf-to-megatron", "--model", str(student), "--out", str(root / "megatron")]) == 0
    _close_process_group()
    assert main(["preprocess", "--input", str(data), "--tokenizer", str(student), "--workers", "1", "--no-progress",
                 "--out", str(root / "corpus")]) == 0
    return {**paths, "megatron": root / "megatron", "dataset": Path(str(root / "corpus"))}
