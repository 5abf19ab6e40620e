"""train.py's flags, each defined once: its default, type and help live in `TrainFlags`' fields, and
argparse, the data and loop configurations and the settings a resume must repeat are built from them.

The defaults are the published recipe: distilgpt2, ELI5-Category answers, 128-token blocks, batch 8,
AdamW (lr 2e-5, weight decay 0.01), linear decay, gradient clipping at 1.0, 3 epochs, seed 42.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .cli import flag, fraction, non_negative_float, non_negative_int, parser_from, positive_float, positive_int
from .cli import block_length, from_flags, path_text, run_flags
from .cli import seed as seed_in_range
from .files import check_utf8, home_expanded
from .formats import FORMATS

if TYPE_CHECKING:  # (the modules themselves are imported where used: --help stays quick)
    import torch

    from .card import RunFacts
    from .data import DataConfig, TokenBlocks
    from .model import GPT
    from .tokenizer import Tokenizer
    from .trainer import TrainConfig

RECIPE_MODEL = "distilbert/distilgpt2"
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # the recipe's, and transformers' defaults (no flag sets them)
DEFAULT_OUT = "checkpoints/eli5"  # where sample.py looks first
# --preset tiny: a model small enough to train on 2 CPU cores in well under a minute, on the ELI5
# sample shipped inside the package, with a BPE vocabulary learned from that sample (no download).
TINY_PRESET = dict(
    init="scratch", n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=16, lr=2e-3,
    warmup_steps=20, epochs=12, dropout=0.0, out="checkpoints/tiny", log_every=5, save_every=50,
)
TINY_VOCAB = 2048
SHAPE_FLAGS = ("n_layer", "n_head", "n_embd")  # a new model's shape (--init scratch)
SCRATCH_FLAGS = (*SHAPE_FLAGS, "tokenizer")  # a new model's only: refused with a loaded one
RECORDED_PATHS = ("init", "tokenizer", "data", "val_data")  # the sources a run's card and settings name
TRAINING_FLAGS = (  # what only a training run uses: refused with --eval-only, which trains nothing
    "grad_accum", "lr", "weight_decay", "warmup_steps", "epochs", "max_steps", "max_grad_norm", "dropout",
    "compile", "compile_mode", "log_every", "eval_every", "save_every",
)


_INT, _X = dict(metavar="N", type=positive_int), dict(metavar="X")
_PATH = dict(metavar="PATH", type=path_text)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes


@dataclasses.dataclass
class TrainFlags:
    """Every train.py flag (`--n-layer` is the field n_layer); `run=True`: a resume must repeat it."""

    preset: str | None = flag(None, "tiny: a 2-layer, 128-wide model trained from scratch on the 50-question ELI5 "
                              "sample bundled with minigpt, with a 2,048-token vocabulary learned from it (block 64, "
                              "batch 16, lr 2e-3, 20 warm-up steps, 12 epochs, dropout 0, --log-every 5, --save-every "
                              "50, out checkpoints/tiny); flags given as well still apply, and a model loaded "
                              "with --init keeps its shape and dropout", choices=["tiny"])
    init: str = flag(RECIPE_MODEL, "start from: a Hub id, an HF or minigpt checkpoint folder, or `scratch` for a new "
                     "model of --n-layer/--n-head/--n-embd", group="model", metavar="SOURCE", type=path_text)
    n_layer: int | None = flag(None, "(--init scratch) Transformer blocks (default: 6)", group="model", run=True, **_INT)
    n_head: int | None = flag(None, "(--init scratch) attention heads (default: 12)", group="model", run=True, **_INT)
    n_embd: int | None = flag(None, "(--init scratch) model width (default: 768)", group="model", run=True, **_INT)
    # (None, not RECIPE_MODEL, when not given: a loaded model refuses it only when given; see tokenizer_source)
    tokenizer: str | None = flag(None, f"(--init scratch) the tokenizer: a Hub id, a tokenizer.json file or a "
                                 f"folder holding one (default: {RECIPE_MODEL}; with --preset tiny, a vocabulary "
                                 f"learned from its data)",
                                 group="model", metavar="SOURCE", type=path_text)
    dropout: float | None = flag(None, "dropout probability (default: the model's own, 0.1 for distilgpt2)",
                                 group="model", run=True, type=fraction, **_X)
    data: str | None = flag(None, "training data: an ELI5 .json[.gz]/.jsonl/.parquet/.csv file, a .txt file or a "
                            "folder of .txt files (default: ELI5-Category's train split from the Hub)", group="data",
                            **_PATH)
    val_data: str | None = flag(None, "validation data (default: --val-fraction of --data's records)", group="data",
                                **_PATH)
    val_fraction: float = flag(0.2, "share of the records held out for validation", group="data", run=True,
                               type=fraction, **_X)
    format: str = flag("answers", "answers: a record's answers joined (the recipe); qa: 'Question: ...\\nAnswer: ...'",
                       group="data", run=True, choices=list(FORMATS))
    max_records: int | None = flag(None, "use only the first N records (default: 5000 from the Hub, all of a local "
                                   "file)", group="data", run=True, **_INT)
    block_size: int = flag(128, "tokens per training example", group="data", run=True, metavar="N", type=block_length)
    batch_size: int = flag(8, "examples per micro-batch per process", group="optimisation", **_INT)
    grad_accum: int = flag(1, "micro-batches per optimizer step", group="optimisation", run=True, **_INT)
    lr: float = flag(2e-5, "peak learning rate", group="optimisation", run=True, type=positive_float, **_X)
    weight_decay: float = flag(0.01, "AdamW weight decay, not on biases/LayerNorm", group="optimisation", run=True,
                               type=non_negative_float, **_X)
    warmup_steps: int = flag(0, "linear warm-up steps before the linear decay", group="optimisation", run=True,
                             metavar="N", type=non_negative_int)
    epochs: int = flag(3, "passes over the training data", group="optimisation", **_INT)
    max_steps: int | None = flag(None, "stop after N optimizer steps; overrides --epochs and sets the schedule's "
                                 "length", group="optimisation", **_INT)
    max_grad_norm: float = flag(1.0, "clip the gradient norm to this; 0: no clipping", group="optimisation", run=True,
                                type=non_negative_float, **_X)
    seed: int = flag(42, "seeds every generator the run draws from: initialisation, data split and order, dropout",
                     group="optimisation", run=True, metavar="N", type=seed_in_range)
    device: str = flag("auto", "auto, cpu, cuda, cuda:N (one GPU of several; not under torchrun) or mps "
                        "(auto: cuda, then mps, then cpu)", group="hardware")
    dtype: str = flag("auto", "fp32, bf16 or fp16 (a GPU's, with loss scaling) compute precision; weights stay "
                      "fp32 (auto: bf16 on a GPU that has it, else fp32; on CPUs auto stays fp32 because most CPUs "
                      "only emulate bf16, ~100x slower (bf16 warns then): ask for bf16 on one with AVX-512 BF16 or "
                      "AMX)", group="hardware")
    compile: bool = flag(False, "compile the model with torch.compile (slow to start, faster steps)",
                         group="hardware", action="store_true")
    compile_mode: str | None = flag(None, "(--compile) torch.compile's mode: default; reduce-overhead (CUDA graphs, "
                                    "for small launch-bound steps such as the recipe's 8 x 128 on a large GPU; the "
                                    "batch dimension is marked dynamic; --grad-accum 1 only); max-autotune (longer "
                                    "start, tuned kernels, and CUDA graphs as reduce-overhead); "
                                    "max-autotune-no-cudagraphs (tuned kernels alone, any --grad-accum) "
                                    "(default: default)", group="hardware",
                                    choices=COMPILE_MODES)
    out: str = flag(DEFAULT_OUT, "output folder: the checkpoint, its model card, metrics.jsonl, loss.png",
                    group="output", **_PATH)
    log_every: int = flag(10, "write a metrics row every N steps", group="output", **_INT)
    eval_every: int = flag(0, "also evaluate every N steps; 0: at each epoch's end and the run's end only",
                           group="output", metavar="N", type=non_negative_int)
    save_every: int = flag(0, "checkpoint every N steps; 0: at the end only", group="output", metavar="N",
                           type=non_negative_int)
    resume: bool = flag(False, "continue the run in --out from its last checkpoint (same settings)", group="output",
                        action="store_true")
    no_progress: bool = flag(False, "no progress bar", group="output", action="store_true")
    eval_only: bool = flag(False, "only print the validation loss and perplexity of --init on the validation data "
                           "training would use (--val-data, or the --val-fraction split of --data with --seed), at "
                           "--batch-size; trains and writes nothing", group="output", action="store_true")
    given: frozenset[str] = frozenset()  # (no flag) the flags typed on the command line, whatever their values
    # (empty for TrainFlags made in Python: every value counts as given, except the recipe's --init)

    def data_config(self, cache_dir: str | None = None) -> DataConfig:
        """The data flags as a DataConfig: training and --eval-only build their blocks from the same one."""
        from .data import DataConfig

        return DataConfig(
            source=self.data, val_source=self.val_data, format=self.format, block_size=self.block_size,
            max_records=self.max_records, val_fraction=self.val_fraction, seed=self.seed, cache_dir=cache_dir,
        )

    def train_config(self, max_steps: int, dtype: torch.dtype) -> TrainConfig:
        """The loop flags as a TrainConfig, for `max_steps` steps in all at precision `dtype`."""
        from .trainer import TrainConfig

        return TrainConfig(
            max_steps=max_steps, grad_accum=self.grad_accum, max_grad_norm=self.max_grad_norm, dtype=dtype,
            compile=self.compile, compile_mode=self.compile_mode or "default", log_every=self.log_every,
            eval_every=self.eval_every, save_every=self.save_every, progress=not self.no_progress,
        )

    def run_config(self, world_size: int, dtype_name: str, max_steps: int | None) -> dict[str, Any]:
        """The settings that decide the run's numbers, by flag: a resume must use the same ones.
        `max_steps` None: all but the steps, which with --epochs wait for the data to be counted."""
        from .run_folder import recorded_path as where

        settings = {
            **run_flags(self), "--init": where(self.init), "--data": where(self.data),
            "--val-data": where(self.val_data), "--batch-size x processes": self.batch_size * world_size,
            "--dtype": dtype_name, "--tokenizer": where(self.tokenizer),
        }
        return settings if max_steps is None else {**settings, "steps (--epochs / --max-steps)": max_steps}

    def tokenizer_source(self) -> str:
        """Where a new model's tokenizer comes from: --tokenizer, else the recipe's."""
        return self.tokenizer or RECIPE_MODEL

    def preset_tokenizer(self) -> Tokenizer:
        """--preset tiny's tokenizer: a TINY_VOCAB-token BPE vocabulary learned from the answers of the
        bundled ELI5 sample."""
        import json

        from .data import tiny_preset_path
        from .formats import answers_text
        from .tokenizer import Tokenizer

        lines = tiny_preset_path().read_text(encoding="utf-8").splitlines()
        texts = [answers_text(json.loads(line)["answers"]["text"]) for line in lines if line.strip()]
        return Tokenizer.train_bpe(texts, TINY_VOCAB)

    def card_facts(self, model: GPT, train_blocks: TokenBlocks, val_blocks: TokenBlocks, world_size: int,
                   dtype_name: str, max_steps: int, license: dict[str, str]) -> RunFacts:
        """What the model card says about a run of these flags (minigpt.card.RunFacts), under `license`."""
        from .card import RunFacts
        from .loading import is_hub_id
        from .sources import HUB_DATASET

        c, scratch = model.config, self.init == "scratch"
        shown = lambda path: home_expanded(path).resolve().name  # noqa: E731  (a file's or folder's own name)
        datasets = [HUB_DATASET] if self.data is None else [shown(self.data)]
        datasets += [shown(self.val_data)] if self.val_data is not None else []
        # (without --val-data, validation is a held-out share of the training records: their split)
        evaluated_on = (datasets[-1], "validation") if self.val_data is not None else (datasets[0], "train")
        split = (f"from --val-data {self.val_data}" if self.val_data else
                 f"the --val-fraction {self.val_fraction:g} split of the records, seed {self.seed}")
        # (--data as it was typed; the blocks name this run's source too, the Hub's file by its hf:// name)
        source = train_blocks.manifest.get("source") if self.data is None else self.data
        data = [f"source: {source}, format `{self.format}`"]
        for role, blocks, how in (("training", train_blocks, ""), ("validation", val_blocks, f" ({split})")):
            m = blocks.manifest
            data.append(f"{role}: {m.get('records', 0):,} records, {m.get('tokens', 0):,} tokens, "
                        f"{len(blocks):,} blocks of {self.block_size} tokens{how}")
        hyper = [
            ("learning_rate", f"{self.lr:g}"), ("train_batch_size", self.batch_size),
            ("eval_batch_size", self.batch_size), ("seed", self.seed), ("gradient_accumulation_steps", self.grad_accum),
            ("num_processes", world_size), ("total_train_batch_size", self.batch_size * self.grad_accum * world_size),
            ("optimizer", f"AdamW (minigpt.optim) with betas=({ADAM_BETAS[0]},{ADAM_BETAS[1]}) and epsilon={ADAM_EPS}, "
                          f"weight decay {self.weight_decay:g} (not on biases and LayerNorm weights)"),
            ("lr_scheduler_type", "linear"), ("lr_scheduler_warmup_steps", self.warmup_steps),
            ("training_steps", max_steps) if self.max_steps else ("num_epochs", self.epochs),
            ("max_grad_norm", f"{self.max_grad_norm:g}"), ("dropout", f"{c.dropout:g}"),
            ("precision", "fp32" if dtype_name == "fp32" else f"{dtype_name} autocast, fp32 weights"),
        ]
        return RunFacts(
            name=Path(self.out).resolve().name, out=self.out, base_model=None if scratch else self.init,
            base_on_hub=not scratch and is_hub_id(self.init), datasets=datasets, evaluated_on=evaluated_on,
            model=f"A GPT-2 language model of {model.num_parameters():,} parameters: {c.n_layer} layers, "
                  f"{c.n_head} heads, {c.n_embd} wide, a {c.block_size}-token context, a vocabulary of "
                  f"{c.vocab_size:,}; trained with minigpt, a from-scratch PyTorch GPT-2.",
            data=data, hyperparameters=hyper, max_steps=max_steps, window=c.block_size, license=license,
        )


def parse_train_flags(argv: Sequence[str] | None, description: str) -> TrainFlags:
    """train.py's command line as TrainFlags; a mistake is argparse's usage error (exit 2)."""
    p = parser_from(TrainFlags, description)
    given = p.given(argv)  # the flags on the command line, whatever their values
    first, _ = p.parse_known_args(argv)  # (--preset and --init, before the preset's defaults)
    if first.preset == "tiny":  # the preset changes defaults; flags given explicitly still win
        from .data import tiny_preset_path

        preset = {**TINY_PRESET, "data": str(tiny_preset_path())}
        if "init" in given and first.init != "scratch":  # a loaded model keeps its shape and dropout: the
            preset = {k: v for k, v in preset.items() if k not in (*SHAPE_FLAGS, "dropout")}  # preset's are new
        p.set_defaults(**preset)
    args = from_flags(TrainFlags, p.parse_args(argv), given=frozenset(given))
    args.out = str(home_expanded(args.out))  # (`--out=~/run`: no shell expands a ~ after "="; `~nouser/run` refused)
    for name in RECORDED_PATHS:  # (before any work: the first save would fail on it)
        if getattr(args, name) is not None:
            check_utf8(getattr(args, name), f"--{name.replace('_', '-')} is written into the model card and the run's "
                       "settings, which are UTF-8 text")
    scratch_flags = [f for f in SCRATCH_FLAGS if getattr(args, f) is not None]  # (None: not given)
    if args.init != "scratch" and scratch_flags:
        kept = "tokenizer" if scratch_flags[0] == "tokenizer" else "shape"
        p.error(f"--{scratch_flags[0].replace('_', '-')} needs --init scratch (a loaded model keeps its {kept})")
    if args.compile_mode is not None and not args.compile:
        p.error(f"--compile-mode {args.compile_mode} needs --compile")
    if args.compile_mode is not None and args.grad_accum > 1:
        import torch  # (only here: a usage error needs no torch)

        from .trainer import CUDA_GRAPH_MODES

        on_gpu = torch.cuda.is_available() and args.device.startswith(("cuda", "auto"))  # (no CUDA: said later)
        if args.compile_mode in CUDA_GRAPH_MODES and on_gpu:
            # a CUDA graph's replay reuses its output memory, where the last micro-batch's gradients
            # still wait to be added to (pytorch/pytorch#169545)
            p.error(f"--compile-mode {args.compile_mode} takes --grad-accum 1: its CUDA graphs would overwrite the "
                    "gradients being accumulated (max-autotune-no-cudagraphs takes any)")
    if args.eval_only and (args.init == "scratch" or args.resume):
        p.error("--eval-only evaluates a trained model: give --init SOURCE, without --resume or --init scratch")
    if args.eval_only:  # a flag that would change nothing here is refused, not ignored
        p.refuse(given, ("out",), "has no effect with --eval-only, which writes nothing; to evaluate a run's "
                 "checkpoint, give its folder as --init")
        p.refuse(given, TRAINING_FLAGS, "has no effect with --eval-only, which trains nothing")
    if args.val_data is not None and not args.resume:  # (a run made before this refusal may need it to resume)
        p.refuse(given, ("val_fraction",), "has no effect with --val-data: it splits --data's records, and with "
                 "--val-data none are split; give one of them")
    if args.eval_only and args.val_data is not None:
        p.refuse(given, ("data", "max_records", "seed"), "has no effect with --eval-only --val-data, which "
                 "reads only --val-data (whole, in order)")
    if args.val_data is None and args.val_fraction == 0:  # (--resume too: the run's own settings are checked equal)
        p.refuse(given, ("eval_every",), "has no effect with --val-fraction 0 and no --val-data: there is no "
                 "validation data to evaluate")
    return args
