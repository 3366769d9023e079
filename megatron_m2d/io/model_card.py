"""The model card (README.md) of every checkpoint m2d writes, in the Hugging Face hub's conventions.

Front matter: `base_model` (the teacher as the user named it, never an absolute local path), `base_model_relation`,
`license` (the teacher's, when its card says), `pipeline_tag`, `library_name`, `tags`, and `model-index` once
results exist. Body: a title and summary, a table of facts (class, width, the dtype actually on disk), a usage
snippet, how the model was made (prose and tables given by the stage), the distillation record, the evaluation
results. huggingface_hub's ModelCard parses and writes the front matter and turns EvalResults into model-index;
this module decides what goes in.

The body is a sequence of '## ' sections. Later stages replace a section by its heading, so a distilled model's
card carries the distillation record where the student's said "not distilled", and results are merged, not
appended twice. Every function but `read_card`/`write_card` is pure (text in, text out):

    card = new_card(teacher="Qwen/Qwen3-30B-A3B", model_dir=tmp, title=..., summary=..., facts={...},
                    made=[("How it was made", markdown)], tags=["moe-to-dense"])
    card = add_distillation(card, Distillation(...), weights=weights_dtype(out_dir))
    card = add_evaluation(card, [Evaluation(metric="perplexity", value=49.9, ...)])
    write_card(out_dir, card)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from megatron_m2d import __version__

CARD = "README.md"
TAGS = ["megatron_m2d"]
# the hub knows four relations (adapter, merge, quantized, finetune); a student with new weights derived from one
# teacher and trained from it is what the hub's model tree lists as a fine-tune
RELATION = "finetune"
NOT_DISTILLED = ("Not distilled: this checkpoint is the starting point of distillation (`m2d distill`); expect a "
                 "quality gap to the teacher until then.")
NO_RESULTS = "No results recorded yet (`m2d eval --out DIR` writes a copy of this card with them)."
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
               "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


@dataclass
class Distillation:
    """What a distillation run did, for the card. `settings` are rendered in their order as a table (learning
    rate, schedule, parallel sizes... whatever the backend wants to state); `losses` are final values."""
    backend: str  # e.g. "PyTorch + transformers (m2d distill --backend hf)"
    teacher: str  # as the user named it
    data: str  # the source or blend, as the user named it (markdown with backticks for a formatted blend)
    tokens: int | None
    steps: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """One metric on one dataset. `dataset` is the machine name (a hub dataset, an lm-eval task or m2d's source
    name), `dataset_name` what a reader should read, `details` how it was measured."""
    metric: str  # "perplexity", "acc", ...
    value: float
    dataset: str
    dataset_name: str
    details: str = ""
    split: str | None = None
    task: str = "text-generation"


def public_name(path_or_id: str | os.PathLike) -> str:
    """A name that means something off this machine: a hub id as given ('Qwen/Qwen3-30B-A3B'), the id of a
    huggingface_hub cache snapshot (.../models--Qwen--Qwen3-30B-A3B/snapshots/<rev>), a relative path as given,
    or the last component of an absolute path (which would disclose the writer's file system and mean nothing
    to a reader)."""
    text = str(path_or_id)
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots/", text)
    if cached:
        return f"{cached[1]}/{cached[2]}"
    if text.startswith(("/", "~")):
        return Path(text).expanduser().name or text
    return text.removeprefix("./").rstrip("/") or text


def teacher_license(teacher_dir: str | os.PathLike) -> dict[str, str]:
    """license (and license_name/license_link for 'other') from the teacher's own card, when it has one."""
    card = read_card(teacher_dir)
    if card is None:
        return {}
    data = ModelCard(card, ignore_metadata_errors=True).data
    return {key: getattr(data, key) for key in ("license", "license_name", "license_link") if getattr(data, key, None)}


