"""Helpers of the Llama-family tests: tiny transformers causal LMs with random weights, our
model over the same weights, and the comparisons the exactness tests use."""

from __future__ import annotations

import pytest
import torch

from did_engine.modeling.hf_checkpoints import _state_dict_sources, build_llama, llama_config_from_hf
from did_engine.modeling.llama import LlamaBlockConfig, LlamaBlockDiffusionLM

transformers = pytest.importorskip("transformers", reason="the exactness tests compare against transformers")

# Tiny configurations with grouped-query heads (4 query heads on 2 K/V heads).
COMMON = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rope_theta=1000.0, rms_norm_eps=1e-5)
KINDS = {
    # name: (config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=1)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
}


def hf_model(kind: str, seed: int = 0, attn: str = "eager", **overrides):
    """A transformers causal LM of ``kind`` with every parameter random (norms near 1)."""
    config_name, model_name, extra = KINDS[kind]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name} (Qwen3 needs >= 4.51)")
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3 if p.dim() > 1 else 0.1)
    return model


def ours_from(hf, shift: bool = True, **overrides) -> LlamaBlockDiffusionLM:
    """Our model holding hf's weights (through the loader's config mapping and weight
    checks); ``shift`` False gives an SDAR-style model over the same weights."""
    config, _ = llama_config_from_hf(hf.config.to_dict(), "test", mask_id=hf.config.vocab_size - 1)
    config = LlamaBlockConfig.from_dict({**config.to_dict(), "logit_shift": shift, **overrides})
    return build_llama(config, _state_dict_sources(hf.state_dict()), "test")


def random_ours(kind="qwen3", shift=True, seed=0, **overrides) -> LlamaBlockDiffusionLM:
    return ours_from(hf_model(kind, seed), shift, **overrides)


def tokens_for(model, shape, seed=1, masked=0.0):
    """Random ids below the mask id; a fraction ``masked`` set to the mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.mask_id, shape, generator=g)
    return x.masked_fill(torch.rand(shape, generator=g) < masked, model.mask_id)


def check_close(got, want, tol=1e-4):
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"max abs difference {err:.3g} > {tol:g}"


def same(got, want):
    """Two of our forwards computing the same thing by other paths: equal up to float32
    rounding relative to the logits' scale."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, scale))


def check_shifted(ours_logits, hf_logits, tol=1e-4):
    """A shift model's logits at i are the causal LM's at i - 1; position 0 is all zeros."""
    check_close(ours_logits[:, 1:], hf_logits[:, :-1], tol)
    assert torch.equal(ours_logits[:, 0], torch.zeros_like(ours_logits[:, 0]))


# -- a tiny Llama-family Hugging Face directory whose tokens are UTF-8 bytes --------------------

BYTES_EOS = 256  # as tests/support/training_data.py: bytes 0..255, then <|endoftext|>


def _byte_characters() -> list:
    """GPT-2's printable stand-in character of each byte 0..255 (the ByteLevel pre-tokenizer's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_tokenizer():
    """A `tokenizers` byte-level tokenizer whose ids are the UTF-8 bytes of the text (no
    merges) and 256 = <|endoftext|>: the ids of the training tests' byte datasets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: b for b, c in enumerate(_byte_characters())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    assert tokenizer.token_to_id("<|endoftext|>") == BYTES_EOS
    return tokenizer


def write_byte_llama(directory, kind: str = "llama", seed: int = 0, model_type: str | None = None, **config) -> str:
    """A random transformers causal LM of ``kind`` over the byte vocabulary (257 tokens),
    saved with save_pretrained, with the byte tokenizer (tokenizer.json and
    tokenizer_config.json, as transformers writes them); ``model_type`` relabels config.json
    (e.g. "sdar", with a <|MASK|> token added to the tokenizer). Returns the directory."""
    import json
    import os

    tokenizer = byte_tokenizer()
    if model_type == "sdar":
        tokenizer.add_special_tokens(["<|MASK|>"])  # id 257
    hf = hf_model(kind, seed, vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=64, **config)
    hf.save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                         bos_token="<|endoftext|>").save_pretrained(directory)
    if model_type:
        path = os.path.join(directory, "config.json")
        raw = json.load(open(path))
        json.dump({**raw, "model_type": model_type}, open(path, "w"))
    return str(directory)
