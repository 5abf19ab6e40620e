"""HF <-> minigpt weights: key variants, Conv1D transposes, legacy .bin, export, config mapping."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt.checkpoint import load_checkpoint
from minigpt.config import GPTConfig
from minigpt.errors import MinigptError
from minigpt.hf import export_hf, hf_to_minigpt_name
from minigpt.loading import load_model, resolve_model


def hf_logits(folder, idx):
    from transformers import GPT2LMHeadModel

    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(folder).eval()(idx).logits


IDX = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(5))
# Largest logit difference from transformers on the tiny reference model: measured 1.2e-6 (fp32
# rounding; logits up to 3.5). A wrong GELU moves them by 8e-4, a swapped or dropped tensor by far more.
FP32_TOL = 5e-6


def test_key_map():
    assert hf_to_minigpt_name("h.3.mlp.c_fc.weight") == "transformer.h.3.mlp.c_fc.weight"
    assert hf_to_minigpt_name("transformer.wte.weight") == "transformer.wte.weight"
    assert hf_to_minigpt_name("h.0.attn.bias") is None  # causal-mask buffer, not a weight
    assert hf_to_minigpt_name("transformer.h.0.attn.masked_bias") is None
    assert hf_to_minigpt_name("h.0.attn.c_attn.bias") == "transformer.h.0.attn.c_attn.bias"  # a weight!
    assert hf_to_minigpt_name("lm_head.weight") == "lm_head.weight"  # kept, to be checked against wte


def test_unprefixed_keys_mask_buffers_and_lm_head(tiny_hf_dir, tmp_path):
    """The original gpt2 upload: no `transformer.` prefix, mask buffers saved, lm_head present."""
    state = load_file(tiny_hf_dir / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in state.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    legacy["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    legacy["lm_head.weight"] = state["transformer.wte.weight"].clone()
    save_file(legacy, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_hf_dir / name).read_bytes())
    model, _ = load_model(tmp_path)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(tiny_hf_dir, IDX)).abs().max() < FP32_TOL


def test_legacy_pytorch_model_bin(tiny_hf_dir, tmp_path):
    state = load_file(tiny_hf_dir / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_hf_dir / name).read_bytes())
    model, _ = load_model(tmp_path)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(tiny_hf_dir, IDX)).abs().max() < FP32_TOL


def test_a_folder_with_safetensors_and_a_bin_loads_the_safetensors_as_transformers_does(tiny_hf_dir, tmp_path):
    """An HF folder holding both model.safetensors and a pytorch_model.bin of other weights (an older
    save left beside a newer one): transformers reads the safetensors, and so does minigpt, whose
    logits are then transformers'. Preferring the .bin (a pickle, and other weights) went unnoticed:
    no test folder held both."""
    import shutil

    from minigpt.hf import hf_weight_files

    folder = tmp_path / "both"
    shutil.copytree(tiny_hf_dir, folder)
    torch.save({k: v + 0.05 for k, v in load_file(folder / "model.safetensors").items()}, folder / "pytorch_model.bin")
    expected = hf_logits(folder, IDX)
    assert (expected - hf_logits(tiny_hf_dir, IDX)).abs().max() == 0  # (transformers read the safetensors)
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - expected).abs().max() < FP32_TOL  # (the .bin's: 2.4 apart)
    assert hf_weight_files(folder) == [folder / "model.safetensors"]


def test_gpt2configs_other_names_for_its_fields_are_read(tmp_path):
    """transformers reads hidden_size, max_position_embeddings, num_attention_heads and
    num_hidden_layers as n_embd, n_positions, n_head and n_layer. minigpt read only the latter, and
    took its defaults instead: 12 heads where the config said 4, logits 0.59 apart without a word
    (the widths' defaults were refused, blaming the weights' shapes). Both names differing is refused."""
    from conftest import save_hf_model
    from minigpt.config import HF_ALIASES

    folder = save_hf_model(tmp_path / "aliases", n_layer=2, n_head=4, n_embd=96, n_positions=64)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **{alias: config.pop(name) for name, alias in HF_ALIASES.items()}}))
    model, _ = load_model(folder)
    assert (model.config.n_head, model.config.n_embd, model.config.n_layer, model.config.block_size) == (4, 96, 2, 64)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(folder, IDX)).abs().max() < FP32_TOL
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "n_head": 2}))
    with pytest.raises(MinigptError, match=r"config\.json: config: n_head 2 and num_attention_heads 4 \(another name for it\) differ"):
        load_model(folder)


def test_conv1d_weights_are_transposed(tiny_hf_dir):
    """c_proj is square, so only the values (not the shape) show a missed transpose."""
    state = load_file(tiny_hf_dir / "model.safetensors")
    model, _ = load_model(tiny_hf_dir)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        key = f"transformer.h.1.{name}.weight"
        assert torch.equal(model.state_dict()[key], state[key].t())


def test_minigpt_checkpoint_layout(tiny_minigpt_dir, tiny_hf_dir):
    assert sorted(p.name for p in tiny_minigpt_dir.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "tokenizer.json"]  # (the card: see test_card.py)
    config = json.loads((tiny_minigpt_dir / "config.json").read_text())
    assert config["n_layer"] == 2 and config["n_embd"] == 64 and "model_type" not in config
    assert resolve_model(tiny_minigpt_dir)[1] == "minigpt"
    assert resolve_model(tiny_hf_dir)[1] == "hf"
    model, tokenizer = load_checkpoint(tiny_minigpt_dir)
    assert tokenizer.eos_id == 50256
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(tiny_hf_dir, IDX)).abs().max() < FP32_TOL


def test_export_round_trip_and_pipeline(tiny_minigpt_dir, tiny_hf_dir, tmp_path):
    from transformers import pipeline

    model, tokenizer = load_model(tiny_minigpt_dir)
    out = export_hf(model, tokenizer, tmp_path / "exported")
    with torch.no_grad():
        assert (hf_logits(out, IDX) - hf_logits(tiny_hf_dir, IDX)).abs().max() == 0  # measured: the same bits
    generator = pipeline("text-generation", model=str(out))
    result = generator("The immune system", max_new_tokens=5, do_sample=False)
    from minigpt.sampling import SamplingConfig, generate_ids

    config = SamplingConfig(max_new_tokens=5, greedy=True)
    greedy = generate_ids(model, tokenizer.encode("The immune system"), config, eos_id=tokenizer.eos_id)
    assert result[0]["generated_text"] == "The immune system" + tokenizer.decode(greedy[0])
    # and the exported folder loads back into minigpt unchanged
    back, _ = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


def test_an_export_samples_in_transformers_as_sample_py_does(tiny_minigpt_dir, tmp_path):
    """Without a generation_config.json transformers sampled at temperature 0.7 with top-p 1.0, and
    `generate()` was greedy for 20 tokens; a tiny model's pipeline("Hi") asked for 256 new tokens of a
    64-token window and failed (IndexError): the length is bounded by the window, prompt included.
    config.json declares the weights' dtype too."""
    import json

    from transformers import AutoModelForCausalLM, GenerationConfig

    from minigpt.config import GPTConfig as Config
    from minigpt.model import GPT

    model, tokenizer = load_model(tiny_minigpt_dir)
    out = export_hf(model, tokenizer, tmp_path / "exported")
    settings = GenerationConfig.from_pretrained(out)
    assert (settings.do_sample, settings.temperature, settings.top_k, settings.top_p) == (True, 1.0, 50, 0.95)
    assert (settings.max_length, settings.repetition_penalty, settings.eos_token_id) == (256, 1.0, 50256)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    small = GPT(Config(vocab_size=50257, block_size=16, n_layer=1, n_head=1, n_embd=8))
    out = export_hf(small.to(torch.bfloat16), tokenizer, tmp_path / "small")
    assert GenerationConfig.from_pretrained(out).max_length == 16  # (prompt and new tokens: no slide)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert hf.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    torch.manual_seed(0)
    assert hf.generate(torch.tensor([[15496]])).shape == (1, 16)  # sampled up to the window, no error
    assert hf.generate(torch.tensor([[15496] * 12])).shape == (1, 16)  # a longer prompt too