def weights_dtype(model_dir: str | os.PathLike) -> str:
    """The dtype of the weights as saved (read from the safetensors headers), e.g. 'bfloat16', or 'bfloat16 and
    float32' when they are mixed: the card states what is on disk, not what was intended."""
    from safetensors import safe_open

    found = set()
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(shard, "pt") as handle:
            found |= {handle.get_slice(name).get_dtype() for name in handle.keys()}
    names = sorted(DTYPE_NAMES.get(d, d.lower()) for d in found)
    return " and ".join(names) if names else "unknown"


def new_card(*, teacher: str | os.PathLike | None, teacher_dir: str | os.PathLike | None, model_dir: str | os.PathLike,
             name: str, title: str, summary: str, facts: dict[str, Any], made: list[tuple[str, str]],
             tags: list[str] = ()) -> str:
    """A complete card. `teacher` as the user gave it (becomes base_model through `public_name`); `teacher_dir`
    the local directory whose card supplies the license; `model_dir` the directory holding the weights as saved
    (their dtype is read for the facts; a temporary sibling is fine), `name` the output's final name (for the
    usage snippet); `made`: (heading, markdown) sections on how the model was made. With no `teacher` (a model
    whose origin m2d does not know) the card has no base_model."""
    base = {"base_model": public_name(teacher), "base_model_relation": RELATION} if teacher is not None else {}
    data = ModelCardData(**base,
                         **(teacher_license(teacher_dir) if teacher_dir is not None else {}),
                         pipeline_tag="text-generation", library_name="transformers", tags=[*TAGS, *tags])
    facts = {**facts, "weights": weights_dtype(model_dir), "made by": f"megatron_m2d {__version__}"}
    sections = [("Model", table(facts, ("property", "value"))), ("Usage", _usage(name)), *made,
                ("Distillation", NOT_DISTILLED), ("Evaluation", NO_RESULTS)]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# {title}\n\n{summary}\n")
    card.text += "".join(_section(h, body) for h, body in sections)
    return str(card)


def add_distillation(card: str, record: Distillation, weights: str | None = None, name: str | None = None) -> str:
    """The card with its distillation section replaced by `record`, the stated dtype set to `weights` (the
    dtype the distilled model was saved in; pass `weights_dtype(out_dir)`), the usage snippet naming `name` (the
    distilled model's directory, not the student's it was copied from), and no evaluation results: those of the
    student before distillation are not the distilled model's."""
    parsed = ModelCard(card)
    if parsed.data.eval_results:
        parsed.data.eval_results = parsed.data.model_name = None
        card = _replace_section(str(parsed), "Evaluation", NO_RESULTS)
    tokens, steps = (f"{n:,}" if isinstance(n, int) else "unknown" for n in (record.tokens, record.steps))
    data = public_name(record.data)
    settings = {"backend": record.backend, "teacher": public_name(record.teacher), "data": data, "tokens": tokens,
                "steps": steps, **record.settings}
    data = data if "`" in data else f"`{data}`"  # a blend arrives formatted already
    body = (f"Distilled from `{public_name(record.teacher)}` on {tokens} tokens of {data} in {steps} steps.\n\n"
            + table(settings, ("setting", "value")))
    if record.losses:
        body += "\n\nFinal losses:\n\n" + table({k: f"{v:.4f}" for k, v in record.losses.items()}, ("loss", "value"))
    card = _replace_section(card, "Distillation", body)
    if name is not None:
        card = _replace_section(card, "Usage", _usage(name))
    return set_fact(card, "weights", weights) if weights is not None else card


