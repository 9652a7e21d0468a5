"""Mix-scale training of block diffusion LMs (BD3-LM), exact resume, DDP through torchrun.

    did-engine train --data DIR --out RUN [options]                    one process
    python -m did_engine train --data DIR --out RUN                    the same
    torchrun --nproc_per_node=N -m did_engine train ...                DDP (gloo on CPU, nccl on GPU)

The configuration is in config.py, the loss and the noise draws in loss.py, the EMA and the
checkpoint files in state.py; here: the distributed set-up, the learning rate, the trainer.

One training step, for a global batch of G sequences of length L:

1. draw each sequence's block size from the mix (default {4: 0.9, L: 0.1});
2. per block size b, one noise level t per block, uniform on that size's clipping
   interval [eps_min, eps_max]; mask each token with probability t (log-linear schedule);
3. per block size, one vectorised forward over cat(x_t, x_0) under the block diffusion
   mask (b = L: a plain global forward on x_t), NELBO terms (1/t) * -log p(x_0 | x_t) at
   masked positions;
4. the loss is the mean of the terms over all G * L tokens; AdamW, gradient clipping,
   EMA of the weights.

Every random draw of step 1-2 is made for the GLOBAL batch from one CPU generator shared
by all ranks, and each rank takes its rows: DDP on N processes computes the same loss as
one process on the same global batch. Data order is a permutation per epoch seeded with
(seed, epoch) (``DistributedSampler``). The generator's state, the global RNG states, the
model, the EMA, the optimizer and the data position are checkpointed, so a killed run
resumes to bit-identical weights (on the CPU: the same machine, software versions and
thread count; the README says what is and is not guaranteed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from did_engine._plotting import pyplot
from did_engine.diffusion import DEFAULT_EPS, draw_block_noise, evaluate_nelbo, get_schedule, model_nelbo_terms
from did_engine.errors import UserError
from did_engine.hardware import fast_bf16
from did_engine.modeling.adapters import (LoRASettings, apply_lora, has_adapters, is_adapter_dir, load_adapted,
                                          load_adapter_tensors, read_adapter_config, reference_base, save_adapter)
from did_engine.modeling.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_safetensors, read_json_file
from did_engine.modeling.dit import BlockDiffusionLM
from did_engine.modeling.loading import load_model, load_weights_into, locate, tokenizer_of, vocabulary_mismatch
from did_engine.training.config import TrainConfig, TrainConfigError
from did_engine.training.loss import MixScaleLoss, draw_batch_noise
from did_engine.training.state import (EMA, TRAINER_STATE, list_checkpoints, optimizer_from_flat, rng_tensors,
                                       save_checkpoint, storage_errors_as_user_errors)


# ---------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    if use_cuda:
        device = torch.device(f"cuda:{local}" if device_pref in ("auto", "cuda") else device_pref)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu" if device_pref == "auto" else device_pref)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world), device


# ---------------------------------------------------------------------------------------
# The trainer


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_steps, then constant or cosine down to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def clip_candidates(widths, delta: float) -> list:
    """BD3-LM's candidate intervals: [1e-3, 1] and [i, i + w] for each width w, i on a delta grid."""
    out = [tuple(DEFAULT_EPS)]
    for w in widths:
        i = 0.0
        while i + w <= 1.0 + 1e-9:
            lo, hi = max(round(i, 6), DEFAULT_EPS[0]), min(round(i + w, 6), 1.0)
            if (lo, hi) not in out:
                out.append((lo, hi))
            i += delta
    return out


def plot_metrics(metrics_path: str, png_path: str, title: str) -> str | None:
    """The loss curve of a run's metrics.jsonl (train loss, validation NELBO per block size)
    as a PNG; None when there is no log or no matplotlib (which says so)."""
    if not os.path.isfile(metrics_path):
        return None
    plt = pyplot(os.path.basename(png_path))
    if plt is None:
        return None
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (NELBO terms, mean per token)", lw=1)
    for key in sorted({k for r in records for k in r if k.startswith("val_nelbo_b")}):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), "o-", label=f"validation NELBO, block {key.rsplit('b', 1)[1]}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    atomic_write_bytes(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return png_path