def test_an_exports_eos_and_bos_are_its_tokenizers(tmp_path):
    """A model with its own small BPE vocabulary (as `train.py --preset tiny` makes) has its EOS at
    another id than GPT-2's 50256 (here 0); the export's generation_config.json names that id as EOS
    and BOS, as config.json does. A hard-coded 50256 (outside its 295-token vocabulary) went unnoticed:
    every export test used GPT-2's vocabulary, where the two agree."""
    from transformers import GenerationConfig

    from minigpt.model import GPT
    from minigpt.tokenizer import Tokenizer

    tokenizer = Tokenizer.train_bpe(["why is the sky blue? because of rayleigh scattering."] * 20, 300)
    assert tokenizer.eos_id != 50256
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    out = export_hf(model, tokenizer, tmp_path / "exported")
    generation = json.loads((out / "generation_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (generation["eos_token_id"], generation["bos_token_id"]) == (tokenizer.eos_id, tokenizer.eos_id)
    assert (config["eos_token_id"], config["bos_token_id"]) == (tokenizer.eos_id, tokenizer.eos_id)
    settings = GenerationConfig.from_pretrained(out)
    assert (settings.eos_token_id, settings.bos_token_id) == (tokenizer.eos_id, tokenizer.eos_id)


def test_an_export_generates_without_a_prompt_from_eos(tiny_minigpt_dir, tmp_path):
    """sample.py "" starts from <|endoftext|>; so does transformers' generate() with no prompt on an
    export, whose generation_config.json names <|endoftext|> as BOS: the same greedy tokens. Without
    that BOS (transformers reads the generation config's, not config.json's) generate() with no
    prompt failed, and no test noticed."""
    from transformers import AutoModelForCausalLM

    from minigpt.sampling import SamplingConfig, generate_ids

    model, tokenizer = load_model(tiny_minigpt_dir)
    out = export_hf(model, tokenizer, tmp_path / "exported")
    assert json.loads((out / "generation_config.json").read_text()).get("bos_token_id") == tokenizer.eos_id == 50256
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        tokens = hf.generate(do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_id)[0].tolist()
    greedy = generate_ids(model, [], SamplingConfig(max_new_tokens=6, greedy=True), eos_id=tokenizer.eos_id)[0]
    assert tokens[0] == tokenizer.eos_id and tokens[1:] == greedy and len(greedy) == 6


def test_config_mapping_round_trip():
    cfg = GPTConfig(n_layer=24, n_head=16, n_embd=1024)  # gpt2-medium's numbers
    assert GPTConfig.from_hf(cfg.to_hf(eos_token_id=50256)) == cfg


def test_dropouts_that_differ_are_named_in_a_warning():
    """minigpt has one dropout (resid_pdrop's): a config whose three differ loads (inference does not
    use them), with a warning naming all three; equal ones load silently."""
    import warnings

    hf = {**GPTConfig().to_hf(eos_token_id=50256), "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.3}
    with pytest.warns(UserWarning, match=r"resid_pdrop 0\.3, embd_pdrop 0\.0, attn_pdrop 0\.0 differ"):
        assert GPTConfig.from_hf(hf).dropout == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GPTConfig.from_hf({**hf, "resid_pdrop": 0.0}).dropout == 0.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_type", "llama"),
        ("activation_function", "relu"),
        ("scale_attn_weights", False),  # scores not divided by sqrt(head size): other attention weights
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("add_cross_attention", True),
        ("tie_word_embeddings", False),
        ("n_inner", 1000),
    ],
)
def test_unsupported_hf_config_names_the_field(field, value):
    hf = GPTConfig().to_hf(eos_token_id=50256)
    hf[field] = value
    with pytest.raises(MinigptError, match=field):
        GPTConfig.from_hf(hf)


def test_gelu_pytorch_tanh_is_gpt2s_gelu_and_loads(tmp_path):
    """activation_function "gelu_pytorch_tanh" is the tanh GELU GPT-2 computes (torch's kernel of it, which
    newer uploads name): such a config loads, not refused as "relu" is, and gives transformers' logits
    (measured: the same bits)."""
    from conftest import save_hf_model

    folder = save_hf_model(tmp_path / "tanh", n_layer=1, n_head=2, n_embd=32, n_positions=64,
                           activation_function="gelu_pytorch_tanh")
    assert json.loads((folder / "config.json").read_text())["activation_function"] == "gelu_pytorch_tanh"
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(folder, IDX)).abs().max() < FP32_TOL


