"""Model checkpoints: safetensors + JSON only (nothing is ever unpickled), written atomically.

Two directory formats are read:

- ours: ``config.json`` = {"format": "did_engine", "format_version": 1, "config": {...}}
  and ``model.safetensors`` with BlockDiffusionLM's parameter names;
- BD3-LM's Hugging Face format: ``config.json`` (``BD3LMConfig`` fields, model_type
  "bd3lm") and ``model.safetensors`` with names under ``backbone.``; scalar tensors outside
  the backbone (``sampling_eps_min``/``max``) become metadata in ``config.extra``.

Checkpoints may come from anywhere, so loading checks before it allocates: the files must be
regular files (symlinks to them are fine: the Hugging Face cache is made of them); the config
is size- and depth-limited JSON whose values ModelConfig range-checks; the safetensors header
is parsed here, checked for consistency with the file's size and against the names, shapes
and dtypes the config implies, and only then is tensor data read. Every refusal is a
CheckpointError naming the file and what is wrong with it.

Unknown keys: in our own format an unknown config key is refused (we write every field, so
it is a typo or a field of a newer did_engine whose meaning would be silently dropped); in
BD3-LM's format unknown keys are kept in ``config.extra`` (Hugging Face configs carry
training settings and bookkeeping such as ``transformers_version``).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from did_engine.errors import UserError
from did_engine.modeling.config import ModelConfig

FORMAT = "did_engine"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes; its metadata stays small
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
MAX_JSON_DEPTH = 32
MAX_TENSOR_RANK = 8
MAX_BD3LM_BUFFERS = 64  # scalar tensors outside BD3-LM's backbone, kept in config.extra
# Fields that fix the weights' shapes: a checkpoint must state them (no defaults are guessed).
REQUIRED_CONFIG_KEYS = ("vocab_size", "model_length", "hidden_dim", "cond_dim", "n_blocks", "n_heads")

# safetensors dtype names -> torch dtypes. Little-endian data is read as native: every
# platform torch supports here is little-endian.
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")  # cast to the model's dtype on load


class CheckpointError(UserError):
    """A checkpoint file that is missing, malformed, or does not match the model it describes."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist (also a FileNotFoundError)."""


