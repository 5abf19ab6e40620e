"""Break the implementation on purpose and check that the tests written for each property notice.

    python -m tests.mutations                 # every break
    python -m tests.mutations erf_gelu ...    # only these
    python -m tests.mutations --list          # names and what each break does

Each break is a list of (regular expression, replacement) edits. The expressions are searched in
every `minigpt/**/*.py` file (not at a file and line), so the breaks keep working while code moves
between modules; an expression that matches nowhere is reported as "pattern not found", its own
failure, so the list is easy to update. For each break a fresh copy of the repository is made in a
temporary folder, the edits are applied there (the working tree is never touched), and the test
nodes named for that property are run in the copy. A break is caught when at least one of them
fails; the script prints, per break, the tests that failed, and exits 1 if any break is not caught
(or not applied). Before the breaks, the same test nodes run once on the unmodified copy: they must
all pass, or a "caught" break would mean nothing (exit 2).
"""

from __future__ import annotations

import argparse
import functools
import os
import py_compile
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
print = functools.partial(print, flush=True)  # noqa: A001  (progress shows as it happens, also in a pipe)
IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".benchmarks", ".pytest_cache", "checkpoints")


@dataclass(frozen=True)
class Break:
    name: str
    what: str
    edits: tuple[tuple[str, str], ...]  # (regex, replacement), re.MULTILINE; each must match somewhere
    tests: tuple[str, ...]  # pytest node ids (a test without [params] selects all its cases)