def test_a_layer_norm_epsilon_other_than_gpt2s_is_kept_both_ways(tmp_path):
    """layer_norm_epsilon 1e-2 (GPT-2's is 1e-5) reaches every LayerNorm of the loaded model, whose
    logits are then transformers' (measured 2.4e-7 apart, logits up to 2.4); with the file's epsilon
    ignored (1e-5) they are 0.68 apart. Saved back, config.json says 1e-2 again, and transformers computes
    the same logits from it."""
    from conftest import save_hf_model

    folder = save_hf_model(tmp_path / "eps", n_layer=1, n_head=2, n_embd=32, n_positions=64, layer_norm_epsilon=1e-2)
    model, tokenizer = load_model(folder)
    assert model.config.layer_norm_eps == 1e-2
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(m.eps == 1e-2 for m in norms)  # ln_1, ln_2 and ln_f
    expected = hf_logits(folder, IDX)
    with torch.no_grad():
        assert (model(IDX)[0] - expected).abs().max() < FP32_TOL
    assert GPTConfig(layer_norm_eps=1e-2).to_hf(eos_token_id=50256)["layer_norm_epsilon"] == 1e-2
    out = export_hf(model, tokenizer, tmp_path / "exported")
    assert json.loads((out / "config.json").read_text())["layer_norm_epsilon"] == 1e-2
    assert (hf_logits(out, IDX) - expected).abs().max() < FP32_TOL


