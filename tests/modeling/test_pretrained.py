"""The embedded DiT (dit-mini, the default until 0.2): loads by name, carries its tokenizer, and has
learned English."""

from __future__ import annotations

import json
import os

import torch

from did_engine.cli import main
from did_engine.data.format import wrap_documents
from did_engine.data.tokenizer import Tokenizer
from did_engine.modeling.dit import BlockDiffusionLM
from did_engine.pretrained import embedded_model_path
from did_engine import evaluate_nelbo

# Written for this test (not from the training corpus): plain English prose.
PROSE = (
    "The river runs past the old mill and under the stone bridge, where the children of the town "
    "gather in the summer to watch the boats go by. In the evening the light falls across the water "
    "and the fishermen return with their nets. The people of the valley have lived here for many "
    "hundreds of years, and the history of their land is written in the names of its fields and "
    "hills. The church was built in the twelfth century, and the market is held every week in the "
    "square before it. Many of the families who farm the land today are descended from those who "
    "settled there first, and they speak of the great flood and the hard winter as if they had seen "
    "them with their own eyes. The school teaches the children to read and write, and the library "
    "holds the records of the town, its laws and its wars, its kings and its saints. "
)


def _sequences(tok, model, text, n):
    ids = tok.encode(text)
    seq = wrap_documents([ids * 2], model.config.model_length, tok.bos_id, tok.eos_id)[:1]
    return torch.from_numpy(seq.astype("int64")).repeat(n, 1)  # [n, L]: one text, n noise draws


def test_dit_mini_loads_by_name_with_its_tokenizer():
    model = BlockDiffusionLM.from_pretrained("dit-mini")
    tok = Tokenizer.from_file(embedded_model_path("dit-mini"))
    assert model.config.vocab_size == tok.vocab_size + 1  # + the mask id
    assert os.path.isfile(os.path.join(embedded_model_path("dit-mini"), "MODEL_CARD.md"))
    assert os.path.getsize(os.path.join(embedded_model_path("dit-mini"), "model.safetensors")) < 50e6


def test_dit_mini_prefers_real_prose_to_the_same_tokens_shuffled():
    """A trained model's NELBO on unseen English is far below the uniform log(V) and below
    the NELBO of the same tokens in a random order; a random model's is not."""
    model = BlockDiffusionLM.from_pretrained("dit-mini")
    tok = Tokenizer.from_file(embedded_model_path("dit-mini"))
    real = _sequences(tok, model, PROSE, 8)
    gen = torch.Generator().manual_seed(0)
    body = real[:, 1:-1]
    shuffled = real.clone()
    shuffled[:, 1:-1] = body[:, torch.randperm(body.shape[1], generator=gen)]
    with torch.no_grad():
        nelbo_real = evaluate_nelbo(model, real, block_size=4, generator=torch.Generator().manual_seed(1))["nelbo"]
        nelbo_shuf = evaluate_nelbo(model, shuffled, block_size=4, generator=torch.Generator().manual_seed(1))["nelbo"]
    uniform = torch.log(torch.tensor(float(tok.vocab_size))).item()
    assert nelbo_real < uniform - 1.0, (nelbo_real, uniform)  # measured: 6.42 vs 8.32
    assert nelbo_real < nelbo_shuf - 0.5, (nelbo_real, nelbo_shuf)  # measured: 6.42 vs 7.49


def test_generate_from_dit_mini(capsys):
    assert main(["generate", "--model", "dit-mini", "--length", "32", "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_file(embedded_model_path("dit-mini"))
    assert out["tokens"][0][0] == tok.bos_id and len(out["tokens"][0]) == 32
    assert isinstance(out["text"][0], str) and out["text"][0]
