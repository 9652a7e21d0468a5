"""Training: the NELBO against float64 references, noise draws, the mix-scale loss against an
independent construction, bad configs, overfitting real text, and reproducibility at the
default thread count: two identical runs, a SIGKILL + resume, a full disk during a
checkpoint write and a torn metrics log must all reproduce an uninterrupted run bit for bit."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from did_engine.cli import main as cli_main
from did_engine.data.format import TokenDataset, wrap_documents, write_manifest, write_split
from did_engine.diffusion import (LogLinearSchedule, draw_block_noise, evaluate_nelbo, masked_nll, nelbo_terms,
                                  sample_block_times, subs_log_probs)
from did_engine.modeling import BlockDiffusionLM, ModelConfig
from did_engine.training.config import TrainConfig
from did_engine.training.loss import MixScaleLoss, draw_batch_noise
from did_engine.training.state import StorageFullError, list_checkpoints, optimizer_to_flat
from did_engine.training.trainer import Trainer, clip_candidates
from support import REPO_DIR as REPO
from support.training_data import TEXT, make_dataset, subprocess_env


def random_model(seed=0, dtype=torch.float32, **overrides) -> BlockDiffusionLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=41, model_length=16, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    model = BlockDiffusionLM(ModelConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    return model.to(dtype).eval()


# -- the NELBO ---------------------------------------------------------------------------


def test_masked_nll_and_nelbo_terms_match_a_float64_subs_reference():
    g = torch.Generator().manual_seed(1)
    B, L, V = 3, 10, 23
    mask_id = V - 1
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 3
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    t = torch.rand(B, L, generator=g, dtype=torch.float64) * 0.9 + 0.1
    x_t = torch.where(masked, mask_id, x0)
    ref = -subs_log_probs(logits, x_t, mask_id).gather(-1, x0[..., None]).squeeze(-1)  # 0 where unmasked
    assert torch.equal(ref[~masked], torch.zeros_like(ref[~masked]))
    assert (masked_nll(logits, x0, masked, mask_id) - ref).abs().max() < 1e-12
    terms = nelbo_terms(logits, x0, masked, t, mask_id)
    assert (terms - ref / t).abs().max() < 1e-12
    # float32 logits: within float32 rounding of the float64 value
    assert (masked_nll(logits.float(), x0, masked, mask_id).double() - ref).abs().max() < 1e-5
    # a mask id that is not the last column takes the general path
    other = masked_nll(logits, x0.clamp(min=1), masked, 0)
    ref0 = -subs_log_probs(logits, torch.where(masked, 0, x0.clamp(min=1)), 0).gather(
        -1, x0.clamp(min=1)[..., None]).squeeze(-1)
    assert (other - ref0).abs().max() < 1e-12


def test_loglinear_schedule_weight_and_sigma():
    s = LogLinearSchedule()
    t = torch.tensor([1e-3, 0.25, 0.5, 0.999, 1.0], dtype=torch.float64)
    assert torch.equal(s.mask_prob(t), t)
    assert torch.allclose(s.loss_weight(t), 1 / t)
    # -alpha'_t / (1 - alpha_t) with alpha_t = 1 - t, by finite differences
    h = 1e-6
    alpha = lambda u: 1 - u  # noqa: E731
    fd = -(alpha(t[:4] + h) - alpha(t[:4] - h)) / (2 * h) / (1 - alpha(t[:4]))
    assert torch.allclose(s.loss_weight(t[:4]), fd, rtol=1e-6)
    assert torch.allclose(s.sigma(t[:4]), -torch.log(1 - t[:4]))
    assert s.sigma(t[4:]).item() == pytest.approx(-math.log(1e-3))  # clamped, finite


def test_nelbo_expectation_is_the_masked_cross_entropy_sum():
    """With t ~ U[0, 1] and masking probability t, E[(1/t) 1{masked} c] = c per token: the
    Monte Carlo NELBO of a fixed per-token cost c converges to the mean of c."""
    g = torch.Generator().manual_seed(3)
    c = torch.rand(64, generator=g, dtype=torch.float64) * 4  # a cost per position
    t, masked = draw_block_noise(20000, 64, 4, 1e-3, 1.0, g)
    est = ((masked.double() / t.double()) * c).mean(0)  # [64]
    assert (est - c).abs().max() < 0.25 and abs(est.mean() - c.mean()) < 0.03


# -- noise draws -------------------------------------------------------------------------


def test_one_t_per_block_within_the_clip_interval_and_mask_rate_t():
    g = torch.Generator().manual_seed(0)
    t, masked = draw_block_noise(4000, 32, 8, 0.3, 0.8, g)
    blocks = t.view(4000, 4, 8)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))  # one t per block
    assert t.min() >= 0.3 and t.max() <= 0.8
    # masked fraction among tokens with t in a bin ~ the bin's t
    for lo in (0.3, 0.5, 0.7):
        sel = (t >= lo) & (t < lo + 0.1)
        assert abs(masked[sel].float().mean().item() - (lo + 0.05)) < 0.01
    # antithetic: the n = rows x blocks uniforms fall one per stratum of [0, 1)
    u = sample_block_times(5, 7, 0.0, 1.0, torch.Generator().manual_seed(2))
    strata = torch.sort((u.flatten() * 35).floor()).values
    assert torch.equal(strata, torch.arange(35, dtype=strata.dtype))


def test_resampling_keeps_masked_fractions_in_the_interval_and_bos_is_never_masked():
    g = torch.Generator().manual_seed(0)
    t, masked = draw_block_noise(500, 32, 4, 0.45, 0.95, g, resample=True, keep_first=True)
    frac = masked.view(500, 8, 4).float().mean(-1)
    assert not masked[:, 0].any()
    frac_rest = frac[:, 1:]  # block 0 lost its BOS after the check, as in BD3-LM
    assert frac_rest.min() >= 0.5 and frac_rest.max() <= 0.75
    with pytest.raises(ValueError, match="no masked fraction"):
        draw_block_noise(2, 8, 4, 0.3, 0.45, g, resample=True)


def test_block_size_draws_follow_the_configured_proportions():
    cfg = TrainConfig(block_sizes={4: 0.6, 8: 0.3, "L": 0.1})
    probs = cfg.resolved_block_sizes(32)
    assert probs == {4: 0.6, 8: 0.3, 32: 0.1}
    g = torch.Generator().manual_seed(0)
    n = 20000
    sizes, t, masked = draw_batch_noise(cfg, n, 32, probs, cfg.resolved_clip(32), g, LogLinearSchedule())
    for b, p in probs.items():
        count = (sizes == b).sum().item()
        sd = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 4.5 * sd, (b, count, n * p)
        rows = t[sizes == b].view(-1, 32 // b, b)  # each row's t is constant inside its own blocks
        assert torch.equal(rows, rows[..., :1].expand_as(rows))


# -- the training mask and the mix-scale loss --------------------------------------------


def _block_causal(model, tokens, b):
    """The model's block-causal forward in float64 (its differentiable dense-mask path: the
    compiled op is float32/bf16/fp16 only)."""
    with torch.enable_grad():
        return model(tokens, block_size=b).detach()


@pytest.mark.parametrize("L,b", [(16, 4), (16, 2), (12, 3), (8, 1)])
def test_training_logits_equal_an_independent_construction(L, b):
    """The block-b rows of the vectorised training forward (cat(x_t, x_0) under the mask)
    equal the model run on the sequence it is meant to see: clean blocks < b, then noisy
    block b, through the block-causal forward, in float64."""
    model = random_model(model_length=L, dtype=torch.float64)
    g = torch.Generator().manual_seed(L + b)
    x0 = torch.randint(0, 40, (2, L), generator=g)
    masked = torch.rand(2, L, generator=g) < 0.5
    x_t = torch.where(masked, model.mask_id, x0)
    with torch.no_grad():
        logits = model(x_t, x0=x0, block_size=b)  # [2, L, V]
        for k in range(L // b):
            seq = torch.cat([x0[:, : k * b], x_t[:, k * b:(k + 1) * b]], dim=1)
            ref = _block_causal(model, seq, b)[:, k * b:]
            assert (logits[:, k * b:(k + 1) * b] - ref).abs().max() < 1e-10, k


def test_mix_scale_loss_equals_a_per_row_float64_reference():
    model = random_model(model_length=16, dtype=torch.float64)
    cfg = TrainConfig(block_sizes={2: 0.4, 4: 0.3, "L": 0.3})
    probs = cfg.resolved_block_sizes(16)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 40, (9, 16), generator=g)
    sizes, t, masked = draw_batch_noise(cfg, 9, 16, probs, cfg.resolved_clip(16), g, LogLinearSchedule())
    assert len(set(sizes.tolist())) > 1
    loss, stats = MixScaleLoss(model, list(probs), LogLinearSchedule())(x0, masked, t, sizes)
    total = 0.0
    with torch.no_grad():
        for i in range(9):
            b = int(sizes[i])
            x_t = torch.where(masked[i:i + 1], model.mask_id, x0[i:i + 1])
            for k in range(16 // b):  # independent: each block from its own visible context
                seq = torch.cat([x0[i:i + 1, : k * b], x_t[:, k * b:(k + 1) * b]], dim=1)
                logp = subs_log_probs(_block_causal(model, seq, b)[:, k * b:], x_t[:, k * b:(k + 1) * b], model.mask_id)
                nll = -logp.gather(-1, x0[i:i + 1, k * b:(k + 1) * b, None]).squeeze(-1)
                total += (nll / t[i, k * b:(k + 1) * b].double()).sum().item()
    assert loss.item() == pytest.approx(total / (9 * 16), rel=1e-9)
    assert stats[1::2].sum().item() == 9 * 16


def test_evaluate_nelbo_reproduces_and_counts_tokens(tmp_path):
    data = TokenDataset(make_dataset(tmp_path / "d"), "validation")
    model = random_model(vocab_size=258, model_length=32)
    r1 = evaluate_nelbo(model, data, block_size=4, batch_size=3, generator=torch.Generator().manual_seed(1))
    r2 = evaluate_nelbo(model, torch.as_tensor(np.asarray(data.array, dtype=np.int64)), block_size=4, batch_size=3,
                        generator=torch.Generator().manual_seed(1))
    assert r1["nelbo"] == r2["nelbo"] and r1["tokens"] == len(data) * 31  # BOS not counted
    assert r1["ppl"] == pytest.approx(math.exp(r1["nelbo"]))
    # direct computation with the same draws
    g = torch.Generator().manual_seed(1)
    total = 0.0
    x_all = data.batch(np.arange(len(data)))
    for s in range(0, len(data), 3):
        x0 = x_all[s:s + 3]
        t, masked = draw_block_noise(x0.shape[0], 32, 4, 1e-3, 1.0, g, keep_first=True)
        with torch.no_grad():
            logits = model(torch.where(masked, model.mask_id, x0), x0=x0, block_size=4).double()
        total += nelbo_terms(logits, x0, masked, t.double(), model.mask_id)[:, 1:].sum().item()
    assert r1["nelbo"] == pytest.approx(total / r1["tokens"], rel=1e-5)
    # a global block and a model that never learnt anything: about log(256) nats per token
    rg = evaluate_nelbo(model, data, block_size=None, max_batches=1)
    assert rg["block_size"] == 32 and rg["tokens"] == min(8, len(data)) * 31


# -- configuration errors ----------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--block-sizes", "5:0.9,L:0.1"], "block size 5 does not divide the sequence length L = 32"),
    (["--block-sizes", "4:0.8,L:0.1"], "must sum to 1"),
    (["--schedule", "cosine-ish"], "unknown noise schedule 'cosine-ish'"),
    (["--clip", "4:0.9:0.2"], "0 < eps_min < eps_max <= 1"),
    (["--clip", "8:0.3:0.8"], "not in the mix"),
    (["--batch-size", "1000"], "fewer than one batch"),
])
def test_bad_config_fails_before_training_with_a_clear_message(tmp_path, capsys, args, message):
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "run"
    try:
        status = cli_main(["train", "--data", data, "--out", str(out), "--no-progress", *args])
    except SystemExit as exc:  # argparse rejects malformed values itself
        status = exc.code
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_clip_candidates_are_bd3lms_grid():
    c = clip_candidates((0.5,), 0.25)
    assert c == [(1e-3, 1.0), (1e-3, 0.5), (0.25, 0.75), (0.5, 1.0)]


# -- training end to end -------------------------------------------------------------------


def _run(tmp_path, name, *extra, data=None):
    from did_engine.cli import build_parser
    from did_engine.cli.train import config_from_args
    from did_engine.training.trainer import train

    args = build_parser().parse_args(["train", "--data", data, "--out", str(tmp_path / name), "--no-progress", *extra])
    return train(config_from_args(args))


def test_tiny_model_overfits_real_text(tmp_path):
    """Sonnet 18 + Genesis 1:1-5 as bytes: after 300 steps the validation NELBO on the
    training text falls at least 4x below the untrained model's (~log 256 = 5.5 nats)."""
    data = make_dataset(tmp_path / "d", val_fraction=0.0001)
    train_set = TokenDataset(data, "train")
    torch.manual_seed(0)
    before = evaluate_nelbo(BlockDiffusionLM.from_preset("tiny", vocab_size=258, model_length=32), train_set,
                            block_size=4)["nelbo"]
    res = _run(tmp_path, "run", "--max-steps", "250", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "20",
               "--ema", "0", "--log-every", "10", "--save-every", "250", "--block-sizes", "4:0.9,L:0.1", data=data)
    model = BlockDiffusionLM.from_pretrained(res["final"])
    after = evaluate_nelbo(model, train_set, block_size=4)["nelbo"]
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    print(f"NELBO on the training text, block 4: {before:.3f} -> {after:.3f} nats/token "
          f"({before / after:.1f}x); train loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}")
    assert before > 5.0
    assert after < before / 4
    assert np.mean(losses[-5:]) < losses[0] / 3
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_final_model_is_loadable_and_carries_tokenizer_and_clipping(tmp_path):
    data = make_dataset(tmp_path / "d")
    res = _run(tmp_path, "run", "--max-steps", "4", "--batch-size", "4", "--clip", "4:0.3:0.8", "--clip-search",
               "--clip-search-widths", "0.5,0.9", "--clip-search-delta", "0.25", "--clip-search-batches", "1",
               "--eval-batches", "1", "--save-every", "2", "--keep-checkpoints", "1", data=data)
    final = res["final"]
    model = BlockDiffusionLM.from_pretrained(final)
    extra = model.config.extra
    assert set(extra["clip_per_block_size"]) == {"4", "32"} and extra["weights"] == "ema"
    lo, hi = extra["clip_per_block_size"]["4"]
    assert (extra["sampling_eps_min"], extra["sampling_eps_max"]) == (lo, hi)
    assert (lo, hi) in clip_candidates((0.5, 0.9), 0.25)
    assert os.path.isfile(os.path.join(final, "tokenizer.json"))
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["step_00000004"]  # keep 1, no temporary directories left
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert any("clip_b4" in r and "val_nelbo_b4" in r and "val_nelbo_b32" in r for r in records)


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_sigkill_then_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    data = make_dataset(tmp_path / "d")
    common = [sys.executable, "-m", "did_engine", "train", "--data", data, "--no-progress", "--max-steps", "30",
              "--batch-size", "8", "--save-every", "5", "--eval-every", "10", "--eval-batches", "1",
              "--dropout", "0.1", "--ema", "0.9", "--warmup-steps", "10", "--lr-decay", "cosine", "--log-every", "1"]
    ref = tmp_path / "ref"
    subprocess.run(common + ["--out", str(ref)], env=subprocess_env(), check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen(common + ["--out", str(run)], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpt_dir = run / "checkpoints"
    while time.time() < deadline:  # kill as soon as the step-10 checkpoint exists
        if ckpt_dir.is_dir() and any(n.startswith("step_") and int(n[5:]) >= 10 for n in os.listdir(ckpt_dir)):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before it could be killed"
    steps_done = max(int(n[5:]) for n in os.listdir(ckpt_dir) if n.startswith("step_"))
    assert steps_done < 30

    resumed = subprocess.run(common + ["--out", str(run)], env=subprocess_env(), check=True, capture_output=True, timeout=300)
    assert "resumed from" in resumed.stderr.decode()

    a, b = _weights(ref / "final"), _weights(run / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights
    last = "checkpoints/step_00000030"
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng_rank0.safetensors"):
        x, y = load_file(str(ref / last / name)), load_file(str(run / last / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    with open(ref / "metrics.jsonl") as f1, open(run / "metrics.jsonl") as f2:
        r1 = [(r["step"], r.get("loss"), r.get("val_nelbo_b4")) for r in map(json.loads, f1)]
        r2 = [(r["step"], r.get("loss"), r.get("val_nelbo_b4")) for r in map(json.loads, f2)]
    assert r1 == r2  # every logged loss, none lost or duplicated by the resume


# -- reproducibility at the default thread count and faults ---------------------------------


def _fit(data, out, **overrides) -> Trainer:
    """An in-process run of the tiny preset with dropout, EMA and a mix of block sizes (every
    source of randomness and accumulation of a real run), at the default thread count."""
    cfg = dict(data=data, out=str(out), batch_size=16, max_steps=8, lr=3e-3, warmup_steps=2, log_every=1,
               save_every=4, keep_checkpoints=10, eval_batches=1, progress=False, plot=False, dropout=0.1, ema=0.9,
               block_sizes={4: 0.5, "L": 0.5})
    trainer = Trainer(TrainConfig(**{**cfg, **overrides}))
    trainer.fit()
    return trainer


def _run_state(trainer: Trainer) -> dict:
    """Every tensor a run ends with: the weights, the EMA and the optimizer state."""
    out = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    out.update(trainer.ema.state_dict())
    out.update(optimizer_to_flat(trainer.optimizer)[0])
    return out


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:4]}"


def _metrics(out) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_nelbo_b4")) for r in map(json.loads, f)]


def test_token_embedding_gradient_is_summed_in_token_order_at_any_thread_count():
    """The embedding's gradient with heavily repeated tokens, over a vocabulary large enough
    for the backward to split its rows among threads (it parallelises over rows, 1000 at a
    time), equals a float32 sum taken token by token in order, bit for bit, at 1, 2 and 3
    threads: the order of the additions does not depend on the threads."""
    from did_engine.modeling.layers import TokenEmbedding

    g = torch.Generator().manual_seed(0)
    emb = TokenEmbedding(4099, 24)
    tokens = torch.cat([torch.randint(0, 4099, (2, 300), generator=g),  # rows in every thread's range
                        torch.tensor([[998, 999, 1000, 1001] * 200] * 2),  # hot rows at a range border
                        torch.full((2, 500), 4098)], dim=1)  # [2, 1600]
    upstream = torch.randn(2, 1600, 24, generator=g)
    ref = torch.zeros(4099, 24)
    for i, k in enumerate(tokens.flatten().tolist()):
        ref[k] += upstream.view(-1, 24)[i]
    # Against float64: the reference itself is a sum of the right terms.
    exact = torch.zeros(4099, 24, dtype=torch.float64).index_add_(0, tokens.flatten(), upstream.view(-1, 24).double())
    assert (ref.double() - exact).abs().max() < 1e-4
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            emb.embedding.grad = None
            out = emb(tokens)
            assert torch.equal(out, emb.embedding.detach()[tokens])
            out.backward(upstream)
            assert torch.equal(emb.embedding.grad, ref), n
    finally:
        torch.set_num_threads(threads)


def test_two_identical_runs_end_bit_identical_at_the_default_thread_count(tmp_path):
    data = make_dataset(tmp_path / "d")
    a = _run_state(_fit(data, tmp_path / "a"))
    b = _run_state(_fit(data, tmp_path / "b"))
    _assert_bit_identical(a, b)
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")


def test_a_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of the optimizer file of the step-8 checkpoint: one StorageFullError
    naming that checkpoint, no temporary directory left, step 4 intact; resuming from step 4
    ends exactly where an uninterrupted run does."""
    import did_engine.training.state as train_module

    data = make_dataset(tmp_path / "d")
    reference = _run_state(_fit(data, tmp_path / "ref", max_steps=12))

    real_save_file = train_module.save_file
    calls = []

    def fill_the_disk(tensors, filename, *args, **kwargs):
        if os.path.basename(filename) == "optimizer.safetensors":
            calls.append(filename)
            if len(calls) == 2:  # the step-8 checkpoint: some bytes land, then the disk is full
                with open(filename, "wb") as f:
                    f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_file", fill_the_disk)
    run = tmp_path / "full"
    with pytest.raises(StorageFullError) as info:
        _fit(data, run, max_steps=12)
    message = str(info.value)
    assert "\n" not in message and "no space left on device" in message
    assert str(run / "checkpoints" / "step_00000008") in message
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000004"]  # no .tmp-* left behind
    monkeypatch.setattr(train_module, "save_file", real_save_file)

    resumed = _fit(data, run, max_steps=12)
    _assert_bit_identical(reference, _run_state(resumed))
    assert _metrics(tmp_path / "ref") == _metrics(run)


def _sha256_of_files(directory) -> dict:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in sorted(os.listdir(directory))}


def test_a_file_size_limit_hit_by_the_cli_is_one_line_and_the_run_resumes(tmp_path):
    """A real refusal by the kernel, without root: under RLIMIT_FSIZE (SIGXFSZ ignored, so the
    write fails with EFBIG) the step-12 checkpoint cannot be written. The CLI prints one line
    naming the checkpoint and exits with 2; no temporary directory is left; the step-8
    checkpoint is byte for byte what it was, and the next run resumes from it."""
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "run"
    common = [sys.executable, "-m", "did_engine", "train", "--data", data, "--out", str(out), "--no-progress",
              "--batch-size", "8", "--save-every", "4", "--eval-batches", "1", "--ema", "0.9", "--no-plot"]
    subprocess.run(common + ["--max-steps", "8"], env=subprocess_env(), check=True, capture_output=True, timeout=300)
    step8 = out / "checkpoints" / "step_00000008"
    before = _sha256_of_files(step8)
    sizes = {n: (step8 / n).stat().st_size for n in ("model.safetensors", "optimizer.safetensors")}
    assert sizes["optimizer.safetensors"] > 1.5 * sizes["model.safetensors"]  # Adam: two moments per weight
    limit = (sizes["model.safetensors"] + sizes["optimizer.safetensors"]) // 2  # the optimizer file cannot fit

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(common + ["--max-steps", "16"], env=subprocess_env(), capture_output=True, timeout=300,
                            preexec_fn=limit_file_size)
    err = failed.stderr.decode()
    assert failed.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"did-engine: error: cannot write the checkpoint "
                           f"{out / 'checkpoints' / 'step_00000012'}: file too large"), err[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000004", "step_00000008"]
    assert _sha256_of_files(step8) == before

    resumed = subprocess.run(common + ["--max-steps", "16"], env=subprocess_env(), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert f"resumed from {step8} (step 8)" in resumed.stderr.decode()
    assert [int(n[5:]) for n in sorted(os.listdir(out / "checkpoints"))] == [12, 16]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    """A kill during an append leaves half a record at the end of metrics.jsonl: the resume
    warns, drops it and the log ends as an uninterrupted run's."""
    data = make_dataset(tmp_path / "d")
    _fit(data, tmp_path / "ref", max_steps=12, eval_every=4)  # evaluations at 4, 8, 12 in both runs
    run = tmp_path / "torn"
    _fit(data, run, max_steps=8, eval_every=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 4, "loss": 3.1')  # no closing brace, no newline
    capsys.readouterr()
    _fit(data, run, max_steps=12, eval_every=4)
    assert "dropped the torn last line" in capsys.readouterr().err
    assert _metrics(run) == _metrics(tmp_path / "ref")


def test_a_damaged_metrics_line_before_the_last_is_a_clear_error(tmp_path, capsys):
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "run"
    _fit(data, out, max_steps=4)
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"step": 3, "lo\n'
    path.write_text("".join(lines))
    capsys.readouterr()
    status = cli_main(["train", "--data", data, "--out", str(out), "--no-progress", "--max-steps", "8",
                       "--batch-size", "16"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"did-engine: error: {path}, line 3: not a JSON record (damaged log): repair or delete "
                   "that line, then resume")
    assert list_checkpoints(str(out))[-1].endswith("step_00000004")  # nothing was trained


def test_cli_has_the_train_subcommand():
    from did_engine.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--block-sizes", "--clip", "--clip-search", "--resume", "--save-every", "--ema", "--amp"):
        assert option in help_text


def test_fine_tunes_a_bd3lm_hugging_face_checkpoint(tmp_path):
    """The BD3-LM fixture (vocab 67 = 66 tokens + mask, L 32) fine-tunes on data of its vocabulary;
    a dataset of another vocabulary is refused before training."""
    fixture = os.path.join(REPO, "tests", "fixtures", "bd3lm_tiny")
    d = tmp_path / "d66"
    os.makedirs(d)
    docs = [[c % 64 for c in line.encode()] for line in TEXT.splitlines() if line]
    seqs = wrap_documents(docs, 32, 65, 65)
    splits = {"train": write_split(str(d), "train", seqs[4:]), "validation": write_split(str(d), "validation", seqs[:4])}
    write_manifest(str(d), seq_len=32, tokenizer={"kind": "bytes-mod-64", "vocab_size": 66, "bos_id": 65, "eos_id": 65},
                   splits=splits)
    before = BlockDiffusionLM.from_pretrained(fixture)
    res = _run(tmp_path, "ft", "--model", fixture, "--max-steps", "3", "--batch-size", "4", "--ema", "0",
               "--eval-batches", "1", data=str(d))
    after = BlockDiffusionLM.from_pretrained(res["final"])
    assert after.config.extra["source_format"] == "bd3lm" and after.config.extra["train_steps"] == 3
    changed = [k for k, v in before.state_dict().items() if not torch.equal(v, after.state_dict()[k])]
    assert len(changed) > 0
    with pytest.raises(ValueError, match="vocabulary"):
        _run(tmp_path, "bad", "--model", fixture, "--max-steps", "1", data=make_dataset(tmp_path / "bytes"))


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    data = make_dataset(tmp_path / "d")
    results = []
    for micro in (0, 3):  # 8 rows at once, or micro-batches of 3, 3, 2
        cfg = TrainConfig(data=data, out=str(tmp_path / f"m{micro}"), batch_size=8, micro_batch_size=micro,
                          max_steps=3, lr=3e-3, warmup_steps=0, log_every=1, save_every=3, eval_batches=1,
                          progress=False, plot=False, block_sizes={4: 0.5, "L": 0.5})
        trainer = Trainer(cfg)
        trainer.fit()
        with open(tmp_path / f"m{micro}" / "metrics.jsonl") as f:
            losses = [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]
        results.append((losses, {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (l0, w0), (l1, w1) = results
    assert np.allclose(l0, l1, rtol=1e-5, atol=0)  # losses and pre-clip gradient norms (scale-sensitive)
    # Adam divides by sqrt(v): rounding in near-zero gradients moves weights by ~1e-5 after
    # 3 steps of lr 3e-3 (updates of up to 9e-3).
    assert max((w0[k] - w1[k]).abs().max().item() for k in w0) < 2e-4


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """matplotlib is an optional extra: training still finishes, and says what it skipped."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    data = make_dataset(tmp_path / "d")
    res = _run(tmp_path, "run", "--max-steps", "2", "--batch-size", "4", "--save-every", "2", data=data)
    assert os.path.isdir(res["final"]) and not (tmp_path / "run" / "loss.png").exists()
    assert "matplotlib is not installed, so loss.png is not drawn" in capsys.readouterr().err
