"""The model card: the `README.md` a run folder carries, as transformers' Trainer writes one.

YAML metadata that `huggingface_hub.ModelCard.load` parses (license, base model, datasets, tags,
language, metrics, library, pipeline tag, and a `model-index` with the measured validation loss and
perplexity), then the body: what the model is and what it was trained on, the hyperparameters, one
results row per evaluation, the framework versions, and how to use it.

A card states only what was measured: the `model-index` and the "results" lines carry a validation
loss only when the weights the card sits beside were evaluated (an evaluation at the checkpoint's
own step); otherwise they say when the last evaluation was, or that there was none.

`render_card(facts, rows, step)` is a pure function of the run's facts and `metrics.jsonl` rows;
`export_card(text)` rewrites a card for a transformers export (`library_name: transformers`), and
`copied_card` for a minigpt copy; `conversion_card` writes one for a folder converted from another
model's (an HF folder or a Hub id), whose own card is about that model: it states the licence that
card states, so a fine-tune of the converted folder states it too.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .metrics import perplexity

LICENSE = "apache-2.0"  # minigpt's licence, and distilgpt2's: a model trained from scratch states it
TAGS = ("minigpt", "gpt2", "text-generation")  # a card's tags, a run's and a conversion's


@dataclass(frozen=True)
class RunFacts:
    """What a run knows about itself, written into its card (train.py fills it in)."""

    name: str  # the model's name: its folder's name
    out: str  # the folder, as the usage examples should spell it
    base_model: str | None  # --init (a Hub id or a folder), None for a model trained from scratch
    base_on_hub: bool  # whether base_model is a Hub id: then linked, and in the metadata (the Hub
    # refuses a card whose base_model is no repo id, such as a local folder's path)
    datasets: list[str]  # Hub dataset ids, or the local files' names: the training data's, then any other
    evaluated_on: tuple[str, str]  # (dataset, split) the validation loss was measured on
    model: str  # one line: the architecture and its size
    data: list[str]  # lines: format, records, blocks
    hyperparameters: list[tuple[str, Any]]  # (name, value), in the order to show
    max_steps: int
    window: int  # the model's context, in tokens: the usage example asks for no more
    license: dict[str, str]  # the base model's (`card_license`), {"license": LICENSE} from scratch; {}: unknown
    language: str = "en"
    tags: list[str] = field(default_factory=lambda: list(TAGS))


def results_table(rows: list[dict[str, Any]]) -> list[tuple[float | None, float, int, float]]:
    """One (training loss, epoch, step, validation loss) per evaluation row, in order.

    The training loss is the mean over the steps the training rows since the previous evaluation
    cover (each row's `loss` is already the mean over its `log_every` steps, so rows are weighted by
    the steps they cover); None ("No log") when no training row was written since.
    """
    table, loss_sum, steps, last_train_step = [], 0.0, 0, 0
    for row in rows:
        if "loss" in row:
            covered = row["step"] - last_train_step
            loss_sum, steps, last_train_step = loss_sum + row["loss"] * covered, steps + covered, row["step"]
        if "val_loss" in row:
            table.append((loss_sum / steps if steps else None, row["epoch"], row["step"], row["val_loss"]))
            loss_sum, steps = 0.0, 0
    return table


def _yaml(value: Any) -> str:
    """A scalar as YAML: JSON's strings and numbers are valid YAML flow scalars."""
    return json.dumps(value)


def _licence_lines(licence: dict[str, str]) -> list[str]:
    """A card's metadata lines for a licence as `card_license` gives it (the id, checked there, as it is)."""
    return [f"{k}: {v if k == 'license' else _yaml(v)}" for k, v in licence.items()]


def _yaml_number(x: float) -> str:
    """A metric as YAML: rounded to 4 decimals; a diverged run's infinite perplexity as YAML's `.inf`
    (`inf` would be read back as a string)."""
    return ".inf" if x == float("inf") else str(round(x, 4))


def _versions() -> list[str]:
    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    from . import __version__

    return [f"minigpt {__version__}", f"PyTorch {torch.__version__}", f"Tokenizers {version('tokenizers')}",
            f"Datasets {version('datasets')}"]