def test_an_untied_lm_head_is_refused_not_dropped(tmp_path):
    """A GPT-2 whose LM head is a matrix of its own (`tie_word_embeddings: false`) computes other
    logits than ours, which reads the token embedding: loading it used to drop the head in silence
    and decode other tokens than transformers. It is refused, naming the tensor."""
    from conftest import save_hf_model

    folder = save_hf_model(tmp_path / "untied", n_layer=1, n_head=2, n_embd=32, n_positions=64,
                           tie_word_embeddings=False)
    assert load_file(str(folder / "model.safetensors"))["lm_head.weight"].shape == (50257, 32)
    with pytest.raises(MinigptError, match=r"untied: lm_head\.weight differs from transformer\.wte\.weight"):
        load_model(folder)


def hf_folder_with_head(folder: Path, head: str, legacy: bool = False, **config) -> Path:
    """A tiny HF folder (save_pretrained's, with `config`) whose weights hold `lm_head.weight` as
    "other" (values of its own), "copy" (an exact copy of wte), "only" (wte's values, wte itself
    left out) or "none" (no such tensor); `legacy`: in a pytorch_model.bin, not a model.safetensors."""
    from conftest import save_hf_model

    save_hf_model(folder, n_layer=1, n_head=2, n_embd=32, n_positions=64, **config)
    state = load_file(folder / "model.safetensors")
    wte = state["transformer.wte.weight"]
    state.pop("lm_head.weight", None)  # (save_pretrained writes one only when untied)
    if head != "none":
        other = torch.randn(wte.shape, generator=torch.Generator().manual_seed(6)) * wte.std()
        state["lm_head.weight"] = other if head == "other" else wte.clone()
    if head == "only":
        del state["transformer.wte.weight"]
    if legacy:
        (folder / "model.safetensors").unlink()
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("tie_word_embeddings", [True, False])
@pytest.mark.parametrize("head", ["other", "copy", "none", "only"])
def test_an_lm_head_loads_only_as_a_copy_of_wte(head, tie_word_embeddings, tmp_path):
    """minigpt's head is wte. A file's lm_head.weight of other values is what transformers uses
    (untied: even when config.json asks to tie, with a warning), so it is refused in one line naming
    it; it used to be dropped in silence. A copy of wte loads whatever the config says (transformers
    then computes the same logits), and no head loads when tied (transformers ties it to wte). A
    head without wte, tied, is the embedding (transformers ties wte to it); untied, wte is missing
    (transformers would draw a random one)."""
    folder = hf_folder_with_head(tmp_path / "hf", head, tie_word_embeddings=tie_word_embeddings)
    refusal = {"other": r"hf: lm_head\.weight differs from transformer\.wte\.weight: an LM head of its own",
               "none": r"hf: config\.json sets tie_word_embeddings false, but the weights hold no lm_head\.weight",
               "only": r"model\.safetensors: missing tensor 'transformer\.wte\.weight'"}
    if head == "other" or (head in ("none", "only") and not tie_word_embeddings):
        with pytest.raises(MinigptError, match=refusal[head]) as error:
            load_model(folder)
        assert "\n" not in str(error.value)
        return
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(folder, IDX)).abs().max() < FP32_TOL


