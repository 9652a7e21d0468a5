"""LoRA adaptation and delta checkpoints (modeling/adapters.py, the trainer's --lora-rank).

Checked against independent paths: a fresh adapter computes exactly the base model (B = 0);
the adapted forward equals a float64 recomputation of W + scale B A; merging gives the
unmerged model's logits; the delta checkpoint stores only the trained tensors, refuses a
different base (sha256), loads into a plain model; a LoRA run resumes bit for bit and
lowers the NELBO with the base frozen.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from did_engine import LlamaBlockDiffusionLM, load_model
from did_engine.errors import UserError
from did_engine.modeling.adapters import (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LoRALinear, LoRASettings,
                                          apply_lora, has_adapters, merge_lora, trainable_state)
from did_engine.modeling.checkpoint import CheckpointError, load_safetensors
from did_engine.training.trainer import Trainer

transformers = pytest.importorskip("transformers", reason="the Llama directories are written with transformers")

from support.hf_llama import random_ours, tokens_for, write_byte_llama  # noqa: E402
from tests.training.test_train_llama import _config, _nelbo, _run_state, byte_data, llama_dir  # noqa: E402,F401


def _perturbed(model, seed=3):
    """Give every LoRA pair and trainable tensor random values (B = 0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_state(model).values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def test_a_fresh_adapter_is_the_base_and_only_adapters_train():
    base = random_ours("qwen3")
    adapted = apply_lora(random_ours("qwen3"), LoRASettings(rank=4))
    x = tokens_for(base, (2, 16), masked=0.3)
    torch.testing.assert_close(adapted(x, block_size=4), base(x, block_size=4), rtol=0, atol=1e-5)
    trained = trainable_state(adapted)
    assert trained and all(("lora_" in n or "norm" in n or n.endswith("mask_row")) for n in trained)
    frozen = [n for n, p in adapted.named_parameters() if not p.requires_grad]
    assert "model.embed_tokens.weight" in frozen and any(n.endswith("q_proj.weight") for n in frozen)


def test_lora_linear_matches_a_float64_recomputation_and_merges():
    torch.manual_seed(0)
    linear = torch.nn.Linear(13, 7, bias=True)
    lora = LoRALinear(linear, rank=3, scale=2.5)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 13)
    w = linear.weight.double() + 2.5 * lora.lora_B.double() @ lora.lora_A.double()
    want = x.double() @ w.T + linear.bias.double()
    torch.testing.assert_close(lora(x).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.merged()(x).double(), want, rtol=1e-5, atol=1e-5)


def test_merged_model_has_the_unmerged_logits_and_base_names():
    adapted = _perturbed(apply_lora(random_ours("llama"), LoRASettings(rank=4, alpha=8.0)))
    x = tokens_for(adapted, (2, 24), masked=0.4)
    want = adapted(x, block_size=4)
    names = set(random_ours("llama").state_dict())
    merge_lora(adapted)
    assert not has_adapters(adapted) and set(adapted.state_dict()) == names
    # The mask's own logit is not compared: SUBS removes it (and the merged table's mask row
    # doubles as that output row, which the unmerged model reads from the frozen table).
    keep = torch.arange(want.shape[-1]) != adapted.mask_id
    torch.testing.assert_close(adapted(x, block_size=4)[..., keep], want[..., keep], rtol=1e-4, atol=1e-4)


def test_bad_settings_name_the_argument():
    with pytest.raises(UserError, match="rank"):
        LoRASettings(rank=0)
    with pytest.raises(UserError, match="targets"):
        LoRASettings(targets=("qkv",))


def _lora_config(data, out, model, **overrides):
    return _config(data, out, model, lora_rank=4, lr=1e-2, **overrides)


def test_a_lora_run_lowers_the_nelbo_with_the_base_frozen_and_saves_a_delta(llama_dir, byte_data, tmp_path):
    before = load_model(llama_dir)
    result = Trainer(_lora_config(byte_data, tmp_path / "run", llama_dir, max_steps=12, ema=0.0)).fit()
    final = result["final"]
    assert set(os.listdir(final)) == {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "tokenizer.json"}
    stored = load_safetensors(os.path.join(final, ADAPTER_WEIGHTS_NAME))
    assert all("lora_" in n or "norm" in n or n.endswith("mask_row") for n in stored)
    n_stored = sum(t.numel() for t in stored.values())
    assert n_stored < before.num_parameters() / 3
    after = load_model(final)  # base + adapter, merged
    assert type(after) is LlamaBlockDiffusionLM and not has_adapters(after)
    nelbo_before, nelbo_after = _nelbo(before, byte_data), _nelbo(after, byte_data)
    print(f"LoRA: NELBO {nelbo_before:.3f} -> {nelbo_after:.3f}, {n_stored} of {before.num_parameters()} stored")
    assert nelbo_after < 0.9 * nelbo_before
    with open(os.path.join(final, ADAPTER_CONFIG_NAME)) as f:
        meta = json.load(f)
    assert meta["base"]["spec"] == os.path.abspath(llama_dir) and len(meta["base"]["sha256"]) == 64


def test_a_changed_base_is_refused(llama_dir, byte_data, tmp_path):
    base = tmp_path / "base"
    write_byte_llama(base, "llama")
    final = Trainer(_lora_config(byte_data, tmp_path / "run", str(base), max_steps=2, ema=0.0)).fit()["final"]
    load_model(final)
    write_byte_llama(base, "llama", seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(final)


def test_a_lora_run_resumes_bit_for_bit(llama_dir, byte_data, tmp_path):
    whole = Trainer(_lora_config(byte_data, tmp_path / "whole", llama_dir))
    whole.fit()
    Trainer(_lora_config(byte_data, tmp_path / "halves", llama_dir, max_steps=3)).fit()
    second = Trainer(_lora_config(byte_data, tmp_path / "halves", llama_dir))
    checkpoint = second.maybe_resume()
    assert os.path.isfile(os.path.join(checkpoint, ADAPTER_WEIGHTS_NAME))
    assert not os.path.exists(os.path.join(checkpoint, "model.safetensors"))  # a delta, not the whole model
    second.fit()
    a, b = _run_state(whole), _run_state(second)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:4]}"