def render_card(facts: RunFacts, rows: list[dict[str, Any]], step: int) -> str:
    """The card of the checkpoint at `step`, given every `metrics.jsonl` row written so far."""
    evals = [r for r in rows if "val_loss" in r]
    measured = evals[-1] if evals and evals[-1]["step"] == step else None  # the weights' own loss
    finished = step >= facts.max_steps

    meta = _licence_lines(facts.license)
    if facts.base_on_hub:
        meta.append(f"base_model: {_yaml(facts.base_model)}")
    meta += ["datasets:", *(f"- {_yaml(d)}" for d in facts.datasets)]
    meta += ["tags:", *(f"- {_yaml(t)}" for t in facts.tags)]
    meta += [f"language:\n- {facts.language}", "metrics:\n- perplexity", "library_name: minigpt",
             "pipeline_tag: text-generation", "model-index:", f"- name: {_yaml(facts.name)}"]
    if measured is None:
        meta.append("  results: []")
    else:
        meta += [
            "  results:", "  - task:", "      type: text-generation", "      name: Causal Language Modeling",
            "    dataset:", f"      name: {_yaml(facts.evaluated_on[0])}", f"      type: {_yaml(facts.evaluated_on[0])}",
            f"      split: {_yaml(facts.evaluated_on[1])}", "    metrics:",
            "    - type: loss", f"      value: {_yaml_number(measured['val_loss'])}", "      name: Validation loss",
            "    - type: perplexity", f"      value: {_yaml_number(perplexity(measured['val_loss']))}",
            "      name: Perplexity",
        ]

    if facts.base_model is None:
        origin = "was trained from scratch"
    elif facts.base_on_hub:
        origin = f"is a fine-tuned version of [{facts.base_model}](https://huggingface.co/{facts.base_model})"
    else:
        origin = f"is a fine-tuned version of `{facts.base_model}`"
    evaluated = "" if facts.evaluated_on[0] == facts.datasets[0] else f" (evaluated on {facts.evaluated_on[0]})"
    body = [f"# {facts.name}", "", f"This model {origin} on {facts.datasets[0]}{evaluated}, with minigpt.",
            f"These are its weights after step {step:,} of {facts.max_steps:,}"
            + ("." if finished else " (the run is not finished)."), ""]
    if measured is not None:
        body += ["It achieves the following results on the evaluation set:",
                 f"- Loss: {measured['val_loss']:.4f}", f"- Perplexity: {perplexity(measured['val_loss']):.4f}"]
    elif evals:
        body.append(f"These weights were not evaluated; the last evaluation was at step {evals[-1]['step']:,}.")
    else:
        body.append("These weights were not evaluated (no evaluation has run), so no loss is reported.")
    body += ["", "## Model description", "", facts.model, "",
             "## Training and evaluation data", "", *(f"- {line}" for line in facts.data), "",
             "## Training procedure", "", "### Training hyperparameters", "",
             "The following hyperparameters were used during training:",
             *(f"- {name}: {value}" for name, value in facts.hyperparameters), "",
             "### Training results", ""]
    table = results_table(rows)
    if table:
        body += ["| Training Loss | Epoch | Step | Validation Loss |", "|:-------------:|:-----:|:----:|:---------------:|"]
        body += [f"| {'No log' if t is None else f'{t:.4f}'} | {e:g} | {s} | {v:.4f} |" for t, e, s, v in table]
    else:
        body.append("No evaluation has run.")
    if measured is not None:
        body += ["", f"Validation loss at step {step:,}: {measured['val_loss']:.4f} "
                 f"(perplexity {perplexity(measured['val_loss']):.4f})."]
    body += ["", "### Framework versions", "", *(f"- {v}" for v in _versions()), "", *_how_to_use(facts.out, facts.window, exported=False)]
    return "---\n" + "\n".join(meta) + "\n---\n\n" + "\n".join(body)


