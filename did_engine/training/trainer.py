"""Mix-scale training of block diffusion LMs (BD3-LM), exact resume, DDP through torchrun.

    did-engine train --data DIR --out RUN [options]           one process
    python -m did_engine.training.trainer --data DIR --out RUN           the same
    torchrun --nproc_per_node=N -m did_engine.training.trainer ...       DDP (gloo on CPU, nccl on GPU)

Read top to bottom: the configuration, the validation NELBO (``evaluate_nelbo``, also used
by the evaluation code), the mix-scale loss module, checkpoints, the trainer, the CLI.

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

import argparse
import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from did_engine.modeling.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_safetensors, read_json_file
from did_engine.cli import HelpFormatter
from did_engine.diffusion import SCHEDULES, draw_block_noise, get_schedule, nelbo_terms
from did_engine._plotting import pyplot
from did_engine.errors import UserError
from did_engine.modeling.dit import PRESETS, BlockDiffusionLM

TRAINER_STATE = "trainer_state.json"
DEFAULT_EPS = (1e-3, 1.0)  # the unclipped schedule: a valid NELBO


class TrainConfigError(UserError):
    """A training option, or a pairing of model, data and options, that cannot train."""


class StorageFullError(UserError):
    """The file system refused a write of the run (no space left, a quota, a file size
    limit). A checkpoint being written is removed, earlier ones are intact: the same command
    resumes from the last of them once there is room."""


# ---------------------------------------------------------------------------------------
# Configuration


@dataclass
class TrainConfig:
    """Everything a run depends on. ``check(seq_len)`` validates it before training starts."""

    # data and model
    data: str = ""  # prepared dataset directory (did-engine data prepare)
    out: str = "runs/train"  # run directory: checkpoints/, final/, metrics.jsonl, loss.png
    model: str = "preset:tiny"  # preset:NAME (random init) or a checkpoint directory (ours or BD3-LM HF)
    dropout: float | None = None  # override the model's dropout
    # mix-scale block diffusion
    block_sizes: dict = field(default_factory=lambda: {4: 0.9, "L": 0.1})  # block size -> probability
    clip: dict = field(default_factory=dict)  # block size -> [eps_min, eps_max]; default [1e-3, 1]
    clip_search: bool = False  # BD3-LM's variance-minimising search of the interval, at each eval
    clip_search_widths: tuple = (0.5, 0.6, 0.7, 0.8, 0.9)
    clip_search_delta: float = 0.05
    clip_search_batches: int = 4
    schedule: str = "loglinear"
    antithetic: bool = True  # stratified t across the blocks of a batch
    resample: bool = True  # redraw masks whose masked fraction leaves the clipping interval
    ignore_bos: bool = True  # never mask position 0 (BOS); eval excludes it from the token count
    # optimisation
    batch_size: int = 16  # global batch (sequences per optimizer step, all ranks together)
    micro_batch_size: int = 0  # sequences per forward on each process (gradient accumulation); 0 = all
    max_steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 100
    lr_decay: str = "constant"  # constant (BD3-LM) | cosine (to min_lr at max_steps)
    min_lr: float = 0.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    ema: float = 0.9999  # EMA decay (0: no EMA)
    # runtime
    device: str = "auto"  # auto = cuda (this rank's GPU) when available, else cpu
    amp: str = "auto"  # auto = bf16 autocast on GPU, off on CPU | bf16 | off
    seed: int = 0
    # logging, evaluation, checkpoints
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    eval_batch_size: int = 8
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest checkpoint in OUT, if any) | never | a checkpoint directory
    final_weights: str = "ema"  # ema | raw: which weights out/final holds
    progress: bool = True
    plot: bool = True

    # -- parsing and validation ------------------------------------------------------------

    @staticmethod
    def parse_block_sizes(text: str) -> dict:
        """'4:0.9,L:0.1' -> {4: 0.9, 'L': 0.1}."""
        out = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if ":" not in part:
                raise TrainConfigError(f"block size entry {part!r} must be SIZE:PROB, e.g. 4:0.9,L:0.1")
            size, prob = part.split(":", 1)
            key = "L" if size.strip() in ("L", "global") else _int(size, "block size")
            out[key] = _float(prob, f"probability of block size {size}")
        return out

    @staticmethod
    def parse_clip(text: str) -> dict:
        """'4:0.3:0.8,L:0.001:1' -> {4: [0.3, 0.8], 'L': [0.001, 1.0]}."""
        out = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            pieces = part.split(":")
            if len(pieces) != 3:
                raise TrainConfigError(f"clip entry {part!r} must be SIZE:EPS_MIN:EPS_MAX, e.g. 4:0.3:0.8")
            key = "L" if pieces[0].strip() in ("L", "global") else _int(pieces[0], "block size")
            out[key] = [_float(pieces[1], "eps_min"), _float(pieces[2], "eps_max")]
        return out

    def resolved_block_sizes(self, seq_len: int) -> dict:
        """{int block size: probability} with 'L' replaced by seq_len (entries merged)."""
        out: dict = {}
        for k, p in self.block_sizes.items():
            b = seq_len if str(k) in ("L", "global") else int(k)
            out[b] = out.get(b, 0.0) + float(p)
        return dict(sorted(out.items()))

    def resolved_clip(self, seq_len: int) -> dict:
        out = {b: list(DEFAULT_EPS) for b in self.resolved_block_sizes(seq_len)}
        for k, v in self.clip.items():
            out[seq_len if str(k) in ("L", "global") else int(k)] = [float(v[0]), float(v[1])]
        return out

    def check(self, seq_len: int | None = None, world_size: int = 1) -> None:
        """Raise TrainConfigError with one clear message for a configuration that cannot train."""
        if self.schedule not in SCHEDULES:
            raise TrainConfigError(f"unknown noise schedule {self.schedule!r}; choose from {', '.join(sorted(SCHEDULES))}")
        if not self.block_sizes:
            raise TrainConfigError("block_sizes is empty: give at least one SIZE:PROB")
        probs = [float(p) for p in self.block_sizes.values()]
        if any(p < 0 for p in probs):
            raise TrainConfigError(f"block size probabilities must be >= 0, got {self.block_sizes}")
        if abs(sum(probs) - 1.0) > 1e-6:
            raise TrainConfigError(f"block size probabilities must sum to 1, got {sum(probs):.6g} ({self.block_sizes})")
        for k in self.block_sizes:
            if str(k) not in ("L", "global") and int(k) < 1:
                raise TrainConfigError(f"block sizes must be >= 1, got {k}")
        if seq_len is not None:
            for b in self.resolved_block_sizes(seq_len):
                if b > seq_len or seq_len % b:
                    raise TrainConfigError(f"block size {b} does not divide the sequence length L = {seq_len}")
            for k in self.clip:
                b = seq_len if str(k) in ("L", "global") else int(k)
                if b not in self.resolved_block_sizes(seq_len):
                    raise TrainConfigError(f"clip interval given for block size {k}, which is not in the mix "
                                     f"{sorted(self.resolved_block_sizes(seq_len))}")
        for k, (lo, hi) in self.clip.items():
            if not (0.0 < lo < hi <= 1.0):
                raise TrainConfigError(f"clip interval of block size {k} must satisfy 0 < eps_min < eps_max <= 1, "
                                 f"got [{lo}, {hi}]")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise TrainConfigError(f"batch_size {self.batch_size} must be a positive multiple of the number of "
                             f"processes ({world_size})")
        for name in ("max_steps", "log_every", "save_every", "keep_checkpoints", "eval_batches", "eval_batch_size",
                     "clip_search_batches"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0:
            raise TrainConfigError(f"micro_batch_size must be >= 0 (0 = the whole per-process batch), got "
                             f"{self.micro_batch_size}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise TrainConfigError(f"ema decay must be in [0, 1), got {self.ema}")
        if self.lr_decay not in ("constant", "cosine"):
            raise TrainConfigError(f"lr_decay must be constant or cosine, got {self.lr_decay!r}")
        if self.amp not in ("auto", "bf16", "off"):
            raise TrainConfigError(f"amp must be auto, bf16 or off, got {self.amp!r}")
        if self.final_weights not in ("ema", "raw"):
            raise TrainConfigError(f"final_weights must be ema or raw, got {self.final_weights!r}")
        if self.final_weights == "ema" and self.ema == 0:
            self.final_weights = "raw"
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.clip_search_delta < 1 or not all(0 < w <= 1 for w in self.clip_search_widths):
            raise TrainConfigError("clip_search_delta must be in (0, 1) and the widths in (0, 1]")
        if self.model.startswith("preset:") and self.model.split(":", 1)[1] not in PRESETS:
            raise TrainConfigError(f"unknown preset {self.model!r}; choose from "
                             f"{', '.join('preset:' + p for p in sorted(PRESETS))}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["block_sizes"] = {str(k): v for k, v in self.block_sizes.items()}
        d["clip"] = {str(k): list(v) for k, v in self.clip.items()}
        d["clip_search_widths"] = list(self.clip_search_widths)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "block_sizes" in d:
            d["block_sizes"] = {_key(k): v for k, v in d["block_sizes"].items()}
        if "clip" in d:
            d["clip"] = {_key(k): v for k, v in d["clip"].items()}
        if "clip_search_widths" in d:
            d["clip_search_widths"] = tuple(d["clip_search_widths"])
        return cls(**d)


def _key(k):
    return "L" if str(k) in ("L", "global") else int(k)


def _int(text, what):
    try:
        return int(str(text).strip())
    except ValueError:
        raise TrainConfigError(f"{what} must be an integer or L, got {text!r}") from None


def _float(text, what):
    try:
        return float(str(text).strip())
    except ValueError:
        raise TrainConfigError(f"{what} must be a number, got {text!r}") from None


# ---------------------------------------------------------------------------------------
# Validation NELBO


def _rows_of(dataset):
    """(n, fetch(indices) -> int64 [k, L]) for a TokenDataset, a tensor or an array [N, L]."""
    if hasattr(dataset, "batch"):
        return len(dataset), dataset.batch
    tensor = torch.as_tensor(np.asarray(dataset) if not torch.is_tensor(dataset) else dataset).long()
    if tensor.dim() != 2:
        raise UserError(f"dataset must be [N, L] token ids, got shape {tuple(tensor.shape)}")
    return tensor.shape[0], lambda idx: tensor[torch.as_tensor(np.asarray(idx), dtype=torch.long)]


@torch.no_grad()
def evaluate_nelbo(model, dataset, *, block_size, batch_size: int = 8, max_batches: int | None = None,
                   generator=None, eps_min: float = DEFAULT_EPS[0], eps_max: float = DEFAULT_EPS[1],
                   ignore_bos: bool = True, schedule: str = "loglinear", antithetic: bool = True) -> dict:
    """Monte Carlo NELBO of ``dataset`` under block size ``block_size`` (None or >= L: global).

    One t per block per sequence, uniform on [eps_min, eps_max] (the default [1e-3, 1] is
    BD3-LM's validation NELBO; a clipped interval gives a biased estimate), one masking
    draw per sequence, in dataset order. Returns::

        {"nelbo": mean per-token NELBO (nats), "ppl": exp(nelbo), "tokens": tokens counted,
         "sequences": n, "block_size": b}

    With ``ignore_bos`` position 0 is never masked and not counted (as BD3-LM). Draws come
    from ``generator`` (default: a CPU generator seeded with 0), so the value reproduces.
    """
    n, fetch = _rows_of(dataset)
    sched = get_schedule(schedule)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    mask_id = model.config.mask_id
    was_training = model.training
    model.eval()
    total, tokens, sequences = 0.0, 0, 0
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            x0 = fetch(np.arange(start, min(start + batch_size, n))).to(device)  # [R, L]
            R, L = x0.shape
            b = L if block_size is None or block_size >= L else int(block_size)
            t, masked = draw_block_noise(R, L, b, eps_min, eps_max, g, sched, antithetic=antithetic,
                                         keep_first=ignore_bos)
            t, masked = t.to(device), masked.to(device)
            x_t = torch.where(masked, mask_id, x0)
            logits = model(x_t, x0=x0, block_size=b, sigma=sched.sigma(t[:, 0]))  # [R, L, V]
            terms = nelbo_terms(logits, x0, masked, t, mask_id, sched)  # [R, L]
            if ignore_bos:
                terms = terms[:, 1:]
            total += terms.double().sum().item()
            tokens += terms.numel()
            sequences += R
    finally:
        model.train(was_training)
    if tokens == 0:
        raise UserError("evaluate_nelbo: the dataset is empty")
    nelbo = total / tokens
    return {"nelbo": nelbo, "ppl": math.exp(min(nelbo, 700.0)), "tokens": tokens, "sequences": sequences,
            "block_size": b}


# ---------------------------------------------------------------------------------------
# The loss of one (local) batch: a module, so DDP wraps one forward per backward


class MixScaleLoss(nn.Module):
    """Mean NELBO over every token of a batch whose rows have different block sizes.

    forward(x0 [B, L], masked [B, L] bool, t [B, L], block_size [B] int) -> (loss, stats):
    rows are grouped by block size (each size has its own mask and, for b = L, no x_0
    half), one forward per group; stats is a detached float64 [2 * n_sizes] of per-size
    (term sum, token count) for logging, in ``sizes`` order.
    """

    def __init__(self, model: BlockDiffusionLM, sizes, schedule, amp_dtype=None):
        super().__init__()
        self.model = model
        self.sizes = [int(b) for b in sizes]
        self.schedule = schedule
        self.amp_dtype = amp_dtype

    def forward(self, x0, masked, t, block_size):
        B, L = x0.shape
        mask_id = self.model.config.mask_id
        total = x0.new_zeros((), dtype=torch.float32)
        stats = torch.zeros(2 * len(self.sizes), dtype=torch.float64)
        sizes_here = block_size.tolist()
        for j, b in enumerate(self.sizes):
            rows = [i for i, s in enumerate(sizes_here) if s == b]
            if not rows:
                continue
            idx = torch.tensor(rows, device=x0.device)
            x0_g, m_g, t_g = x0[idx], masked[idx], t[idx]  # [R, L]
            x_t = torch.where(m_g, mask_id, x0_g)
            with torch.autocast(device_type=x0.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                logits = self.model(x_t, x0=x0_g, block_size=b, sigma=self.schedule.sigma(t_g[:, 0]))  # [R, L, V]
            terms = nelbo_terms(logits, x0_g, m_g, t_g, mask_id, self.schedule)  # [R, L] float32
            part = terms.sum()
            total = total + part
            stats[2 * j] = part.detach().double().item()
            stats[2 * j + 1] = terms.numel()
        return total / (B * L), stats


# ---------------------------------------------------------------------------------------
# Noise for a global batch (identical on every rank)


def draw_batch_noise(cfg: TrainConfig, n_rows: int, seq_len: int, probs: dict, clip: dict, generator, schedule):
    """Block size per row, then per size (ascending) its rows' t and masks: CPU tensors
    block_size [G] int64, t [G, L] float32, masked [G, L] bool."""
    sizes = list(probs)
    weights = torch.tensor([probs[b] for b in sizes], dtype=torch.float64)
    which = torch.multinomial(weights, n_rows, replacement=True, generator=generator)  # [G]
    block_size = torch.tensor(sizes, dtype=torch.int64)[which]
    t = torch.empty(n_rows, seq_len, dtype=torch.float32)
    masked = torch.empty(n_rows, seq_len, dtype=torch.bool)
    for b in sizes:
        rows = (block_size == b).nonzero().flatten()
        if rows.numel() == 0:
            continue
        lo, hi = clip[b]
        t_b, m_b = draw_block_noise(rows.numel(), seq_len, b, lo, hi, generator, schedule, antithetic=cfg.antithetic,
                                    resample=cfg.resample, keep_first=cfg.ignore_bos)
        t[rows], masked[rows] = t_b, m_b
    return block_size, t, masked


# ---------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of the parameters, float32 (or the parameters' dtype if wider)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
                       for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().to(s.dtype) for p, s in zip(model.parameters(), self.shadow)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and the EMA's (call twice to undo: bit-exact)."""
        for p, s in zip(model.parameters(), self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {f"ema.{n}": s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, tensors: dict) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[f"ema.{n}"])


# ---------------------------------------------------------------------------------------
# Checkpoints: a directory per step, written under a temporary name then renamed


def _optimizer_to_flat(opt: torch.optim.Optimizer):
    """AdamW state -> (tensors for safetensors, JSON-able param_groups + state keys)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(noise_gen: torch.Generator) -> dict:
    out = {"rng.cpu": torch.get_rng_state(), "rng.noise": noise_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def list_checkpoints(out_dir: str) -> list:
    """Complete checkpoint directories of a run, oldest first."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and
                   os.path.isfile(os.path.join(root, n, TRAINER_STATE)))
    return [os.path.join(root, n) for n in names]


