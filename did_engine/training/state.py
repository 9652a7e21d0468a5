"""Training state on disk: the EMA of the weights, optimizer and RNG state as safetensors,
and checkpoint directories written atomically (temporary directory, fsync, rename), with a
full disk reported as one StorageFullError line.

A checkpoint directory (checkpoints/step_NNNNNNNN) holds config.json + model.safetensors
(loadable by from_pretrained), ema.safetensors, optimizer.safetensors, rng_rankR.safetensors
per rank, tokenizer.json and, written last, trainer_state.json.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil

import torch
import torch.nn as nn
from safetensors.torch import save_file

from did_engine.errors import UserError
from did_engine.modeling.adapters import has_adapters, save_adapter
from did_engine.modeling.checkpoint import atomic_write_json

TRAINER_STATE = "trainer_state.json"


class StorageFullError(UserError):
    """The file system refused a write of the run (no space left, a quota, a file size
    limit). A checkpoint being written is removed, earlier ones are intact: the same command
    resumes from the last of them once there is room."""


class EMA:
    """Exponential moving average of the parameters, float32 (or the parameters' dtype if wider)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]  # frozen weights never move
        self.shadow = [p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
                       for p in self._params(model)]

    @staticmethod
    def _params(model: nn.Module) -> list:
        return [p for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().to(s.dtype) for p, s in zip(self._params(model), self.shadow)]
        torch._foreach_lerp_(self.shadow, params, 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and the EMA's (call twice to undo: bit-exact)."""
        for p, s in zip(self._params(model), self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)

    def state_dict(self) -> dict:
        return {f"ema.{n}": s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, tensors: dict) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(tensors[f"ema.{n}"])


def optimizer_to_flat(opt: torch.optim.Optimizer):
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


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, v in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = v
    for name, v in meta["scalars"].items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(noise_gen: torch.Generator) -> dict:
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
def storage_errors_as_user_errors(what: str):
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
    if has_adapters(model):  # a delta: the adapter and a reference to its base
        save_adapter(model, directory)
    else:
        model.save_pretrained(directory)  # config.json + model.safetensors: loadable by from_pretrained
    if ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()},
                  os.path.join(directory, "ema.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
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
    with storage_errors_as_user_errors(f"the checkpoint {path}"):
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