def _how_to_use(folder: str, window: int, exported: bool) -> list[str]:
    """The card's last section: sample.py on `folder`, and transformers' pipeline on it where it is an
    `exported` one (else on its export, to a folder the text names), asking for at most half the
    model's context `window` (transformers fails past the window)."""
    lines = ["## How to use", "", "With minigpt:", "", "```bash",
             f"python sample.py --model {shlex.quote(folder)} \"Why is the sky blue?\"", "```", ""]
    if exported:
        lines.append("With transformers (its generation_config.json samples as sample.py does):")
    else:
        lines.append("With transformers, after exporting it (`python convert_hf_weights.py --to-hf "
                     f"{shlex.quote(folder)} --out exported/`):")
    model, new_tokens = json.dumps(folder if exported else "exported/"), min(50, window // 2)
    return lines + ["", "```python", "from transformers import pipeline", "",
                    f'generator = pipeline("text-generation", model={model})',
                    f'print(generator("Why is the sky blue?", max_new_tokens={new_tokens})[0]["generated_text"])',
                    "```", ""]


def card_license(card: Path) -> dict[str, str]:
    """The licence a model card (a README.md) states in its metadata, as the Hub reads it (YAML):
    {"license": id}, with `license_name` and `license_link` where the id is "other" and names them;
    {} where there is no card, no metadata, or no licence id (a number, a list, a YAML error). A
    relative `license_link` (a file of the repo, as the Hub recommends) in a card downloaded from the
    Hub becomes that file's address there, so that the cards which state the licence link to it."""
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(card) or {}
    except Exception:  # noqa: BLE001  (another model's card, unreadable, not UTF-8 or not YAML: none stated)
        return {}
    licence = meta.get("license")
    if not isinstance(licence, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", licence):
        return {}
    more = {k: meta[k] for k in ("license_name", "license_link") if licence == "other" and isinstance(meta.get(k), str)}
    snapshot = card.parent  # (huggingface_hub's cache: models--{owner}--{name}/snapshots/{commit}/README.md)
    if "://" not in more.get("license_link", "://") and snapshot.parent.name == "snapshots":
        repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")  # (no repo id holds "--")
        more["license_link"] = f"https://huggingface.co/{repo}/blob/{snapshot.name}/{more['license_link'].removeprefix('./')}"
    return {"license": licence, **more}


def conversion_card(source: str, on_hub: bool, licence: dict[str, str], folder: str, window: int,
                    exported: bool) -> str:
    """The card of `folder`, the weights of the model `source` (a Hub id where `on_hub`, else a local
    folder) unchanged, with a `window`-token context, as a minigpt checkpoint, or as a transformers
    folder where `exported`: the `licence` the source's card states (`card_license`; {}: none) and
    how to use the folder. Not `base_model`: the Hub reads it as a fine-tune of, or an adapter to."""
    meta = _licence_lines(licence)
    meta += ["tags:", *(f"- {_yaml(t)}" for t in TAGS),
             f"library_name: {'transformers' if exported else 'minigpt'}", "pipeline_tag: text-generation"]
    named = f"[{source}](https://huggingface.co/{source})" if on_hub else f"`{source}`"
    if licence:
        more = [licence[k] for k in ("license_name", "license_link") if k in licence]
        terms = f"Its licence is the source's, as its model card states it: {licence['license']}"
        terms += f" ({', '.join(more)})." if more else "."
    else:  # (no card, a card without metadata, a licence the Hub would not read either: a list, not UTF-8)
        terms = ("No licence could be read from the source's model card (it has none, or none in the form the "
                 "Hub reads): check the source's terms before you share this model.")
    body = [f"# {Path(folder).name or folder}", "", f"The weights of {named}, unchanged, converted by minigpt's "
            "`convert_hf_weights.py` (no training): see the source for what the model is, what it was trained "
            f"on and its limitations. {terms}", ""]
    return "---\n" + "\n".join(meta) + "\n---\n\n" + "\n".join(body + _how_to_use(folder, window, exported))


def copied_card(text: str, folder: str, window: int) -> str:
    """A minigpt checkpoint's card for a copy of it in `folder` (`convert_hf_weights.py` from one
    minigpt folder to another): the same text, with the "How to use" section naming the copy."""
    return _usage_for(text, folder, window, exported=False)


def _usage_for(text: str, folder: str, window: int, exported: bool) -> str:
    """`text` with its lines ending in LF and its "How to use" section for `folder` (see `_how_to_use`)."""
    text = text.replace("\r\n", "\n")
    usage = text.find("\n## How to use\n")
    if usage != -1:  # (the section minigpt wrote, up to the next one: a user's own sections after it are kept)
        after = text.find("\n## ", usage + 1)
        rest = "" if after == -1 else "\n" + text[after + 1:]
        text = text[: usage + 1] + "\n".join(_how_to_use(folder, window, exported)) + rest
    return text


def export_card(text: str, folder: str, window: int) -> str:
    """The card for a transformers export into `folder` of a model with a `window`-token context: the
    same text, with `library_name: transformers` (its lines ending in LF: a card saved with Windows'
    CRLF keeps its metadata block, which the Hub reads) and a "How to use" section for the export
    itself, not the run it came from."""
    text = _usage_for(text, folder, window, exported=True)
    head = re.match(r"---\n((?:.*?\n)?)---\n", text, re.DOTALL)  # (an empty block too)
    if head is None:  # no metadata block: give it one
        return f"---\nlibrary_name: transformers\n---\n\n{text}"
    meta = head.group(1)
    if re.search(r"^library_name:.*$", meta, re.MULTILINE):
        meta = re.sub(r"^library_name:.*$", "library_name: transformers", meta, flags=re.MULTILINE)
    else:
        meta += "library_name: transformers\n"
    return f"---\n{meta}---\n{text[head.end():]}"