# errno values meaning "the file system has no room for this file": the user must free
# space or raise a limit. Every other I/O error keeps its traceback.
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room_errno(exc: BaseException) -> int | None:
    """The errno of ``exc``, or of an exception it was raised from, when it says the file
    system is out of room; else None. safetensors reports a failed write as its own
    exception, whose text carries the OS error as "(os error N)", not as an OSError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM_ERRNOS:
            return exc.errno
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found and int(found.group(1)) in _NO_ROOM_ERRNOS:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _storage_errors_as_user_errors(what: str):
    """Re-raise a full disk (or quota, or file size limit) met while writing ``what`` as one
    StorageFullError line: the user has to make room, the code has no bug to show."""
    try:
        yield
    except StorageFullError:
        raise
    except Exception as exc:
        code = _no_room_errno(exc)
        if code is None:
            raise
        raise StorageFullError(f"cannot write {what}: {os.strerror(code).lower()}; make room, then run the same "
                               "command again: it resumes from the last complete checkpoint") from exc


def _write_checkpoint_files(directory: str, *, model, ema, optimizer, state: dict, rng_per_rank: list,
                            tokenizer: str | None) -> None:
    model.save_pretrained(directory)  # config.json + model.safetensors: loadable by from_pretrained
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()},
                  os.path.join(directory, "ema.safetensors"))
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    save_file(opt_tensors, os.path.join(directory, "optimizer.safetensors"))
    for rank, rng in enumerate(rng_per_rank):
        save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(directory, f"rng_rank{rank}.safetensors"))
    if tokenizer and os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(directory, "tokenizer.json"))
    atomic_write_json(os.path.join(directory, TRAINER_STATE), {**state, "optimizer": opt_meta})
    for name in os.listdir(directory):  # make the bytes durable before the rename publishes them
        with open(os.path.join(directory, name), "rb") as f:
            os.fsync(f.fileno())


def save_checkpoint(path: str, *, model, ema, optimizer, state: dict, rng_per_rank: list, tokenizer: str | None,
                    keep: int) -> None:
    """Write the checkpoint directory `path` atomically (temp dir + rename); keep the last `keep`.

    A write that fails (a full disk: StorageFullError, one line) removes its temporary
    directory and leaves every earlier checkpoint as it was.
    """
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    for stale in os.listdir(root):  # left by a run killed while writing: never complete, never read
        if stale.startswith(".tmp-"):
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    tmp = os.path.join(root, f".tmp-{os.path.basename(path)}-{os.getpid()}")
    with _storage_errors_as_user_errors(f"the checkpoint {path}"):
        try:
            os.makedirs(tmp)
            _write_checkpoint_files(tmp, model=model, ema=ema, optimizer=optimizer, state=state,
                                    rng_per_rank=rng_per_rank, tokenizer=tokenizer)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(os.path.dirname(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

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
    return Dist(rank, world, local), device


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

        amp = cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "off")
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        self.loss_module = MixScaleLoss(self.model, list(self.probs), self.schedule, self.amp_dtype)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_module = DDP(self.loss_module, device_ids=[self.device.index] if self.device.type == "cuda"
                                    else None)
        else:
            self.train_module = self.loss_module
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, foreach=True)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0
        self.best_val = None
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if self.dist.main:
            os.makedirs(cfg.out, exist_ok=True)

    # -- construction ------------------------------------------------------------------------

    def _build_model(self) -> BlockDiffusionLM:
        cfg, L = self.cfg, self.seq_len
        vocab = self.train_data.model_vocab_size
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if cfg.model.startswith("preset:"):
            overrides = dict(vocab_size=vocab, model_length=L, block_size=min(self.probs))
            if cfg.dropout is not None:
                overrides["dropout"] = cfg.dropout
            model = BlockDiffusionLM.from_preset(cfg.model.split(":", 1)[1], **overrides)
        else:
            if not os.path.isdir(cfg.model):
                raise TrainConfigError(f"--model {cfg.model!r} is neither preset:NAME nor a checkpoint directory")
            model = BlockDiffusionLM.from_pretrained(cfg.model)
            if cfg.dropout is not None:
                model = BlockDiffusionLM(model.config, dropout=cfg.dropout).train()
                model.load_state_dict(BlockDiffusionLM.from_pretrained(cfg.model).state_dict())
            mc = model.config
            if mc.vocab_size != vocab:
                raise TrainConfigError(f"the model's vocabulary ({mc.vocab_size}) differs from the dataset's "
                                 f"({vocab} = tokenizer + mask): prepare the data with the model's tokenizer")
            if mc.model_length != L:
                raise TrainConfigError(f"the model was trained on L = {mc.model_length} but the dataset's sequences have "
                                 f"{L} tokens: prepare the data with --seq-len {mc.model_length}")
        for b in self.probs:
            if b > model.config.model_length:
                raise TrainConfigError(f"block size {b} exceeds the model length {model.config.model_length}")
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

    def steps_per_epoch(self) -> int:
        return (len(self.train_data) // self.dist.world_size) // (self.cfg.batch_size // self.dist.world_size)

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
        model, mask_id, L = self.model, self.model.config.mask_id, self.seq_len
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
                    t, masked = t.to(self.device), masked.to(self.device)
                    logits = model(torch.where(masked, mask_id, x0), x0=x0, block_size=b,
                                   sigma=self.schedule.sigma(t[:, 0]))
                    terms = nelbo_terms(logits, x0, masked, t, mask_id, self.schedule)  # [R, L]
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
        rng = _rng_tensors(self.noise_gen)
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
        weights = load_safetensors(os.path.join(path, "model.safetensors"))
        self.model.load_state_dict({k: v.to(self.device) for k, v in weights.items()})
        if self.ema is not None and os.path.isfile(os.path.join(path, "ema.safetensors")):
            self.ema.load_state_dict({k: v.to(self.device) for k, v in
                                      load_safetensors(os.path.join(path, "ema.safetensors")).items()})
        _optimizer_from_flat(self.optimizer, {k: v.to(self.device) for k, v in
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
        if not self.dist.main or not os.path.isfile(self.metrics_path):
            return None
        plt = pyplot("loss.png")
        if plt is None:
            return None

        with open(self.metrics_path) as f:
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
        ax.set_title(f"did_engine train: {os.path.basename(os.path.abspath(self.cfg.out))}")
        path = os.path.join(self.cfg.out, "loss.png")
        fig.tight_layout()
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        return path

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
            print(f"did_engine train: {n_params / 1e6:.2f}M parameters, L = {self.seq_len}, mix "
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
            with _storage_errors_as_user_errors(f"the final model {path}"):
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
        with _storage_errors_as_user_errors(f"to the run directory {cfg.out}"):  # metrics, plot, config
            return trainer.fit()
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Command line


def _arg_type(parse):
    """argparse shows an ArgumentTypeError's own message (a ValueError becomes 'invalid value')."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def _bool_flag(group, name, default, help_text):
    group.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                       default=default, help=help_text)


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = TrainConfig()
    g = p.add_argument_group("data and model")
    g.add_argument("--data", required=True, help="prepared dataset directory (from `did-engine data prepare`): "
                                                 "train.bin, validation.bin, manifest.json, tokenizer.json")
    g.add_argument("--out", default=d.out, help="run directory: checkpoints/, final/ (the trained model), "
                                                "metrics.jsonl, loss.png, train_config.json")
    g.add_argument("--model", default=d.model,
                   help="preset:NAME (tiny, small; vocabulary and L are taken from the data) to train from "
                        "scratch, or a checkpoint directory to fine-tune (ours or a BD3-LM Hugging Face "
                        "directory with config.json + model.safetensors)")
    g.add_argument("--dropout", type=float, default=None, help="override the model's dropout probability")
    m = p.add_argument_group("mix-scale block diffusion")
    m.add_argument("--block-sizes", type=_arg_type(TrainConfig.parse_block_sizes), default="4:0.9,L:0.1",
                   help="block size distribution SIZE:PROB,...; each training sequence draws its block size; "
                        "L = the whole sequence (global block). Sizes must divide L, probabilities sum to 1")
    m.add_argument("--clip", type=_arg_type(TrainConfig.parse_clip), default="",
                   help="noise clipping per block size SIZE:EPS_MIN:EPS_MAX,... (t ~ U[eps_min, eps_max]); "
                        "unlisted sizes use [0.001, 1], the unclipped NELBO")
    _bool_flag(m, "clip-search", d.clip_search,
               "at every evaluation, pick each block size's clipping interval that minimises the variance "
               "of the per-block validation loss (BD3-LM's data-driven noise schedule)")
    m.add_argument("--clip-search-widths", type=lambda s: tuple(float(x) for x in s.split(",")),
                   default=d.clip_search_widths, help="interval widths tried by --clip-search (comma list)")
    m.add_argument("--clip-search-delta", type=float, default=d.clip_search_delta,
                   help="grid step of interval starts tried by --clip-search")
    m.add_argument("--clip-search-batches", type=int, default=d.clip_search_batches,
                   help="validation batches per candidate interval in --clip-search")
    m.add_argument("--schedule", default=d.schedule, help=f"noise schedule ({', '.join(sorted(SCHEDULES))})")
    _bool_flag(m, "antithetic", d.antithetic, "stratified (antithetic) noise levels across a batch's blocks")
    _bool_flag(m, "resample", d.resample, "redraw a block's mask when its masked fraction leaves a clipped "
                                          "interval (as BD3-LM)")
    _bool_flag(m, "ignore-bos", d.ignore_bos, "never mask position 0 (BOS); evaluation does not count it")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch: sequences per optimizer step over all processes (a multiple of their number)")
    o.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size,
                   help="sequences per forward pass on each process; smaller than the per-process batch "
                        "accumulates gradients over several passes (same result, less memory); 0 = all at once")
    o.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps of the whole run")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    o.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup steps from 0 to --lr")
    o.add_argument("--lr-decay", choices=["constant", "cosine"], default=d.lr_decay,
                   help="after warmup: constant (BD3-LM) or cosine down to --min-lr at --max-steps")
    o.add_argument("--min-lr", type=float, default=d.min_lr, help="final learning rate of the cosine decay")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (matrices only; norms, biases, embeddings' vectors excluded)")
    o.add_argument("--beta1", type=float, default=d.beta1, help="AdamW beta1")
    o.add_argument("--beta2", type=float, default=d.beta2, help="AdamW beta2")
    o.add_argument("--adam-eps", type=float, default=d.adam_eps, help="AdamW epsilon")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="clip the global gradient norm (0: off)")
    o.add_argument("--ema", type=float, default=d.ema, help="EMA decay of the weights (0: no EMA)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d.device, help="auto (this rank's GPU if any, else cpu), cpu, cuda, cuda:N")
    r.add_argument("--amp", choices=["auto", "bf16", "off"], default=d.amp,
                   help="bf16 autocast: auto = on GPU only (CPUs here lack fast bf16 matmuls)")
    r.add_argument("--seed", type=int, default=d.seed, help="seed of the initial weights, data order and noise")
    lg = p.add_argument_group("logging, evaluation, checkpoints")
    lg.add_argument("--log-every", type=int, default=d.log_every, help="steps between metrics.jsonl records")
    lg.add_argument("--eval-every", type=int, default=d.eval_every,
                    help="steps between validation NELBO evaluations (0: at the end only)")
    lg.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches per evaluation")
    lg.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size, help="sequences per validation batch")
    lg.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    lg.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept (latest)")
    lg.add_argument("--resume", default=d.resume,
                    help="auto: continue from the latest checkpoint in --out if there is one; never; or a "
                         "checkpoint directory")
    lg.add_argument("--final-weights", choices=["ema", "raw"], default=d.final_weights,
                    help="which weights out/final holds")
    _bool_flag(lg, "progress", d.progress, "show a progress bar with loss and tokens/s")
    _bool_flag(lg, "plot", d.plot, "write loss.png at the end")
    p.set_defaults(run=run_from_args)
    return p


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if isinstance(cfg.block_sizes, str):
        cfg.block_sizes = TrainConfig.parse_block_sizes(cfg.block_sizes)
    if isinstance(cfg.clip, str):
        cfg.clip = TrainConfig.parse_clip(cfg.clip)
    return cfg


def run_from_args(args) -> int:
    cfg = config_from_args(args)
    cfg.check()  # what can be checked before the data is opened
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    return 0


DESCRIPTION = ("Train (or fine-tune) a block diffusion LM with mix-scale block sizes: each sequence draws its "
               "block size (default 4 with p 0.9, the whole sequence with p 0.1), the vectorised cat(x_t, x_0) "
               "mask, the NELBO of the log-linear schedule with per-size noise clipping. Checkpoints are atomic "
               "and resume exactly; run under `torchrun --nproc_per_node=N -m did_engine.training.trainer` for DDP.")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="mix-scale block diffusion training (DDP under torchrun)",
                              description=DESCRIPTION, formatter_class=HelpFormatter)
    configure_parser(p)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m did_engine.training.trainer", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    configure_parser(parser)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:  # a mistake in the options, the data or the run directory: one line
        print(f"did-engine train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