class Trainer:
    """Builds the model, data, optimizer; runs, logs, evaluates and checkpoints. See the module doc."""

    def __init__(self, cfg: TrainConfig):
        from did_engine.data.format import DatasetError, TokenDataset

        self.cfg = cfg
        if not cfg.data:
            raise TrainConfigError("--data is required: a prepared dataset directory (did-engine data prepare)")
        self.dist, self.device = init_distributed(cfg.device)
        self.train_data = TokenDataset(cfg.data, "train")
        try:
            self.val_data = TokenDataset(cfg.data, "validation")
            if len(self.val_data) == 0:
                self.val_data = None
        except DatasetError:
            self.val_data = None
        L = self.seq_len = self.train_data.seq_len
        cfg.check(L, self.dist.world_size)
        if len(self.train_data) < cfg.batch_size:
            raise TrainConfigError(f"the train split has {len(self.train_data)} sequences, fewer than one batch "
                             f"({cfg.batch_size})")
        self.probs = cfg.resolved_block_sizes(L)
        self.clip = {b: tuple(v) for b, v in cfg.resolved_clip(L).items()}
        self.schedule = get_schedule(cfg.schedule)
        self.model = self._build_model()
        for b, (lo, hi) in self.clip.items():  # fail now, not at the first unlucky batch
            if cfg.resample:
                try:
                    draw_block_noise(1, L, b, lo, hi, torch.Generator().manual_seed(0), self.schedule, resample=True)
                except ValueError as exc:  # no block of b tokens can have a masked fraction in [lo, hi]
                    raise TrainConfigError(f"--clip of block size {b}: {exc}") from None

        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if fast_bf16(self.device) else "off")
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        self.loss_module = MixScaleLoss(self.model, list(self.probs), self.schedule, self.amp_dtype)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_module = DDP(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda"
                                    else None)
        else:
            self.train_module = self.loss_module
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # a LoRA run: the adapters only
        decay = [p for p in trainable if p.dim() >= 2]
        no_decay = [p for p in trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, foreach=True)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if self.dist.main:
            os.makedirs(cfg.out, exist_ok=True)

    # -- construction ------------------------------------------------------------------------

    def _build_model(self):
        """The model of --model on this rank's device, in training mode: a DiT preset sized
        to the data, or a checkpoint of either class (fine-tuning, or adapting a causal LM)
        whose vocabulary and context fit the data."""
        cfg, L = self.cfg, self.seq_len
        dropout = {} if cfg.dropout is None else {"dropout": cfg.dropout}
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.model.startswith("preset:"):
            model = load_model(cfg.model, vocab_size=self.train_data.model_vocab_size, model_length=L,
                               block_size=min(self.probs), **dropout)
        elif cfg.lora_rank and is_adapter_dir(locate(cfg.model)):  # go on training an adapter
            path = locate(cfg.model)
            model = load_adapted(path, merge=False)
        else:
            path = locate(cfg.model)
            model = load_model(path, **dropout)
            mismatch = vocabulary_mismatch(model, self.train_data.model_vocab_size - 1, tokenizer_of(path))
            if mismatch:  # (model_vocab_size is the data's tokenizer + the mask)
                raise TrainConfigError(mismatch)
            length = model.config.model_length
            if isinstance(model, BlockDiffusionLM) and length != L:  # BD3-LM's DiT is trained at one length
                raise TrainConfigError(f"the model was trained on L = {length} but the dataset's sequences "
                                       f"have {L} tokens: prepare the data with --seq-len {length}")
            if L > length:
                raise TrainConfigError(f"the dataset's sequences have {L} tokens, more than the model's context "
                                       f"({length}): prepare the data with a --seq-len of at most {length}")
        for b in self.probs:
            if b > model.config.model_length:
                raise TrainConfigError(f"block size {b} exceeds the model length {model.config.model_length}")
        if cfg.lora_rank and not has_adapters(model):
            model.config.extra["base_model"] = vars(reference_base(cfg.model))
            apply_lora(model, LoRASettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank,
                                           targets=cfg.lora_targets))
        return model.to(self.device).train()

    # -- data ----------------------------------------------------------------------------------

    def _epoch_batches(self, epoch: int) -> list:
        """This rank's row indices of every global batch of `epoch` (DistributedSampler order)."""
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(range(len(self.train_data)), num_replicas=self.dist.world_size,
                                     rank=self.dist.rank, shuffle=True, seed=self.cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        local = list(sampler)
        per_rank = self.cfg.batch_size // self.dist.world_size
        n = len(local) // per_rank
        return [local[i * per_rank:(i + 1) * per_rank] for i in range(n)]

    # -- one step ------------------------------------------------------------------------------

    def train_step(self, rows: list) -> dict:
        cfg, W, r = self.cfg, self.dist.world_size, self.dist.rank
        L = self.seq_len
        block_size, t, masked = draw_batch_noise(cfg, cfg.batch_size, L, self.probs, self.clip, self.noise_gen,
                                                 self.schedule)
        # Global row j*W + r of the batch is this rank's local row j (DistributedSampler's striding).
        block_size, t, masked = block_size[r::W], t[r::W], masked[r::W]
        x0 = self.train_data.batch(rows).to(self.device, non_blocking=True)  # [B_local, L]
        lr = lr_at(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        masked, t = masked.to(self.device), t.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation: micro-batches of the local batch, each loss weighted by its
        # share of the rows, so the summed gradient is the local batch's mean; DDP
        # all-reduces only at the last one.
        B_local = x0.shape[0]
        micro = cfg.micro_batch_size or B_local
        starts = list(range(0, B_local, micro))
        loss, stats = 0.0, 0.0
        for i, s in enumerate(starts):
            sl = slice(s, s + micro)
            sync = i == len(starts) - 1 or not self.dist.enabled
            with (contextlib.nullcontext() if sync else self.train_module.no_sync()):
                part, part_stats = self.train_module(x0[sl], masked[sl], t[sl], block_size[sl])
                part = part * (x0[sl].shape[0] / B_local)
                part.backward()
            loss, stats = loss + part.detach(), stats + part_stats
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        loss_value = loss.detach().double()
        if self.dist.enabled:
            import torch.distributed as dist

            both = torch.cat([loss_value.reshape(1).to(self.device), stats.to(self.device)])
            dist.all_reduce(both)
            loss_value, stats = both[0] / W, both[1:].cpu()
        self.step += 1
        self.tokens_seen += cfg.batch_size * L
        out = {"loss": float(loss_value), "lr": lr, "grad_norm": float(grad_norm)}
        for j, b in enumerate(self.loss_module.sizes):
            if stats[2 * j + 1] > 0:
                out[f"loss_b{b}"] = float(stats[2 * j] / stats[2 * j + 1])
        return out

    # -- evaluation and clipping search --------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation NELBO per block size of the mix, with the EMA weights, fixed draws."""
        if self.val_data is None:
            return {}
        out = {}
        if self.ema is not None:
            self.ema.swap(self.model)
        try:
            for b in self.probs:
                res = evaluate_nelbo(self.model, self.val_data, block_size=b, batch_size=self.cfg.eval_batch_size,
                                     max_batches=self.cfg.eval_batches,
                                     generator=torch.Generator().manual_seed(self.cfg.seed + 7919),
                                     ignore_bos=self.cfg.ignore_bos, schedule=self.cfg.schedule)
                out[f"val_nelbo_b{b}"], out[f"val_ppl_b{b}"] = res["nelbo"], res["ppl"]
            if self.cfg.clip_search:
                out.update(self.search_clipping())
        finally:
            if self.ema is not None:
                self.ema.swap(self.model)
        return out

    @torch.no_grad()
    def search_clipping(self) -> dict:
        """BD3-LM's clipped-schedule search: per block size, the interval whose per-block
        loss has the smallest variance over a few validation batches becomes the training
        interval. Returns {"clip_b{b}": [lo, hi]}."""
        cands = clip_candidates(self.cfg.clip_search_widths, self.cfg.clip_search_delta)
        model, L = self.model, self.seq_len
        was = model.training
        model.eval()
        out = {}
        n = len(self.val_data)
        bs = self.cfg.eval_batch_size
        for b in self.probs:
            best = None
            for lo, hi in cands:
                if self.cfg.resample:
                    k = torch.arange(b + 1) / b
                    if not (((k >= lo) | (lo <= 1e-3)) & ((k <= hi) | (hi >= 1.0))).any():
                        continue
                g = torch.Generator().manual_seed(self.cfg.seed + 104729)
                var_sum = 0.0
                for i in range(min(self.cfg.clip_search_batches, math.ceil(n / bs))):
                    x0 = self.val_data.batch(np.arange(i * bs, min((i + 1) * bs, n))).to(self.device)
                    R = x0.shape[0]
                    t, masked = draw_block_noise(R, L, b, lo, hi, g, self.schedule, antithetic=self.cfg.antithetic,
                                                 resample=self.cfg.resample, keep_first=self.cfg.ignore_bos)
                    terms = model_nelbo_terms(model, x0, masked.to(self.device), t.to(self.device), b,
                                              self.schedule)  # [R, L]
                    per_block = terms.view(R, L // b, b).mean(-1).double()  # [R, nb]
                    var_sum += per_block.var(unbiased=per_block.numel() > 1).item() if per_block.numel() > 1 else 0.0
                if best is None or var_sum < best[0]:
                    best = (var_sum, lo, hi)
            self.clip[b] = (best[1], best[2])
            out[f"clip_b{b}"] = [best[1], best[2]]
        model.train(was)  # (under DDP only rank 0 searches; fit() broadcasts its choice)
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "tokens_seen": self.tokens_seen, "world_size": self.dist.world_size, "seq_len": self.seq_len,
                "clip": {str(b): list(v) for b, v in self.clip.items()}, "config": self.cfg.to_json(),
                "lr": lr_at(self.cfg, max(self.step - 1, 0))}

    def save(self) -> str:
        path = os.path.join(self.cfg.out, "checkpoints", f"step_{self.step:08d}")
        rng = rng_tensors(self.noise_gen)
        if self.dist.enabled:
            import torch.distributed as dist

            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        if self.dist.main:
            self.model.config.extra.update(self._final_metadata())
            save_checkpoint(path, model=self.model, ema=self.ema, optimizer=self.optimizer, state=self._state(),
                            rng_per_rank=rng_all, tokenizer=self.train_data.tokenizer_path,
                            keep=self.cfg.keep_checkpoints)
        self._barrier()
        return path

    def load(self, path: str) -> None:
        # Checkpoint files are read with the checks for untrusted files (regular files only,
        # bounded JSON, safetensors headers checked before any data is read).
        state_path = os.path.join(path, TRAINER_STATE)
        state = read_json_file(state_path, max_bytes=64 << 20)
        missing = [k for k in ("seq_len", "step", "epoch", "batch_in_epoch", "tokens_seen", "clip", "optimizer",
                               "world_size") if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{state_path} lacks {', '.join(missing)}: not a did_engine trainer state")
        if state["seq_len"] != self.seq_len:
            raise CheckpointError(f"{path} was trained on L = {state['seq_len']}, the dataset has L = {self.seq_len}")
        if has_adapters(self.model):
            stored = read_adapter_config(path)["base"].get("sha256")
            if stored != self.model.config.extra["base_model"]["sha256"]:
                raise CheckpointError(f"{path} adapts a base of sha256 {stored}, not the --model of this run")
            load_adapter_tensors(self.model, path)
        else:
            load_weights_into(self.model, path)
        if self.ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
            self.ema.load_state_dict({k: v.to(self.device) for k, v in
                                      load_safetensors(os.path.join(path, "ema.safetensors")).items()})
        optimizer_from_flat(self.optimizer, {k: v.to(self.device) for k, v in
                                              load_safetensors(os.path.join(path, "optimizer.safetensors")).items()},
                             state["optimizer"])
        rank_file = os.path.join(path, f"rng_rank{self.dist.rank}.safetensors")
        if state["world_size"] != self.dist.world_size or not os.path.isfile(rank_file):
            rank_file = os.path.join(path, "rng_rank0.safetensors")  # data order/noise still exact; dropout not
        rng = load_safetensors(rank_file)
        torch.set_rng_state(rng["rng.cpu"])
        self.noise_gen.set_state(rng["rng.noise"])
        if "rng.cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["rng.cuda"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.tokens_seen = state["batch_in_epoch"], state["tokens_seen"]
        self.clip = {int(b): tuple(v) for b, v in state["clip"].items()}

    def _barrier(self):
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()

    def _final_metadata(self) -> dict:
        """What a sampler needs to know about this model, stored in config.extra."""
        small = min(self.probs)
        return {"trained_block_sizes": {str(b): p for b, p in self.probs.items()},
                "clip_per_block_size": {str(b): list(v) for b, v in self.clip.items()},
                "sampling_eps_min": self.clip[small][0], "sampling_eps_max": self.clip[small][1],
                "train_steps": self.step, "train_tokens": self.tokens_seen, "noise_schedule": self.cfg.schedule}

    # -- logging ---------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop the records of steps after the one training starts from (they will be redone).

        A kill during an append leaves a torn last line: it is dropped with a warning. A
        damaged line before the last is not something a kill does: an error naming it.
        """
        if not self.dist.main or not os.path.isfile(self.metrics_path):
            return
        with open(self.metrics_path, errors="replace") as f:
            lines = f.readlines()
        keep = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if number < len(lines):
                    raise UserError(f"{self.metrics_path}, line {number}: not a JSON record (damaged log): repair "
                                    "or delete that line, then resume")
                print(f"did_engine train: warning: dropped the torn last line of {self.metrics_path} (line {number}, "
                      "cut short by an interrupted write)", file=sys.stderr)
                continue
            if record.get("step", 0) <= self.step:
                keep.append(line if line.endswith("\n") else line + "\n")

        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(keep)

        atomic_write_bytes(self.metrics_path, write)

    def plot(self) -> str | None:
        if not self.dist.main:
            return None
        return plot_metrics(self.metrics_path, os.path.join(self.cfg.out, "loss.png"),
                            f"did_engine train: {os.path.basename(os.path.abspath(self.cfg.out))}")

    # -- the loop --------------------------------------------------------------------------------

    def maybe_resume(self) -> str | None:
        """Load the checkpoint that --resume names (auto: the latest in --out, if any); return
        its path, or None when training starts from step 0. Either way metrics.jsonl keeps
        only the records of the steps already done."""
        cfg = self.cfg
        path = None
        if cfg.resume == "auto":
            ckpts = list_checkpoints(cfg.out)
            path = ckpts[-1] if ckpts else None
        elif cfg.resume != "never":
            path = cfg.resume
            if not os.path.isfile(os.path.join(path, TRAINER_STATE)):
                raise CheckpointError(f"--resume {path!r} is not a training checkpoint (no {TRAINER_STATE})")
        if path is not None:
            self.load(path)
        self._truncate_metrics()
        return path

    def fit(self) -> dict:
        cfg = self.cfg
        resumed = self.maybe_resume()
        if self.dist.main:
            atomic_write_json(os.path.join(cfg.out, "train_config.json"), cfg.to_json())
            n_params = self.model.num_parameters()
            n_trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            print(f"did_engine train: {n_params / 1e6:.2f}M parameters ({n_trained / 1e6:.2f}M trained), L = {self.seq_len}, mix "
                  f"{ {b: p for b, p in self.probs.items()} }, global batch {cfg.batch_size} on "
                  f"{self.dist.world_size} process(es), {self.device}, amp {self.amp_dtype or 'off'}"
                  + (f", resumed from {resumed} (step {self.step})" if resumed else ""), file=sys.stderr)
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        last = {}
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        batches = self._epoch_batches(self.epoch)
        while self.step < cfg.max_steps:
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                batches = self._epoch_batches(self.epoch)
            rows = batches[self.batch_in_epoch]
            self.batch_in_epoch += 1
            last = self.train_step(rows)
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"the loss is {last['loss']} at step {self.step}: lower --lr or check data")
            now = time.perf_counter()
            tok_s = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{last['lr']:.2e}")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log({"step": self.step, "epoch": self.epoch, "tokens": self.tokens_seen,
                           "tokens_per_s": tok_s, **last})
                t_last, tok_last = time.perf_counter(), self.tokens_seen
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.max_steps:
                val = self.evaluate() if self.dist.main else {}
                if self.dist.enabled and cfg.clip_search:
                    box = [self.clip]
                    import torch.distributed as dist

                    dist.broadcast_object_list(box, src=0)
                    self.clip = box[0]
                self._barrier()
                if val:
                    self._log({"step": self.step, **val})
                    last.update(val)
                    if bar is not None:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in val.items()
                                                                   if isinstance(v, float)))
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        final = self.save_final()
        if cfg.plot:
            self.plot()
        return {"step": self.step, "final": final, **last}

    def save_final(self) -> str | None:
        """out/final: the (EMA) weights, tokenizer.json, clipping intervals in config.extra."""
        if not self.dist.main:
            self._barrier()
            return None
        path = os.path.join(self.cfg.out, "final")
        use_ema = self.cfg.final_weights == "ema" and self.ema is not None
        if use_ema:
            self.ema.swap(self.model)
        try:
            self.model.config.extra.update(self._final_metadata())
            self.model.config.extra["weights"] = "ema" if use_ema else "raw"
            with storage_errors_as_user_errors(f"the final model {path}"):
                if has_adapters(self.model):
                    save_adapter(self.model, path)
                else:
                    self.model.save_pretrained(path)
                tok = self.train_data.tokenizer_path
                if os.path.isfile(tok):
                    shutil.copyfile(tok, os.path.join(path, "tokenizer.json"))
        finally:
            if use_ema:
                self.ema.swap(self.model)
        self._barrier()
        return path


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the last step's metrics and the final model path."""
    trainer = Trainer(cfg)
    try:
        with storage_errors_as_user_errors(f"to the run directory {cfg.out}"):  # metrics, plot, config
            return trainer.fit()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