def test_a_legacy_bin_with_a_head_of_its_own_is_refused(tmp_path):
    """The pytorch_model.bin reader maps names through the same key map, so meets the same check."""
    with pytest.raises(MinigptError, match=r"lm_head\.weight differs from transformer\.wte\.weight"):
        load_model(hf_folder_with_head(tmp_path / "hf", "other", legacy=True))
    model, _ = load_model(hf_folder_with_head(tmp_path / "copy", "copy", legacy=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    folder = hf_folder_with_head(tmp_path / "only", "only", legacy=True)
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(folder, IDX)).abs().max() < FP32_TOL


def sharded_hf_folder(folder: Path) -> tuple[Path, dict[str, str]]:
    """A tiny HF folder whose weights are shards listed in model.safetensors.index.json, as
    `save_pretrained(max_shard_size=...)` writes them; returns it and the index's weight map."""
    from transformers import GPT2LMHeadModel

    from conftest import save_hf_model

    save_hf_model(folder, n_layer=2, n_head=2, n_embd=32, n_positions=64)
    GPT2LMHeadModel.from_pretrained(folder).save_pretrained(folder, max_shard_size="1MB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2  # (else the cases below test nothing)
    return folder, weight_map


def rewrite_shard(folder: Path, shard: str, change) -> None:
    state = load_file(folder / shard)
    change(state)
    save_file(state, str(folder / shard), metadata={"format": "pt"})


def test_shards_load_and_are_checked_as_one_file(tmp_path, monkeypatch):
    """Sharded weights load as transformers reads them. Across shards the checks hold as in one
    file: a tensor missing from every shard names the index, a tensor in two shards names both
    (one file naming a tensor twice is refused too), and every shard's header is checked before
    any tensor of any shard is read."""
    import minigpt.checkpoint

    folder, weight_map = sharded_hf_folder(tmp_path / "ok")
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(folder, IDX)).abs().max() < FP32_TOL

    folder, weight_map = sharded_hf_folder(tmp_path / "missing")
    rewrite_shard(folder, weight_map["transformer.wpe.weight"], lambda state: state.pop("transformer.wpe.weight"))
    with pytest.raises(MinigptError, match=r"missing/model\.safetensors\.index\.json: missing tensor 'transformer\.wpe"):
        load_model(folder)

    folder, weight_map = sharded_hf_folder(tmp_path / "twice")
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    name = next(n for n, shard in weight_map.items() if shard == first)
    copy = load_file(folder / first)[name]
    rewrite_shard(folder, last, lambda state: state.update({name: torch.zeros_like(copy)}))
    with pytest.raises(MinigptError, match=rf"tensor '{re.escape(name)}' is in both {first} and {last}"):
        load_model(folder)

    folder, weight_map = sharded_hf_folder(tmp_path / "junk")
    rewrite_shard(folder, last, lambda state: state.update({"junk": torch.zeros(3)}))

    def no_reading(*args):
        raise AssertionError("a tensor was read before every shard's header was checked")

    monkeypatch.setattr(minigpt.checkpoint, "read_tensor", no_reading)
    with pytest.raises(MinigptError, match=rf"{last}: unexpected tensor 'junk'"):
        load_model(folder)


# A fresh process: the peak memory of refusing a pytorch_model.bin that holds one tensor too many.
# (Through /proc: a child's ru_maxrss starts at its parent's size, pytest's, whatever it does.)
REFUSAL_PEAK = """
import sys
from pathlib import Path
from minigpt.errors import MinigptError
from minigpt.loading import load_model
status = lambda key: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                              if l.startswith(key + ":")).split()[1]) / 1024  # (MB; the file gives kB)
Path("/proc/self/clear_refs").write_text("5")  # (the peak restarts from the memory resident now)
before = status("VmRSS")
try:
    load_model(sys.argv[1])
except MinigptError as e:
    print(str(e).replace(" ", "_"), status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak through Linux's /proc")
def test_sharded_pytorch_model_bins_load_and_are_checked_as_one_file(tmp_path):
    """Shards saved as pytorch_model-*.bin (transformers' default before safetensors, for a model over
    its shard size: gpt2-xl in fp32 from 4.30 on) were not read: "no model.safetensors (or
    pytorch_model.bin)". They load as the safetensors shards do, with the same checks."""
    from conftest import as_bin_shards

    sharded, weight_map = sharded_hf_folder(tmp_path / "st")
    folder = as_bin_shards(sharded, tmp_path / "bin")
    model, _ = load_model(folder)
    with torch.no_grad():
        assert (model(IDX)[0] - hf_logits(sharded, IDX)).abs().max() < FP32_TOL
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())["weight_map"]
    shard = folder / index["transformer.wpe.weight"]
    state = torch.load(shard, weights_only=True)
    del state["transformer.wpe.weight"]
    torch.save(state, shard)
    with pytest.raises(MinigptError, match=r"bin/pytorch_model\.bin\.index\.json: missing tensor 'transformer\.wpe"):
        load_model(folder)
    shard.unlink()
    with pytest.raises(MinigptError, match=rf"^{re.escape(str(shard))}: file not found \(a shard its index names\)$"):
        load_model(folder)


def test_a_legacy_bin_is_checked_before_its_weights_are_read(tiny_hf_dir, tmp_path):
    """A pytorch_model.bin naming a tensor no GPT-2 has, of 400 MB, is refused by its names alone:
    the file is memory-mapped for the check, not read (reading it first peaked 384 MB higher)."""
    state = load_file(tiny_hf_dir / "model.safetensors")
    state["junk"] = torch.zeros(100_000_000)
    src = tmp_path / "src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    for name in ("config.json", "vocab.json", "merges.txt"):
        (src / name).write_bytes((tiny_hf_dir / name).read_bytes())
    r = subprocess.run([sys.executable, "-c", REFUSAL_PEAK, str(src)], capture_output=True, text=True, timeout=120)
    message, peak_mb = r.stdout.split()
    assert message.endswith("unexpected_tensor_'junk'"), r.stdout + r.stderr
    assert float(peak_mb) < 40, peak_mb