# ---------------------------------------------------------------------------------------
# Writing


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def atomic_write_bytes(path: str, write) -> None:
    """Call write(tmp_path) then rename over `path`: a reader never sees a partial file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make a plain output file private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write_bytes(path, write)


def save_pretrained(model, path) -> None:
    """Write `model` as a did_engine checkpoint directory (config.json + model.safetensors)."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    if getattr(model, "checkpoint_class", None):  # classes other than BlockDiffusionLM say which they are
        config["model_class"] = model.checkpoint_class
    try:  # before any file is written: metadata that JSON cannot hold is the caller's mistake
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"model.config.extra cannot be saved as JSON: {e}") from None
    os.makedirs(path, exist_ok=True)
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    # Weights first, config last: a directory with a config.json always has matching weights.
    atomic_write_bytes(os.path.join(path, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write_json(os.path.join(path, CONFIG_NAME), config)


# ---------------------------------------------------------------------------------------
# Reading files that may be hostile


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
        raise CheckpointError(f"{path} is {kind}, not a regular file")


def open_regular_file(path: str):
    """Open `path` for binary reading if it (or what its symlinks point to) is a regular file.

    A FIFO or device in a checkpoint's place would otherwise be read forever; it is refused
    before it is opened, and again after (non-blocking open, fstat) in case it was swapped in.
    """
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # os.stat's "embedded null byte"
        raise CheckpointError(f"{path!r} is not a usable path: {e}") from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _refuse_duplicate_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {dup!r} appears twice")
    return obj


def _json_depth(obj) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (dict, list)):
            depth = max(depth, d)
            stack.extend((child, d + 1) for child in (node.values() if isinstance(node, dict) else node))
    return depth


def parse_json(data: bytes, source: str):
    """JSON bytes -> object, or CheckpointError naming `source` (bad UTF-8, bad syntax,
    duplicate keys, numbers Python refuses, nesting deeper than MAX_JSON_DEPTH)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except RecursionError:
        raise CheckpointError(f"{source} nests JSON too deeply to parse (limit {MAX_JSON_DEPTH} levels)") from None
    except ValueError as e:  # JSONDecodeError, duplicate keys, integers of more than 4300 digits
        raise CheckpointError(f"{source} is not valid JSON: {e}") from None
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{source} nests JSON {_json_depth(obj)} levels deep (limit {MAX_JSON_DEPTH})")
    return obj


def read_json_file(path: str, max_bytes: int = MAX_CONFIG_BYTES):
    """Parse a small JSON file that may be hostile (see parse_json); refused above max_bytes."""
    with open_regular_file(path) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is larger than {max_bytes} bytes: not a checkpoint config")
    return parse_json(data, path)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: where its bytes lie, relative to the data start."""

    dtype: str
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _header_entry(path: str, name: str, info) -> TensorEntry:
    def bad(what):
        return CheckpointError(f"{path}: safetensors header entry {name!r} {what}")

    def is_index(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise bad("must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise bad(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(map(is_index, shape)):
        raise bad(f"has shape {shape!r}: expected at most {MAX_TENSOR_RANK} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(is_index, offsets)) or offsets[0] > offsets[1]:
        raise bad(f"has data_offsets {offsets!r}: expected [begin, end] with 0 <= begin <= end")
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    expected_bytes = entry.numel * SAFETENSORS_DTYPES[dtype].itemsize
    if entry.end - entry.begin != expected_bytes:
        raise bad(f"spans {entry.end - entry.begin} bytes but {dtype} {list(shape)} needs {expected_bytes}")
    return entry


class SafetensorsFile:
    """An open safetensors file whose header has been validated; tensors are read on demand.

    Checked before any tensor data is read: the file is regular, the header length fits the
    file and MAX_HEADER_BYTES, the header is a JSON object of well-formed entries, each
    entry's byte span equals its dtype x shape, and the spans tile the data section exactly
    (no overlap, no gap, nothing past the end: a truncated file or a tensor declared larger
    than the file is refused from the header alone).
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open_regular_file(path)
        try:
            self.entries, self.metadata = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self):
        path, f = self.path, self._file
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path} is {size} bytes: too short for a safetensors file")
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8 or header_len > MAX_HEADER_BYTES or header_len < 2:
            raise CheckpointError(f"{path}: safetensors header length {header_len} is impossible (file of {size} "
                                  f"bytes, limit {MAX_HEADER_BYTES}): truncated or not a safetensors file")
        header = parse_json(f.read(header_len), f"{path} (safetensors header)")
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header is a JSON {_json_type(header)}, not an object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{path}: safetensors __metadata__ must map names to strings")
        entries = {name: _header_entry(path, name, info) for name, info in header.items()}
        self.data_start, data_len = 8 + header_len, size - 8 - header_len
        for name, e in entries.items():
            if e.end > data_len:
                raise CheckpointError(f"{path}: tensor {name!r} ({e.dtype} {list(e.shape)}) ends at data byte "
                                      f"{e.end} but the file holds {data_len}: truncated or forged")
        position = 0
        for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if e.begin != position:
                what = "overlaps the tensor before it" if e.begin < position else "leaves unindexed bytes before it"
                raise CheckpointError(f"{path}: tensor {name!r} at data bytes [{e.begin}, {e.end}) {what}")
            position = e.end
        if position != data_len:
            raise CheckpointError(f"{path}: {data_len - position} bytes after the last tensor are not indexed "
                                  "by the header")
        return entries, metadata

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype (a fresh CPU tensor)."""
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES[e.dtype]
        if e.numel == 0:
            return torch.empty(e.shape, dtype=dtype)
        buf = bytearray(e.end - e.begin)
        self._file.seek(self.data_start + e.begin)
        if self._file.readinto(buf) != len(buf):
            raise CheckpointError(f"{self.path} became shorter while tensor {name!r} was read")
        return torch.frombuffer(buf, dtype=dtype).reshape(e.shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_safetensors(path: str) -> dict:
    """Every tensor of a safetensors file, in stored dtypes, after SafetensorsFile's checks: a
    drop-in for safetensors.torch.load_file on files that may be truncated or forged."""
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f.entries}


# ---------------------------------------------------------------------------------------
# Loading a model


def _bd3lm_config(raw: dict, config_path: str) -> dict:
    """Map BD3LMConfig fields onto ModelConfig fields (the names already agree)."""
    if raw.get("attn_backend") not in (None, "sdpa", "flex"):
        raise CheckpointError(f"{config_path}: unsupported BD3-LM attn_backend {raw['attn_backend']!r}")
    if raw.get("causal"):
        raise CheckpointError(f"{config_path}: causal (autoregressive) BD3-LM checkpoints are not block "
                              "diffusion models")
    return raw


def resolve_embedded(path: str) -> str:
    """A name of a model shipped in the package (e.g. "dit-mini") -> its directory; a real
    directory of that name takes precedence."""
    from did_engine.pretrained import EMBEDDED_MODELS, embedded_model_path

    if os.path.isdir(path) or path not in EMBEDDED_MODELS:
        return path
    directory = embedded_model_path(path)
    if not any(os.path.isfile(os.path.join(directory, f)) for f in (WEIGHTS_NAME, "adapter.safetensors")):
        raise FileNotFoundError(f"the embedded model {path!r} is missing from this installation ({directory}): "
                                "reinstall did_engine, or pass a checkpoint directory")
    return directory


def checked_model_config(cls, raw, config_path: str, weights: SafetensorsFile | None = None):
    """config.json's object -> (a ``cls.config_class``, source format), every value checked.
    A did_engine checkpoint must be of ``cls`` (its model_class; none: BlockDiffusionLM);
    BD3-LM's Hugging Face config is read for the DiT only."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} holds a JSON {_json_type(raw)}, not an object")
    if raw.get("format") == FORMAT:
        version = raw.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"{config_path}: format_version {version!r} is not a positive integer")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{config_path} has format_version {version}; this did_engine reads up to "
                                  f"{FORMAT_VERSION}: upgrade did_engine")
        if raw.get("model_class", "BlockDiffusionLM") != _class_name(cls):
            raise CheckpointError(f"{config_path} holds a {raw.get('model_class', 'BlockDiffusionLM')!r:.80} checkpoint, "
                                  f"not a {_class_name(cls)}: load it with did_engine.load_model")
        fields, source, unknown = raw.get("config"), "did_engine", "error"
        if not isinstance(fields, dict):
            raise CheckpointError(f"{config_path}: 'config' must be an object, got "
                                  f"{_json_type(fields) if 'config' in raw else 'nothing'}")
    elif cls.config_class is ModelConfig and (raw.get("model_type") == "bd3lm"
                                              or any(k.startswith("backbone.") for k in weights.entries)):
        fields, source, unknown = _bd3lm_config(raw, config_path), "bd3lm", "extra"
    else:
        raise CheckpointError(f"{config_path} is neither a did_engine checkpoint config nor a BD3-LM "
                              "Hugging Face config")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in fields] if cls.config_class is ModelConfig else []
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}")
    try:
        return cls.config_class.from_dict(fields, unknown=unknown), source
    except UserError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def _class_name(cls) -> str:
    """The model_class a checkpoint of ``cls`` carries (BlockDiffusionLM's files predate the field)."""
    return getattr(cls, "checkpoint_class", None) or "BlockDiffusionLM"


def _bd3lm_metadata(weights: SafetensorsFile) -> dict:
    """BD3-LM's tensors outside the backbone (sampling_eps_min/max buffers): scalars only."""
    outside = {name: e for name, e in weights.entries.items() if not name.startswith("backbone.")}
    if len(outside) > MAX_BD3LM_BUFFERS:
        raise CheckpointError(f"{weights.path} has {len(outside)} tensors outside the backbone; BD3-LM has a few "
                              f"scalar buffers (limit {MAX_BD3LM_BUFFERS})")
    metadata = {}
    for name, e in outside.items():
        if e.numel != 1:
            raise CheckpointError(f"{weights.path}: tensor {name!r} outside the backbone has shape {list(e.shape)}; "
                                  "only scalar buffers (such as sampling_eps_min) are kept, as metadata")
        value = weights.read(name).item()
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{weights.path}: tensor {name!r} is {value}")
        metadata[name] = value
    return metadata


def load_pretrained(cls, path, device=None, dtype=None, strict: bool = True):
    """Load a checkpoint directory (ours or BD3-LM's) into a new `cls` model (a model class
    with ``config_class``, and ``checkpoint_class`` unless BlockDiffusionLM); see the module
    docstring for what is checked. strict=False tolerates missing and unexpected tensors (the
    missing ones keep their initial values); wrong shapes and dtypes are refused either way."""
    path = resolve_embedded(os.fspath(path))
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.lexists(p):
            raise CheckpointNotFoundError(f"{p} not found: a checkpoint directory holds {CONFIG_NAME} and "
                                          f"{WEIGHTS_NAME}")
    raw = read_json_file(config_path)
    with SafetensorsFile(weights_path) as weights:
        config, source = checked_model_config(cls, raw, config_path, weights)
        in_file = weights.entries
        if source == "bd3lm":
            config.extra.update(_bd3lm_metadata(weights))
            config.extra["source_format"] = "bd3lm"
            in_file = {n[len("backbone."):]: e for n, e in weights.entries.items() if n.startswith("backbone.")}
            file_name = {n: "backbone." + n for n in in_file}
        else:
            file_name = {n: n for n in in_file}

        with torch.device("meta"):  # the names, shapes and dtypes the config implies, allocating nothing
            expected = dict(cls(config).state_dict())
        missing = sorted(set(expected) - set(in_file))
        unexpected = sorted(set(in_file) - set(expected))
        common = sorted(set(expected) & set(in_file))
        mis_shaped = [f"{n}: checkpoint {in_file[n].shape} vs model {tuple(expected[n].shape)}"
                      for n in common if in_file[n].shape != tuple(expected[n].shape)]
        not_float = [f"{n} ({in_file[n].dtype})" for n in common if in_file[n].dtype not in WEIGHT_DTYPES]
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected)}")
        if mis_shaped:
            problems.append(f"mis-shaped tensors: {'; '.join(mis_shaped)}")
        if not_float:
            problems.append(f"tensors that are not floating point: {', '.join(not_float)}")
        if mis_shaped or not_float or (strict and problems):
            raise CheckpointError(f"{weights_path} does not match {config_path} (vocab {config.vocab_size}): "
                                  + " | ".join(problems))

        model = cls(config)
        target = model.state_dict()  # shares storage with the parameters and buffers
        with torch.no_grad():
            for name in common:  # one tensor at a time: the peak is the model plus its largest tensor
                t = weights.read(file_name[name]).to(target[name].dtype)
                if not torch.isfinite(t).all():
                    raise CheckpointError(f"{weights_path}: tensor {file_name[name]!r} holds non-finite values "
                                          f"({int((~torch.isfinite(t)).sum())} of {t.numel()})")
                target[name].copy_(t)
    model.eval()
    return model.to(device=device, dtype=dtype)