def add_evaluation(card: str, results: list[Evaluation]) -> str:
    """The card with `results` in its evaluation table and its model-index; a result for the same metric and
    dataset as an earlier one replaces it."""
    if not card.startswith("---"):  # a card without front matter (or none at all): the model loads in transformers
        card = "---\nlibrary_name: transformers\n---\n" + card
    parsed = ModelCard(card)
    keep = [r for r in (parsed.data.eval_results or [])
            if not any((r.metric_type, r.dataset_type) == (n.metric, n.dataset) for n in results)]
    parsed.data.eval_results = keep + [
        EvalResult(task_type=r.task, dataset_type=r.dataset, dataset_name=r.dataset_name, metric_type=r.metric,
                   metric_value=round(float(r.value), 4), dataset_split=r.split, metric_name=r.metric)
        for r in results]
    parsed.data.model_name = parsed.data.model_name or _title(parsed.text)
    rows = _table_rows(_section_body(parsed.text, "Evaluation"))
    rows = [row for row in rows if not any(row[:2] == [n.dataset_name, n.metric] for n in results)]
    rows += [[r.dataset_name, r.metric, _number(r.value), r.details] for r in results]
    lines = ["| dataset | metric | value | how |", "|---|---|---|---|", *(f"| {' | '.join(r)} |" for r in rows)]
    parsed.text = _replace_section(parsed.text, "Evaluation", "\n".join(lines))
    return str(parsed)


def read_card(model_dir: str | os.PathLike) -> str | None:
    path = Path(model_dir) / CARD
    return path.read_text() if path.is_file() else None


def write_card(model_dir: str | os.PathLike, card: str) -> Path:
    """README.md in `model_dir`, readable by everyone (0644) whatever the process umask, like the weights."""
    path = Path(model_dir) / CARD
    path.write_text(card)
    path.chmod(0o644)
    return path


def _usage(name: str) -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{name}"  # this directory, or its hub id once uploaded
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
inputs = tokenizer("Friends, Romans, countrymen,", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0], skip_special_tokens=True))
```

A standard transformers class with no custom code, so vLLM (`vllm serve {name}`) is expected to serve it; that is
not verified by megatron_m2d's tests (they run without a GPU)."""


def table(rows: dict[str, Any], header: tuple[str, str]) -> str:
    """A two-column markdown table of `rows`, cells made readable (see _cell)."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """Readable table cells: lists joined with commas, floats without noise; never a Python repr."""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _number(value: float) -> str:
    return f"{value:,.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _section(heading: str, body: str) -> str:
    return f"\n## {heading}\n\n{body.strip()}\n"


def _split(text: str) -> list[tuple[str | None, str]]:
    """(heading, whole section text) pieces; the part before the first '## ' has heading None."""
    parts = re.split(r"(?m)^(?=## )", text)
    return [(re.match(r"## (.*)", p)[1].strip() if p.startswith("## ") else None, p) for p in parts]


def _section_body(text: str, heading: str) -> str:
    for name, part in _split(text):
        if name == heading:
            return part.split("\n", 1)[1] if "\n" in part else ""
    return ""


def _replace_section(text: str, heading: str, body: str) -> str:
    """`text` with section `heading` holding `body`; appended at the end when it has no such section."""
    parts = _split(text)
    new = _section(heading, body).lstrip("\n") + "\n"
    if any(name == heading for name, _ in parts):
        return "".join(new if name == heading else part for name, part in parts).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + new.rstrip("\n") + "\n"


def _table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # the first row is the header


def set_fact(card: str, key: str, value: Any) -> str:
    """The card with row `key` of its Model table set to `value` (added when missing; no-op without the table)."""
    body = _section_body(card, "Model")
    if not body:
        return card
    row = f"| {key} | {_cell(value)} |"
    new, count = re.subn(rf"(?m)^\| {re.escape(key)} \| .* \|$", lambda _: row, body)
    return _replace_section(card, "Model", new if count else body.rstrip("\n") + "\n" + row)


def add_section(card: str, heading: str, body: str) -> str:
    """The card with section `heading` holding `body` (replaced if present, else appended): for records other
    stages keep, such as a conversion."""
    return _replace_section(card, heading, body)


def _title(text: str) -> str:
    match = re.search(r"(?m)^# (.+)$", text)
    return match[1].strip() if match else "model"