BREAKS = (
    # --- loading HF weights ---------------------------------------------------------------------
    Break(
        "ln_swap", "the HF name map swaps ln_1 and ln_2",
        ((r"(def hf_to_minigpt_name\([^)]*\)[^:]*:\n)",
          r'\1    name = name.replace(".ln_1.", ".ln_@.").replace(".ln_2.", ".ln_1.").replace(".ln_@.", ".ln_2.")\n'),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-sdpa]", "tests/test_hf.py::test_minigpt_checkpoint_layout",
         "tests/test_hf.py::test_unprefixed_keys_mask_buffers_and_lm_head", "tests/test_convert_cli.py::test_hf_to_minigpt_and_back"),
    ),
    Break(
        "zero_biases", "every bias is zeroed when a model is built from loaded tensors",
        ((r"^(\s*)model\.load_state_dict\((\w+),",
          r'\1\2 = {k: v * 0 if k.endswith(".bias") else v for k, v in \2.items()}\n\1model.load_state_dict(\2,'),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-sdpa]", "tests/test_hf.py::test_minigpt_checkpoint_layout",
         "tests/test_hf.py::test_legacy_pytorch_model_bin", "tests/test_convert_cli.py::test_hf_to_minigpt_and_back"),
    ),
    Break(
        "square_conv1d_untransposed", "attn.c_proj (square, so no shape check notices) loses its Conv1D transpose",
        ((r'"attn\.c_proj\.weight",\s*', ""),),
        ("tests/test_hf.py::test_conv1d_weights_are_transposed", "tests/test_model.py::test_logits_equal_transformers[tiny-sdpa]"),
    ),
    Break(
        "load_through_one_mapping", "each tensor is read whole through one memory mapping of the file",
        ((r"^READ_BYTES = .*$", "READ_BYTES = 2**40"),),
        ("tests/test_hf.py::test_loading_holds_the_weights_once_not_twice",),
    ),
    Break(
        "meta_model_drawn", "the model to load is built on the meta device with its random initialisation",
        ((r"with torch\.device\(\"meta\"\), _NoRandomInit\(\):", 'with torch.device("meta"):'),),
        ("tests/test_hf.py::test_loading_draws_no_random_numbers_and_imports_no_compiler",),
    ),
    Break(
        "nan_check_on_whole_tensors", "the NaN check makes temporaries as large as each tensor",
        ((r"if not all_finite\(t\)", "if not torch.isfinite(t).all()"),),
        ("tests/test_hf.py::test_loading_holds_the_weights_once_not_twice",),
    ),
    # --- the model --------------------------------------------------------------------------------
    Break(
        "erf_gelu", "the exact (erf) GELU instead of GPT-2's tanh approximation",
        ((r'approximate="tanh"', 'approximate="none"'),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-sdpa]", "tests/test_model.py::test_loss_equals_transformers",
         "tests/test_hf.py::test_minigpt_checkpoint_layout"),
    ),
    Break(
        "causal_mask_off_by_one", "the written-out attention lets each token see one token ahead",
        ((r"tril\(diagonal=t_past\)", "tril(diagonal=t_past + 1)"),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-reference]",
         "tests/test_model.py::test_sdpa_equals_reference_with_dropout_off_and_cache"),
    ),
    Break(
        "attention_scale", "the written-out attention divides the scores by hs instead of sqrt(hs)",
        ((r"/ math\.sqrt\((\w+)\.size\(-1\)\)", r"/ \1.size(-1)"),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-reference]",
         "tests/test_model.py::test_sdpa_equals_reference_with_dropout_off_and_cache"),
    ),
    Break(
        "sdpa_not_causal", "scaled_dot_product_attention without the causal mask",
        ((r"is_causal=[^,)]+", "is_causal=False"),),
        ("tests/test_model.py::test_logits_equal_transformers[tiny-sdpa]", "tests/test_model.py::test_loss_equals_transformers"),
    ),
    Break(
        "kv_positions_restart", "with a KV cache, position embeddings restart at 0 each step",
        ((r"torch\.arange\(t_past, t_past \+ T", "torch.arange(0, T"),),
        ("tests/test_model.py::test_kv_cache_matches_full_forward_every_step",
         "tests/test_sampling.py::test_greedy_equals_hf_generate"),
    ),
    # --- sampling ---------------------------------------------------------------------------------
    Break(
        "temperature_after_filters", "next_token divides by the temperature after top-k / top-p",
        ((r"^(\s*)scores = torch\.where\(scaled\.amax.*$", r"\1pass"),
         (r"^(\s*)return scores, ids$", r"\1return apply_temperature(scores, config.temperature), ids")),
        ("tests/test_decoding_vs_hf.py::test_next_token_samples_from_hf_chain",
         "tests/test_decoding_vs_hf.py::test_sampled_loop_equals_hf_generate_with_the_same_seed"),
    ),
    Break(
        "no_top_p_guard", "top-p may drop the most likely token too",
        ((r"^(\s*)\w+\[\.\.\., -1:\] = False.*$", r"\1pass"),),
        ("tests/test_decoding_vs_hf.py::test_a_tiny_top_p_keeps_only_the_most_likely_token",),
    ),
    Break(
        "top_k_drops_ties", "the sampling shortcut keeps exactly k tokens, dropping ties at the k-th score",
        ((r"if values\.size\(1\) == k or not bool\(.*\):", "if True:"),),
        ("tests/test_decoding_vs_hf.py::test_ties_at_the_top_k_line_are_all_kept",
         "tests/test_sampling.py::test_candidates_are_the_top_k_survivors",
         "tests/test_sampling.py::test_candidates_keep_a_tie_at_the_kth_value_in_any_one_row"),
    ),
    Break(
        "generator_ignored", "sampling draws from the global RNG instead of the generator it is given",
        ((r"(torch\.multinomial\(.*)generator=generator\)", r"\1generator=None)"),),
        ("tests/test_sampling.py::test_seeded_sampling_is_reproducible",
         "tests/test_decoding_vs_hf.py::test_a_draw_with_the_same_generator_is_hfs_draw"),
    ),
    Break(
        "finished_rows_not_padded", "a sample that emitted EOS keeps drawing tokens while the others go on",
        ((r"^(\s*)new = new\.masked_fill\(finished, eos_id\)", r"\1pass"),),
        ("tests/test_decoding_vs_hf.py::test_a_finished_sample_is_padded_while_the_others_go_on",),
    ),
    Break(
        "penalty_sign_swapped", "the repetition penalty multiplies positive scores and divides negative ones",
        ((r"torch\.where\((\w+) < 0, \1 \* penalty, \1 / penalty\)", r"torch.where(\1 < 0, \1 / penalty, \1 * penalty)"),),
        ("tests/test_sampling.py::test_repetition_penalty_equals_hf",
         "tests/test_decoding_vs_hf.py::test_next_token_samples_from_hf_chain"),
    ),
    # --- the optimizer ----------------------------------------------------------------------------
    Break(
        "decay_on_biases", "weight decay on biases and LayerNorm weights too",
        ((r'("weight_decay":\s*)0\.0', r"\1weight_decay"),),
        ("tests/test_optim.py::test_param_groups_are_hf_trainers",),
    ),
    Break(
        "no_bias_correction", "AdamW without bias correction of the moments",
        ((r"c = math\.sqrt\(1 - beta2\s*\*\*\s*t\)", "c = 1.0"), (r"\s*/\s*\(1 - beta1\s*\*\*\s*t\)", "")),
        ("tests/test_optim.py::test_adamw_equals_torch_adamw", "tests/test_optim.py::test_adamw_first_step_by_hand"),
    ),
    Break(
        "coupled_weight_decay", "L2 regularisation (decay added to the gradient) instead of AdamW's decoupled decay",
        ((r"torch\._foreach_mul_\((\w+), 1 - lr \* wd\)", r"torch._foreach_add_(grads, \1, alpha=wd)"),),
        ("tests/test_optim.py::test_adamw_equals_torch_adamw", "tests/test_optim.py::test_adamw_first_step_by_hand"),
    ),
    Break(
        "eps_not_bias_corrected", "eps added to sqrt(v) instead of sqrt(v^) (the bias correction skips eps)",
        ((r"torch\._foreach_add_\((\w+), eps \* c\)", r"torch._foreach_add_(\1, eps)"),),
        ("tests/test_optim.py::test_adamw_equals_torch_adamw", "tests/test_promises.py::test_adamw_equals_torch_where_eps_matters"),
    ),
    Break(
        "no_clipping", "gradients are measured but never clipped",
        ((r"if max_norm > 0:", "if False:"),),
        ("tests/test_optim.py::test_clip_grad_norm_equals_torch",),
    ),
    Break(
        "moments_not_restored", "loading an optimizer state leaves the moments at zero",
        ((r"^(\s*)(\w+)\.copy_\((\w+)_saved\)", r"\1\2.zero_()"),),
        ("tests/test_optim.py::test_state_dict_round_trip_continues_identically",
         "tests/test_trainer.py::test_resume_continues_bitwise"),
    ),
    Break(
        "overflow_not_skipped", "under fp16's GradScaler an overflowed step still updates the weights",
        ((r"found_inf=found_inf,", "found_inf=None,"), (r"if found_inf\.item\(\):", "if False:")),
        ("tests/test_optim.py::test_grad_scaler_skips_an_overflowed_step_on_the_device",),
    ),
    # --- checkpoints and resume -------------------------------------------------------------------
    Break(
        "no_rng_restore", "--resume does not restore the RNG state (dropout masks differ)",
        ((r"torch\.set_rng_state\(", "(lambda *state: None)("),),
        ("tests/test_trainer.py::test_resume_continues_bitwise",
         "tests/test_faults.py::test_killed_fine_tune_with_dropout_resumes_bitwise"),
    ),
    Break(
        "data_order_not_restored", "--resume starts the data order from the epoch's beginning",
        ((r"self\.train_batches\.load_state_dict\(", "(lambda *state: None)("),),
        ("tests/test_trainer.py::test_resume_continues_bitwise",),
    ),
    Break(
        "non_atomic_save", "a save deletes the previous folder before the new one is in place",
        ((r"os\.replace\((\w+), (\w+) / \1\.name\)", r"shutil.rmtree(\1)"),),
        ("tests/test_faults.py::test_save_killed_between_renames_is_recovered",),
    ),
    Break(
        "no_recovery_after_kill", "after a kill between a save's renames the previous folder is not moved back",
        ((r"os\.replace\((\w+) / (\w+)\.name, \2\)", "None"),),
        ("tests/test_faults.py::test_save_killed_between_renames_is_recovered",),
    ),
    Break(
        "unsafe_torch_load", "pytorch_model.bin is unpickled with weights_only=False",
        ((r"weights_only=True", "weights_only=False"),),
        ("tests/test_faults.py::test_pickle_that_runs_code_is_refused_and_never_run",),
    ),
    Break(
        "grad_norm_not_checked", "a non-finite gradient norm does not stop the run",
        ((r"^(\s*)self\._stop_non_finite\(\"the gradient norm\", (\w+), (\w+)\)", r"\1pass"),),
        ("tests/test_promises.py::test_a_non_finite_gradient_norm_stops_the_run_and_spares_the_checkpoint",),
    ),
    # --- inference kernels --------------------------------------------------------------------------
    Break(
        "int8_digits_misweighted", "the fbgemm int8 kernel weighs its high activation digit 127, not 128",
        ((r"torch\.add\((\w+)\[n:\], (\w+)\[:n\], alpha=128\)", r"torch.add(\1[n:], \2[:n], alpha=127)"),),
        ("tests/test_kernels.py::test_each_kernel_computes_x_wt_plus_b",
         "tests/test_kernels.py::test_a_model_on_each_forced_kernel_matches_the_reference"),
    ),
    Break(
        "row_blocks_interleaved", "the bmm-rows kernel reads its blocks' outputs back in the wrong order",
        ((r"y = y\.view\(-1, y\.size\(2\)\)\[: self\.out_features\]",
          r"y = y.transpose(0, 1).reshape(-1, y.size(2))[: self.out_features]"),),
        ("tests/test_kernels.py::test_each_kernel_computes_x_wt_plus_b",
         "tests/test_kernels.py::test_a_model_on_each_forced_kernel_matches_the_reference"),
    ),
    Break(
        "split_dense_scrambled", "the bmm-split layout hands the frozen step its slices' columns out of order",
        ((r"self\.weight_parts\.transpose\(0, 1\)\.reshape\(", "self.weight_parts.reshape("),),
        ("tests/test_compiled_decoding.py::test_every_fp32_layout_gives_back_its_exact_weight_and_bias",),
    ),
    Break(
        "frozen_gemm_without_bias", "the step with inductor's GEMMs multiplies without the layers' biases",
        ((r"return F\.linear\(x, self\.weight, self\.bias\)", "return F.linear(x, self.weight)"),),
        ("tests/test_compiled_decoding.py::test_inductor_gemms_decode_the_eager_tokens_with_no_opaque_call",),
    ),
    Break(
        "fbgemm_twin_without_scales", "the FBGEMM twin of an int8mm layer is built from q without its scales",
        ((r"inner\.qweight\.float\(\) \* inner\.scale\.float\(\)\.unsqueeze\(1\)", "inner.qweight.float()"),),
        ("tests/test_compiled_decoding.py::test_int8mm_layers_race_a_step_with_fbgemm_on_every_layer",),
    ),
    Break(
        "eager_choice_ignored", "compiled decoding keeps running its compiled step when the eager model won the race",
        ((r' or self\.chosen == "eager":', ":"),),
        ("tests/test_compiled_decoding.py::test_the_eager_model_that_wins_the_race_decodes_and_says_so",),
    ),
    Break(
        "whole_cache_unmasked", "the CUDA-graph step's attention also reads the cache's positions after the new token",
        ((r"            if unfilled is not None:", "            if False:"),),
        ("tests/test_compiled_decoding.py::test_the_whole_cache_step_decodes_the_eager_tokens_in_the_same_tensors_every_run",),
    ),
    Break(
        "whole_cache_not_kept", "new_cache hands the CUDA-graph step a fresh cache of its own each run",
        ((r'        if "cudagraphs" not in self\.steps:\n            return KVCache', '        if True:\n            return KVCache'),),
        ("tests/test_compiled_decoding.py::test_the_whole_cache_step_decodes_the_eager_tokens_in_the_same_tensors_every_run",),
    ),
    Break(
        "fused_grads_other_layout", "the fused AdamW flattens each gradient in its own memory order, not its parameter's",
        ((r"grads = \[_flat\(g, p\) for p, g, _, _ in todo\]", "grads = [g.reshape(-1) for p, g, _, _ in todo]"),),
        ("tests/test_optim.py::test_fused_adamw_is_the_written_out_update_and_shares_its_state",),
    ),
    Break(
        "adamw_takes_gapped_params", "AdamW takes a parameter with gaps in memory, which it then updates through a copy",
        ((r"if p\.numel\(\) and flat\.data_ptr\(\) != p\.data_ptr\(\):", "if False:"),),
        ("tests/test_optim.py::test_a_parameter_that_is_no_dense_block_of_memory_is_refused",),
    ),
    Break(
        "compiled_race_keeps_the_slower", "warm_up decodes with the slower of the two compiled fp32 steps",
        ((r"self\.chosen = min\(self\.seconds_per_token", "self.chosen = max(self.seconds_per_token"),),
        ("tests/test_compiled_decoding.py::test_one_compiled_graph_serves_every_prompt_and_cache_length",),
    ),
    Break(
        "nan_weight_packed_as_fp16", "a NaN bf16 weight is packed by FBGEMM as fp16, which makes it a number: "
        "finite logits from broken weights",
        ((r"^(\s*)if largest != largest:", r"\1if False:"),),
        ("tests/test_kernels.py::test_fp16_is_refused_for_weights_beyond_its_range",),
    ),
    Break(
        "fp16_range_unchecked", "a bf16 weight beyond fp16's range is packed as fp16 (infinite) anyway",
        ((r"if largest > FP16_MAX else None", "if False else None"),),
        ("tests/test_kernels.py::test_fp16_is_refused_for_weights_beyond_its_range",),
    ),
    Break(
        "fp16_bias_dropped", "the fbgemm-fp16 kernel packs its weights without the bias",
        ((r"linear_prepack_fp16\(plain\.float\(\), fp32_bias\)", "linear_prepack_fp16(plain.float(), None)"),),
        ("tests/test_kernels.py::test_each_kernel_computes_x_wt_plus_b",
         "tests/test_kernels.py::test_a_model_on_each_forced_kernel_matches_the_reference"),
    ),
    Break(
        "stream_in_weight_dtype", "a prepared bf16 model keeps its residual stream and KV cache in bf16",
        ((r"stream_dtype = prepared_stream_dtype\(model, quantize\)", "stream_dtype = dtype"),),
        ("tests/test_kernels.py::test_only_the_weights_keep_the_models_precision",
         "tests/test_kernels.py::test_the_stream_dtype_said_before_preparing_is_the_prepared_models"),
    ),
    Break(
        "gloo_no_drain", "a gloo rank exits right after leaving the process group (gloo's workers may still need the GIL)",
        ((r"^(\s+)time\.sleep\(GLOO_DRAIN_SECONDS\)", r"\1pass"),),
        ("tests/test_trainer_syncs.py::test_a_gloo_rank_hands_its_workers_the_gil_after_leaving_the_group",),
    ),
    Break(
        "race_pruned_after_one_pass", "a kernel over twice the best after its first timed pass is out of the race",
        ((r"^(\s+)if round_ == 2:", r"\1if round_ == 1:"),),
        ("tests/test_kernels.py::test_one_disturbed_pass_does_not_drop_the_fastest_kernel",),
    ),
    Break(
        "compiled_step_misses_its_own_token", "the compiled decoding step's attention leaves out the new token's own position",
        ((r"att = \(q @ k_cache\.transpose", r"k_cache, v_cache = k_cache[:, :, :-1], v_cache[:, :, :-1]\n            att = (q @ k_cache.transpose"),),
        ("tests/test_compiled_decoding.py::test_compiled_int8_decodes_the_eager_tokens_through_a_sliding_window",
         "tests/test_compiled_decoding.py::test_compiled_fp32_decodes_a_batch_with_the_eager_logits"),
    ),
    Break(
        "compiled_graph_per_length", "the compiled decoding step's cache length is not marked dynamic (a graph per length)",
        ((r"torch\._dynamo\.mark_dynamic\(view, 2\)", r"pass"),),
        ("tests/test_compiled_decoding.py::test_one_compiled_graph_serves_every_prompt_and_cache_length",),
    ),
    Break(
        "compiled_attention_unscaled", "the compiled decoding step's attention scores are not divided by sqrt(hs)",
        ((r"\(q @ k_cache\.transpose\(-2, -1\)\) / math\.sqrt\(C // nh\)", r"(q @ k_cache.transpose(-2, -1))"),),
        ("tests/test_compiled_decoding.py::test_compiled_fp32_decodes_a_batch_with_the_eager_logits",),
    ),
    Break(
        "compiled_step_unchecked", "the compiled decoding step is not checked against the eager model when compiled",
        ((r"if not gap <= AGREEMENT\[dtype\] \* largest:", r"if False:"),),
        ("tests/test_compiled_decoding.py::test_warm_up_refuses_a_compiled_step_that_disagrees_with_the_eager_model",),
    ),
    Break(
        "compiled_timing_times_whole_layers", "timing for compiled decoding runs FBGEMM's and int8mm's whole layers",
        ((r"if core_only and layer\.kernel in FUSIBLE_KERNELS", r"if False and layer.kernel in FUSIBLE_KERNELS"),),
        ("tests/test_kernels.py::test_for_compiled_decoding_fusible_kernels_are_timed_by_their_product_alone",),
    ),
    Break(
        "timing_from_cache", "the kernels are timed without first reading the flush buffer",
        ((r"^(\s+)flush\.sum\(\)", r"\1pass"),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",),
    ),
    Break(
        "flush_trusts_sysfs_cache", "the timing reads no flush where sysfs's cache size (a VM's host's, shared) holds the model",
        ((r"\) // 4\) if timing else None", ") // 4) if timing and weight_bytes > cpu_cache_bytes() else None"),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",),
    ),
    Break(
        "flush_beyond_the_model", "every timed pass reads twice the cache first, however small the model (evicting what decoding keeps)",
        ((r"evicting_bytes\(min\(weight_bytes, 2 \* cpu_cache_bytes\(\)\)\)", "evicting_bytes(2 * cpu_cache_bytes())"),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",
         "tests/test_kernels.py::test_the_flush_is_made_once_per_prepare_and_only_when_something_is_timed"),
    ),
    Break(
        "eviction_unmeasured", "the flush reads all the model's weights (or twice sysfs's cache), not the smallest read measured to evict",
        ((r"torch\.ones\(evicting_bytes\((min\(weight_bytes, 2 \* cpu_cache_bytes\(\)\))\) // 4\)", r"torch.ones(\1 // 4)"),),
        ("tests/test_kernels.py::test_the_flush_is_made_once_per_prepare_and_only_when_something_is_timed",),
    ),
    Break(
        "eviction_margin_wide", "any size re-read less than 10x faster than memory counts as not cached (the flush too small)",
        ((r"rate <= COLD_MARGIN \* from_memory", "rate <= 10 * from_memory"),),
        ("tests/test_kernels.py::test_the_flush_is_the_smallest_read_measured_to_evict_the_cache",),
    ),
    Break(
        "eviction_past_cached", "the eviction search goes on below the first cached size (a disturbed re-read passes for memory's)",
        ((r"itertools\.takewhile\(lambda rate: rate <= COLD_MARGIN \* from_memory, measured\)",
          "(rate <= COLD_MARGIN * from_memory for rate in measured)"),
         (r"zip\(sizes\[1:\], cold\)", "zip(sizes[1:], cold) if _"),),
        ("tests/test_kernels.py::test_the_flush_is_the_smallest_read_measured_to_evict_the_cache",),
    ),
    Break(
        "flush_made_untimed", "a prepare whose kernels are all chosen already still measures and allocates the flush",
        ((r"\) // 4\) if timing else None", ") // 4) if device.type == \"cpu\" else None"),),
        ("tests/test_kernels.py::test_the_flush_is_made_once_per_prepare_and_only_when_something_is_timed",),
    ),
    Break(
        "no_final_on_cut_head", "the LM head's kernel is the winner of the race on its first rows, never raced on all of it",
        ((r"if any\(sw\.shape != w\.shape for \(sw, _\), \(w, _\) in zip\(sample, weights\)\):", "if False:"),),
        ("tests/test_kernels.py::test_the_two_fastest_on_a_matrix_cut_for_timing_race_again_on_all_of_it",),
    ),
    Break(
        "final_against_the_slowest", "the LM head's final races the heat's winner against the slowest candidate, not the second",
        ((r"runner_up = min\(\(c for c in candidates", "runner_up = max((c for c in candidates"),),
        ("tests/test_kernels.py::test_the_two_fastest_on_a_matrix_cut_for_timing_race_again_on_all_of_it",),
    ),
    Break(
        "loss_grad_first_block_only", "the in-place loss's backward makes the gradient of the first block of rows only",
        ((r"for block, out, target, block_scale in zip\(\*blocks\):", "for block, out, target, block_scale in list(zip(*blocks))[:1]:"),),
        ("tests/test_training_speed.py::test_in_place_cross_entropy_equals_cross_entropy_in_value_and_gradient",),
    ),
    Break(
        "workspace_ignores_users", "a workspace hands its block out again while a tensor still uses it",
        ((r" or lent\(\) is not None:", ":"),),
        ("tests/test_training_speed.py::test_a_workspace_hands_its_block_out_again_only_once_no_tensor_uses_it",
         "tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept"),
    ),
    Break(
        "workspace_watches_another_view", "a workspace watches a memoryview of its own, not the one the tensor holds: a block in use looks free",
        ((r"self\._blocks\[name\] = \(block, weakref\.ref\(view\)\)", "self._blocks[name] = (block, weakref.ref(memoryview(block)))"),),
        ("tests/test_training_speed.py::test_a_workspace_hands_its_block_out_again_only_once_no_tensor_uses_it",
         "tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept"),
    ),
    Break(
        "workspace_never_reused", "a workspace maps a new block for every tensor (fresh memory every step)",
        ((r"if block is None or len\(block\)", "if True or len(block)"),),
        ("tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept",),
    ),
    Break(
        "workspace_tensor_a_view", "a workspace hands out a view of its flat tensor: autograd then adds wte's two gradients out of place",
        ((r"return torch\.empty\(0, dtype=dtype\)\.set_\(flat, 0, shape\)", "return flat.view(shape)"),),
        ("tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept",),
    ),
    Break(
        "workspace_copied_whole", "a copy or pickle of a workspace tries to copy its mapped blocks",
        ((r"    def __reduce__\(self\) -> tuple:\n        return \(Workspace, \(\)\)\n", ""),),
        ("tests/test_training_speed.py::test_a_workspace_hands_its_block_out_again_only_once_no_tensor_uses_it",),
    ),
    Break(
        "head_grad_fresh", "the LM head's weight gradient is a fresh tensor every step, not in the logits' block",
        ((r'grad_w = ctx\.workspace\.empty\("out", tuple\(w\.shape\), ctx\.weight_dtype, x2\.device\)',
          "grad_w = torch.empty(w.shape, dtype=ctx.weight_dtype)"),),
        ("tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept",),
    ),
    Break(
        "prepared_model_casts", "a prepared model lets .to(torch.bfloat16) / .half() / .to(device) cast what it reaches",
        ((r"if \(moved := fn\(probe\)\)\.dtype != dtype or moved\.device != probe\.device:", "if False:"),),
        ("tests/test_kernels.py::test_a_prepared_model_refuses_a_move_or_cast_in_one_line_and_stays_as_it_was",),
    ),
    Break(
        "packed_weights_pickled", "a prepared model's MKL / oneDNN packed weights go into its pickle (no storage: it fails)",
        ((r"if k not in names\}", "if True}"),),
        ("tests/test_kernels.py::test_a_prepared_model_pickles_and_deep_copies_on_every_kernel",),
    ),
    Break(
        "fbgemm_product_pickled", "FBGEMM's int8 layer pickles its product, a closure (it fails)",
        ((r'state_without\(self, "packed", "product", "key"\)', 'state_without(self, "packed", "key")'),),
        ("tests/test_kernels.py::test_a_prepared_model_pickles_and_deep_copies_on_every_kernel",),
    ),
    Break(
        "cache_checked_in_the_models_dtype", "the memory check before the kernels' race counts a bf16 model's KV cache in bf16, not the fp32 it will hold",
        ((r"\(cache_dtype or activation_dtype\(model\)\)\.itemsize", "activation_dtype(model).itemsize"),),
        ("tests/test_sample_cli.py::test_a_bf16_models_kv_cache_is_checked_as_the_fp32_one_it_will_hold_before_the_kernels_race",),
    ),
    Break(
        "stream_dtype_said_wrong", "prepared_stream_dtype says the model's own dtype (bf16) where preparing makes the stream fp32",
        ((r'return torch\.float32 if device\.type == "cpu" and swapped else dtype', "return dtype"),),
        ("tests/test_kernels.py::test_the_stream_dtype_said_before_preparing_is_the_prepared_models",),
    ),
    Break(
        "embedding_grad_fresh", "the token embedding's weight gradient is fresh zeros every step, not in its workspace",
        ((r'grad_w = ctx\.workspace\.empty\("grad", ctx\.weight_shape, grad\.dtype, grad\.device\)\.zero_\(\)',
          "grad_w = torch.zeros(ctx.weight_shape, dtype=grad.dtype)"),),
        ("tests/test_training_speed.py::test_the_embeddings_gradient_is_torchs_bit_for_bit_in_memory_it_takes_again",),
    ),
    Break(
        "embedding_grad_not_zeroed", "the token embedding's gradient block is not zeroed again: the last step's gradient stays in it",
        ((r'(grad_w = ctx\.workspace\.empty\("grad", ctx\.weight_shape, grad\.dtype, grad\.device\))\.zero_\(\)', r"\1"),),
        ("tests/test_training_speed.py::test_the_embeddings_gradient_is_torchs_bit_for_bit_in_memory_it_takes_again",),
    ),
    Break(
        "embedding_options_ignored", "the workspace embedding ignores padding_idx / max_norm / scale_grad_by_freq / sparse",
        ((r"stock = self\.padding_idx is not None or self\.max_norm is not None or self\.scale_grad_by_freq or self\.sparse",
          "stock = False"),),
        ("tests/test_training_speed.py::test_the_embeddings_gradient_is_torchs_bit_for_bit_in_memory_it_takes_again",),
    ),
    Break(
        "cache_variable_tilde_literal",
        "a ~ in MINIGPT_CACHE is not expanded: written to the home folder's, read from a folder \"~\" (every run fails)",
        ((r"return \(home_expanded\(root\) if root", 'return (Path(root) if root'),),
        ("tests/test_data.py::test_numpy_numbers_and_a_tilde_in_the_cache_variable_load",),
    ),
    Break(
        "out_tilde_literal",
        "--out=~/run keeps its ~: the run trains, then fails at its first save",
        ((r"    args\.out = str\(home_expanded\(args\.out\)\)  #", '    pass  #'),),
        ("tests/test_train_cli.py::test_an_out_after_an_equals_sign_has_its_tilde_expanded",),
    ),
    Break(
        "data_config_numpy_kept",
        "DataConfig keeps NumPy's numbers: load_blocks fails on them in the cache key (not JSON)",
        ((r"                setattr\(self, name, int\(value\) if kind is Integral else float\(value\)\)", '                pass'),),
        ("tests/test_data.py::test_numpy_numbers_and_a_tilde_in_the_cache_variable_load",),
    ),
    Break(
        "block_size_one_taken",
        "--block-size 1 is taken: a block with no target, a NaN loss and advice to lower --lr",
        ((r"if self\.block_size < 2:", 'if self.block_size < 1:'),),
        ("tests/test_data.py::test_a_data_config_of_the_wrong_kind_is_refused_when_made", "tests/test_train_cli.py::test_an_out_after_an_equals_sign_has_its_tilde_expanded",),
    ),
    Break(
        "added_token_bytes_as_stand_ins",
        "decode_bytes reads an added token as GPT-2's byte stand-ins (KeyError: ' ' for \"hello world\")",
        ((r"^(\s*)if all\(c in byte_decoder for c in token\):", r"\1if True:"),),
        ("tests/test_tokenizer.py::test_added_tokens_decode_to_their_own_text_as_bytes",),
    ),
    Break(
        "card_source_from_the_cache",
        "the model card names the path that built the cache entry, not this run's --data",
        ((r'source = train_blocks\.manifest\.get\("source"\) if self\.data is None else self\.data', 'source = train_blocks.manifest.get("source")'),),
        ("tests/test_card.py::test_card_facts_state_the_runs_own_numbers",),
    ),
    Break(
        "epoch_end_saved_before_eval",
        "an epoch's last step (a whole accumulation) is saved before it is evaluated: its card says not evaluated",
        ((r"self\._run_step\(micro, epoch_end=self\.train_batches\.position == len\(self\.train_batches\)\)",
          "self._run_step(micro)"),),
        ("tests/test_trainer.py::test_an_epochs_last_step_is_evaluated_before_it_is_saved",),
    ),
    Break(
        "curve_drawn_outside_signals",
        "a Ctrl-C while loss.png is drawn after the last checkpoint stops the finished run (no loss.png, exit 130)",
        ((r"                    plot_metrics\(self\.out / METRICS_FILE, self\.out / PLOT_FILE\)\n        finally:\n",
          "                    pass\n        finally:\n            if self.ranks.is_main:\n"
          "                plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)\n"),),
        ("tests/test_trainer.py::test_a_ctrl_c_while_the_curve_is_drawn_waits_for_it",),
    ),
    Break(
        "resume_path_gone_refused",
        "a resume is refused when a relative --init / --tokenizer has moved since (\"made with --init /abs/base, not base\")",
        ((r"if was != now and not \(texts and home_expanded\(was\)", "if was != now and not (False and Path(was)"),),
        ("tests/test_train_cli.py::test_a_resume_with_other_settings_names_them_readably",),
    ),
    Break(
        "sigterm_kills_sample",
        "SIGTERM ends sample.py outright: a --trace run leaves no file, only a hidden temporary copy",
        ((r"sigterm_as_interrupt\(sigterm_interrupts\)", 'sigterm_as_interrupt(sigterm_interrupts and "sample" not in sys.argv[0])'),),
        ("tests/test_sample_cli.py::test_a_trace_run_stopped_by_sigterm_or_a_closed_pipe_keeps_its_rows",),
    ),
    Break(
        "trace_blamed_for_stdout",
        "stdout's error in a --trace run (a closed pipe) is reported as the trace's failure, and its rows are lost",
        ((r"except \(KeyboardInterrupt, OSError\) as e:  # Ctrl-C, SIGTERM or stdout's", "except KeyboardInterrupt as e:  #"),),
        ("tests/test_trace.py::test_trace_output_is_replaced_whole_kept_on_ctrl_c_and_untouched_on_an_error",
         "tests/test_sample_cli.py::test_a_trace_run_stopped_by_sigterm_or_a_closed_pipe_keeps_its_rows"),
    ),
    Break(
        "trace_write_error_unnamed",
        "the trace file's own write error is not named as the trace's (written through a device: \"writing the output\")",
        ((r"        except OSError as e:\n            raise MinigptError\(f\"--trace \{self\.path\}: writing it failed",
          '        except ValueError as e:\n            raise MinigptError(f"--trace {self.path}: writing it failed'),),
        ("tests/test_trace.py::test_trace_output_is_replaced_whole_kept_on_ctrl_c_and_untouched_on_an_error",),
    ),
    Break(
        "prepare_untied_head_taken",
        "prepare_for_inference takes a model whose LM head is untied from wte and embeds with the head's rows (other logits, no word)",
        ((r"if model\.lm_head\.weight is not model\.transformer\.wte\.weight:  # \(a prepared", 'if False:  # (a prepared'),),
        ("tests/test_kernels.py::test_a_model_whose_head_is_untied_or_on_meta_is_refused_in_one_line",),
    ),
    Break(
        "meta_model_taken",
        "a model on the meta device is prepared or decoded: torch's tracebacks (a dispatch key, .item() on meta)",
        ((r'    if device\.type == "meta":\n', '    if False:\n'),),
        ("tests/test_kernels.py::test_a_model_whose_head_is_untied_or_on_meta_is_refused_in_one_line",),
    ),
    Break(
        "huge_temperature_to_inf",
        "a temperature above float32's largest rounds to inf: every score 0, and top-k keeps the whole vocabulary",
        ((r"min\(max\(temperature, finfo\.tiny\), finfo\.max\)", 'max(temperature, finfo.tiny)'),),
        ("tests/test_sampling.py::test_a_huge_temperature_keeps_top_k",),
    ),
    Break(
        "prepared_model_shared",
        "share_memory() on a prepared model is let through (MKL's and oneDNN's packed weights: a traceback)",
        ((r"if moved\.is_shared\(\):", 'if False:'),),
        ("tests/test_kernels.py::test_a_prepared_model_pickles_and_deep_copies_on_every_kernel",),
    ),
    Break(
        "numpy_integers_refused",
        "num_samples / batch_size / TrainConfig's counts refuse a NumPy integer",
        ((r"number = None if isinstance\(value, bool\) else operator\.index\(value\)", 'number = value if type(value) is int else None'),),
        ("tests/test_kernels.py::test_preparing_a_prepared_model_or_for_no_rows_is_refused_in_one_line", "tests/test_sampling.py::test_generate_checks_num_samples_generator_and_eos_id_when_called",),
    ),
    Break(
        "workspace_shared_with_a_fork",
        "a workspace's blocks are shared anonymous maps: a fork()ed child writes the parent's logits and gradients",
        ((r"mmap\.mmap\(-1, numel \* dtype\.itemsize, \*\*_PRIVATE\)", "mmap.mmap(-1, numel * dtype.itemsize)"),),
        ("tests/test_training_speed.py::test_a_workspace_is_not_shared_with_a_forked_child",),
    ),
    Break(
        "head_grad_read_in_padded_rows",
        "the head's backward reads a gradient in padded rows as it is: oneDNN's bf16 matmul reads the padding (NaN: NaN)",
        ((r"grad2 = grad\.contiguous\(\)\.view\(-1, grad\.size\(-1\)\)", "grad2 = grad.reshape(-1, grad.size(-1))"),),
        ("tests/test_training_speed.py::test_a_gradient_in_padded_rows_is_read_dense",),
    ),
    Break(
        "loss_nan_when_nothing_scored", "the in-place loss's gradient is NaN where every target is ignored (torch's: zeros)",
        ((r"grad_loss / n\.clamp\(min=1\)", "grad_loss / n"),),
        ("tests/test_training_speed.py::test_the_swapped_model_takes_what_the_plain_one_takes",),
    ),
    Break(
        "head_logits_a_view", "the padded head returns its logits as a view: editing them in place is refused by autograd",
        ((r"return torch\.empty\(0, dtype=dtype\)\.set_\(padded\.untyped_storage\(\), 0, logits\.shape, logits\.stride\(\)\)",
          "return logits"),),
        ("tests/test_training_speed.py::test_the_swapped_model_takes_what_the_plain_one_takes",),
    ),
    Break(
        "head_casts_fp64_under_autocast",
        "the padded head casts an fp64 model's activations to bf16 under autocast (autocast leaves fp64)",
        ((r'autocast = torch\.is_autocast_enabled\("cpu"\) and x\.dtype != torch\.float64', 'autocast = torch.is_autocast_enabled("cpu")'),),
        ("tests/test_training_speed.py::test_the_swapped_model_takes_what_the_plain_one_takes",),
    ),
    Break(
        "embedding_grad_in_workspace_for_bf16",
        "the workspace embedding makes a bf16 / fp16 model's gradient too, summed otherwise than torch's",
        ((r"if stock or self\.weight\.dtype not in \(torch\.float32, torch\.float64\) or not _cpu_eager", "if stock or not _cpu_eager"),),
        ("tests/test_training_speed.py::test_the_embeddings_gradient_is_torchs_bit_for_bit_in_memory_it_takes_again",),
    ),
    Break(
        "second_derivative_taken",
        "the swapped Functions' backwards are taken as differentiable: a gradient penalty runs on wrong numbers or fails in a kernel",
        ((r"    @once_differentiable  # \(its backward is no graph: a second derivative is refused, not wrong\)\n", ""),),
        ("tests/test_training_speed.py::test_a_second_derivative_or_backward_is_refused_not_wrong",),
    ),
    Break(
        "head_weight_cast_fresh", "under autocast the LM head casts its weight to bf16 into a fresh tensor every step",
        ((r'w = workspace\.empty\("weight", tuple\(weight\.shape\), dtype, weight\.device\)\.copy_\(weight\)',
          "w = weight.to(dtype)"),),
        ("tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept",),
    ),
    Break(
        "head_autocast_stock", "under autocast the LM head is a plain nn.Linear again (unpadded bf16 rows, fresh casts)",
        ((r'        if not _cpu_eager\(x\):\n            return super\(\)\.forward\(x\)\n        autocast =',
          '        if not _cpu_eager(x) or torch.is_autocast_enabled("cpu"):\n            return super().forward(x)\n        autocast ='),),
        ("tests/test_training_speed.py::test_lm_head_under_autocast_pads_bf16_rows_and_equals_autocasts_linear",
         "tests/test_training_speed.py::test_same_logits_loss_and_gradients_as_the_plain_model_under_bf16_autocast"),
    ),
    Break(
        "head_grad_rows_first_block_only", "under autocast the LM head's weight gradient is made for its first block of rows only",
        ((r"for rows in range\(0, w\.size\(0\), HEAD_GRAD_ROWS\):", "for rows in range(0, min(w.size(0), HEAD_GRAD_ROWS), HEAD_GRAD_ROWS):"),),
        ("tests/test_training_speed.py::test_lm_head_under_autocast_pads_bf16_rows_and_equals_autocasts_linear",),
    ),
    Break(
        "logprobs_fresh", "the loss's log-probabilities are a fresh tensor every step",
        ((r'logprobs = workspace\.empty\("logprobs", tuple\(logits\.shape\), torch\.float32, logits\.device\)',
          "logprobs = torch.empty(logits.shape, dtype=torch.float32)"),),
        ("tests/test_training_speed.py::test_training_steps_reuse_the_heads_and_the_losss_memory_and_never_what_the_caller_kept",),
    ),
    Break(
        "loss_bf16_grad_unwritten", "the in-place loss's backward leaves a bf16 gradient unwritten (computed in fp32 only)",
        ((r"if grad is not logprobs:", "if False:"),),
        ("tests/test_training_speed.py::test_in_place_cross_entropy_equals_cross_entropy_in_value_and_gradient",),
    ),
    Break(
        "timing_cold_code", "after the flush every layer is timed, the first one with cold code and buffers",
        ((r"if len\(layers\) > 1:  # warm", "if False:  # warm"),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",),
    ),
    Break(
        "head_not_halved", "a single matrix (the LM head) is timed whole after the flush, with cold code",
        ((r"if flush is not None and len\(sample\) == 1 and len\(sample\[0\]\[0\]\) > 1:", "if False:"),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",),
    ),
    Break(
        "one_row_halved", "a one-row matrix timed from memory is split too, into an empty half and the row",
        ((r" and len\(sample\[0\]\[0\]\) > 1:  # one matrix", ":  # one matrix"),),
        ("tests/test_kernels.py::test_a_one_row_head_timed_from_memory_is_not_split_into_an_empty_half",),
    ),
    Break(
        "flush_zero_pages", "the flush buffer is allocated but never written (reads one shared zero page)",
        ((r"flush = torch\.ones\(", "flush = torch.empty("),),
        ("tests/test_kernels.py::test_each_timed_pass_first_reads_what_decoding_reads_between_two_uses_of_a_layer",),
    ),
    Break(
        "threads_kept_fewer", "a layer run on fewer threads leaves the whole process on that many",
        ((r"^(\s+)torch\.set_num_threads\(every\)$", r"\1pass"),),
        ("tests/test_kernels.py::test_a_kernel_faster_on_fewer_threads_runs_on_them",
         "tests/test_kernels.py::test_a_layer_on_fewer_threads_gives_them_back_even_after_an_error"),
    ),
    Break(
        "fewer_threads_one_race", "fewer threads are chosen after winning one race, not two in a row",
        ((r"for _ in range\(2\):\n(\s+)on = _race", r"for _ in range(1):\n\1on = _race"),),
        ("tests/test_kernels.py::test_fewer_threads_must_win_two_races_in_a_row",),
    ),
    Break(
        "fewer_threads_by_a_hair", "fewer threads are chosen when they win by any margin, not by 10%",
        ((r"on\[kernel, fewer\] >= FEWER_THREADS_MARGIN \* on", "on[kernel, fewer] >= on"),),
        ("tests/test_kernels.py::test_a_kernel_faster_on_fewer_threads_runs_on_them",),
    ),
    # --- what a user hands in that this model cannot compute, or that is broken --------------------
    Break(
        "untied_head_loaded", "an HF config with an untied LM head loads (its head dropped in silence)",
        ((r"if head is not None and not copy:", "if False:"),),
        ("tests/test_hf.py::test_an_untied_lm_head_is_refused_not_dropped",
         "tests/test_hf.py::test_an_lm_head_loads_only_as_a_copy_of_wte",
         "tests/test_convert_cli.py::test_bad_weights_are_refused_and_nothing_is_written[head_not_wte]"),
    ),
    Break(
        "from_hf_ties_any_head", "GPTConfig.from_hf accepts a config that declares its LM head untied",
        ((r'\n\s*\("tie_word_embeddings", True\),', ""),),
        ("tests/test_hf.py::test_unsupported_hf_config_names_the_field[tie_word_embeddings-False]",),
    ),
    Break(
        "one_record_split_unexplained", "a split that takes the only record is reported as data with 0 tokens",
        ((r"if val_docs and not train_docs:", "if False:"),),
        ("tests/test_data.py::test_a_split_that_takes_every_record_says_so",),
    ),
    Break(
        "nonfinite_logits_decoded", "decoding and scoring go on from logits that are inf or NaN",
        ((r"if not math\.isfinite\(logits\.sum\(dtype=torch\.float32\)\) and not bool\(logits\.isfinite\(\)\.all\(\)\):", "if False:"),),
        ("tests/test_sampling.py::test_weights_that_make_no_finite_logits_are_named_not_decoded",),
    ),
    Break(
        "cache_ids_unchecked", "a cached entry whose ids lie outside the vocabulary is used as it is",
        ((r"if blocks\.num_tokens and int\(blocks\.blocks\.max\(\)\) >= vocab_size:", "if False:"),),
        ("tests/test_data.py::test_a_damaged_entry_is_rebuilt",),
    ),
    Break(
        "bom_kept", "a byte-order mark at the start of a data file is read as text",
        ((r'TEXT_ENCODING = "utf-8-sig"', 'TEXT_ENCODING = "utf-8"'),),
        ("tests/test_data.py::test_a_byte_order_mark_is_dropped_in_every_text_format",),
    ),
    Break(
        "lone_surrogate_passed", "a record holding a lone surrogate goes on to the tokenizer",
        ((r"if texts\[-1\] is not None and lone_surrogate\(texts\[-1\]\) is not None:", "if False:"),),
        ("tests/test_data.py::test_a_lone_surrogate_in_json_text_is_named_in_one_line",),
    ),
    Break(
        "preset_shapes_a_loaded_model", "--preset tiny's shape applies to a model loaded with --init",
        ((r'if "init" in given and first\.init != "scratch":', "if False:"),),
        ("tests/test_train_cli.py::test_the_tiny_preset_continues_from_a_loaded_model",),
    ),
    Break(
        "penalty_forgets_the_prompt_beyond_the_window", "the repetition penalty sees only the window's prompt tokens",
        ((r"prompt = list\(prompt\) or \[eos_id\]", "prompt = list(prompt[-window:]) or [eos_id]"),),
        ("tests/test_sampling.py::test_the_repetition_penalty_counts_prompt_tokens_beyond_the_window",),
    ),
    Break(
        "one_compile_cache_for_every_isa", "compiled decoding shares inductor's cache between instruction sets",
        ((r"^(\s*)prepare_cpu_compile\(\)$", r"\1pass"),),
        ("tests/test_compiled_decoding.py::test_steps_compiled_for_other_instruction_sets_keep_to_their_own_cache",),
    ),
    Break(
        "forced_kernel_ignored", "a kernel asked for is ignored: timing chooses among all the candidates",
        ((r"candidates = \[\(lay, k\) for lay, k in candidates if k == kernel\]",
          "candidates = [(lay, k) for lay, k in candidates if k == kernel] and candidates"),),
        ("tests/test_sample_cli.py::test_kernel_pins_every_layer_and_gives_the_librarys_text",),
    ),
    Break(
        "resume_moments_unnamed", "an optimizer state of other shapes is refused without naming its file",
        ((r'raise MinigptError\(f"\{folder\}: \{e\}"\) from None', "raise"),),
        ("tests/test_faults.py::test_a_damaged_training_state_is_one_line_on_resume",),
    ),
    Break(
        "trace_over_what_is_read", "--trace may write over the weights or the prompt file the run reads",
        ((r"if written == source or source in written\.parents:", "if False:"),),
        ("tests/test_trace.py::test_a_trace_never_writes_over_what_the_run_reads_or_a_models_files",),
    ),
    Break(
        "trace_among_a_models_files", "--trace may write into another model's (a training run's) folder",
        ((r"if \(written\.parent / WEIGHTS_FILE\)\.exists\(\):", "if False:"),),
        ("tests/test_trace.py::test_a_trace_never_writes_over_what_the_run_reads_or_a_models_files",),
    ),
    Break(
        "kv_cache_trusts_overcommit", "a KV cache larger than the memory available is allocated (Linux overcommits)",
        ((r"or \(available is not None and nbytes > available\)", ""),),
        ("tests/test_sampling.py::test_a_kv_cache_beyond_the_memory_available_is_refused_before_it_is_allocated",),
    ),
    Break(
        "raw_python_warnings", "a Python warning through a CLI prints its source path and line of code",
        ((r"warnings\.formatwarning = _one_line_warning", "pass"),),
        ("tests/test_faults.py::test_python_warnings_reach_the_user_as_one_line_each",),
    ),
    Break(
        "torchrun_variables_unchecked", "RANK, WORLD_SIZE, LOCAL_RANK set by hand are used unchecked",
        ((r"    for name, number in \(\(\"RANK\", rank\), \(\"LOCAL_RANK\", local_rank\)\):", "    for name, number in ():"),),
        ("tests/test_faults.py::test_torchrun_variables_set_by_hand_are_one_line",),
    ),
    Break(
        "interactive_ends_on_a_mistyped_line", "one line typed at a terminal that is not UTF-8 ends --interactive",
        ((r"            if not sys\.stdin\.isatty\(\):\n                raise MinigptError\(message\)", "            raise MinigptError(message)"),),
        ("tests/test_faults.py::test_a_line_typed_at_a_terminal_that_is_not_utf8_is_asked_again",),
    ),
    Break(
        "force_replaces_any_folder", "convert_hf_weights.py --force deletes a folder of anything, not only a model's",
        ((r"if not model_file and \(name := foreign_entry\(entry\)\) is not None:", "if False:"),),
        ("tests/test_convert_cli.py::test_force_replaces_only_a_models_folder",),
    ),
    Break(
        "config_shape_defaulted", "a shape missing from minigpt's config.json takes distilgpt2's default",
        ((r"missing = \[name for name in SHAPE_FIELDS if name not in d\]", "missing = []"),),
        ("tests/test_faults.py::test_a_minigpt_config_missing_a_shape_names_it_and_an_hf_one_without_model_type_says_so",),
    ),
    Break(
        "folder_not_renamed_onto_a_dangling_link", "a conversion onto a symlink that names nothing fails: a folder renamed onto a link",
        ((r"if not out\.exists\(\) and not out\.is_symlink\(\):", "if not out.exists():"),),
        ("tests/test_files.py::test_atomic_folder_replaces_a_symlink_out_also_one_that_names_nothing",),
    ),
    Break(
        "train_into_a_dangling_link", "train.py --out that is a symlink naming nothing fails at the lock, unexplained",
        ((r"if out\.is_symlink\(\) and not out\.exists\(\):  # \(the run", "if False:  # (the run"),),
        ("tests/test_faults.py::test_train_flags_out_of_range",),
    ),
    Break(
        "stopped_run_not_plotted", "a run stopped by Ctrl-C leaves no loss.png of its curve so far",
        ((r"if self\.metrics is not None:  # \(rank 0: a stopped run's curve too;", "if self.metrics is not None and not stopped:  # (;"),),
        ("tests/test_train_cli.py::test_ctrl_c_saves_a_checkpoint_and_exits_130",),
    ),
    Break(
        "dash_prompt_unexplained", "a prompt that starts with - is a bare usage error, without how to pass it",
        ((r'hint = f"; \{self\.dash_hint\}" if self\.dash_hint and taken_for_a_flag else ""', 'hint = ""'),),
        ("tests/test_sample_cli.py::test_a_prompt_taken_for_a_flag_is_told_about_double_dash",),
    ),
    Break(
        "exported_tokenizer_window_fixed", "an exported tokenizer says GPT-2's 1024 tokens, not the model's window",
        ((r'"model_max_length": model_max_length,', '"model_max_length": 1024,'),),
        ("tests/test_convert_cli.py::test_hf_to_minigpt_and_back",),
    ),
    Break(
        "cuda_home_line_on_the_cpu", "a CPU compile on a machine with a CUDA toolkit but no GPU logs torch's line about CUDA",
        ((r"    logger\.setLevel\(logging\.ERROR\)", "    pass"),),
        ("tests/test_compiled_decoding.py::test_a_cuda_toolkit_without_a_gpu_adds_no_line_about_cuda",),
    ),
    Break(
        "compiled_training_shares_the_isa_cache", "a training step compiled on the CPU shares inductor's cache between "
        "instruction sets, and is not checked for a C++ compiler (an inductor traceback at the first step)",
        ((r"^(\s*)prepare_cpu_compile\(\)\n(?=\s*self\.forward_model = torch\.compile)", r"\1pass\n"),),
        ("tests/test_trainer_syncs.py::test_compiled_training_on_the_cpu_keeps_to_its_instruction_sets_cache",
         "tests/test_train_cli.py::test_compile_without_a_working_compiler_is_one_line"),
    ),
    Break(
        "trace_replaces_a_device", "--trace onto a device or a symlink renames a plain file over it",
        ((r"if target\.is_symlink\(\) or \(target\.exists\(\) and not target\.is_file\(\)\):", "if False:"),),
        ("tests/test_trace.py::test_a_trace_path_that_is_no_plain_file_is_written_through_not_replaced",),
    ),
    Break(
        "full_stdout_is_a_traceback", "a CLI whose stdout cannot be written (a full disk) ends in a traceback",
        ((r"except OSError as e:  # one no library call", "except ZeroDivisionError as e:  # one no library call"),),
        ("tests/test_sample_cli.py::test_a_full_disk_behind_stdout_is_one_line",),
    ),
    Break(
        "convert_replaces_its_source", "convert_hf_weights.py --force replaces the folder it converts, or one holding it",
        ((r"if replaced == read or replaced in read\.parents:", "if False:"),),
        ("tests/test_convert_cli.py::test_force_never_replaces_the_folder_it_reads",),
    ),
    Break(
        "writes_inside_a_run", "a conversion or a run writes its --out inside another run's folder",
        ((r"if \(folder / CKPT_DIR\)\.is_dir\(\) or _held_by_a_run\(folder / LOCK_FILE\):", "if False:"),),
        ("tests/test_run_lock.py::test_nothing_is_written_inside_a_runs_folder",),
    ),
    Break(
        "eval_only_reads_the_training_data", "--eval-only --val-data reads (and needs) the training data too",
        ((r"    if cfg\.val_source is None:  # a split of the training records", "    if True:  #"),),
        ("tests/test_train_cli.py::test_eval_only_with_val_data_reads_only_that_file",
         "tests/test_data.py::test_validation_blocks_alone_never_read_the_training_source"),
    ),
    Break(
        "failed_run_leaves_its_parents", "a run that fails before its first checkpoint leaves the parent folders it made",
        ((r"self\._made = \[p for p in \(self\.out, \*self\.out\.absolute\(\)\.parents\) if not p\.exists\(\)\]",
          "self._made = [] if self.out.exists() else [self.out]"),),
        ("tests/test_faults.py::test_a_failed_run_leaves_no_folder_it_made",),
    ),
    Break(
        "loaded_model_takes_a_tokenizer", "--tokenizer with a loaded model is ignored, not refused",
        ((r'SCRATCH_FLAGS = \(\*SHAPE_FLAGS, "tokenizer"\)', "SCRATCH_FLAGS = SHAPE_FLAGS"),),
        ("tests/test_train_cli.py::test_bad_flags_exit_2",),
    ),
    Break(
        "vanishing_temperature_is_nan", "a temperature too small for a float32 divides the logits by zero",
        ((r"min\(max\(temperature, finfo\.tiny\), finfo\.max\)", "min(temperature, finfo.max)"),),
        ("tests/test_sampling.py::test_a_vanishing_temperature_is_its_limit_all_mass_on_the_maximum",
         "tests/test_sampling.py::test_sampling_at_a_vanishing_temperature_decodes_greedy_tokens"),
    ),
    Break(
        "vanishing_penalty_overflows", "a repetition penalty too small for a float32 overflows the seen logits",
        ((r"        penalized = torch\.where\(smallest > penalty, limit, penalized\)", "        pass"),),
        ("tests/test_sampling.py::test_a_vanishing_repetition_penalty_is_its_limit",
         "tests/test_sampling.py::test_decoding_with_a_vanishing_repetition_penalty_is_decoding_at_its_limit"),
    ),
    Break(
        "huge_penalty_overflows", "a repetition penalty too large for a float32 leaves a row all seen and negative at -inf",
        ((r"penalized = torch\.where\(\(largest < penalty\) & \(seen < 0\), seen \* largest, penalized\)", "pass"),),
        ("tests/test_sampling.py::test_a_huge_repetition_penalty_on_a_row_all_seen_and_negative_is_its_limit",),
    ),
    Break(
        "an_impossible_output_is_a_traceback", "an output buffer too large for memory ends in the allocator's traceback",
        ((r"if isinstance\(e, torch\.OutOfMemoryError\) or \"allocate\" in str\(e\):", "if False:"),
         (r"if nbytes > torch\.iinfo\(torch\.int64\)\.max or \(available is not None and nbytes > available\):",
          "if False:")),
        ("tests/test_sampling.py::test_an_output_that_cannot_be_allocated_is_refused_when_generate_is_called",
         "tests/test_sampling.py::test_a_kv_cache_that_cannot_be_allocated_is_refused",
         "tests/test_sampling.py::test_the_cli_refuses_an_output_too_large_in_one_line"),
    ),
    Break(
        "non_finite_validation_goes_on", "a validation loss that is not finite is logged and saved, not a stop",
        ((r"if not math\.isfinite\(val_loss\):  # \(a step broke", "if False:  # ("),),
        ("tests/test_faults.py::test_a_diverged_run_ends_cleanly",),
    ),
    Break(
        "resume_ignores_the_tokenizer", "--resume with another --tokenizer is accepted (and the flag ignored)",
        ((r', "--tokenizer": where\(self\.tokenizer\),', ","),),
        ("tests/test_train_cli.py::test_a_resume_with_other_settings_names_them_readably",),
    ),
    Break(
        "card_infinity_as_text", "a diverged run's card writes perplexity inf, which YAML reads as a string",
        ((r'return "\.inf" if x == float\("inf"\)', 'return "inf" if x == float("inf")'),),
        ("tests/test_card.py::test_a_diverged_runs_card_holds_yamls_infinity",),
    ),
    Break(
        "concurrent_builds_clear_each_other", "a build clears a live writer's temporary folder of the same entry",
        ((r"        if _writer_lives\(stale\):\n            continue\n        if stale\.is_dir\(\)", "        if stale.is_dir()"),),
        ("tests/test_files.py::test_a_live_writers_temporary_folder_is_left_alone",),
    ),
    Break(
        "cache_width_unchecked", "cached blocks of another width are used, not rebuilt",
        ((r"\n                or blocks\.shape\[1\] != manifest\.get\(\"block_size\"\)\)", ")"),),
        ("tests/test_data.py::test_a_damaged_entry_is_rebuilt",),
    ),
    Break(
        "a_failing_compiler_passes", "a C++ compiler that is found but does not run passes compiled decoding's check",
        ((r"return subprocess\.run\(\[program, \"--version\"\], capture_output=True, timeout=60\)\.returncode == 0",
          "return shutil.which(program) is not None"), (r"import subprocess\n", "import shutil\nimport subprocess\n")),
        ("tests/test_compiled_decoding.py::test_a_model_in_training_mode_or_a_cpu_without_a_compiler_or_python_headers_is_refused",),
    ),
    Break(
        "every_rank_prints_usage", "under torchrun every rank prints the same usage error",
        ((r'if _other_rank\(\):  # \(under torchrun every rank parses', 'if False:  # ('),),
        ("tests/test_sample_cli.py::test_under_torchrun_only_rank_0_prints_a_usage_error",),
    ),
    Break(
        "state_field_type_unchecked", "a training state's field of the wrong type is a traceback on resume",
        ((r"except \(TypeError, ValueError, AttributeError\) as e:", "except ZeroDivisionError as e:"),),
        ("tests/test_faults.py::test_a_damaged_training_state_is_one_line_on_resume",),
    ),
    Break(
        "int8_width_of_8", "--quantize int8 refuses a layer width that is no multiple of 8, which upcast and fbgemm take",
        ((r'^(\s*)if kernel == "int8mm" and in_features % 16:',
          r'\1if in_features % 8:\n\1    raise MinigptError("--quantize int8: not a multiple of 8")\n\g<0>'),),
        ("tests/test_kernels.py::test_int8_takes_a_width_that_is_no_multiple_of_8",
         "tests/test_sampling.py::test_int8_refuses_widths_the_kernel_cannot_take_and_upcast_takes_any"),
    ),
    Break(
        "missing_kernel_unexplained", "a kernel this machine lacks is refused as another precision's, not by what it needs",
        ((r"if missing:  # \(a layout", "if False:  # (a layout"),),
        ("tests/test_kernels.py::test_a_forced_kernel_that_cannot_run_says_why",),
    ),
    Break(
        "stats_name_the_prompts_kernels", "--stats under --compile names the prompt's kernels alone where other products decode",
        ((r'return "" if chosen in \("kernels", "eager"\) else', 'return "" if True else'),),
        ("tests/test_compiled_decoding.py::test_inductor_gemms_decode_the_eager_tokens_with_no_opaque_call",),
    ),
    Break(
        "save_replaces_any_folder", "the Python savers replace a folder that holds other files without overwrite=True",
        ((r"if not overwrite and out\.is_dir\(\)", "if False and out.is_dir()"),),
        ("tests/test_hf.py::test_saving_never_deletes_other_files_unless_told",),
    ),
    Break(
        "convert_deletes_its_source", "convert_to_minigpt(overwrite=True) replaces a folder that holds its source",
        ((r"^(\s*)check_source_outside\(folder_destination\(out\), source, \"the source\"\)", r"\1pass"),),
        ("tests/test_hf.py::test_saving_never_deletes_other_files_unless_told",),
    ),
    Break(
        "save_to_a_folder_named_tilde", "a save to \"~/x\" writes a folder named \"~\" in the current folder",
        ((r"given = home_expanded\(out\)", "given = Path(out)"),),
        ("tests/test_hf.py::test_saving_expands_home_as_loading_does",),
    ),
    Break(
        "unloadable_model_saved", "a model no loader reads back (a prepared one, a tokenizer too large) is saved",
        ((r"^(\s*)check_vocabulary\(out, model\.config, tokenizer\)\n", r"\1pass\n"),
         (r"!= expected_shapes\(model\.config\):", "!= expected_shapes(model.config) and False:")),
        ("tests/test_hf.py::test_a_model_no_loader_could_read_back_is_not_saved",),
    ),
    Break(
        "targets_shape_unchecked", "GPT.forward takes targets of another shape than idx (a transposed batch)",
        ((r"if targets is not None and targets\.shape != idx\.shape:", "if False:"),),
        ("tests/test_model.py::test_inputs_of_the_wrong_shape_are_named",),
    ),
    Break(
        "load_inputs_unchecked", "load_model takes any dtype and any object as its source (None: the Hub id 'None')",
        ((r"if dtype not in DTYPES\.values\(\):", "if False:"),
         (r"if not isinstance\(source, \(str, os\.PathLike\)\):", "if False:")),
        ("tests/test_hf.py::test_a_source_or_dtype_of_the_wrong_kind_is_named",),
    ),
    Break("prompt_not_checked", "generate takes its prompt unchecked: a tensor is ambiguous, floats are truncated, ids beyond the vocabulary reach the embedding",
          ((r"^(\s*)prompt = token_ids\(prompt, model\.config\.vocab_size\)\n", r"\1pass\n"),),
          ("tests/test_sampling.py::test_a_prompt_is_a_list_a_tuple_or_a_1d_integer_tensor", "tests/test_sampling.py::test_ids_outside_the_vocabulary_are_named_with_its_size")),
    Break("float_ids_truncated", "a float token id is truncated to an int in silence",
          ((r"operator\.index\(t\)", "int(t)"),),
          ("tests/test_sampling.py::test_a_prompt_is_a_list_a_tuple_or_a_1d_integer_tensor",)),
    Break("ids_beyond_the_vocabulary", "token ids outside [0, vocab_size) go on to the embedding",
          ((r"bad = next\(\(t for t in ids if not 0 <= t < vocab_size\), None\)", "bad = None"),),
          ("tests/test_sampling.py::test_ids_outside_the_vocabulary_are_named_with_its_size", "tests/test_trace.py::test_score_ids_takes_a_1d_tensor_and_refuses_a_batch_or_bad_ids")),
    Break("eos_id_unchecked", "an eos_id outside the vocabulary is taken",
          ((r"^(\s*)check_in_vocabulary\(\[eos_id\], model\.config\.vocab_size, \"eos_id\"\)\n", r"\1pass\n"),),
          ("tests/test_sampling.py::test_ids_outside_the_vocabulary_are_named_with_its_size",)),
    Break("score_ids_unchecked", "score_ids reads its ids unchecked: a (1, T) tensor is \"1 token\"",
          ((r"^(\s*)ids = token_ids\(ids, model\.config\.vocab_size, \"ids\"\)\n", r"\1pass\n"),),
          ("tests/test_trace.py::test_score_ids_takes_a_1d_tensor_and_refuses_a_batch_or_bad_ids",)),
    Break("decoding_with_dropout_on", "generation and scoring run a model in training mode, dropout on",
          ((r"if rates := \[m\.p for m in model\.modules\(\)", "if False and [m.p for m in model.modules()"),),
          ("tests/test_sampling.py::test_generation_refuses_a_model_in_training_mode_with_dropout", "tests/test_trace.py::test_scoring_refuses_a_model_in_training_mode_with_dropout")),
    Break("scoring_with_dropout_on", "score_ids scores with a model in training mode, dropout on",
          ((r"^(\s*)check_eval_mode\(model, \"scoring\"\)\n", r"\1pass\n"),),
          ("tests/test_trace.py::test_scoring_refuses_a_model_in_training_mode_with_dropout",)),
    Break("prepared_in_training_mode", "prepare_for_inference leaves the model (and the modules it swaps in) in training mode",
          ((r"return model\.eval\(\)\.requires_grad_\(False\)$", "return model.requires_grad_(False)"),),
          ("tests/test_kernels.py::test_a_prepared_model_is_in_eval_mode",)),
    Break("prepared_twice", "prepare_for_inference runs again on a prepared model",
          ((r"if isinstance\(model\.transformer\.wte, SharedEmbedding\):", "if False:"),),
          ("tests/test_kernels.py::test_preparing_a_prepared_model_or_for_no_rows_is_refused_in_one_line",)),
    Break("prepared_for_no_rows", "prepare_for_inference takes batch_size 0 or below",
          ((r'batch_size = integer_at_least\(batch_size, 1, "batch_size"\)',
            'batch_size = integer_at_least(batch_size, -2**62, "batch_size")'),),
          ("tests/test_kernels.py::test_preparing_a_prepared_model_or_for_no_rows_is_refused_in_one_line",)),
    Break("negative_id_decoded", "decode and decode_bytes pass a negative id to the Rust side",
          ((r"bad = next\(\(t for t in ids if t < 0\), None\)", "bad = None"),),
          ("tests/test_tokenizer.py::test_a_negative_id_is_refused_and_one_beyond_the_vocabulary_decodes_to_nothing",)),
    Break("encode_batch_not_utf8_opaque", "encode_batch lets the Rust side's TypeError through for a lone surrogate",
          ((r"^(\s*)_refuse_not_utf8\(texts, \"text \{\}\"\)\n", r"\1pass\n"),),
          ("tests/test_tokenizer.py::test_encode_batch_names_a_text_that_is_not_utf8_as_encode_does",)),
    Break("train_bpe_on_a_str", "train_bpe trains on a str one character at a time",
          ((r"if isinstance\(texts, str\):\n(\s*)raise TypeError\(\"texts: a list of strings \(", r'if False:\n\1raise TypeError("texts: a list of strings ('),),
          ("tests/test_tokenizer.py::test_train_bpe_refuses_a_str_and_a_vocabulary_below_the_bytes_and_eos",)),
    Break("bpe_vocabulary_below_the_bytes", "train_bpe takes a vocab_size below 256 bytes + EOS",
          ((r"if vocab_size < MIN_BPE_VOCAB:", "if False:"),),
          ("tests/test_tokenizer.py::test_train_bpe_refuses_a_str_and_a_vocabulary_below_the_bytes_and_eos",)),
    Break(
        "sampling_config_types_unchecked", "SamplingConfig takes \"0.5\", 3.0 or greedy=\"False\" (truthy) as they are",
        ((r"if not isinstance\(value, kind\) or \(kind is not bool and isinstance\(value, bool\)\):", "if False:"),),
        ("tests/test_sampling.py::test_sampling_config_names_a_value_of_the_wrong_type",),
    ),
    Break(
        "data_config_types_unchecked", "DataConfig takes block_size=64.0 and other values of the wrong kind",
        ((r"if value is not None and \(isinstance\(value, bool\) or not isinstance\(value, kind\)\):", "if False:"),),
        ("tests/test_data.py::test_a_data_config_of_the_wrong_kind_is_refused_when_made",),
    ),
    Break("empty_epochs_loop", "an epoch that yields no batch is not refused: fit() starts one empty epoch after another",
          ((r"if whole and self\.step == step:", r"if False:"),),
          ("tests/test_trainer.py::test_batches_that_yield_nothing_are_refused_not_looped_over",)),
    Break("resumed_empty_epoch_refused", "an epoch without a step is refused even when it is a resumed epoch's empty rest",
          ((r"if whole and self\.step == step:", r"if self.step == step:"),),
          ("tests/test_trainer.py::test_a_run_resumed_at_the_end_of_an_epoch_goes_on",)),
    Break("short_epoch_no_step", "an epoch's last accumulation shorter than grad_accum makes no step",
          ((r"^(\s*)if micro:  # the epoch's last", r"\1if False:  # the epoch's last"),),
          ("tests/test_trainer.py::test_an_epoch_shorter_than_grad_accum_is_one_step",)),
    Break("train_config_float_ints", "TrainConfig takes a grad_accum of 1.5 (and other non-integer counts)",
          ((r'setattr\(self, name, integer_at_least\(getattr\(self, name\), least, f"TrainConfig: \{name\}"\)\)',
            'value = getattr(self, name)\n            setattr(self, name, value if value >= least else '
            'integer_at_least(value, least, f"TrainConfig: {name}"))'),),
          ("tests/test_trainer.py::test_train_config_refuses_what_the_loop_would_misread",)),
    Break("train_config_dtype_by_name", "TrainConfig takes dtype='bf16' (autocast off, fp32 training)",
          ((r"    if dtype not in DTYPES\.values\(\):", r"    if False:"),),
          ("tests/test_trainer.py::test_train_config_refuses_what_the_loop_would_misread",)),
    Break("adamw_duplicate_parameters", "AdamW takes a parameter twice (tied lm_head + transformer groups) and updates it twice a step",
          ((r"if len\(\{id\(p\) for p in params\}\) < len\(params\):", r"if False:"),),
          ("tests/test_optim.py::test_a_parameter_given_twice_is_refused_as_torch_does",)),
    Break("adamw_group_tensor_rows", "a group's single tensor as 'params' is split into its rows, which train nothing",
          ((r"items = \[params\] if isinstance\(params, torch\.Tensor\) else list\(params\)", r"items = list(params)"),),
          ("tests/test_optim.py::test_params_are_taken_as_torch_takes_them",)),
    Break("adamw_bare_tensor", "AdamW(tensor) is taken (as its rows) instead of refused with a TypeError",
          ((r"if isinstance\(params, torch\.Tensor\):  # \(list\(t\)", r"if False:  # (list(t)"),),
          ("tests/test_optim.py::test_params_are_taken_as_torch_takes_them",)),
    Break("adamw_named_params", "AdamW(model.named_parameters()) is refused: (name, tensor) pairs are not unpacked",
          ((r"named = \[isinstance\(item, tuple\) for item in items\]", r"named = [False for item in items]"),),
          ("tests/test_optim.py::test_params_are_taken_as_torch_takes_them",)),
    Break("adamw_betas_unchecked", "betas that are not a pair of numbers fail with an unrelated error (or pass)",
          ((r"if not \(isinstance\(betas, \(tuple, list\)\) and len\(betas\) == 2$", r"if False and (len(betas) == 2"),),
          ("tests/test_optim.py::test_betas_that_are_not_a_pair_of_numbers_are_refused",)),
    Break("schedule_negative_step", "linear_schedule takes a negative step (a negative multiplier) or warm-up",
          ((r"for name, value in \(\(\"step\", step\), \(\"warmup_steps\", warmup_steps\)\):", r"for name, value in ():"),),
          ("tests/test_optim.py::test_linear_schedule_refuses_negative_steps",)),
    Break("compiled_step_of_another_model", "generate decodes through a CompiledDecoding of another model, or of layers since swapped",
          ((r"if model is not self\.model or \[id\(m\) for m in _layers\(model\)\] != self\.layer_ids:", "if False:"),),
          ("tests/test_compiled_decoding.py::test_a_compiled_step_of_another_model_or_of_swapped_layers_is_refused",)),
    Break("evaluate_leaves_eval_mode", "metrics.evaluate leaves a model in training mode in eval mode",
          ((r"^(\s*)model\.train\(training\)\n", r"\1pass\n"),),
          ("tests/test_trainer.py::test_evaluate_leaves_the_mode_as_it_found_it_and_no_examples_is_nan",)),
    Break("perplexity_of_nan_infinite", "the perplexity of a NaN loss (no examples) is inf",
          ((r"if math\.isnan\(loss\):", "if False:"),),
          ("tests/test_trainer.py::test_evaluate_leaves_the_mode_as_it_found_it_and_no_examples_is_nan",)),
    Break("plot_metrics_needs_paths", "plot_metrics fails on paths given as str",
          ((r"^(\s*)metrics, png = Path\(metrics\), Path\(png\)\n", r"\1pass\n"),),
          ("tests/test_trainer.py::test_plot_metrics_takes_paths_as_str",)),
    Break("kv_cache_of_no_rows", "a KV cache of batch size 0 (other logits, in silence) or of no positions is made",
          ((r"if batch_size < 1 or max_len < 1:", "if False:"),),
          ("tests/test_model.py::test_context_window_is_enforced",)),
    Break("kv_cache_of_another_batch", "a step of another batch, dtype or device than its KV cache is written into it",
          ((r"if \(k\.size\(0\), k\.dtype, k\.device\) != ", "if False and (k.size(0), k.dtype, k.device) != "),),
          ("tests/test_model.py::test_a_kv_cache_of_another_batch_dtype_or_device_is_named_and_left_unwritten",)),
    Break("warm_up_any_batch_or_dtype", "CompiledDecoding.warm_up takes a batch of 0 or 2.0, or a dtype other than the activations'",
          ((r"if isinstance\(batch_size, bool\) or not \(isinstance", "if False and (isinstance"),),
          ("tests/test_compiled_decoding.py::test_warm_up_refuses_a_batch_or_dtype_it_cannot_decode",)),
    Break("fit_over_another_run", "Trainer.fit of a new run writes into a folder that holds another run's checkpoint or other files",
          ((r"if not saved:  # a new run", "if False:  # a new run"),),
          ("tests/test_trainer.py::test_a_new_run_is_refused_a_folder_that_holds_another_run_or_other_files",)),
    Break("fit_refused_on_rank_0_only", "only rank 0 refuses a new run's folder that holds another run; the others go on to wait",
          ((r"if not saved:  # a new run", "if not saved and self.ranks.is_main:  # a new run"),),
          ("tests/test_trainer.py::test_a_new_run_is_refused_a_folder_that_holds_another_run_or_other_files",)),
    Break("fit_again_drops_rows", "a Trainer fit a second time cuts metrics.jsonl back to where its first fit began",
          ((r"MetricsLog\(self\.out / METRICS_FILE, self\.rows_at_save if saved else None\)",
            'MetricsLog(self.out / METRICS_FILE, self.__dict__.setdefault("first_rows", self.rows_at_save if saved else None))'),),
          ("tests/test_trainer.py::test_a_new_run_is_refused_a_folder_that_holds_another_run_or_other_files",)),
    Break("gpu_number_unchecked", "--device cuda:N takes a GPU number the machine does not have",
          ((r'if kind == "cuda" and colon and int\(index\) >= torch\.cuda\.device_count\(\):', "if False:"),),
          ("tests/test_train_cli.py::test_a_device_is_named_as_torch_names_it",)),
    Break("torchrun_replaces_gpu_number", "under torchrun --device cuda:N is replaced by GPU LOCAL_RANK in silence",
          ((r'if device\.type == "cuda" and device\.index is not None:', "if False:"),),
          ("tests/test_train_cli.py::test_a_device_is_named_as_torch_names_it",)),
    Break("grad_norm_zero_on_the_cpu", "with no gradient at all the norm is a CPU zero, stacked with a GPU's losses",
          ((r"return torch\.zeros\(\(\), device=params\[0\]\.device if params else None\)", "return torch.zeros(())"),),
          ("tests/test_optim.py::test_clip_grad_norm_without_gradients_is_a_zero_on_the_parameters_device",)),
    Break("step_events_on_the_current_gpu", "the steps' CUDA events record on the current GPU's stream, not the training GPU's",
          ((r"\.record\(torch\.cuda\.current_stream\(self\.device\)\)", ".record()"),),
          ("tests/test_trainer_syncs.py::test_step_times_are_recorded_on_the_training_gpus_stream",)),
    Break("batch_state_anywhere", "BatchIterator.load_state_dict takes a position or epoch that is no place in the data",
          ((r"if not \(isinstance\(epoch, int\) and epoch >= 0", "if False and (isinstance(epoch, int) and epoch >= 0"),),
          ("tests/test_data.py::test_load_state_dict_refuses_a_place_that_is_not_in_the_data",)),
    Break("render_any_format_is_qa", "sources.render takes any format but 'answers' as qa",
          ((r"if fmt not in FORMATS:", "if False:"),),
          ("tests/test_data.py::test_a_format_or_answers_of_the_wrong_kind_are_named",)),
    Break("answers_text_of_a_str", "answers_text joins a str's letters or a dict's keys",
          ((r"if isinstance\(answers, \(str, dict\)\):", "if False:"),),
          ("tests/test_data.py::test_a_format_or_answers_of_the_wrong_kind_are_named",)),
    Break("card_crlf_second_block", "export_card puts a second metadata block before a card with CRLF line ends",
          ((r'^(\s*)text = text\.replace\("\\r\\n", "\\n"\)\n', r"\1pass\n"),),
          ("tests/test_card.py::test_export_card_keeps_a_windows_or_an_empty_metadata_block",)),
    Break(
        "flags_without_effect_ignored", "a flag that changes nothing in the mode asked for is dropped in silence",
        ((r"if dest in given:\n(\s*)self\.error\(", r"if False:\n\1self.error("),),
        ("tests/test_sample_cli.py::test_a_flag_that_would_change_nothing_is_refused",
         "tests/test_train_cli.py::test_a_flag_that_would_change_nothing_is_refused"),
    ),
    # --- sharded and legacy HF weights --------------------------------------------------------------
    Break("index_sorted_before_checked", "a shard index's file names are sorted before they are checked (a list is a TypeError)",
          ((r"for shard in weight_map\.values\(\):  # plain names", "for shard in sorted(set(weight_map.values())):  # plain names"),),
          ("tests/test_faults.py::test_shard_index_cannot_point_outside_its_folder",)),
    Break("shards_merged_silently", "a tensor in two shards loads from whichever is read last",
          ((r"if target in found:  # \(across shards", "if False:  # (across shards"),),
          ("tests/test_hf.py::test_shards_load_and_are_checked_as_one_file",)),
    Break("missing_blames_the_first_shard", "a tensor missing from every shard is blamed on the first shard file",
          ((r"files\[0\] if len\(files\) == 1 else index, found", "files[0], found"),),
          ("tests/test_hf.py::test_shards_load_and_are_checked_as_one_file",)),
    Break("shard_read_before_the_next_header", "each shard's tensors are read before the next shard's header is checked",
          ((r"mappings = \{path: match_names\(path, shapes\[path\], expected, hf_to_minigpt_name\) for path in files\}",
            "mappings = {path: m for path in files for m in [match_names(path, shapes[path], expected, "
            "hf_to_minigpt_name)] if legacy or read_tensors(path, m) is not None}"),),
          ("tests/test_hf.py::test_shards_load_and_are_checked_as_one_file",)),
    Break("legacy_bin_read_before_checked", "a pytorch_model.bin is read whole before its names are checked",
          ((r"mmap = mmap and zipfile\.is_zipfile\(path\)", "mmap = False"),),
          ("tests/test_hf.py::test_a_legacy_bin_is_checked_before_its_weights_are_read",)),
    Break("sparse_bin_tensors", "a pytorch_model.bin's sparse or meta tensors pass as weights (then fail in a traceback)",
          ((r'return isinstance\(t, torch\.Tensor\) and t\.layout == torch\.strided and t\.device\.type == "cpu"',
            "return isinstance(t, torch.Tensor)"),),
          ("tests/test_faults.py::test_broken_pytorch_model_bin",)),
    Break("temperature_shift_everywhere", "every row is shifted to a maximum of 0 before the temperature (close scores merge at the top-p line)",
          ((r"scores = torch\.where\(scaled\.amax\(dim=-1, keepdim=True\)\.isfinite\(\), scaled, shifted\)", "scores = shifted"),),
          ("tests/test_sampling.py::test_the_candidates_after_a_temperature_are_hfs_numbers",)),
    Break("temperature_shift_nowhere", "no row is shifted before the temperature (a vanishing one overflows to NaN)",
          ((r"scores = torch\.where\(scaled\.amax\(dim=-1, keepdim=True\)\.isfinite\(\), scaled, shifted\)", "scores = scaled"),),
          ("tests/test_sampling.py::test_a_vanishing_temperature_is_its_limit_all_mass_on_the_maximum",
           "tests/test_sampling.py::test_sampling_at_a_vanishing_temperature_decodes_greedy_tokens")),
    Break("losses_since_row_not_resumed", "a resumed run's first metrics row averages only the losses after the checkpoint",
          ((r'self\.interval\["losses"\] = \[float\(x\) for x in info\["losses_since_row"\]\]', 'self.interval["losses"] = []'),),
          ("tests/test_trainer.py::test_resume_continues_bitwise",)),
    Break("metrics_lines_unchecked", "a damaged metrics.jsonl line stops a resume in a JSONDecodeError traceback, after the file was cut",
          ((r"\[_row\(path, number, line\) for number, line in enumerate\(lines, 1\)\]", "[json.loads(line) for line in lines]"),),
          ("tests/test_trainer.py::test_a_damaged_metrics_file_stops_a_resume_in_one_line_and_is_kept",)),
    Break("cache_manifest_settings_unchecked", "a cache entry whose manifest (and blocks) say another block size is used as it is",
          ((r"if any\(blocks\.manifest\.get\(name\) != value", "if False and any(blocks.manifest.get(name) != value"),),
          ("tests/test_data.py::test_a_damaged_entry_is_rebuilt",)),
    Break("surprisal_from_the_rounded_prob", "surprisal is -log2 of the rounded fp32 probability (inf where it underflows)",
          ((r'return self\.nats\[row\["step"\] - 1\] / math\.log\(2\)', 'return -math.log2(row["prob"]) if row["prob"] > 0 else math.inf'),),
          ("tests/test_trace.py::test_surprisal_stays_finite_where_a_probability_underflows",)),
    Break("coloured_text_of_token_texts", "the coloured --score line joins each token's own text (a split character is U+FFFD)",
          ((r'text \+= colour\(stream\.push\(row\["id"\]\), row\["prob"\]\)',
            'text += colour(row["text"], row["prob"])'),),
          ("tests/test_trace.py::test_the_coloured_text_keeps_characters_split_across_tokens",)),
    Break("rank_without_job_silenced", "RANK or LOCAL_RANK set by hand without WORLD_SIZE (no torchrun job) "
          "silences the CLI's errors: exit 2 and nothing said",
          ((r'^(\s*)if not under_torchrun\(\):', r"\1if False:"),),
          ("tests/test_sample_cli.py::test_under_torchrun_only_rank_0_prints_a_usage_error",)),
    Break("stripped_path_loaded", "a local path is looked for without the spaces around it: `--model \"run \"` loads "
          "the folder \"run\" in silence",
          ((r"given = home_expanded\(str\(source\)\)", "given = home_expanded(text)"),),
          ("tests/test_hub.py::test_a_folder_named_with_a_space_is_the_one_loaded",)),
    Break("tiny_window_compiled", "compiled decoding takes a model with a window of fewer than 3 positions "
          "(warm_up's check: KVCache's ValueError in a traceback)",
          ((r"^(\s*)if model\.config\.block_size < 3:", r"\1if False:"),),
          ("tests/test_compiled_decoding.py::test_a_window_of_fewer_than_3_positions_is_refused_in_one_line",)),
    Break("every_rank_prints_alike_errors", "under torchrun every rank prints an error they all meet alike (one line a rank)",
          ((r'if not \(e\.every_rank and _other_rank\("LOCAL_RANK"\)\):', "if True:"),),
          ("tests/test_promises.py::test_an_error_every_rank_meets_is_printed_once_a_machine",)),
    Break("lost_rank_traceback", "a collective that fails because another rank died ends the survivor in a traceback",
          ((r"if not \(isinstance\(e, dist\.DistError\) or any\(cause in str\(e\) for cause in LOST_RANK\)\):", "if True:"),),
          ("tests/test_promises.py::test_a_rank_killed_mid_run_leaves_the_others_one_line_not_a_traceback",)),
    Break("head_only_refused", "a tied checkpoint that stores its embedding only as lm_head.weight is refused",
          ((r"if EMBEDDING not in found and HEAD in found and not untied:", "if False:"),),
          ("tests/test_hf.py::test_an_lm_head_loads_only_as_a_copy_of_wte", "tests/test_hf.py::test_a_legacy_bin_with_a_head_of_its_own_is_refused")),
    Break("tokens_of_rank_0_times_world", "tokens_per_sec counts rank 0's tokens times the world size, not each rank's",
          ((r"summed = all_reduce_sum\(torch\.cat\(\[torch\.stack\(self\.losses\), own\]\), ranks\)",
            "summed = torch.cat([all_reduce_sum(torch.stack(self.losses), ranks), own * ranks.world_size])"),),
          ("tests/test_ddp.py::test_a_read_counts_every_ranks_tokens_when_the_batch_splits_unevenly",)),
    Break("tokens_of_the_first_step", "tokens_per_sec counts only the first step's tokens of a row",
          ((r"^(\s*)self\.tokens \+= tokens$", r"\1self.tokens = self.tokens or tokens"),),
          ("tests/test_trainer_syncs.py::test_tokens_per_sec_counts_each_steps_tokens_over_its_time",
           "tests/test_trainer_syncs.py::test_step_numbers_read_all_steps_at_once")),
    Break("cache_stray_file_kept", "a plain file where a cache entry's folder belongs stops the run instead of being rebuilt",
          ((r"if folder\.is_symlink\(\) or folder\.exists\(\):", "if False:"),),
          ("tests/test_data.py::test_a_damaged_entry_is_rebuilt",)),
    Break("kernel_key_names_refused_ones", "a kernel choice is cached under every candidate's name, so one made without a "
          "kernel the weights refused is reused where it is allowed",
          ((r"tuple\(k for _, k in settled\[role\]\)", "tuple(k for _, k in candidates)"),),
          ("tests/test_kernels.py::test_fp16_is_refused_for_weights_beyond_its_range",)),
    Break("kernels_settled_group_by_group", "each group's kernels are settled as it is swapped: a refusal leaves the "
          "groups before it swapped",
          ((r"settled = \{role: _settle\(candidates, precision, w, batch_size\) for role, w in weights\.items\(\)\}",
            "settled = {role: candidates for role in weights}"),
           (r"layers = _choose\(settled\[role\], ", "layers = _choose(_settle(candidates, precision, ws, batch_size), ")),
          ("tests/test_kernels.py::test_a_refusal_leaves_the_model_as_it_was",)),
    Break("race_memory_unchecked", "the kernels' timing passes are not checked against the memory available",
          ((r"if len\(settled\) > 1:  # \(one is used untimed", "if False:  # ("),),
          ("tests/test_kernels.py::test_timing_passes_beyond_the_memory_available_are_refused_before_any_swap",)),
    Break("step_memory_unchecked", "a decoding step's logits are not counted against the memory available, only its KV cache",
          ((r"check_fits\(cache \+ step,", "check_fits(cache,"),),
          ("tests/test_sampling.py::test_a_decoding_step_beyond_the_memory_available_is_refused_before_it_runs",)),
    Break("gz_kind_dropped", "a .json.gz file's kind drops .gz, so a plain file misnamed .gz trains from the cache of its bytes",
          ((r'return cls\(str\(path\), suffix\.lstrip\("\."\), path, limit\)',
            'return cls(str(path), suffix.lstrip(".").removesuffix(".gz"), path, limit)'),),
          ("tests/test_data.py::test_malformed_files",)),
    Break("non_utf8_out_taken", "an --out path that is not UTF-8 is taken, and fails at the first save",
          ((r"^(\s*)str\(path\)\.encode\(\"utf-8\"\)$", r"\1str(path).encode('utf-8', 'surrogateescape')"),),
          ("tests/test_convert_cli.py::test_hf_to_minigpt_and_back",)),
    Break("non_utf8_source_path_taken", "a --data (--val-data, --init, --tokenizer) path that is not UTF-8 is taken: "
          "training runs, then the first save fails in a traceback writing the model card",
          ((r"^(\s*)for name in RECORDED_PATHS:", r"\1for name in ():"),),
          ("tests/test_train_cli.py::test_a_source_path_that_is_not_utf8_is_refused_before_any_work",)),
    Break("non_utf8_file_name_in_key_traceback", "a text folder holding a file whose name is not UTF-8 fails in a "
          "traceback building its cache key",
          ((r'name\.encode\("utf-8", "surrogateescape"\) \+ b"\\0"', r'name.encode() + b"\\0"'),),
          ("tests/test_data.py::test_a_text_folders_entry_follows_its_files_and_their_bytes",)),
    Break("hub_error_first_line", "a Hub error is cut to its first line (\"404 Client Error.\", the cause dropped)",
          ((r"\(\{_hub_reason\(asked, e, constants\.HF_HUB_ETAG_TIMEOUT\)\}\)", "({reason(e)})"),),
          ("tests/test_hub.py::test_the_hubs_errors_say_what_went_wrong",)),
    Break("max_autotune_graphs_unmarked", "--compile-mode max-autotune is not known to replay CUDA graphs: the batch "
          "is not marked dynamic and --grad-accum 2 is taken (its graphs would overwrite the accumulated gradients)",
          ((r'CUDA_GRAPH_MODES = \("reduce-overhead", "max-autotune"\)', 'CUDA_GRAPH_MODES = ("reduce-overhead",)'),),
          ("tests/test_trainer_syncs.py::test_compile_mode_reaches_torch_compile_and_reduce_overhead_marks_the_batch_dynamic",
           "tests/test_trainer_syncs.py::test_compile_mode_flag_errors_are_one_line")),
    Break("hub_asked_without_time_limit", "the Hub's first request has no time limit (a network that drops packets "
          "hangs sample.py in silence)",
          ((r"info\(repo_id, timeout=constants\.HF_HUB_ETAG_TIMEOUT\)", "info(repo_id, timeout=None)"),),
          ("tests/test_hub.py::test_the_hub_is_given_a_time_to_answer",
           "tests/test_hub.py::test_a_hub_that_never_answers_is_one_line_in_seconds")),
    Break("hub_asked_per_download", "the Hub is asked about a repo before each of its downloads (an old upload: "
          "three waits on a network that drops packets)",
          ((r"^(\s*)@functools\.cached_property\n(\s*)def _asked\(", r"\1@property\n\2def _asked("),),
          ("tests/test_hub.py::test_the_hub_is_given_a_time_to_answer",
           "tests/test_hub.py::test_a_repo_is_asked_about_once_for_all_its_downloads")),
    Break("hub_cache_unused_without_answer", "where the Hub did not answer (or refused), the download is still tried "
          "online instead of from the cache",
          ((r"if asked is not None:\n(\s*)return Path\(snapshot_download\(", r"if False:\n\1return Path(snapshot_download("),),
          ("tests/test_hub.py::test_the_hubs_errors_say_what_went_wrong",
           "tests/test_hub.py::test_an_offline_cache_with_tokenizer_json_alone_loads")),
    Break("hub_downloads_in_worker_threads", "a Hub repo's files come by snapshot_download (its own requests untimed, the "
          "files downloaded in worker threads: Ctrl-C unheard until every download has ended)",
          ((r"if asked is not None:\n(\s*)return Path\(snapshot_download\(repo_id, allow_patterns=patterns, local_files_only=True\)\)",
            r"if True:\n\1return Path(snapshot_download(repo_id, allow_patterns=patterns if asked else [*patterns, *optional], "
            r"local_files_only=asked is not None))"),),
          ("tests/test_hub.py::test_a_hub_id_downloads_the_model_and_tokenizer_files",
           "tests/test_hub.py::test_ctrl_c_stops_a_download_at_once")),
    Break("hub_revisions_mixed", "a repo pushed to during its download gives a folder of one commit's files, the rest "
          "elsewhere (the load fails on a missing file, or mixes two versions)",
          ((r"if len\(self\._snapshots\) > 1:", "if False:"),),
          ("tests/test_hub.py::test_a_repo_changed_during_its_download_is_one_line",)),
    Break("hub_timeout_said_as_missing", "a Hub that did not answer is reported as a repo that is not in the cache "
          "(nothing says to wait longer)",
          ((r"if asked is not None and any\(\"Timeout\"", "if False and any(\"Timeout\""),),
          ("tests/test_hub.py::test_the_hubs_errors_say_what_went_wrong",)),
    Break("hub_snapshot_unchecked", "a Hub repo with no config.json at its root is taken as a model folder",
          ((r"if not \(folder / CONFIG_FILE\)\.is_file\(\):", "if False:"),),
          ("tests/test_hub.py::test_the_hubs_errors_say_what_went_wrong",)),
    Break("tokenizer_forms_fetched_together", "a Hub download asks for vocab.json + merges.txt beside tokenizer.json (an "
          "offline cache holding tokenizer.json alone is refused as incomplete)",
          ((r"patterns \+ \[TOKENIZER_FILE\], optional=HF_SETTINGS\)",
            "patterns + [TOKENIZER_FILE, *VOCAB_MERGES], optional=HF_SETTINGS)"),),
          ("tests/test_hub.py::test_an_offline_cache_with_tokenizer_json_alone_loads",)),
    Break("weight_forms_fetched_together", "a Hub download asks for the shards beside model.safetensors (a repo holding "
          "both is downloaded twice)",
          ((r"\[CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, CARD_FILE\]",
            '[CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, CARD_FILE, "model-*.safetensors"]'),),
          ("tests/test_hub.py::test_only_one_form_of_the_weights_and_of_the_tokenizer_is_downloaded",)),
    Break("shard_names_as_patterns", "the shards an index names are asked for as glob patterns (a name with [ ] "
          "matches nothing)",
          ((r"\[glob\.escape\(name\) for name in missing\]", "missing"),),
          ("tests/test_hub.py::test_only_one_form_of_the_weights_and_of_the_tokenizer_is_downloaded",)),
    Break("bin_shards_unread", "the pytorch_model-*.bin shards a pytorch_model.bin.index.json lists are not read",
          ((r"\(LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE\)\):", '(LEGACY_WEIGHTS_FILE, "")):'),),
          ("tests/test_hf.py::test_sharded_pytorch_model_bins_load_and_are_checked_as_one_file",
           "tests/test_hub.py::test_only_one_form_of_the_weights_and_of_the_tokenizer_is_downloaded")),
    Break("short_step_saved_before_its_evaluation", "an epoch's shorter last step (batches not filling --grad-accum) is "
          "saved before the epoch is evaluated: a resume from that checkpoint never evaluates it",
          ((r"self\._run_step\(micro, epoch_end=True\)", "self._run_step(micro)"),),
          ("tests/test_trainer.py::test_a_resume_after_an_epochs_short_last_step_keeps_its_evaluation",)),
    Break("last_save_outside_signal_handlers", "the run's last evaluation and save run after the signal handlers are "
          "put back: Ctrl-C or SIGTERM in them loses every step since the last checkpoint",
          ((r"^                (if not stopped and self\.val_batches is not None and self\.last_eval_step != self\.step:)\n"
            r"                    (self\._evaluate_and_log\(\))\n"
            r"                (if not stopped and \(self\.last_save_step != self\.step or self\._rows_since_save\(\)\):)\n"
            r"                    (self\.save\(\))",
            "            \\1\n                \\2\n            \\3\n                \\4"),),
          ("tests/test_trainer.py::test_a_signal_in_the_last_save_waits_for_it",)),
    Break("metrics_rows_not_utf8_traceback", "a metrics.jsonl line that is not UTF-8 is not caught (a "
          "UnicodeDecodeError traceback on --resume)",
          ((r"^    except UnicodeDecodeError as e:\n        raise MinigptError\(f\"\{path\}: line \{number\} is not UTF-8",
            "    except ZeroDivisionError as e:\n        raise MinigptError(f\"{path}: line {number} is not UTF-8"),),
          ("tests/test_trainer.py::test_a_metrics_file_not_utf8_or_short_of_rows",)),
    Break("short_metrics_silent", "a metrics.jsonl with fewer rows than its checkpoint counts is cut back without a word",
          ((r"if keep_rows and len\(lines\) < keep_rows:", "if False:"),),
          ("tests/test_trainer.py::test_a_metrics_file_not_utf8_or_short_of_rows",)),
    Break("hf_aliases_ignored", "an HF config's other names for its fields (num_attention_heads, hidden_size, ...) "
          "are ignored: minigpt's defaults stand in, and the logits differ without a word",
          ((r"for name, alias in HF_ALIASES\.items\(\):", "for name, alias in {}.items():"),),
          ("tests/test_hf.py::test_gpt2configs_other_names_for_its_fields_are_read",)),
    Break("exported_tokenizer_rebuilt", "the exported tokenizer_config.json names GPT2Tokenizer: transformers rebuilds "
          "GPT-2's pipeline and drops a prefix space or a normalizer the tokenizer.json holds",
          ((r'"tokenizer_class": "PreTrainedTokenizerFast"', '"tokenizer_class": "GPT2Tokenizer"'),),
          ("tests/test_tokenizer.py::test_an_exported_tokenizer_gives_transformers_the_same_ids",)),
    Break("stdout_encoding_strict", "a character stdout's encoding cannot write is a UnicodeEncodeError traceback",
          ((r'if getattr\(sys\.stdout, "errors", None\) == "strict"', "if False"),),
          ("tests/test_faults.py::test_text_the_terminal_cannot_encode_prints_as_question_marks",)),
    Break("compile_failure_traceback", "a compiler that answers --version but builds nothing is an InductorError "
          "traceback at the first compiled step",
          ((r"except Exception as e:  # \(a compiler that answers --version", "except ZeroDivisionError as e:  # ("),),
          ("tests/test_compiled_decoding.py::test_warm_up_names_a_compiler_that_builds_nothing",)),
    Break("card_local_base_model", "a card's metadata names a local --init folder as base_model (the Hub refuses it)",
          ((r"if facts\.base_on_hub:\n        meta\.append", "if facts.base_model is not None:\n        meta.append"),),
          ("tests/test_card.py::test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card",)),
    Break("card_tilde_init_on_the_hub", "a card takes --init=~/folder for a Hub id (linked as huggingface.co/~/folder)",
          ((r"base_on_hub=not scratch and is_hub_id\(self\.init\)", "base_on_hub=not scratch and not Path(self.init).exists()"),),
          ("tests/test_card.py::test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card",)),
    Break("card_dataset_name_unresolved", "a card names --data . as the dataset \"\"",
          ((r"home_expanded\(path\)\.resolve\(\)\.name", "Path(path).name"),),
          ("tests/test_card.py::test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card",)),
    Break("card_results_on_the_training_file", "a card credits the validation loss to the training file, with --val-data too",
          ((r'evaluated_on = \(datasets\[-1\], "validation"\) if self\.val_data is not None else \(datasets\[0\], "train"\)',
            'evaluated_on = (datasets[0], "validation")'),),
          ("tests/test_card.py::test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card",)),
    Break("card_usage_unquoted", "a card's usage commands leave the folder unquoted (a space or a # splits it)",
          ((r"shlex\.quote\(folder\)", "folder"),),
          ("tests/test_card.py::test_what_the_hub_would_refuse_or_misread_stays_out_of_the_card",)),
    Break("kernel_race_draws_torchs_rng", "the kernel race draws its input from torch's global generator (seeded text "
          "then depends on whether the choice was cached)",
          ((r"device=own\.device, generator=own\)", "device=own.device)"),),
          ("tests/test_kernels.py::test_timing_the_kernels_leaves_torchs_random_generator_alone",)),
    Break("trainer_evaluate_forces_training", "Trainer.evaluate leaves the model in training mode, whatever mode it came in",
          ((r"return evaluate\(self\.model, self\.loss_fn, self\.val_batches, self\.device, self\.autocast, self\.ranks\)",
            "loss = evaluate(self.model, self.loss_fn, self.val_batches, self.device, self.autocast, self.ranks); "
            "self.model.train(); return loss"),),
          ("tests/test_trainer.py::test_the_trainers_evaluate_leaves_the_mode_as_it_found_it",)),
    Break("num_samples_type_unchecked", "generate takes num_samples 2.0 or \"2\" (a TypeError deep in torch)",
          ((r'num_samples = integer_at_least\(num_samples, 1, "num_samples"\)',
            'num_samples = num_samples if num_samples >= 1 else integer_at_least(num_samples, 1, "num_samples")'),),
          ("tests/test_sampling.py::test_generate_checks_num_samples_generator_and_eos_id_when_called",)),
    Break("eos_id_type_unchecked", "generate takes eos_id \"x\" (a TypeError from a comparison)",
          ((r"eos_id = operator\.index\(eos_id\)", "eos_id = eos_id"),),
          ("tests/test_sampling.py::test_generate_checks_num_samples_generator_and_eos_id_when_called",)),
    Break("resumed_done_run_without_loss", "a resumed run that was already done reports no validation loss",
          ((r"if saved and \(evaluated := ", "if False and (evaluated := "),),
          ("tests/test_trainer.py::test_a_finished_run_resumed_reports_its_last_validation_loss",)),
    Break("ckpt_contents_unchecked", "a run folder's .ckpt may be a link, a file, or hold anyone's files (a save deletes "
          "them)", ((r"if not \(real and entry\.is_dir\(\)\):", "if False:"),
                    (r"return next\(\(f\"\{CKPT_DIR\}/\{e\.name\}\" for e in inside\), None\)", "return None")),
          ("tests/test_trainer.py::test_a_run_folder_whose_checkpoint_store_holds_what_a_save_would_delete_is_refused",)),
    Break("damaged_current_accepted", "step folders without a valid .ckpt/current let a new run start (and delete them)",
          ((r"if ckpt is None and \(out / CKPT_DIR\)\.is_dir\(\)", "if False and (out / CKPT_DIR).is_dir()"),),
          ("tests/test_trainer.py::test_a_run_folder_whose_checkpoint_store_holds_what_a_save_would_delete_is_refused",)),
    Break("swap_failure_deletes_current", "a failure after the pointer swap deletes the step folder `current` names",
          ((r"if current_checkpoint\(out\) != folder\.resolve\(\):", "if True:"),),
          ("tests/test_trainer.py::test_a_failure_after_the_pointer_swap_keeps_the_checkpoint_it_points_to",)),
    Break("lock_file_followed", "the lock file is opened through a link (and the file it names emptied)",
          ((r"return None if real and entry\.is_file\(\) else entry\.name", "return None"),
           (r"os\.O_RDWR \| os\.O_CREAT \| os\.O_NOFOLLOW, 0o644\)", "os.O_RDWR | os.O_CREAT, 0o644)"),
           (r"fd = os\.open\(path, os\.O_RDWR \| os\.O_NOFOLLOW\)", "fd = os.open(path, os.O_RDWR)")),
          ("tests/test_run_lock.py::test_a_lock_file_that_is_a_link_is_refused_and_what_it_names_is_kept",)),
    Break("conversion_lock_not_made", "a conversion locks only a folder that already has a lock file",
          ((r"elif made := not os\.path\.lexists\(path\):\n(\s+)fd = os\.open\([^\n]*\n", r"elif not os.path.lexists(path):\n\1fd = None\n"),),
          ("tests/test_run_lock.py::test_a_conversion_keeps_runs_out_of_a_folder_it_replaces_and_out_of_one_it_makes",)),
    Break("rename_over_filled_folder", "a folder filled while a new one is written (overwrite=False) is replaced",
          ((r"if overwrite or out\.is_symlink\(\):", "if True:"),),
          ("tests/test_files.py::test_a_folder_filled_while_a_new_one_is_written_is_not_replaced",
           "tests/test_run_lock.py::test_a_conversion_keeps_runs_out_of_a_folder_it_replaces_and_out_of_one_it_makes")),
    Break("force_by_name_only", "--force takes any entry named like a model file (a folder model-x.safetensors)",
          ((r"entry\.is_symlink\(\) or entry\.is_file\(\)\)", "True)"),),
          ("tests/test_run_lock.py::test_force_replaces_only_a_models_files_by_name_and_kind",)),
    Break("run_folder_read_through_links", "a run folder's files are each read through .ckpt/current (a save meanwhile "
          "mixes two steps)", ((r'checkpoint = \(current_checkpoint\(folder\) if kind == "minigpt" else None\) or folder', "checkpoint = folder"),),
          ("tests/test_trainer.py::test_loading_a_run_folder_never_mixes_two_checkpoints",)),
    Break("whitespace_answers_skipped", "records whose answers are whitespace only are skipped (the recipe tokenizes them)",
          ((r"if not answers_text\(answers\) or \(fmt == \"qa\"", "if not any(a.strip() for a in answers) or (fmt == \"qa\""),),
          ("tests/test_data.py::test_records_with_only_empty_answers_are_skipped_and_counted",)),
    Break("nan_score_taken", "--format qa takes a NaN answer score (max() then keeps the first answer)",
          ((r"or \(isinstance\(s, float\) and math\.isfinite\(s\)\)", "or isinstance(s, float)"),),
          ("tests/test_data.py::test_qa_needs_one_finite_score_per_answer",)),
    Break("damaged_gz_traceback", "a .json.gz damaged inside is a zlib.error traceback",
          ((r", zlib\.error\) as e:", ") as e:"),), ("tests/test_data.py::test_damaged_or_hostile_files_are_one_line",)),
    Break("big_json_int_traceback", "a JSON integer of 5,000 digits is a ValueError traceback",
          ((r"except ValueError as e:  # \(not JSON; or", "except json.JSONDecodeError as e:  # (not JSON; or"),),
          ("tests/test_data.py::test_damaged_or_hostile_files_are_one_line",)),
    Break("deep_csv_traceback", "a CSV answers cell nested 100,000 deep is a RecursionError traceback",
          ((r"except \(ValueError, RecursionError\):  # \(not JSON, a", "except json.JSONDecodeError:  # (not JSON, a"),),
          ("tests/test_data.py::test_damaged_or_hostile_files_are_one_line",)),
    Break("record_numbers_not_lines", "a data error names a .jsonl/.csv record by its number alone, not the line it starts on",
          ((r"return _which\(record, i, self\._lines\[i\] if self\._lines else None\)", "return _which(record, i)"),),
          ("tests/test_data.py::test_errors_name_the_line_a_record_starts_on_where_blank_lines_or_a_header_move_it",)),
    Break("csv_lines_miss_quoted_breaks", "a CSV record's line is the line it ends on (quoted line breaks not counted)",
          ((r"line = reader\.line_num - sum\(", "line = reader.line_num - 0 * sum("),),
          ("tests/test_data.py::test_errors_name_the_line_a_record_starts_on_where_blank_lines_or_a_header_move_it",)),
    Break("one_json_record_as_lines", "a .json file holding one pretty-printed record is read as JSON lines",
          ((r"if not lines and \(whole := _whole_json\(text, path\)\) is not None:",
            "if not lines and text.lstrip().startswith('[') and (whole := _whole_json(text, path)) is not None:"),),
          ("tests/test_data.py::test_a_json_file_holding_one_record_is_read_however_it_is_laid_out",)),
    Break("hf_tokenizer_settings_ignored", "an HF folder's tokenizer is read without tokenizer_config.json or added_tokens.json",
          ((r"tokenizer = Tokenizer\.from_hf_dir\(folder\)\n(\s*)check_vocabulary", "tokenizer = Tokenizer.from_dir(folder)\n\\1check_vocabulary"),),
          ("tests/test_hf.py::test_a_fine_tune_with_added_tokens_loads_converts_and_exports_with_them",)),
    Break("prefix_space_setting_ignored", "tokenizer_config.json's add_prefix_space is not applied to a GPT-2 tokenizer",
          ((r"prefix = config\.get\(\"add_prefix_space\"\) is True", "prefix = False"),),
          ("tests/test_tokenizer.py::test_an_hf_folders_tokenizer_settings_give_transformers_ids",)),
    Break("added_token_id_unchecked", "an added token naming an id past the vocabulary's next is taken at the next",
          ((r"        if where != n:\n", "        if False:\n"),),
          ("tests/test_tokenizer.py::test_what_transformers_would_read_otherwise_is_refused_in_one_line",)),
    Break("tokenizer_settings_required_offline", "offline, a cache without tokenizer_config.json is taken for incomplete",
          ((r"allow_patterns=patterns, local_files_only=True\)", "allow_patterns=[*patterns, *optional], local_files_only=True)"),),
          ("tests/test_hub.py::test_a_repos_tokenizer_settings_are_fetched_online_and_not_required_offline",)),
    Break("tilde_of_no_user_made", "a ~nouser path is taken as it is: a traceback in pathlib, or a folder \"~nouser\" made",
          ((r"if first\.startswith\(\"~\"\) and not os\.path\.lexists\(first\):", "if False:"),),
          ("tests/test_faults.py::test_a_tilde_that_is_no_users_home_is_one_line_and_makes_nothing",)),
    Break("force_refuses_legacy_hf_files", "--force refuses an older HF folder: .bin shards, their index, added_tokens.json",
          ((r"LEGACY_FILES = \[LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE, \"pytorch_model-\*\.bin\"\]", "LEGACY_FILES = [LEGACY_WEIGHTS_FILE]"),),
          ("tests/test_convert_cli.py::test_force_replaces_only_a_models_folder",)),
    Break("adamw_t_shared", "AdamW corrects a parameter that skipped steps with the optimizer's t, not its own (torch's)",
          ((r"self\._steps\[torch\.tensor\(counted, device=self\._steps\.device\)\] \+= increment",
            "self._steps += increment"),),
          ("tests/test_optim.py::test_each_parameter_counts_its_own_steps_as_torch_does",)),
    Break("fused_adamw_writes_old_data", "after p.data = ..., the fused AdamW updates the old memory (the parameter stops)",
          ((r"        if flat\.data_ptr\(\) != p\.data_ptr\(\):\n", "        if False:\n"),),
          ("tests/test_optim.py::test_a_parameter_given_new_data_is_updated_there_and_a_new_shape_is_refused",)),
    Break("logits_checked_at_the_prompt_only", "logits that break after the prompt are sampled (a traceback) or argmaxed (\"!!!\")",
          ((r"        check_finite\(logits\)  # \(every step:", "        0 and check_finite(logits)  # (every step:"),),
          ("tests/test_sampling.py::test_logits_that_break_after_the_prompt_are_named_at_that_step",)),
    Break("closed_std_streams_traceback", "a stdin or stdout closed by the shell (<&-, >&-) is an AttributeError traceback",
          ((r"            setattr\(sys, name, ClosedStream\(name\)\)", "            pass"),),
          ("tests/test_sample_cli.py::test_a_closed_stdin_or_stdout_is_one_line",)),
    Break("flattened_parquet_refused", "a parquet file of datasets' flatten() (column answers.text) is refused",
          ((r"flat = \[\] if \"answers\" in names else", "flat = [] if True else"),),
          ("tests/test_data.py::test_a_flattened_parquet_or_json_file_reads_as_the_struct_one",)),
    Break("flattened_json_refused", "the JSON of datasets' flatten().to_json() (fields answers.text, answers.score) is refused",
          ((r"    return _fold_flat_answers\(records\), numbers\n", "    return records, numbers\n"),),
          ("tests/test_data.py::test_a_flattened_parquet_or_json_file_reads_as_the_struct_one",)),
    Break("cache_race_kills_a_run", "a run that finds its cache entry renamed in by another run while it wrote dies",
          ((r"if \(built := _cached\(root, role, key, tokenizer\.vocab_size\)\) is None:", "if True:"),),
          ("tests/test_data.py::test_two_runs_building_one_cache_entry_at_once_both_get_it",)),
    Break("race_memory_halved", "the kernels' race counts bmm-split's output once (it makes it twice: a kill for memory)",
          ((r"check_fits\(rows \* \(width \+ 2 \* out\) \* 4,", "check_fits(rows * (width + out) * 4,"),),
          ("tests/test_kernels.py::test_timing_passes_beyond_the_memory_available_are_refused_before_any_swap",)),
    Break("ctrl_c_between_renames_loses_out", "a Ctrl-C between a save's two renames leaves the folder missing",
          ((r"except BaseException:  # \(an OSError, or a Ctrl-C between the two renames", "except OSError:  # ("),),
          ("tests/test_files.py::test_what_comes_between_a_saves_two_renames_keeps_the_previous_folder",)),
    Break("sigterm_kills_clis", "SIGTERM ends convert_hf_weights.py outright (a save's temporary folder stays)",
          ((r"signal\.signal\(signal\.SIGTERM, interrupt\)", "pass"),),
          ("tests/test_faults.py::test_sigterm_while_a_cli_saves_leaves_no_temporary_folder",)),
    Break("fifo_waited_on", "weights that are a FIFO are opened (the load waits for a writer forever)",
          ((r"if os\.path\.exists\(path\) and not os\.path\.isfile\(path\) and not os\.path\.isdir\(path\):",
            "if False:"),),
          ("tests/test_faults.py::test_weights_that_are_a_fifo_are_refused_not_waited_on",)),
    Break("previous_deleted_when_place_taken", "a folder made in a save's place between its renames gets the "
          "previous one deleted", ((r"old\.rmdir\(\)  # puts it back", "shutil.rmtree(old)  # puts it back"),),
          ("tests/test_files.py::test_what_comes_between_a_saves_two_renames_keeps_the_previous_folder",)),
    Break("eval_only_val_data_flags_ignored", "--eval-only --val-data takes --data, --max-records and --seed (unread)",
          ((r"if args\.eval_only and args\.val_data is not None:", "if False:"),),
          ("tests/test_eval_only.py::test_eval_only_with_val_data_refuses_what_it_does_not_read",)),
    Break("eval_every_without_validation", "--eval-every is taken where there is no validation data",
          ((r"if args\.val_data is None and args\.val_fraction == 0:", "if False:"),),
          ("tests/test_train_cli.py::test_flags_that_would_change_nothing_in_training_are_refused",)),
    Break("preset_sets_loaded_dropout", "--preset tiny sets the dropout of a model loaded with --init to 0",
          ((r"k not in \(\*SHAPE_FLAGS, \"dropout\"\)", "k not in SHAPE_FLAGS"),),
          ("tests/test_train_cli.py::test_flags_that_would_change_nothing_in_training_are_refused",)),
    Break("interactive_reads_text_stdin", "--interactive reads stdin as text: strict under a UTF-8 locale (a traceback on a "
          "byte that is not UTF-8), and a lone \\r does not end a question",
          ((r"return buffer\.readline\(\)\.decode\(\"utf-8\", \"surrogateescape\"\) if buffer is not None else "
            r"sys\.stdin\.readline\(\)", "return sys.stdin.readline()"),
           (r"yield from \(question for question in LINE_BREAKS\.split\(typed\) if question\.strip\(\)\)",
            "yield from ([typed] if typed.strip() else [])")),
          ("tests/test_faults.py::test_interactive_reads_bytes_whatever_the_locale",)),
    Break("timing_race_beyond_the_window", "compiled decoding's race times 16 tokens in 19 positions whatever the window",
          ((r"tokens = max\(1, min\(TIMING_TOKENS, self\.model\.config\.block_size - 3\)\)", "tokens = TIMING_TOKENS"),
           (r"min\(tokens \+ 3, self\.model\.config\.block_size\)", "tokens + 3")),
          ("tests/test_compiled_decoding.py::test_the_race_between_steps_fits_a_small_window",)),
    Break("prepared_model_trainable", "a prepared model keeps wpe and the LayerNorms trainable (its logits carry a graph)",
          ((r"return model\.eval\(\)\.requires_grad_\(False\)$", "return model.eval()"),),
          ("tests/test_kernels.py::test_a_prepared_model_has_no_gradients_to_train",)),
    Break("prepare_takes_any_batch_size", "prepare_for_inference takes a batch_size that is no integer (2.0: MKL's error)",
          ((r'batch_size = integer_at_least\(batch_size, 1, "batch_size"\)',
            'batch_size = batch_size if batch_size >= 1 else integer_at_least(batch_size, 1, "batch_size")'),),
          ("tests/test_kernels.py::test_preparing_a_prepared_model_or_for_no_rows_is_refused_in_one_line",)),
    Break("untied_head_saved", "a model whose LM head was untied from wte saves wte alone (another model reads back)",
          ((r"if model\.lm_head\.weight is not model\.transformer\.wte\.weight:", "if False:"),),
          ("tests/test_faults.py::test_a_model_whose_head_was_untied_is_not_saved_without_it",)),
    Break("device_checked_after_reading", "loading reads every weight before torch refuses the device (\"gpu\", or "
          "\"meta\": a model without values)",
          ((r"device, folder = resolve_device\(device\), Path\(folder\)", "folder = Path(folder)"),
           (r"^    device = resolve_device\(device\)\n", "")),
          ("tests/test_faults.py::test_a_device_no_model_can_load_onto_is_refused_before_reading",)),
    Break("bf16_loss", "a bf16 model's loss takes the log-softmax in bf16 (0.3% off); int32 targets refused",
          ((r"F\.cross_entropy\(logits\.float\(\), targets", "F.cross_entropy(logits, targets"),
           (r"value=-100\)\.long\(\)", "value=-100)")),
          ("tests/test_training_speed.py::test_a_bf16_models_loss_is_computed_in_fp32",)),
    Break("scale_attn_weights_accepted", "an HF config with scale_attn_weights false (unscaled attention scores) loads",
          ((r'^\s*\("scale_attn_weights", True\),\n', ""),),
          ("tests/test_hf.py::test_unsupported_hf_config_names_the_field",)),
    Break("gelu_pytorch_tanh_refused", "an HF config naming the tanh GELU gelu_pytorch_tanh is refused",
          ((r'if activation not in \("gelu_new", "gelu_pytorch_tanh"\):', 'if activation not in ("gelu_new",):'),),
          ("tests/test_hf.py::test_gelu_pytorch_tanh_is_gpt2s_gelu_and_loads",)),
    Break("evaluate_in_training_mode", "validation during training computes its loss with the model's dropout on",
          ((r"^(\s*)model\.eval\(\)\n(\s*sums = )", r"\1pass\n\2"),),
          ("tests/test_trainer.py::test_validation_runs_in_eval_mode_whatever_the_mode_of_the_model",)),
    Break("no_embedding_dropout", "no dropout on the embeddings",
          ((r"self\.transformer\.drop\((self\.transformer\.wte\(idx\) \+ self\.transformer\.wpe\(pos\))\)", r"(\1)"),),
          ("tests/test_model.py::test_dropout_is_applied_at_each_site_in_training",)),
    Break("no_mlp_dropout", "no dropout after the MLP",
          ((r"return self\.dropout\(self\.c_proj\(x\)\)", "return self.c_proj(x)"),), ("tests/test_model.py::test_dropout_is_applied_at_each_site_in_training",)),
    Break("no_residual_dropout", "no dropout after the attention's projection",
          ((r"return self\.resid_dropout\(self\.c_proj\(y\)\)", "return self.c_proj(y)"),), ("tests/test_model.py::test_dropout_is_applied_at_each_site_in_training",)),
    Break("no_sdpa_dropout", "scaled_dot_product_attention is given no dropout in training",
          ((r"dropout_p = self\.attn_dropout\.p if self\.training else 0\.0", "dropout_p = 0.0"),), ("tests/test_model.py::test_dropout_is_applied_at_each_site_in_training",)),
    Break("no_reference_attention_dropout", "the written-out attention drops no probabilities",
          ((r"att = self\.attn_dropout\(F\.softmax\(att, dim=-1\)\)", "att = F.softmax(att, dim=-1)"),), ("tests/test_model.py::test_dropout_is_applied_at_each_site_in_training",)),
    Break("attention_dropout_in_eval", "scaled_dot_product_attention drops probabilities in eval mode too",
          ((r"dropout_p = self\.attn_dropout\.p if self\.training else 0\.0", "dropout_p = self.attn_dropout.p"),),
          ("tests/test_model.py::test_dropout_is_off_in_eval_mode",)),
    Break("layer_norm_eps_ignored", "the LayerNorms use 1e-5 whatever the config",
          ((r"nn\.LayerNorm\(config\.n_embd, eps=config\.layer_norm_eps\)", "nn.LayerNorm(config.n_embd)"),),
          ("tests/test_hf.py::test_a_layer_norm_epsilon_other_than_gpt2s_is_kept_both_ways",)),
    Break("layer_norm_eps_exported_as_default", "export writes layer_norm_epsilon 1e-5 whatever the config",
          ((r'"layer_norm_epsilon": self\.layer_norm_eps,', '"layer_norm_epsilon": 1e-5,'),),
          ("tests/test_hf.py::test_a_layer_norm_epsilon_other_than_gpt2s_is_kept_both_ways",)),
    Break("embedding_init_small", "the embeddings are initialised with std 0.002 instead of GPT-2's 0.02",
          ((r"(elif isinstance\(module, nn\.Embedding\):\n\s*nn\.init\.normal_\(module\.weight, mean=0\.0, )std=0\.02\)",
            r"\1std=0.002)"),),
          ("tests/test_model.py::test_gpt2_init_statistics_and_tying",)),
    Break("bundled_data_by_absolute_path", "--preset tiny's data is recorded by its absolute path (its run cannot "
          "resume once the clone moves)",
          ((r'return f"<minigpt>/\{path\.relative_to\(package\)\.as_posix\(\)\}" if path\.is_relative_to\(package\) '
            r'else str\(path\)', "return str(path)"),),
          ("tests/test_train_cli.py::test_a_preset_run_resumes_after_the_clone_moves",)),
    Break("mistyped_local_path_to_hub", "a missing checkpoints/eli55 (its checkpoints/ a folder here) is asked of the "
          "Hub as a repository",
          ((r'in_a_local_folder = bool\(HUB_ID\.match\(text\)\) and "/" in text and Path\(owner\)\.is_dir\(\)',
            "in_a_local_folder = False"),),
          ("tests/test_hub.py::test_a_mistyped_path_in_a_local_folder_is_not_sent_to_the_hub",)),
    Break("empty_idx_taken", "the model takes an idx of no tokens (with targets: torch's \"cannot reshape tensor of 0 "
          "elements\")",
          ((r"if idx\.dim\(\) != 2 or idx\.size\(1\) == 0:", "if idx.dim() != 2:"),),
          ("tests/test_model.py::test_inputs_of_the_wrong_shape_are_named",)),
    Break("cache_keyed_by_vocab_size", "the data cache keys the tokenizer by its vocabulary size, not its whole definition",
          ((r'"tokenizer_sha256": hashlib\.sha256\(tokenizer\.backend\.to_str\(\)\.encode\(\)\)\.hexdigest\(\),',
            '"tokenizer_sha256": tokenizer.vocab_size,'),),
          ("tests/test_data.py::test_every_input_change_makes_a_new_cache_entry",)),
    Break("folder_key_without_contents", "a folder source's cache key leaves out its files' bytes (an edited file: stale blocks)",
          ((r"^(\s*)h\.update\(_sha256\(file\)\.digest\(\)\)", r"\1pass"),),
          ("tests/test_data.py::test_a_text_folders_entry_follows_its_files_and_their_bytes",)),
    Break("loss_read_every_step", "a training step reads its loss back to the host (.cpu().numpy()) every step",
          ((r'^(\s*)(self\.step \+= 1\n\s*return \{"loss": step_loss)',
            r"\1self.last_loss = float(step_loss.detach().cpu().numpy())\n\1\2"),),
          ("tests/test_trainer_syncs.py::test_numbers_are_read_back_only_at_logging_steps",)),
    Break("card_data_roles_swapped", "the card names the validation blocks as training and the reverse",
          ((r'\(\("training", train_blocks, ""\), \("validation", val_blocks, ',
            '(("training", val_blocks, ""), ("validation", train_blocks, '),),
          ("tests/test_card.py::test_card_facts_state_the_runs_own_numbers",)),
    Break("card_total_batch_one_process", "the card's total_train_batch_size leaves out the number of processes",
          ((r"self\.batch_size \* self\.grad_accum \* world_size", "self.batch_size * self.grad_accum"),),
          ("tests/test_card.py::test_card_facts_state_the_runs_own_numbers",)),
    Break("card_params_without_embeddings", "the card's parameter count leaves out the token embedding",
          ((r"language model of \{model\.num_parameters\(\):,\}",
            "language model of {model.num_parameters() - c.vocab_size * c.n_embd:,}"),),
          ("tests/test_card.py::test_card_facts_state_the_runs_own_numbers",)),
    Break("card_perplexity_in_bits", "the card body's perplexity is exp of the loss in bits, not nats",
          ((r"perplexity\(measured\['val_loss'\]\):\.4f\}", "perplexity(measured['val_loss'] / 0.6931471805599453):.4f}"),),
          ("tests/test_card.py::test_card_of_an_evaluated_checkpoint",)),
    Break("score_perplexity_in_bits", "--score's report gives exp of the loss in bits as the perplexity",
          ((r"perplexity \{result\.perplexity:\.6g\}", "perplexity {perplexity(result.loss / 0.6931471805599453):.6g}"),),
          ("tests/test_trace.py::test_score_report_columns_and_totals_are_the_scores_numbers",)),
    Break("score_bits_column_in_nats", "--score's bits column shows nats",
          ((r"\{result\.bits\(row\):>5\.1f\}", "{result.nats[row['step'] - 1]:>5.1f}"),),
          ("tests/test_trace.py::test_score_report_columns_and_totals_are_the_scores_numbers",)),
    Break("score_guess_is_the_worst_alternative", "--score's top-guess column shows the last alternative, not the best",
          ((r'guess = row\["alternatives"\]\[0\]', 'guess = row["alternatives"][-1]'),),
          ("tests/test_trace.py::test_score_report_columns_and_totals_are_the_scores_numbers",)),
    Break("atomic_file_fixed_mode", "atomic_file gives every file mode 0o644, whatever the umask",
          ((r"^(\s*)yield tmp\n(\s*)fsync\(tmp\)", r"\1yield tmp\n\1os.chmod(tmp, 0o644)\n\2fsync(tmp)"),),
          ("tests/test_files.py::test_atomic_file_gets_the_usual_permissions",)),
    Break("warm_up_bounds_loosened", "compiled decoding's agreement bounds are ~3-4x wider (2.9e-2 fp32, 0.19 bf16/fp16)",
          ((r"^AGREEMENT = \{torch\.float32: 1e-2, torch\.bfloat16: 5e-2, torch\.float16: 5e-2\}",
            "AGREEMENT = {torch.float32: 2.9e-2, torch.bfloat16: 0.19, torch.float16: 0.19}"),),
          ("tests/test_compiled_decoding.py::test_warm_up_allows_16_bit_rounding_and_no_more",)),
    Break("old_run_paths_taken_as_they_are", "a run that recorded the preset's data by its absolute path (older versions) "
          "cannot resume in the same place",
          ((r"^\s*was = recorded_path\(was\) if isinstance\(was, str\) and os\.path\.isabs\(was\) else was.*\n", ""),),
          ("tests/test_train_cli.py::test_a_preset_run_resumes_after_the_clone_moves",)),
    Break("unswapped_model_untrainable", "prepare_for_inference turns off the gradients of a model it swaps nothing in "
          "(fp16; a GPU's)",
          ((r"return model\.eval\(\)  # \(nothing swapped", "return model.eval().requires_grad_(False)  # (nothing swapped"),),
          ("tests/test_kernels.py::test_a_model_with_nothing_to_swap_keeps_its_gradients",)),
    Break("hub_hint_for_any_path", "every missing path with a slash gets the hint that its first part is a folder here "
          "(\"./ is a folder here\")",
          ((r'in_a_local_folder = bool\(HUB_ID\.match\(text\)\) and ', "in_a_local_folder = "),),
          ("tests/test_hub.py::test_a_mistyped_path_in_a_local_folder_is_not_sent_to_the_hub",)),
    Break("torch_device_names_refused", "a device torch names so (\"cpu:0\", a bare GPU index) is refused",
          ((r'numbered = index\.isdecimal\(\) and \(kind == "cuda" or index == "0"\)', 'numbered = kind == "cuda" and index.isdecimal()'),
           (r'name = f"cuda:\{name\}" if isinstance\(name, int\) and not isinstance\(name, bool\) else name', "pass")),
          ("tests/test_train_cli.py::test_a_device_is_named_as_torch_names_it",)),
    Break("vanished_entry_foreign", "an entry of --out renamed away by a live run's save between the listing and the look "
          "is taken for foreign (rank 1's check under torchrun)",
          ((r"^(\s*)if not os\.path\.lexists\(entry\):.*\n\s*return None\n", ""),
           (r"not os\.path\.lexists\(e\) or \(e\.name == CURRENT", "(e.name == CURRENT")),
          ("tests/test_run_lock.py::test_what_a_live_runs_save_renames_away_meanwhile_is_not_taken_for_foreign",)),
    Break("decode_takes_a_batch", "Tokenizer.decode passes a batch or a 0-d tensor on (the Rust side's TypeError)",
          ((r"ids = \[operator\.index\(t\) for t in ids\]", "ids = list(ids)"),),
          ("tests/test_tokenizer.py::test_decode_takes_one_sequence_of_ids_and_says_so_of_anything_else",)),
    Break("bool_score_counts", "JSON's true in answers.score is a score of 1 (Python's bool is an int)",
          ((r"\(isinstance\(s, int\) and not isinstance\(s, bool\)\)", "isinstance(s, int)"),),
          ("tests/test_data.py::test_qa_needs_one_finite_score_per_answer",)),
    Break("signal_in_last_step_stops", "a Ctrl-C in the run's last step or evaluation ends the finished run as stopped "
          "(exit 130, \"run the same command with --resume\")",
          ((r"stopped := self\.step < cfg\.max_steps and self\._should_stop", "stopped := self._should_stop"),),
          ("tests/test_trainer.py::test_a_signal_in_the_last_step_or_evaluation_ends_the_run_complete",)),
    Break("metrics_newline_not_mended", "a resumed run appends its first row to a kept last row that lost its newline",
          ((r'b""\.join\(line if line\.endswith\(b"\\n"\) else line \+ b"\\n" for line in lines\)', 'b"".join(lines)'),),
          ("tests/test_trainer.py::test_a_last_row_without_its_newline_is_mended_on_resume",)),
    Break("metrics_row_unchecked", "a metrics row without an integer step, or with NaN, is taken on --resume (the card fails later)",
          ((r', parse_constant=_not_json\)', ")"), (r' or type\(row\.get\("step"\)\) is not int', "")),
          ("tests/test_trainer.py::test_a_damaged_metrics_file_stops_a_resume_in_one_line_and_is_kept",)),
    Break("tokenizer_json_truncates", "a tokenizer.json's truncation and padding apply to every text (transformers turns them off)",
          ((r"^(\s*)backend\.no_truncation\(\)$", r"\1pass"), (r"^(\s*)backend\.no_padding\(\)$", r"\1pass")),
          ("tests/test_tokenizer.py::test_tokenizer_json_settings_give_transformers_ids",)),
    Break("post_processor_tokens_taken", "a tokenizer whose post-processor adds <|endoftext|> to every text is taken "
          "(transformers adds it, minigpt does not)",
          ((r"if \(added := backend\.num_special_tokens_to_add\(False\)\) > 0:", "if (added := 0) > 0:"),),
          ("tests/test_tokenizer.py::test_a_post_processor_that_adds_tokens_to_every_text_is_refused",)),
    Break("gpt2_class_keeps_normalizer", "a GPT-2 tokenizer class keeps tokenizer.json's normalizer and BPE dropout "
          "(transformers' rebuild drops them)",
          ((r"^(\s*)tokenizer\.backend\.normalizer = None$", r"\1pass"),
           (r"^(\s*)tokenizer\.backend\.model\.dropout = None$", r"\1pass")),
          ("tests/test_tokenizer.py::test_tokenizer_json_settings_give_transformers_ids",)),
    Break("nan_tied_copy_refused", "a tied head written as a copy of a wte holding NaN is refused as a head of its own",
          ((r"torch\.allclose\(\s*head, wte, rtol=0, atol=0, equal_nan=True\)", "torch.equal(head, wte)"),),
          ("tests/test_faults.py::test_nan_and_inf_weights_load_with_a_warning",)),
    Break("bin_key_not_a_name", "a pytorch_model.bin with a key that is not a name is a TypeError traceback",
          ((r"isinstance\(k, str\) and _is_plain\(t\)", "_is_plain(t)"),),
          ("tests/test_faults.py::test_broken_pytorch_model_bin",)),
    Break("hf_card_exported", "--to-hf copies an HF folder's own model card (another model's) into the export",
          ((r'if kind == "hf":(\s+on_hub = is_hub_id)', r"if False:\1"),),
          ("tests/test_card.py::test_only_a_minigpt_checkpoints_card_travels_and_whole",)),
    Break("card_not_utf8_traceback", "--to-hf of a checkpoint whose model card is not UTF-8 is a traceback",
          ((r'except UnicodeDecodeError as e:(\s*)raise MinigptError\(f"\{card\}: the model card',
            r'except OSError as e:\1raise MinigptError(f"{card}: the model card'),),
          ("tests/test_card.py::test_only_a_minigpt_checkpoints_card_travels_and_whole",)),
    Break("card_of_another_step", "--to-hf looks the run's checkpoint up again for its card, after the weights: a save "
          "meanwhile exports one step's weights with the next one's card",
          ((r"_card_for\(source, checkpoint, kind,", "_card_for(source, current_checkpoint(folder) or checkpoint, kind,"),),
          ("tests/test_card.py::test_the_exported_card_is_the_step_whose_weights_were_read",)),
    Break("step_folder_called_foreign", "--force onto a checkpoint's step folder says its training_state.json is no "
          "model's file, not that the folder is inside a run",
          ((r"^(\s*)check_outside_runs\(out\)\n(\s*)patterns = ", r"\2patterns = "),),
          ("tests/test_run_lock.py::test_nothing_is_written_inside_a_runs_folder",)),
    Break("adamw_moved_param_taken", "AdamW steps a parameter moved to another dtype or device after it was made "
          "(torch's dtype or device error, or the fused kernel's)",
          ((r"\(p\.shape, p\.stride\(\), p\.dtype, p\.device\) != \(m\.shape, m\.stride\(\), m\.dtype, m\.device\)",
            "(p.shape, p.stride()) != (m.shape, m.stride())"),),
          ("tests/test_optim.py::test_a_parameter_given_new_data_is_updated_there_and_a_new_shape_is_refused",)),
    Break("eli5_through_hf_path", "ELI5's file is read through datasets' hf:// path, which asks the Hub's API on every "
          "run (offline, a second train.py failed with the file in the cache)",
          ((r'path = _downloaded\(repo_id, filename, snapshot, .*\n\s*etag_timeout=seconds, local_files_only=asked is not None\)',
            'path = f"hf://datasets/{repo_id}/{filename}"'),),
          ("tests/test_hub.py::test_the_default_data_is_the_hubs_eli5_file",
           "tests/test_hub.py::test_the_eli5_file_downloaded_once_is_read_offline")),
    Break("hub_error_answer_called_unreachable", "an HTTP 500 the cache cannot make up for is reported as \"the Hub is "
          "unreachable or HF_HUB_OFFLINE is set\"",
          ((r"status = _http_status\(e\)  #", "status = None  #"),),
          ("tests/test_hub.py::test_an_error_answer_and_a_missing_file_are_named",)),
    Break("hub_http_error_cut", "a Hub HTTP error is cut to its first line (\"404 Client Error.\", the file named after it)",
          ((r'return " "\.join\(line\.strip\(\) for line in str\(e\)\.splitlines\(\) if line\.strip\(\)\)', "return reason(e)"),),
          ("tests/test_hub.py::test_an_error_answer_and_a_missing_file_are_named",
           "tests/test_hub.py::test_the_hubs_errors_say_what_went_wrong")),
    Break("spaced_tmpdir_compiles", "torch.compile on the CPU is tried under a TMPDIR or cache folder with a space "
          "(\"CppCompileError: C++ compile error\" at the first step)",
          ((r"if any\(c\.isspace\(\) for c in path\):", "if False:"),),
          ("tests/test_compiled_decoding.py::test_a_temporary_or_cache_folder_with_a_space_is_refused_in_one_line",)),
    Break("tokenizer_panic_traceback", "the tokenizer's Rust panic (a Split regex past its retry limit) is a traceback",
          ((r'if type\(e\)\.__name__ == "PanicException":', "if False:"),),
          ("tests/test_tokenizer.py::test_a_tokenizer_that_panics_on_a_text_is_one_line",)),
    Break("added_token_id_isdigit", "an added token's id is checked with isdigit() (\"\u00b2\" passes, int() fails)",
          ((r'not re\.fullmatch\(r"\[0-9\]\{1,18\}", str\(token\["id"\]\)\)', 'not str(token["id"]).isdigit()'),),
          ("tests/test_tokenizer.py::test_what_transformers_would_read_otherwise_is_refused_in_one_line",)),
    Break("added_token_flags_unchecked", "an added token's flags (special: \"yes\") reach AddedToken: a TypeError",
          ((r"if bad := \[k for k in ADDED_TOKEN_FLAGS if k in token", "if bad := [k for k in () if k in token"),),
          ("tests/test_tokenizer.py::test_what_transformers_would_read_otherwise_is_refused_in_one_line",)),
    Break("added_tokens_decoder_not_object", "an added_tokens_decoder that is a JSON list is an AttributeError",
          ((r"if not isinstance\(decoder, dict\):", "if False:"),),
          ("tests/test_tokenizer.py::test_what_transformers_would_read_otherwise_is_refused_in_one_line",)),
    Break("symlinked_card_exported", "--to-hf exports a README.md that is a symlink to any file as the model card",
          ((r"if card\.is_symlink\(\) and not is_hub_id\(source\):  # \(a folder from elsewhere",
            "if False:  # (a folder from elsewhere"),),
          ("tests/test_card.py::test_a_card_or_a_checkpoint_link_pointing_elsewhere_is_refused",)),
    Break("current_link_outside_run", "a run folder's .ckpt/current naming a folder outside the run is its checkpoint",
          ((r"if step is not None and step\.parent != link\.parent\.resolve\(\):", "if False:"),),
          ("tests/test_card.py::test_a_card_or_a_checkpoint_link_pointing_elsewhere_is_refused",)),
    Break("data_pipe_read", "--data naming a pipe or a device is read (a FIFO hung the run)",
          ((r"if not path\.is_file\(\):  # \(a FIFO", "if False:  # (a FIFO"),),
          ("tests/test_data.py::test_missing_file_and_unknown_extension",)),
    Break("parquet_read_whole", "a parquet file is read whole before --max-records cuts it",
          ((r"if limit is not None and len\(rows\) >= limit:", "if False:"),),
          ("tests/test_data.py::test_max_records_of_a_parquet_file_reads_no_further",)),
    Break("changed_checkpoint_kept", "a checkpoint folder replaced while it was read (convert --force) is kept: one "
          "model's config with the next one's weights",
          ((r"if before is not None and _inode\(checkpoint\) == before:\n            return result", "return result"),),
          ("tests/test_trainer.py::test_loading_a_folder_replaced_meanwhile_reads_the_new_one_whole",)),
    Break("vanished_checkpoint_not_retried", "a run's step removed by a save while it was read fails the load, which "
          "is not tried again on the new step",
          ((r"except Exception:\n            if before is not None and _inode\(checkpoint\) == before:\n                raise",
            "except Exception:\n            raise"),),
          ("tests/test_trainer.py::test_loading_a_run_folder_never_mixes_two_checkpoints",)),
    Break("foreign_pid_compared", "another container's (or machine's) temporary is judged by its PID here: two "
          "containers sharing a cache, both PID 1, deleted each other's entries mid-write",
          ((r"if len\(parts\) == 4 and parts\[2\] != _process_space\(\):", "if False:"),),
          ("tests/test_files.py::test_another_machines_or_containers_temporary_is_kept_until_a_day_old",)),
    Break("memory_error_traceback", "running out of memory (a MemoryError) is a traceback",
          ((r"    except MemoryError:  # \(a huge input", "    except ZeroDivisionError:  # (a huge input"),),
          ("tests/test_sample_cli.py::test_running_out_of_memory_is_one_line",)),
    Break("cache_leftovers_kept", "a killed cache save's temporary is deleted only when that same entry is saved again "
          "(one no run asks for again keeps it for good)",
          ((r"    clear_leftovers_in\(root\)  # \(of every entry", "    pass  # (of every entry"),),
          ("tests/test_data.py::test_a_crash_while_writing_leaves_no_entry",)),
    Break("metrics_write_error_unnamed", "a full disk under metrics.jsonl stops the run naming no file",
          ((r'except OSError as e:  # \(a full disk: "writing the output', 'except ZeroDivisionError as e:  # (a full disk: "writing the output'),),
          ("tests/test_trainer_syncs.py::test_a_full_disk_under_the_metrics_names_the_file",)),
    Break("metrics_close_raises_again", "closing a metrics log whose last row failed to write raises again",
          ((r"with contextlib\.suppress\(OSError\):  # \(only a row", "with contextlib.nullcontext():  # (only a row"),),
          ("tests/test_trainer_syncs.py::test_a_full_disk_under_the_metrics_names_the_file",)),
    Break("zero_defaults_hidden", "--help shows no default where it is 0 (0 == False)",
          ((r"shown = f\.default is not None and f\.default is not False", "shown = f.default not in (None, False)"),),
          ("tests/test_train_cli.py::test_help_explains_every_flag",)),
    Break("eli5_download_retried_offline", "without an answer from the Hub, ELI5's download is tried anyway (with no "
          "network: ~26 s of retries and 11 lines before the error)",
          ((r"local_files_only=asked is not None\)", "local_files_only=False)"),),
          ("tests/test_hub.py::test_the_default_data_is_the_hubs_eli5_file",)),
    Break("eval_mode_reads_config", "the eval-mode check reads the config's dropout, not the layers' (a layer's "
          "probability set by hand, or a config edited after the build, passes: greedy text random)",
          ((r"if rates := \[m\.p for m in model\.modules\(\) if isinstance\(m, torch\.nn\.Dropout\) and m\.training and m\.p > 0\]:",
            "if rates := [model.config.dropout] * (model.training and model.config.dropout > 0):"),),
          ("tests/test_sampling.py::test_generation_refuses_a_model_in_training_mode_with_dropout",)),
    Break("config_mutable", "a model's config can be changed after the build, which changes nothing in the model "
          "(attn_impl, dropout: silently ignored)",
          ((r"^@dataclass\(frozen=True\)", "@dataclass"),),
          ("tests/test_sampling.py::test_generation_refuses_a_model_in_training_mode_with_dropout",)),
    Break("compiled_model_called_prepared", "saving a torch.compile'd model says it was prepared for inference "
          "(\"save the model before preparing it\")",
          ((r"if hasattr\(model, \"_orig_mod\"\):", "if False:"),),
          ("tests/test_hf.py::test_a_model_no_loader_could_read_back_is_not_saved",)),
    Break("top_alternatives_unchecked", "top_alternatives 2.0 is taken (torch's topk() TypeError at the first step)",
          ((r"self\.top_alternatives = integer_at_least\(top_alternatives, 1, \"top_alternatives\"\)",
            "self.top_alternatives = top_alternatives"),
           (r"\n(\s*)top_alternatives = integer_at_least\(top_alternatives, 1, \"top_alternatives\"\)", r"\n\1pass")),
          ("tests/test_trace.py::test_score_ids_takes_a_1d_tensor_and_refuses_a_batch_or_bad_ids",)),
    Break("space_folder_called_empty", "a folder whose name is a space (train.py --out ' ' makes one) is \"empty "
          "model path\" to every reader",
          ((r"if not str\(source\):\n", "if not text:\n"),),
          ("tests/test_hub.py::test_a_folder_named_with_a_space_is_the_one_loaded",)),
    Break("read_only_out_replaced", "an empty --out folder the user cannot write into is renamed over (a writable "
          "folder in its place)",
          ((r"and not os\.access\(out, os\.W_OK\):", "and False:"),),
          ("tests/test_convert_cli.py::test_a_read_only_out_folder_is_refused_and_kept",)),
    Break("negative_value_taken_for_flag", "--temperature -inf or --lr -1e-3 is \"expected one argument\" (argparse "
          "takes the value for a flag)",
          ((r"self\._negative_number_matcher = re\.compile\(", "self._negative_matcher_unused = re.compile("),),
          ("tests/test_sample_cli.py::test_a_flag_that_would_change_nothing_is_refused",)),
    Break("epoch_counts_optimizer_steps", "the metrics' epoch counts optimizer steps, not micro-batches (0.3333 where "
          "transformers' Trainer says 0.4 with --grad-accum)",
          ((r"return round\(self\.train_batches\.epoch \+ self\.train_batches\.position / max\(1, len\(self\.train_batches\)\), 4\)",
            "it, accum = self.train_batches, self.config.grad_accum\n        "
            "return round(it.epoch + math.ceil(it.position / accum) / max(1, math.ceil(len(it) / accum)), 4)"),),
          ("tests/test_trainer.py::test_accumulation_equals_one_big_batch",)),
    Break("sigterm_fatal_before_training", "every process counts as a torchrun rank: SIGTERM while train.py reads its "
          "data ends it outright (exit 143, no word, --out left with its lock)",
          ((r"return all\(os\.environ\.get\(name, \"\"\)\.strip\(\) for name in \(\"RANK\", \"WORLD_SIZE\"\)\)",
            "return True"),),
          ("tests/test_faults.py::test_sigterm_before_training_starts_is_ctrl_c_and_leaves_no_folder",)),
    Break("resume_over_edited_data", "a data file edited in place since the checkpoint (as many blocks, other tokens) "
          "resumes silently, the run going on with the new blocks",
          ((r"if saved != len\(self\.blocks\) or sha256 not in \(None, self\.blocks\.sha256\):",
            "if saved != len(self.blocks):"),),
          ("tests/test_data.py::test_load_state_dict_refuses_other_blocks_of_the_same_number",
           "tests/test_train_cli.py::test_a_data_file_edited_since_the_checkpoint_is_refused_on_resume")),
    Break("resume_skips_validation_data", "a validation file edited since the checkpoint resumes silently (its losses no "
          "longer comparable with the curve's)",
          ((r"self\.val_batches\.load_state_dict\(info\[\"validation_data\"\]\)", "pass"),),
          ("tests/test_train_cli.py::test_a_data_file_edited_since_the_checkpoint_is_refused_on_resume",)),
    Break("resume_threads_unnoticed", "a resume under another CPU thread count goes on without a word (bitwise "
          "equality lost)",
          ((r'if device\.type == "cpu" and saved is not None and saved != now:', "if False:"),),
          ("tests/test_train_cli.py::test_a_resume_under_another_cpu_thread_count_warns_in_one_line",)),
    Break("tilde_user_out_made", "train.py --out ~nosuchuser/run trains into a folder named ~nosuchuser in the current "
          "folder (os.path.expanduser keeps an unknown user's ~)",
          ((r"args\.out = str\(home_expanded\(args\.out\)\)", 'args.out = __import__("os").path.expanduser(args.out)'),),
          ("tests/test_train_cli.py::test_an_out_under_no_users_home_is_refused_not_made",)),
    Break("train_seed_worded_apart", "train.py --seed 2**63 is refused in words of its own, not sample.py's (the range "
          "checked twice)",
          ((r"type=seed_in_range\)", "type=non_negative_int)"),),
          ("tests/test_train_cli.py::test_bad_flags_exit_2",)),
    Break("compile_mode_checked_before_cuda", "on a machine without CUDA, --device cuda --compile-mode reduce-overhead "
          "--grad-accum 2 is told about CUDA graphs, not that there is no CUDA",
          ((r'on_gpu = torch\.cuda\.is_available\(\) and args\.device\.startswith\(\("cuda", "auto"\)\)',
            'on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())'),),
          ("tests/test_trainer_syncs.py::test_compile_mode_flag_errors_are_one_line",)),
    Break("converter_replaces_live_run", "convert_to_minigpt / export_to_hf with overwrite=True replace the folder of a "
          "live training run (only the CLI kept runs out)",
          ((r"with keep_runs_out\(folder_destination\(out\)\):", "with contextlib.nullcontext():"),
           (r"^import glob\n", "import contextlib\nimport glob\n")),
          ("tests/test_run_lock.py::test_convert_force_never_replaces_the_folder_of_a_live_run",)),
    Break("infinite_temperature_worded_wrong", "SamplingConfig(temperature=inf) says \"must be >= 0, got inf\"",
          ((r"temperature must be a finite number >= 0", "temperature must be >= 0"),),
          ("tests/test_sampling.py::test_sampling_config_rejects_bad_values",)),
    Break("decoding_loads_speed_modules", "importing the plain decoding loop (minigpt.sampling) loads the speed "
          "modules (compiled_decoding, inference, layouts, quantized) for a type hint",
          ((r"^if TYPE_CHECKING:  # \(a speed module: the plain decoding loop does not load it\)", "if True:"),),
          ("tests/test_imports.py::test_the_trainer_and_the_decoding_loop_load_only_what_they_need",)),
    Break("isa_cache_prefix_guessed", "a TORCHINDUCTOR_CACHE_DIR of the user's named isa-mine is taken for an earlier "
          "call's instruction-set folder: the cache goes beside it, outside the folder chosen",
          ((r'if re\.fullmatch\(r"isa-\[a-z0-9-\]\+-\[0-9a-f\]\{8\}", base\.name\):', 'if base.name.startswith("isa-"):'),),
          ("tests/test_trainer_syncs.py::test_compiled_training_on_the_cpu_keeps_to_its_instruction_sets_cache",)),
    Break("unlinked_first_save_refused", "a run killed between its first step folder and its .ckpt/current link is "
          "refused by --resume (the link had to be made by hand)",
          ((r"ckpt = _unlinked_first_save\(out\)", "ckpt = None"),),
          ("tests/test_train_cli.py::test_a_run_killed_between_its_first_checkpoint_and_its_link_resumes",)),
    Break("clis_defaults_drift", "train.py's --block-size default is not DataConfig's (the recipe's numbers written in two "
          "places, one changed)",
          ((r'block_size: int = flag\(128, ', "block_size: int = flag(64, "),),
          ("tests/test_train_cli.py::test_the_clis_defaults_are_the_librarys",)),
    Break("hub_sha_unchecked", "the Hub's answer names the snapshot folder read (sha \"/some/folder\" loads that "
          "folder's model; none is a TypeError traceback)",
          ((r'if not \(isinstance\(sha, str\) and re\.fullmatch\(r"\[0-9a-f\]\{40\}", sha\)\):', "if False:"),),
          ("tests/test_hub.py::test_an_answer_naming_no_commit_or_a_file_it_then_lacks_is_one_line",)),
    Break("hub_vanished_file_unnamed", "a file the Hub's answer listed and then did not serve is the Hub's 404 text, "
          "not \"the repository changed during the download\"",
          ((r"if isinstance\(e, EntryNotFoundError\) and not isinstance\(e, LocalEntryNotFoundError\):", "if False:"),),
          ("tests/test_hub.py::test_an_answer_naming_no_commit_or_a_file_it_then_lacks_is_one_line",)),
    Break("hub_download_unverified", "a file changed on the way is kept in the cache under the true file's checksum "
          "(every later run reads it, offline too)",
          ((r"_downloaded\(repo_id, name, snapshot, ", "_downloaded(repo_id, name, None, "),),
          ("tests/test_hub.py::test_a_file_changed_on_the_way_is_refused_and_not_kept",)),
    Break("eli5_download_unverified", "the ELI5 training file changed on the way is kept in the cache under the "
          "true file's checksum (every later run reads it, offline too)",
          ((r'snapshot = None if asked is not None else _snapshot_folder\(repo_id, "dataset", answer\.sha\)',
            "snapshot = None"),),
          ("tests/test_hub.py::test_an_eli5_file_changed_on_the_way_is_refused_and_not_kept",)),
    Break("other_revision_download_unchecked", "a file that resolves to a newer commit than the Hub's answer named "
          "(a push since, a mirror's stale answer) is taken for cached and not checked: changed on the way, it stays",
          ((r"if not cached or \(snapshot is not None and _snapshot_of\(path, name\) != snapshot\):", "if not cached:"),),
          ("tests/test_hub.py::test_an_eli5_file_changed_on_the_way_is_refused_and_not_kept",)),
    Break("hub_partial_cache_blamed_on_folder", "offline, a cache a stopped download left without the weights says "
          "\"snapshots/...: no model.safetensors in this folder\", the Hub's state unsaid",
          ((r"^    if not names:\n        raise repo\.missing\(.*\n", ""),),
          ("tests/test_hub.py::test_a_cache_that_a_download_left_part_filled_says_so_offline",)),
    Break("hub_partial_cache_tokenizer_unnamed", "a cached snapshot without its tokenizer is blamed on the folder, "
          "not said to be a part-filled cache with the Hub's reason",
          ((r"^    _require_tokenizer\(repo, folder\)\n", ""),),
          ("tests/test_sample_cli.py::test_without_a_model_the_hubs_distilgpt2_fails_in_its_own_words",)),
    Break("hub_5xx_in_httpx_words", "the first request's HTTP 503 with a cold cache is httpx's two lines in one, not "
          "\"the Hub answered HTTP 503 ...; try again later\"",
          ((r"if status and \(status >= 500 or isinstance\(e, LocalEntryNotFoundError\)\):",
            "if status and isinstance(e, LocalEntryNotFoundError):"),),
          ("tests/test_hub.py::test_an_error_answer_and_a_missing_file_are_named",)),
    Break("hub_garbled_answer_called_unreachable", "an answer that is not JSON (or a redirect loop) is reported as "
          "\"the Hub is unreachable or HF_HUB_OFFLINE is set\"",
          ((r"if garbled and not isinstance\(asked, HFValidationError\):", "if False:"),),
          ("tests/test_hub.py::test_an_error_answer_and_a_missing_file_are_named",)),
    Break("odd_shard_names_taken", "an index's shard names with a backslash, a line break or over 255 bytes are taken "
          "(a sub-folder's file downloaded for one; a 5,000-character error line)",
          ((r' or "\\\\" in shard\n\s+or not shard\.isprintable\(\) or len\(shard\.encode\("utf-8", "surrogatepass"\)\) > 255\)',
            ")"),),
          ("tests/test_faults.py::test_shard_index_cannot_point_outside_its_folder",)),
    Break("xet_blob_followed_to_its_store", "a download is compared with the name at the end of its links (a Xet "
          "file's shared-store name), so every Xet download is refused and the shared file deleted",
          ((r"blob = link\.parent / os\.readlink\(link\)", "blob = link.resolve()"),),
          ("tests/test_hub.py::test_a_download_is_checked_by_the_name_its_snapshot_link_gives",)),
    Break("invalid_hub_id_blamed_on_proxy", "a Hub id no repo can have (\"distilgpt2.\") is reported as an answer "
          "that was not usable, a proxy in the way",
          ((r"if garbled and not isinstance\(asked, HFValidationError\):", "if garbled:"),),
          ("tests/test_hub.py::test_an_error_answer_and_a_missing_file_are_named",)),
    Break("edited_data_named_by_cache_entry", "blocks from the cache name the file that first built the entry "
          "(maybe a colleague's copy), so a refused resume and the card name another file than the run's",
          ((r'^    blocks\.manifest = \{\*\*blocks\.manifest, "source": src\.name\}\n', ""),),
          ("tests/test_data.py::test_blocks_from_the_cache_name_this_runs_source",)),
    Break("grown_data_blamed_on_steps", "a data file grown since the checkpoint of an --epochs run is refused as \"made "
          "with steps 40, not 50\" (the step count the data makes), not as the data that changed",
          ((r'^(            self\.train_batches\.load_state_dict\(info\["data"\]\).*\n'
            r'            if self\.val_batches.*\n                self\.val_batches\.load_state_dict.*\n)'
            r'(            check_same_run\(.*\n)', r"\2\1"),),
          ("tests/test_train_cli.py::test_a_data_file_edited_since_the_checkpoint_is_refused_on_resume",)),
    Break("data_block_count_called_settings", "data with fewer blocks than at the checkpoint is refused as \"saved "
          "num_blocks 23 differs from this run's 22; resume with the same ... --batch-size and --seed\"",
          ((r'for name in \("seed", "batch_size"\):', 'for name in ("seed", "batch_size", "num_blocks"):'),
           (r"if state\.get\(name\) != getattr\(self, name\):",
            "if state.get(name) != (len(self.blocks) if name == 'num_blocks' else getattr(self, name)):")),
          ("tests/test_data.py::test_load_state_dict_refuses_a_different_run",)),
    Break("eval_every_taken_on_resume", "--eval-every with --val-fraction 0 and no --val-data is refused on a new run "
          "but taken, evaluating nothing, on --resume",
          ((r"if args\.val_data is None and args\.val_fraction == 0:", "if args.val_data is None and args.val_fraction == 0 "
            "and not args.resume:"),),
          ("tests/test_train_cli.py::test_flags_that_would_change_nothing_in_training_are_refused",)),
    Break("unlinked_run_called_no_checkpoint", "sample.py on a run stopped in its first save says \"no config.json in "
          "this folder\" (its links lead nowhere yet), not how to link its checkpoint",
          ((r"if not \(path / CONFIG_FILE\)\.is_file\(\) and \(path / CKPT_DIR\)\.is_dir\(\):", "if False:"),),
          ("tests/test_train_cli.py::test_a_run_killed_between_its_first_checkpoint_and_its_link_resumes",)),
    Break("prepared_model_loads_weights", "a prepared model's load_state_dict reports success while FBGEMM's packed "
          "layers keep the old weights (logits neither model's)",
          ((r"^        module\.register_load_state_dict_pre_hook\(refuse_loading\).*\n", ""),),
          ("tests/test_kernels.py::test_a_prepared_model_refuses_to_load_weights_in_one_line_and_stays_as_it_was",)),
    Break("layer_threads_above_process", "a layer timed onto 2 threads widens torch's pool to 2 at every call after "
          "the process was set to 1",
          ((r"^        if every <= self\.threads:.*\n            return self\.layer\(x\)\n", ""),),
          ("tests/test_kernels.py::test_a_layer_on_fewer_threads_never_takes_more_than_the_process_has_now",)),
    Break("eval_only_writes_token_cache", "--eval-only keeps its validation blocks in the token cache (it is to "
          "write nothing)",
          ((r"args\.data_config\(cache_dir=cache\)", "args.data_config()"),),
          ("tests/test_eval_only.py::test_eval_only_equals_transformers_and_writes_nothing",)),
    Break("init_dropout_flag_ignored", "--dropout with --init leaves the loaded model's dropout as it was",
          ((r"if args\.dropout is not None and args\.dropout != model\.config\.dropout:", "if False:"),),
          ("tests/test_train_cli.py::test_dropout_given_with_init_is_the_models_and_keeps_its_weights",)),
    Break("split_special_tokens_taken", "an HF folder's split_special_tokens is taken silently (transformers reads "
          "<|endoftext|> in a text as characters, minigpt as the token)",
          ((r'if config\.get\("split_special_tokens"\) is True:', "if False:"),),
          ("tests/test_tokenizer.py::test_what_transformers_would_read_otherwise_is_refused_in_one_line",)),
    Break("existing_added_token_flags_dropped", "added_tokens_decoder's flags (lstrip, rstrip) for a token already at "
          "its id are dropped",
          ((r"^            if keep:  # \(the token keeps its id", "            if False:  # (the token keeps its id"),),
          ("tests/test_tokenizer.py::test_an_hf_folders_tokenizer_settings_give_transformers_ids",)),
    Break("added_tokens_bytes_as_text", "decode_bytes takes every added token as its own text (a vocabulary token "
          "listed as added streams as \"\u0120Hi\", not \" Hi\"; \"<|\u00fc|>\" unlike decode's)",
          ((r"^(\s*)if all\(c in byte_decoder for c in token\):",
            r"\1if all(c in byte_decoder for c in token) and self.backend.token_to_id(token) not in "
            r"self.backend.get_added_tokens_decoder():"),),
          ("tests/test_tokenizer.py::test_added_tokens_decode_to_their_own_text_as_bytes",)),
    Break("hf_model_tokenizer_read_as_is", "load_tokenizer reads an HF model folder without tokenizer_config.json as its "
          "tokenizer.json says, where load_model and transformers rebuild GPT-2's pipeline",
          ((r"or \(\n\s*\(path / CONFIG_FILE\)\.is_file\(\) and not is_minigpt_checkpoint\(path\)\)", "or False"),),
          ("tests/test_tokenizer.py::test_an_hf_models_folder_gives_one_tokenizer_whichever_loader_reads_it",)),
    Break("card_licence_always_minigpts", "every card states license: apache-2.0, a fine-tune of an MIT model's too",
          ((r"^    meta = _licence_lines\(facts\.license\)", '    meta = ["license: apache-2.0"]'),),
          ("tests/test_card.py::test_the_card_states_the_base_models_licence_not_minigpts",)),
    Break("hub_card_not_fetched", "a Hub model is downloaded without its card, so a fine-tune of it states no licence",
          ((r"INDEX_FILE, CARD_FILE\]\)", "INDEX_FILE])"),),
          ("tests/test_hub.py::test_a_hub_models_card_comes_with_it_for_its_licence",)),
    Break("export_without_generation_config", "an export has no generation_config.json: transformers samples at "
          "temperature 0.7, generate() is greedy, a tiny model's pipeline fails past its window",
          ((r"^        \(tmp / GENERATION_FILE\)\.write_text\(.*\n", ""),),
          ("tests/test_hf.py::test_an_export_samples_in_transformers_as_sample_py_does",)),
    Break("export_config_without_dtype", "an export's config.json declares no dtype (transformers' dtype=\"auto\" "
          "guesses from the weights)",
          ((r'^            "dtype": dtype,\n', ""),),
          ("tests/test_hf.py::test_an_export_samples_in_transformers_as_sample_py_does",)),
    Break("export_card_usage_of_the_run", "an exported card's usage names the training run and says to export it first",
          ((r"if usage != -1:", "if False:"),),
          ("tests/test_card.py::test_export_card_says_transformers_and_how_to_use_the_export",)),
    Break("eval_only_refusal_every_rank", "--eval-only's refusals after loading (no validation data, a NaN loss) are "
          "printed by every rank of a torchrun job",
          ((r"with alike_on_every_rank\(\):  # \(the same files, data and loss on every rank",
            "with contextlib.nullcontext():  # (the same files, data and loss on every rank"),),
          ("tests/test_ddp.py::test_an_eval_only_refusal_under_torchrun_is_one_line_for_the_job",)),
    Break("qa_prompt_unstripped", "qa_prompt keeps the spaces and line breaks around a question: a typed \"  Why?  \" is "
          "prompted otherwise than a record's title was trained",
          ((r"\{question\.strip\(\)\}", "{question}"),),
          ("tests/test_data.py::test_qa_template_strips_the_question_and_the_answer",)),
    Break("qa_answer_unstripped", "the qa format trains an answer with the spaces and line breaks around it",
          ((r"\{answer\.strip\(\)\}", "{answer}"),),
          ("tests/test_data.py::test_qa_template_strips_the_question_and_the_answer",)),
    Break("dropout_one_accepted", "GPTConfig takes dropout 1.0 (every activation dropped in training)",
          ((r"if not 0\.0 <= self\.dropout < 1\.0:", "if not 0.0 <= self.dropout <= 1.0:"),),
          ("tests/test_model.py::test_the_configs_bounds_are_exact",)),
    Break("max_layers_off_by_one", "GPTConfig takes n_layer 257, one past MAX_LAYERS",
          ((r"if self\.n_layer > MAX_LAYERS:", "if self.n_layer > MAX_LAYERS + 1:"),),
          ("tests/test_model.py::test_the_configs_bounds_are_exact",)),
    Break("hf_default_layers_distilgpt2", "an HF config.json without n_layer is read as 6 layers (GPTConfig's), not "
          "transformers' 12",
          ((r'n_layer=hf\.get\("n_layer", 12\)', 'n_layer=hf.get("n_layer", 6)'),),
          ("tests/test_hf.py::test_an_hf_config_without_its_shape_takes_transformers_defaults",)),
    Break("vocab_check_off_by_one", "a model one row short of its tokenizer (no row for EOS) is saved and loaded, and "
          "fails with an IndexError at its first EOS",
          ((r"if tokenizer\.vocab_size > config\.vocab_size:", "if tokenizer.vocab_size > config.vocab_size + 1:"),),
          ("tests/test_hf.py::test_a_model_one_row_short_of_its_tokenizer_is_refused",)),
    Break("tensor_twice_unchecked", "a tensor under both its names (wte.weight, transformer.wte.weight) passes "
          "match_names, refused later as \"in both model.safetensors and model.safetensors\"",
          ((r"if target in mapping\.values\(\):", "if False:"),),
          ("tests/test_hf.py::test_a_tensor_under_both_of_its_names_is_refused",)),
    Break("bf16_warning_bound_loose", "the emulated-bf16 warning needs bf16 matmuls 30x slower than fp32's, not 3x",
          ((r"if speedup >= 1 / 3:", "if speedup >= 1 / 30:"),),
          ("tests/test_kernels.py::test_bf16_warning_starts_below_a_third_of_fp32s_speed",)),
    Break("evaluate_empty_share_not_skipped", "evaluate runs the loss of a DDP rank's empty share of a last batch, which "
          "fails validation with a RuntimeError",
          ((r"^            if len\(batch\):\n", "            if True:\n"),),
          ("tests/test_trainer.py::test_evaluate_skips_a_ranks_empty_share_of_a_last_batch",)),
    Break("hub_id_spaces_in_card", "a Hub id typed with spaces around it is named and linked with them in the converted "
          "card (https://huggingface.co/ org/tiny )",
          ((r"name = str\(source\)\.strip\(\) if on_hub else str\(source\)", "name = str(source)"),),
          ("tests/test_hub.py::test_a_hub_id_with_spaces_around_it_is_named_without_them_in_the_card",)),
    Break("hf_weights_left_strided", "a model loaded from an HF folder keeps its Conv1D weights as transposed views, "
          "not contiguous",
          ((r"owned\[name\] = state\.pop\(name\)\.to\(device=device, dtype=dtype\)\.contiguous\(\)",
            "owned[name] = state.pop(name).to(device=device, dtype=dtype)"),),
          ("tests/test_hf.py::test_weights_loaded_from_an_hf_folder_are_contiguous",)),
    Break("mps_unchecked", "--device mps on a machine without MPS is taken, and the run fails later in torch",
          ((r'^    if kind == "mps" and not torch\.backends\.mps\.is_available\(\):\n', "    if False:\n"),),
          ("tests/test_train_cli.py::test_a_device_this_machine_lacks_is_refused_in_one_line",)),
    Break("curve_draws_null_rows", "the loss curve takes rows whose loss is null (not finite) as points: a gap in the "
          "train line, an empty validation line in the legend",
          ((r"for r in rows if r\.get\(key\) is not None\]", "for r in rows if key in r]"),),
          ("tests/test_trainer.py::test_the_curve_leaves_out_the_rows_whose_loss_is_null",)),
    Break("typed_init_called_default", "an --init typed on the command line is reported \"--init, by default ...\" when "
          "it is the recipe's model",
          ((r'default = recipe and "init" not in args\.given', "default = recipe"),),
          ("tests/test_hub.py::test_train_names_the_flag_whose_default_model_failed",)),
    Break("init_resolved_twice", "a run with a Hub --init asks the Hub again for the folder its card's licence is read "
          "from (a second timeout on a network that does not answer)",
          ((r"model, tokenizer = load_model\(folder\)", "model, tokenizer = load_model(args.init)"),),
          ("tests/test_hub.py::test_a_hub_models_card_comes_with_it_for_its_licence",)),
    Break("generation_new_tokens_past_window", "an export's generation_config.json asks for new tokens (the window less "
          "one) rather than bounding the length: a prompt of two tokens goes past the window",
          ((r'"max_length": window\}', '"max_new_tokens": max(1, window - 1)}'),),
          ("tests/test_hf.py::test_an_export_samples_in_transformers_as_sample_py_does",)),
    Break("export_card_names_tilde", "an export's card names the folder as given (\"~/x\"), which transformers refuses",
          ((r"folder = str\(home_expanded\(out\)\)", "folder = str(out)"),),
          ("tests/test_card.py::test_a_run_folder_card_matches_its_metrics_and_travels_with_the_export",)),
    Break("licence_other_unnamed", "a base card's license: other is carried without its license_name and license_link",
          ((r'more = \{k: meta\[k\] for k in \("license_name", "license_link"\)', 'more = {k: meta[k] for k in ()'),),
          ("tests/test_card.py::test_the_card_states_the_base_models_licence_not_minigpts",)),
    Break("card_example_past_window", "a card's usage example asks transformers for 50 new tokens of a model whose window "
          "holds fewer",
          ((r"min\(50, window // 2\)", "50"),),
          ("tests/test_card.py::test_export_card_says_transformers_and_how_to_use_the_export",)),
    Break("library_init_called_default", "an --init given to TrainFlags in Python is reported \"--init, by default ...\"",
          ((r'default = recipe and "init" not in args\.given', 'default = "init" not in args.given'),),
          ("tests/test_hub.py::test_train_names_the_flag_whose_default_model_failed",)),
    Break('converted_folder_without_card', 'a minigpt folder converted from an HF folder or a Hub id carries no card, so a fine-tune of it states no licence',
          ((r'(\s+)return conversion_card\(name,', r'\1return None if True else conversion_card(name,'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('conversion_card_licence_dropped', "a conversion's card states no licence where the source's card states one",
          ((r'conversion_card\(name, on_hub, card_license\(checkpoint / CARD_FILE\),', r'conversion_card(name, on_hub, {},'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('conversion_card_other_unnamed', "a conversion's card says `other` without the licence's name and link",
          ((r'more = \[licence\[k\] for k in \("license_name", "license_link"\) if k in licence\]', r'more = []'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('minigpt_copy_card_dropped', 'converting a minigpt folder into another drops its model card',
          ((r'save_checkpoint_folder\(out, model, tokenizer, overwrite, card=card\)', r'save_checkpoint_folder(out, model, tokenizer, overwrite)'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('minigpt_copy_usage_of_the_source', "a minigpt copy's card tells users to sample from the folder it was copied from",
          ((r'return _usage_for\(text, folder, window, exported=False\)', r'return text'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('checkpoint_saved_inside_run', "`save_checkpoint_folder` writes into a training run's folder, whose every later --resume then refuses it",
          ((r'^\s*check_outside_runs\(out\)  # \(a folder in a run\'s folder stops every later --resume of the run\)\n', r""),),
          ('tests/test_hf.py::test_saving_never_deletes_other_files_unless_told',)),
    Break('export_hf_inside_run', "`export_hf` writes into a training run's folder, whose every later --resume then refuses it",
          ((r"^\s*check_outside_runs\(out\)  # \(as `save_checkpoint_folder`\)\n", r""),),
          ('tests/test_hf.py::test_saving_never_deletes_other_files_unless_told',)),
    Break('trainer_empty_out', '`Trainer(out="")` trains into the current folder',
          ((r'if not os\.fspath\(out\):  # \(Path\(""\) is "\."', r"if False:  # ("),),
          ('tests/test_trainer.py::test_out_folder_rules',)),
    Break('trainer_device_unresolved', '`Trainer(device="auto")` fails in torch, naming every device type it knows',
          ((r"resolve_device\(device\), ranks,", r"torch.device(device), ranks,"),),
          ('tests/test_trainer.py::test_out_folder_rules',)),
    Break('unknown_precision_keyerror', '`available_kernels("fp64")` is a KeyError',
          ((r"if precision not in LAYOUTS:", r"if False:"),),
          ('tests/test_kernels.py::test_a_forced_kernel_that_cannot_run_says_why',)),
    Break('int8_advice_on_cpu', 'a torch build without int8mm tells a CPU user to try `--device cpu`',
          ((r'\("" if device\.type == "cpu" else " \(try --device cpu\)"\)', r'" (try --device cpu)"'),),
          ('tests/test_kernels.py::test_a_forced_kernel_that_cannot_run_says_why',)),
    Break('library_device_named_as_flag', "`resolve_device` (`load_model(device=...)`) names its argument as train.py's flag, --device, from Python",
          ((r'int = "auto", what: str = "device"\) -> torch\.device:', r'int = "auto", what: str = "--device") -> torch.device:'),),
          ('tests/test_train_cli.py::test_a_device_is_named_as_torch_names_it',)),
    Break('cli_device_named_as_python', "the CLIs' device errors name `device='cuda'`, not their own flag --device",
          ((r'^CLI_NAMES = \("--device", "--dtype"\)', r'CLI_NAMES = ("device", "dtype")'),),
          ('tests/test_train_cli.py::test_cuda_where_there_is_none_is_one_line_and_exit_2',)),
    Break('data_config_named_as_flags', "DataConfig's errors name train.py's flags (--block-size), not its fields, from Python",
          ((r'raise MinigptError\(f"DataConfig: block_size must be at least 2, got', r'raise MinigptError(f"--block-size: must be at least 2, got'),),
          ('tests/test_data.py::test_bad_settings_name_their_field',)),
    Break('block_size_one_reaches_the_library', "train.py --block-size 1 passes argparse and is refused in DataConfig's words",
          ((r'run=True, metavar="N", type=block_length\)', r'run=True, metavar="N", type=positive_int)'),),
          ('tests/test_data.py::test_bad_settings_name_their_field',)),
    Break('hub_minigpt_card_refused', 'a minigpt checkpoint on the Hub cannot be converted or exported: its cached README.md, a link to a blob, is refused as a file from elsewhere',
          ((r'if card\.is_symlink\(\) and not is_hub_id\(source\):', r'if card.is_symlink():'),),
          ('tests/test_hub.py::test_a_hub_models_card_comes_with_it_for_its_licence',)),
    Break('relative_licence_link_dangles', "a Hub card's relative license_link (LICENSE) is copied as it is, naming a file the converted folder lacks",
          ((r'if "://" not in more\.get\("license_link", "://"\) and snapshot\.parent\.name == "snapshots":', r'if False:'),),
          ('tests/test_hub.py::test_a_hub_models_card_comes_with_it_for_its_licence',)),
    Break('user_sections_after_usage_dropped', 'a section the user added after the card\'s "How to use" is dropped by a copy or an export',
          ((r'rest = "" if after == -1 else "\\n" \+ text\[after \+ 1:\]', r'rest = ""'),),
          ('tests/test_card.py::test_a_converted_folder_states_the_sources_licence_and_so_does_its_fine_tune',)),
    Break('live_run_folder_unseen', "an output inside a live run's folder before its first save is written (its later --resume refuses the folder)",
          ((r' or _held_by_a_run\(folder / LOCK_FILE\)', r''),),
          ('tests/test_run_lock.py::test_a_second_lock_is_refused_naming_the_holder',)),
    Break('any_lock_file_is_a_run', "any folder holding a file named .lock (pytest's temporary folders) is taken for a training run's",
          ((r'return not lock\.is_symlink\(\) and lock\.read_bytes\(\)\[:64\]\.decode\("ascii", "replace"\)\.split\(\)\[1:\] == \[TRAINING\]', r'return lock.is_file()'),),
          ('tests/test_run_lock.py::test_a_second_lock_is_refused_naming_the_holder',)),
    Break('quantize_choices_as_a_tuple', 'an unknown quantize scheme lists its choices as a Python tuple, naming the CLI flag',
          ((r'''raise MinigptError\(f"quantize: unknown scheme \{quantize!r\} \(choose from \{', '\.join\(QUANTIZATIONS\)\}\)"\)''', r'raise MinigptError(f"--quantize: unknown scheme {quantize!r} (choose from {QUANTIZATIONS})")'),),
          ('tests/test_kernels.py::test_a_forced_kernel_that_cannot_run_says_why',)),
    Break("eos_text_printed", "an answer that ends at the EOS token prints that token's text (EOS is streamed as text)",
          ((r"piece = \"\" if finished\[row\] else streams\[row\]\.push\(token\)", "piece = streams[row].push(token)"),),
          ("tests/test_sample_cli.py::test_an_answer_that_ends_at_eos_prints_no_eos_text",)),
    Break("text_stream_shared", "--num-samples N shares one TextStream: characters split across tokens are garbled",
          ((r"\[TextStream\(tokenizer\) for _ in range\(num_samples\)\]", "[TextStream(tokenizer)] * num_samples"),),
          ("tests/test_sample_cli.py::test_each_sample_streams_its_own_characters",)),
    Break("filters_in_model_dtype", "a bf16 model's logits are filtered in bf16 (top-p keeps fewer candidates than transformers')",
          ((r"scores = logits\.float\(\)", "scores = logits"),),
          ("tests/test_sampling.py::test_a_bf16_models_logits_are_filtered_in_fp32_as_transformers_does",)),
    Break("export_eos_hardcoded", "an export's generation_config.json names 50256 as EOS and BOS whatever its tokenizer's EOS",
          ((r"SamplingConfig\(\)\.to_hf\(tokenizer\.eos_id,", "SamplingConfig().to_hf(50256,"),),
          ("tests/test_hf.py::test_an_exports_eos_and_bos_are_its_tokenizers",)),
    Break("colour_band_strict", "a probability at a band's lower edge takes the band below (0.5 yellow), and 0 matches none (StopIteration)",
          ((r"if prob >= lowest\)", "if prob > lowest)"),),
          ("tests/test_trace.py::test_each_probability_band_begins_at_its_lower_edge_and_zero_is_red",)),
    Break("max_new_tokens_default", "--max-new-tokens defaults to 50 where README states 100",
          ((r"max_new_tokens: int = flag\(100,", "max_new_tokens: int = flag(50,"),),
          ("tests/test_sample_cli.py::test_readmes_sampling_defaults_are_sample_pys",)),
    Break("export_bos_dropped", "an export's generation_config.json names no BOS: transformers' generate() without a prompt fails",
          ((r"\"bos_token_id\": eos_token_id, ", ""),),
          ("tests/test_hf.py::test_an_export_generates_without_a_prompt_from_eos",)),
    Break("score_in_model_dtype", "--score takes a bf16 model's log-softmax in bf16 (another loss than transformers')",
          ((r"scores = logits\[start : start \+ SCORE_CHUNK\]\.float\(\)", "scores = logits[start : start + SCORE_CHUNK]"),),
          ("tests/test_trace.py::test_a_bf16_models_score_is_the_fp32_loss_of_its_logits",)),
    Break("kv_cache_counted_once", "the memory check counts the KV cache's keys but not its values (half its bytes)",
          ((r"cache = 2 \* c\.n_layer \* num_samples", "cache = c.n_layer * num_samples"),),
          ("tests/test_sampling.py::test_the_kv_cache_estimate_is_the_bytes_the_cache_allocates",)),
    Break("bin_before_safetensors", "an HF folder holding model.safetensors and pytorch_model.bin loads the .bin (transformers reads the safetensors)",
          ((r"\(\(WEIGHTS_FILE, INDEX_FILE\), \(LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE\)\)",
            "((LEGACY_WEIGHTS_FILE, LEGACY_INDEX_FILE), (WEIGHTS_FILE, INDEX_FILE))"),),
          ("tests/test_hf.py::test_a_folder_with_safetensors_and_a_bin_loads_the_safetensors_as_transformers_does",)),
    Break("long_prompt_warning_late", "a prompt one token longer than the window loses its first token without a warning",
          ((r"if len\(ids\) > window:", "if len(ids) > window + 1:"),),
          ("tests/test_sample_cli.py::test_a_prompt_warns_from_one_token_past_the_window",)),
    Break("decode_rate_counts_prefill", "--stats' decode rate counts each sample's prefill token as decoded",
          ((r"decoded = sum\(counts\) - num_samples", "decoded = sum(counts)"),),
          ("tests/test_sample_cli.py::test_the_decode_rate_leaves_out_the_prefills_tokens",)),
    Break("flush_dropped", "a sample cut off inside a character drops its held-back bytes (decode ends it with U+FFFD)",
          ((r"return self\.decoder\.decode\(b\"\", final=True\)", "return \"\""),),
          ("tests/test_sampling.py::test_a_stream_cut_inside_a_character_ends_as_decode_ends_it",)),
    Break("greedy_filters_silent", "SamplingConfig(greedy=True, temperature=0.5) decodes greedily without a word",
          ((r"^(\s*)if unused:\n", r"\1if False:\n"),),
          ("tests/test_sampling.py::test_sampling_config_warns_of_filters_greedy_decoding_ignores",)),
    Break("lr_zero_refused", "AdamW refuses lr 0 (a warm-up checkpoint saved at step 0 stores it, and its --resume fails)",
          ((r'^    if not group\["lr"\] >= 0:', r'    if not group["lr"] > 0:'),),
          ("tests/test_optim.py::test_lr_zero_is_taken_as_torch_takes_it_and_a_warm_up_state_with_lr_0_loads",)),
    Break("zero_grad_noop", "AdamW.zero_grad(set_to_none=False) leaves the gradients, which add up over backwards",
          ((r"^(\s*)p\.grad\.zero_\(\)$", r"\1pass"),),
          ("tests/test_optim.py::test_zero_grad_without_none_zeroes_the_gradients_as_torch_does",)),
    Break("frozen_params_in_groups", "param_groups puts frozen parameters (requires_grad=False) in the groups, and AdamW gives them moments",
          ((r"params = \[p for p in model\.parameters\(\) if p\.requires_grad\]", r"params = [p for p in model.parameters()]"),),
          ("tests/test_optim.py::test_a_frozen_parameter_is_in_no_group_and_gets_no_moments",)),
    Break("scaler_unscale_dropped", "fp16 steps clip and log the scaled gradients (no GradScaler.unscale_ before the clipping)",
          ((r"^(\s*)self\.scaler\.unscale_\(self\.optimizer\)", r"\1pass"),),
          ("tests/test_promises.py::test_fp16_skipped_steps_reach_metrics",)),
    Break("skipped_not_restored", "a resume restores the step but not the count of skipped fp16 steps (0 again)",
          ((r'self\.step, self\.skipped_steps = int\(info\["step"\]\), int\(info\["skipped_steps"\]\)', r'self.step = int(info["step"])'),),
          ("tests/test_promises.py::test_fp16_skipped_steps_are_kept_over_a_resume",)),
    Break("max_grad_norm_not_run", "--max-grad-norm is no run setting: a --resume with another value is taken silently",
          ((r'(max_grad_norm: float = flag\(1\.0, "clip the gradient norm to this; 0: no clipping", group="optimisation"), run=True,', r"\1,"),),
          ("tests/test_train_cli.py::test_a_resume_compares_exactly_the_settings_readme_lists",
           "tests/test_train_cli.py::test_a_resume_with_other_settings_names_them_readably")),
    Break("warmup_not_run", "--warmup-steps is no run setting: a --resume with another value is taken silently",
          ((r'(warmup_steps: int = flag\(0, "linear warm-up steps before the linear decay", group="optimisation"), run=True,', r"\1,"),),
          ("tests/test_train_cli.py::test_a_resume_compares_exactly_the_settings_readme_lists",)),
    Break("data_order_seed_dropped", "--seed no longer decides the batch order (every run shuffles with the iterator's default 42)",
          ((r"BatchIterator\(train_blocks, global_micro, seed=args\.seed, \*\*shard\)", r"BatchIterator(train_blocks, global_micro, **shard)"),),
          ("tests/test_train_cli.py::test_the_seed_decides_the_batch_order",)),
    Break("steps_per_epoch_floor", "an epoch is counted in whole --grad-accum steps (floor): --epochs 1 --grad-accum 3 stops at epoch 0.8571",
          ((r"steps_per_epoch = math\.ceil\(len\(train_batches\) / args\.grad_accum\)", r"steps_per_epoch = len(train_batches) // args.grad_accum"),),
          ("tests/test_train_cli.py::test_an_epoch_whose_batches_do_not_divide_by_grad_accum_ends_with_a_shorter_step",)),
    Break("preset_epochs", "--preset tiny trains 10 epochs while its --help says 12",
          ((r"warmup_steps=20, epochs=12,", r"warmup_steps=20, epochs=10,"),),
          ("tests/test_train_cli.py::test_the_presets_help_states_what_it_sets",)),
    Break("val_data_max_records", "--max-records cuts an explicit --val-data too, silently",
          ((r'^        val_src = Source\.resolve\(cfg\.val_source, "--val-data", None\)', r'        val_src = Source.resolve(cfg.val_source, "--val-data", cfg.max_records)'),),
          ("tests/test_data.py::test_max_records_cuts_the_training_source_not_an_explicit_validation_source",)),
    Break("card_final_not_finished", "every finished run's card says \"(the run is not finished)\"",
          ((r"finished = step >= facts\.max_steps", r"finished = step > facts.max_steps"),),
          ("tests/test_card.py::test_card_of_an_evaluated_checkpoint",)),
    Break("no_fsync_tree", "atomic_folder renames the new folder into place without fsyncing what was written in it",
          ((r"^        fsync_tree\(tmp\)\n", r""),),
          ("tests/test_files.py::test_atomic_folder_syncs_every_file_and_folder_before_the_rename",)),
    Break("eval_only_no_autocast", "--eval-only --dtype bf16 computes the loss in fp32 (evaluate is given no autocast)",
          ((r"loss = evaluate\(model\.to\(device\), lm_loss, batches, device, autocast, ranks\)", r"loss = evaluate(model.to(device), lm_loss, batches, device, None, ranks)"),),
          ("tests/test_eval_only.py::test_eval_only_in_emulated_bf16_warns_as_training_does",)),
    Break("hub_blob_id_without_header", "a small file's download (config.json, named by its git blob id) is hashed "
          "without git's \"blob <size>\\0\" header: every one is refused as changed on the way and removed",
          ((r"digest = hashlib\.sha1\(b\"blob %d\\0\" % link\.stat\(\)\.st_size\)", "digest = hashlib.sha1()"),),
          ("tests/test_hub.py::test_a_small_files_download_is_checked_by_its_git_blob_id",)),
    Break("hub_small_files_unchecked", "a small file's download (named by its git blob id, not a sha256) is not "
          "checked: one changed on the way is kept in the cache",
          ((r"elif re\.fullmatch\(r\"\[0-9a-f\]\{40\}\", blob\.name\):", "elif False:"),),
          ("tests/test_hub.py::test_a_small_files_download_is_checked_by_its_git_blob_id",)),
    Break("lock_holder_line_not_truncated", "a lock holder writes its line over a killed holder's longer one without "
          "truncating: the tail stays, and a refused run names \"another process\"",
          ((r"^    os\.ftruncate\(fd, 0\)\n    os\.write", "    os.write"),),
          ("tests/test_run_lock.py::test_a_killed_holders_longer_line_is_overwritten_whole",)),
    Break("kernel_choice_key_without_batch_size", "the kernels timed for one batch size are reused, untimed, for "
          "another (the batch size left out of the choice's cache key)",
          ((r"ws\[0\]\[0\]\.shape, batch_size, torch\.get_num_threads\(\),", "ws[0][0].shape, torch.get_num_threads(),"),),
          ("tests/test_kernels.py::test_a_choice_timed_for_one_batch_size_is_not_reused_for_another",)),
    Break("licence_name_without_other", "a base card's license_name and license_link are carried with any licence id, "
          "not only with license: other",
          ((r"if licence == \"other\" and isinstance", "if isinstance"),),
          ("tests/test_card.py::test_a_licence_name_and_link_are_carried_only_with_license_other",)),
    Break("lock_on_a_removed_file_kept", "a run whose lock file was removed between its open and its lock holds a lock "
          "on a file nobody can find: a second run makes a new one and trains in the same folder",
          ((r"if os\.fstat\(fd\)\.st_ino == os\.stat\(self\.path\)\.st_ino:", "if True:"),),
          ("tests/test_run_lock.py::test_a_lock_file_removed_between_its_open_and_its_lock_is_not_the_one_held",)),
    Break("conversion_removes_a_runs_lock", "a conversion that made the lock file removes whatever lock file is there "
          "when done, a run's that took its place meanwhile too",
          ((r"if made and os\.stat\(path\)\.st_ino == os\.fstat\(fd\)\.st_ino:", "if made:"),),
          ("tests/test_run_lock.py::test_a_conversion_removes_only_its_own_lock_file",)),
    Break("unlinked_step_picked_among_several", "a run folder with two step folders and no .ckpt/current link is "
          "resumed from whichever the listing gives first (maybe the older), and its next save deletes the other",
          ((r"return steps\[0\] if len\(steps\) == 1 and", "return steps[0] if len(steps) >= 1 and"),),
          ("tests/test_run_lock.py::test_step_folders_without_a_current_link_resume_only_a_lone_complete_one",)),
    Break("export_card_library_name_twice", "an export's card adds library_name: transformers after the run's "
          "library_name: minigpt (the key twice: a strict YAML parser refuses the metadata)",
          ((r"if re\.search\(r\"\^library_name:\.\*\$\", meta, re\.MULTILINE\):", "if False:"),),
          ("tests/test_card.py::test_export_card_replaces_the_library_name_not_adds_a_second",)),
    Break("metrics_rows_keep_non_finite", "a metrics row keeps an inf / NaN in MetricsLog.rows (the card's rows) where the file holds null, as a resumed run reads it",
          ((r"self\.rows\.append\(json\.loads\(line\)\)", r"self.rows.append(row)"),),
          ("tests/test_trainer_syncs.py::test_strict_json_writes_null_for_non_finite_numbers_and_refuses_nested_ones",)),
    Break("int8mm_twin_without_scales", "the int8mm twin of an int8 layer (the int8 step whose products inductor writes) "
          "is built from q without its scales",
          ((r"return Int8Linear\(q\.float\(\) \* inner\.scale\.float\(\)\.unsqueeze\(1\), inner\.bias",
            "return Int8Linear(q.float(), inner.bias"),),
          ("tests/test_compiled_decoding.py::test_an_int8_layers_int8mm_twin_has_its_q_and_bias_and_its_scales_in_bf16",
           "tests/test_compiled_decoding.py::test_int8_layers_race_a_step_whose_int8_products_inductor_writes")),
    Break("int8_without_inductor_step", "compiled decoding of an int8 model on the CPU races no step whose int8 products "
          "inductor writes (1.35x slower on the Zen 4)",
          ((r"for m in layers\) or int8_frozen\)", "for m in layers))"),),
          ("tests/test_compiled_decoding.py::test_int8_layers_race_a_step_whose_int8_products_inductor_writes",)),
    Break("describe_names_one_other_step", "compiled decoding's line (--compile on stderr) names the time of one step "
          "beside the chosen one where three were raced",
          ((r"for k, t in timed\.items\(\) if k != self\.chosen\)", "for k, t in list(timed.items())[:2] if k != self.chosen)"),),
          ("tests/test_compiled_decoding.py::test_int8mm_layers_race_a_step_with_fbgemm_on_every_layer",)),
    Break("finite_check_by_the_sum_alone", "the logits' finite check trusts their sum alone: finite logits whose sum "
          "overflows (a model with huge but finite logits) are refused as not finite",
          ((r"if not math\.isfinite\(logits\.sum\(dtype=torch\.float32\)\) and not bool\(logits\.isfinite\(\)\.all\(\)\):",
            "if not math.isfinite(logits.sum(dtype=torch.float32)):"),),
          ("tests/test_sampling.py::test_the_finite_check_reads_every_logit_and_no_overflowing_sum",)),
    Break("int8_twins_of_any_width", "compiled decoding makes int8mm twins for a model whose layer widths int8mm refuses "
          "(not multiples of 16): CompiledDecoding of such an int8 model fails with int8mm's refusal",
          ((r"and not any\(int8mm_refuses\(\"int8mm\", width\) for width in widths\)\)", "and True)"),),
          ("tests/test_compiled_decoding.py::test_only_fp32_and_int8_on_the_cpu_offer_inductor_gemms",)),
    Break("auto_device_skips_gpu", "--device auto takes the CPU (or MPS) on a machine with CUDA",
          ((r"^        if torch\.cuda\.is_available\(\):\n            return torch\.device\(\"cuda\"\)\n", ""),),
          ("tests/test_train_cli.py::test_auto_picks_cuda_then_mps_then_the_cpu_and_bf16_where_the_gpu_has_it",)),
    Break("auto_dtype_fp32_on_gpu", "--dtype auto is fp32 on a GPU that computes bf16",
          ((r'if device\.type == "cuda" and torch\.cuda\.is_bf16_supported\(\):', "if False:"),),
          ("tests/test_train_cli.py::test_auto_picks_cuda_then_mps_then_the_cpu_and_bf16_where_the_gpu_has_it",)),
)


def apply(brk: Break, copy: Path) -> list[str]:
    """Apply `brk`'s edits to the copy's minigpt/; returns the problems (empty: applied)."""
    files = sorted((copy / "minigpt").rglob("*.py"))
    texts = {f: f.read_text() for f in files}
    problems = []
    for pattern, replacement in brk.edits:
        hits = 0
        for f in files:
            texts[f], n = re.subn(pattern, replacement, texts[f], flags=re.MULTILINE)
            hits += n
        if hits == 0:
            problems.append(f"pattern not found in minigpt/: {pattern!r}")
    for f in files:
        if texts[f] != f.read_text():
            f.write_text(texts[f])
            try:
                py_compile.compile(str(f), doraise=True)
            except py_compile.PyCompileError as e:
                problems.append(f"the edit breaks the syntax of {f.relative_to(copy)}: {e.msg.strip()}")
    return problems


def run_tests(copy: Path, nodes: list[str], tmp: Path) -> tuple[list[str], list[str], str]:
    """Run `nodes` in `copy`; returns (failed node ids, errored node ids, pytest's summary line)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "MINIGPT_CACHE": str(tmp / "cache")}
    result = subprocess.run(  # (-n 0: one process; starting two test processes for each break's few tests costs more)
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "--tb=no", "-rfE",
         "--basetemp", str(tmp / "pytest"), *nodes],
        cwd=copy, env=env, capture_output=True, text=True, timeout=1800,
    )
    lines = result.stdout.splitlines()
    failed = [line.split()[1] for line in lines if line.startswith("FAILED ")]
    errored = [line.split()[1] for line in lines if line.startswith("ERROR ")]
    summary = next((line for line in reversed(lines) if line.strip()), result.stderr.strip()[-300:])
    if result.returncode not in (0, 1):  # 2-5: interrupted, internal or usage error, nothing collected
        errored.append(f"pytest exit status {result.returncode}: {summary}")
    return failed, errored, summary.strip("= ")


def grouped(nodes: list[str]) -> dict[str, list[str]]:
    """Node ids by test function: {"tests/x.py::test_y": ["case1", "case2"]} ([] when not parametrized)."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        test, _, case = node.partition("[")
        out.setdefault(test, [])
        if case:
            out[test].append(case.rstrip("]"))
    return out


def fresh_copy(parent: Path) -> Path:
    copy = parent / "repo"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ROOT, copy, ignore=IGNORE)
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these breaks (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    args = parser.parse_args(argv)
    known = {b.name: b for b in BREAKS}
    if args.list:
        for b in BREAKS:
            print(f"{b.name:28} {b.what}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown break(s): {', '.join(unknown)} (see --list)")
    breaks = [known[n] for n in args.names] if args.names else list(BREAKS)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="minigpt-mutations-") as tmp_name:
        tmp = Path(tmp_name)
        copy = fresh_copy(tmp)
        check = subprocess.run([sys.executable, "-c", "import minigpt; print(minigpt.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not check.stdout.strip().startswith(str(copy)):
            print(f"error: the copy's minigpt is not the one imported ({check.stdout.strip() or check.stderr.strip()})")
            return 2
        nodes = sorted({node for b in breaks for node in b.tests})
        failed, errored, summary = run_tests(copy, nodes, tmp)
        print(f"unmodified copy: {len(nodes)} targeted test nodes: {summary}")
        if failed or errored:
            print("error: the targeted tests must pass on the unmodified code first:")
            for node in failed + errored:
                print(f"    {node}")
            return 2

        not_caught = []
        for b in breaks:
            copy = fresh_copy(tmp)
            problems = apply(b, copy)
            if problems:
                print(f"[NOT APPLIED] {b.name}: {b.what}")
                for p in problems:
                    print(f"    {p}")
                not_caught.append(b.name)
                continue
            failed, errored, summary = run_tests(copy, list(b.tests), tmp)
            status = "caught" if failed else "NOT CAUGHT"
            print(f"[{status}] {b.name}: {b.what}  ({summary})")
            for test, cases in grouped(failed).items():
                print(f"    failed: {test}" + (f"  [{', '.join(cases)}]" if cases else ""))
            for node in errored:
                print(f"    error (does not count as caught): {node}")
            if not failed:
                not_caught.append(b.name)
    minutes = (time.monotonic() - started) / 60
    print(f"{len(breaks) - len(not_caught)} of {len(breaks)} breaks caught ({minutes:.1f} min)"
          + (f"; not caught or not applied: {', '.join(not_caught)}" if not_caught else ""))
    return 1 if not_caught else 0


if __name__ == "__main__":
    sys.exit(main())