# A fresh process loads the model: in the suite's own process, memory that earlier tests freed could
# go back to the system during the load and count as part of its peak (once 87 MB over, against 62).
LOAD_PEAK = """
import sys
from pathlib import Path
from minigpt.loading import load_model
status = lambda key: int(next(l for l in Path("/proc/self/status").read_text().splitlines()
                              if l.startswith(key + ":")).split()[1]) / 1024  # (MB; the file gives kB)
Path("/proc/self/clear_refs").write_text("5")  # (the peak restarts from the memory resident now)
model, _ = load_model(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(weights, status("VmHWM") - status("VmRSS"))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the peak through Linux's /proc")
def test_loading_holds_the_weights_once_not_twice(distil_hf_dir, tmp_path):
    """Loading distilgpt2 (328 MB of fp32 weights), from an HF folder and from a minigpt checkpoint:
    the process's memory at its peak is within 20% of the weights of where it ends. (It was ~2x: the
    pages read through one memory mapping of the whole file stayed resident while the model copied
    them, and the NaN check made temporaries as large as the embedding.)"""
    from minigpt.loading import convert_to_minigpt

    checkpoint = convert_to_minigpt(distil_hf_dir, tmp_path / "ckpt")
    for folder in (distil_hf_dir, checkpoint):
        r = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(folder)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        weights_mb, above_the_end_mb = map(float, r.stdout.split())
        assert 300 < weights_mb < 320  # (MiB; the tied head counted once)
        assert above_the_end_mb < 0.2 * weights_mb, (folder, above_the_end_mb)


def test_loading_draws_no_random_numbers_and_imports_no_compiler(tiny_minigpt_dir, tiny_hf_dir):
    """A model to load is built on the meta device without its random initialisation: drawing there
    costs nothing, but the first `normal_` on the meta device imports torch's compiler (~0.9 s of
    `sample.py`'s ~4 s on 2 cores). In a fresh process, loading either kind of folder leaves
    torch._dynamo unimported, and the loaded weights are the file's."""
    script = (
        "import sys, torch\n"
        "from minigpt.loading import load_model\n"
        f"models = [load_model({str(tiny_minigpt_dir)!r})[0], load_model({str(tiny_hf_dir)!r})[0]]\n"
        "print('torch._dynamo' in sys.modules, [m.transformer.h[0].mlp.c_fc.weight.detach().sum().item() for m in models])\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    dynamo, sums = r.stdout.split(" ", 1)
    assert dynamo == "False"
    want = load_model(tiny_minigpt_dir)[0].transformer.h[0].mlp.c_fc.weight.detach().sum().item()
    assert json.loads(sums) == pytest.approx([want, want], rel=1e-6) and want != 0


# --- saving from Python: what the CLIs check, the library checks too ------------------------------


def test_saving_never_deletes_other_files_unless_told(tiny_minigpt_dir, tmp_path):
    """save_checkpoint_folder, export_hf and convert_to_minigpt replace their folder whole: one that
    holds anything is refused unless overwrite=True (they used to delete a thesis.tex beside them in
    silence), and convert_to_minigpt never replaces the folder of its own source, even then."""
    from minigpt.checkpoint import save_checkpoint_folder
    from minigpt.loading import convert_to_minigpt

    model, tokenizer = load_model(tiny_minigpt_dir)
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("months of work")
    for save in (lambda **kw: save_checkpoint_folder(folder, model, tokenizer, **kw),
                 lambda **kw: export_hf(model, tokenizer, folder, **kw),
                 lambda **kw: convert_to_minigpt(tiny_minigpt_dir, folder, **kw)):
        with pytest.raises(MinigptError, match="thesis: already exists and is not empty; pass overwrite=True"):
            save()
        assert [p.name for p in folder.iterdir()] == ["thesis.tex"]
    assert save(overwrite=True) == folder  # said: replaced whole
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert save_checkpoint_folder(tmp_path / "empty", model, tokenizer) == tmp_path / "empty"  # new: no need to say

    models = tmp_path / "models"
    source = models / "a"
    convert_to_minigpt(tiny_minigpt_dir, source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for out in (models, source):
        with pytest.raises(MinigptError, match=r"is the folder of the source \(.*\) or holds it"):
            convert_to_minigpt(source, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    # nor into a training run's folder (a folder there stops every later --resume of the run), from
    # Python as from convert_hf_weights.py
    run = tmp_path / "run"
    (run / ".ckpt").mkdir(parents=True)
    for save, out in ((lambda o: save_checkpoint_folder(o, model, tokenizer), run / "best"),
                      (lambda o: export_hf(model, tokenizer, o), run / "hf")):
        with pytest.raises(MinigptError, match=f"^--out {out}: is inside the training run in {run}, "):
            save(out)
    assert [p.name for p in run.iterdir()] == [".ckpt"]


def test_saving_expands_home_as_loading_does(tiny_minigpt_dir, tmp_path, monkeypatch):
    """"~/ckpt" is the home folder's ckpt for the savers, as it is for load_model (it used to become
    a folder named "~" in the current folder)."""
    from minigpt.checkpoint import save_checkpoint_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model, tokenizer = load_model(tiny_minigpt_dir)
    assert save_checkpoint_folder("~/ckpt", model, tokenizer) == tmp_path / "home" / "ckpt"
    assert export_hf(model, tokenizer, "~/hf") == tmp_path / "home" / "hf"
    assert not (tmp_path / "~").exists()
    assert torch.equal(load_model("~/hf")[0].lm_head.weight, model.lm_head.weight)


def test_weights_loaded_from_an_hf_folder_are_contiguous(tiny_hf_dir, tmp_path):
    """HF's Conv1D weights are read transposed (a view); the loader makes each one contiguous, so the
    matmuls of an HF folder take the kernels (and rounding) of the same weights read back from a
    minigpt checkpoint. Dropping `.contiguous()` went unnoticed: 4 strided weights a block, and the
    logits of this tiny model happened to be bitwise equal all the same."""
    from minigpt.loading import convert_to_minigpt

    model, _ = load_model(tiny_hf_dir)
    assert [name for name, p in model.named_parameters() if not p.is_contiguous()] == []
    converted, _ = load_model(convert_to_minigpt(tiny_hf_dir, tmp_path / "mine"))
    with torch.no_grad():
        assert torch.equal(model(IDX)[0], converted(IDX)[0])


def test_a_model_one_row_short_of_its_tokenizer_is_refused(tmp_path, gpt2_tokenizer):
    """The vocabulary check is exact: 50,256 rows for GPT-2's 50,257 tokens is refused (EOS, id
    50256, has no row), 50,257 saves and loads. The test below used 100 rows only, so an
    off-by-one saved and loaded such a model, which then failed with an IndexError at its first EOS."""
    from minigpt.checkpoint import save_checkpoint_folder
    from minigpt.model import GPT

    shape = dict(block_size=16, n_layer=1, n_head=1, n_embd=8)
    short = GPT(GPTConfig(vocab_size=50256, **shape))
    with pytest.raises(MinigptError, match=r"short: tokenizer has 50257 tokens but the model only 50256$"):
        save_checkpoint_folder(tmp_path / "short", short, gpt2_tokenizer)
    assert not (tmp_path / "short").exists()
    save_checkpoint_folder(tmp_path / "exact", GPT(GPTConfig(vocab_size=50257, **shape)), gpt2_tokenizer)
    model, tokenizer = load_model(tmp_path / "exact")
    assert model.config.vocab_size == tokenizer.vocab_size == 50257


def test_an_hf_config_without_its_shape_takes_transformers_defaults():
    """A config.json that leaves a field out gets GPT2Config's default, gpt2's (12 layers), as in
    transformers, not GPTConfig's own (distilgpt2's 6): a default of 6 went unnoticed, and a
    hand-written config.json without n_layer was read as 6 layers, refusing gpt2's 12-layer weights."""
    from transformers import GPT2Config

    hf, cfg = GPT2Config(), GPTConfig.from_hf({"model_type": "gpt2"})
    ours = (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.layer_norm_eps)
    assert ours == (hf.vocab_size, hf.n_positions, hf.n_layer, hf.n_head, hf.n_embd, hf.resid_pdrop,
                    hf.layer_norm_epsilon) == (50257, 1024, 12, 12, 768, 0.1, 1e-5)


def test_a_tensor_under_both_of_its_names_is_refused(tiny_hf_dir, tmp_path):
    """An HF file holding a tensor under both its names (`wte.weight` and `transformer.wte.weight`)
    is refused, naming it, whichever copy would win. Without match_names' check it was refused only
    later, as "in both model.safetensors and model.safetensors"."""
    state = load_file(tiny_hf_dir / "model.safetensors")
    state["wte.weight"] = torch.ones_like(state["transformer.wte.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((tiny_hf_dir / name).read_bytes())
    with pytest.raises(MinigptError) as error:
        load_model(tmp_path)
    assert str(error.value) == f"{tmp_path / 'model.safetensors'}: tensor 'transformer.wte.weight' given twice"


def test_a_model_no_loader_could_read_back_is_not_saved(tiny_minigpt_dir, tmp_path, gpt2_tokenizer):
    """Refused before anything is written: a tokenizer with more tokens than the model has rows (the
    load would refuse it), and a model prepared for inference, whose decoding layouts are no GPT's
    tensors (safetensors' three-line error about shared memory, before), nor the folders above."""
    from minigpt.checkpoint import save_checkpoint_folder
    from minigpt.inference import prepare_for_inference
    from minigpt.model import GPT

    small = GPT(GPTConfig(vocab_size=100, block_size=16, n_layer=1, n_head=1, n_embd=8))
    for save in (save_checkpoint_folder, lambda out, m, t: export_hf(m, t, out)):
        with pytest.raises(MinigptError, match="tokenizer has 50257 tokens but the model only 100"):
            save(tmp_path / "new" / "small", small, gpt2_tokenizer)
        model, tokenizer = load_model(tiny_minigpt_dir)
        prepared = prepare_for_inference(model, kernel="linear")
        with pytest.raises(MinigptError, match="not a plain GPT's .* save the model before preparing it"):
            save(tmp_path / "new" / "prepared", prepared, tokenizer)
        with pytest.raises(MinigptError) as err:  # (was "not a plain GPT's ... before preparing it": it was not prepared)
            save(tmp_path / "new" / "compiled", torch.compile(model), tokenizer)
        assert str(err.value) == ("this is a torch.compile'd model: save the model it compiles (model._orig_mod, the "
                                  "same weights)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the parent folder "new"


def test_a_source_or_dtype_of_the_wrong_kind_is_named(tiny_minigpt_dir, tmp_path, monkeypatch):
    """load_model(None) was read as the Hub id "None", load_model(..., dtype=torch.int64) gave 29 lines
    of load_state_dict, and load_tokenizer("/no/such") asked the Hub for a repo of that name."""
    from minigpt.loading import load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TypeError, match="^model: a folder path or a Hub id, got NoneType$"):
        load_model(None)
    with pytest.raises(TypeError, match="^tokenizer: a folder path or a Hub id, got bytes$"):
        load_tokenizer(str(tiny_minigpt_dir).encode())
    for dtype in (torch.int64, "bfloat16"):
        with pytest.raises(MinigptError, match="^dtype must be torch.float32, torch.bfloat16 or torch.float16, got"):
            load_model(tiny_minigpt_dir, dtype=dtype)
    assert load_model(tiny_minigpt_dir, dtype=torch.bfloat16)[0].lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(MinigptError, match="^tokenizer: empty tokenizer path$"):
        load_tokenizer("")
    with pytest.raises(MinigptError, match="^' ': no such file or folder$"):  # (a folder may be named " ")
        load_tokenizer(" ")
    with pytest.raises(MinigptError, match=f"^{tmp_path / 'missing'}: no such file or folder$"):
        load_tokenizer(tmp_path / "missing")
    monkeypatch.setenv("HOME", str(tiny_minigpt_dir.parent))
    from_home = load_tokenizer("~/ckpt").encode("Hello")
    assert from_home == load_tokenizer(tiny_minigpt_dir / "tokenizer.json").encode("Hello")


def test_a_fine_tune_with_added_tokens_loads_converts_and_exports_with_them(tmp_path):
    """A folder as transformers 4's GPT2Tokenizer saved a fine-tune with two added tokens (added_tokens.json
    beside vocab.json + merges.txt): the tokens were dropped, "question<sep>answer" was 6 pieces, and the next
    token's logits were 1.95 from transformers'. Now the same ids and logits, through a minigpt checkpoint
    and back to an HF folder."""
    from conftest import TINY_HF, save_hf_model
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from minigpt.loading import convert_to_minigpt

    folder = save_hf_model(tmp_path / "hf", **{**TINY_HF, "vocab_size": 50259})
    (folder / "added_tokens.json").write_text(json.dumps({"<sep>": 50257, "<pad>": 50258}))
    ids = [25652, 50257, 41484, 220, 50258]
    model, tokenizer = load_model(folder)
    assert tokenizer.encode("question<sep>answer <pad>") == ids
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(folder).eval()(torch.tensor([ids])).logits
        torch.testing.assert_close(model(torch.tensor([ids]))[0], theirs, rtol=0, atol=2e-5)
    checkpoint = convert_to_minigpt(folder, tmp_path / "mg")
    assert load_model(checkpoint)[1].encode("question<sep>answer <pad>") == ids
    export_hf(*load_model(checkpoint), tmp_path / "back")
    assert AutoTokenizer.from_pretrained(tmp_path / "back").encode("question<sep>answer <pad>") == ids
