"""A gallery of hostile checkpoint directories: each is refused clearly and cheaply, or loads correctly.

The directories are built from two valid checkpoints (a tiny did_engine one and the BD3-LM
fixture) by breaking one thing each. A worker subprocess loads them one by one, so a crash or
a hang costs one case and not the run; for each it reports the exception (type, message), the
time taken and how much its peak memory grew. The parent classifies every case:

- loaded correctly: a case meant to load did, and equals the reference model exactly;
- refused clearly: CheckpointError naming the offending file, fast, without a big allocation;
- unclear error: any other exception, or a CheckpointError that does not name the file;
- silent wrong answer: a case meant to be refused loaded, or a load differs from the reference;
- crash / hang: the worker died, or made no progress within the time limit.

Run as a script (``python tests/modeling/test_checkpoint_hostile.py``) it prints these figures.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

BD3LM_FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "bd3lm_tiny")
CASE_SECONDS = 20.0  # generous for a loaded CI machine; a refusal takes milliseconds
REFUSAL_SECONDS = 2.0
FIFO_SECONDS = 1.0
PEAK_GROWTH_MB = 200  # the gallery's models are tiny: anything above is a forged size obeyed

CONFIG, WEIGHTS = "config.json", "model.safetensors"
TINY = dict(vocab_size=37, model_length=24, hidden_dim=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)


# ---------------------------------------------------------------------------------------
# Building blocks: a raw safetensors writer (so headers can lie), JSON edits


def write_safetensors(path, tensors: dict, header_edit=None, data_edit=None, metadata=None):
    """Write tensors in the safetensors layout by hand; header_edit(header) and
    data_edit(bytes) -> bytes may corrupt the result."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                 torch.int64: "I64", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = metadata if metadata is not None else {"format": "pt"}
    if header_edit:
        header = header_edit(header)
    data = b"".join(chunks)
    if data_edit:
        data = data_edit(data)
    pairs = header if isinstance(header, list) else header.items()  # a list may repeat a name
    text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    write_raw_safetensors(path, text.encode(), data)


def write_raw_safetensors(path, header_bytes: bytes, data: bytes, declared_len=None):
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if declared_len is None else declared_len))
        f.write(header_bytes)
        f.write(data)


def edit_json(path, edit):
    with open(path) as f:
        obj = json.load(f)
    edit(obj)  # in place
    with open(path, "w") as f:
        json.dump(obj, f)


def tiny_reference(root):
    """A did_engine checkpoint of a tiny model with every parameter random, at root/reference."""
    from did_engine.modeling import BlockDiffusionLM, ModelConfig

    torch.manual_seed(0)
    model = BlockDiffusionLM(ModelConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = os.path.join(root, "reference")
    model.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------
# The gallery: name -> (base, edit(dir), expectation). An expectation is ("refuse", file that
# must be named) or ("load", transform of the reference tensors the load must equal).


def _cfg(edit):
    return lambda d: edit_json(os.path.join(d, CONFIG), lambda raw: edit(raw["config"] if "config" in raw else raw))


def _set(**values):
    return _cfg(lambda c: c.update(values))


def _write_config_text(text: bytes):
    def edit(d):
        with open(os.path.join(d, CONFIG), "wb") as f:
            f.write(text)
    return edit


def _replace_with(name, make):
    def edit(d):
        os.remove(os.path.join(d, name))
        make(os.path.join(d, name))
    return edit


def _weights(transform=None, header_edit=None, data_edit=None, metadata=None):
    """Rewrite model.safetensors by hand; transform(tensors) may change the dict in place."""
    def edit(d):
        p = os.path.join(d, WEIGHTS)
        tensors = load_file(p)
        if transform:
            transform(tensors)  # in place
        write_safetensors(p, tensors, header_edit, data_edit, metadata)
    return edit


def _bytes(edit_bytes):
    def edit(d):
        p = os.path.join(d, WEIGHTS)
        with open(p, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(edit_bytes(data))
    return edit


def _header_of(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, data[8:8 + n], data[8 + n:]


def _put(name, value_fn):
    def transform(t):
        t[name] = value_fn(t[name])
    return transform


def _cast_all(dtype):
    return lambda t: t.update({k: v.to(dtype) for k, v in t.items()})


def _first_key(header):
    return next(k for k in header if k != "__metadata__")


def _shift_offsets(name, by):
    def edit(header):
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
        return header
    return edit


def _overlap(header):
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]  # point b at a's bytes; b's own bytes stay where they were
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]
    return header


def _declare_10gb(header):
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["blocks.0.attn_qkv.weight_huge"] = {"dtype": "F32", "shape": [50_000, 50_000],
                                               "data_offsets": [end, end + 10_000_000_000]}
    return header


def _embed_10gb(header):
    """The embedding re-declared as 10 GB, with a config to match: refused from the header."""
    entry = header["vocab_embed.embedding"]
    start = entry["data_offsets"][0]
    entry["shape"] = [2_441_406, 1024]
    entry["data_offsets"] = [start, start + 2_441_406 * 1024 * 4]
    return header


def _duplicate_name(header):
    """A list of (name, entry) pairs in which the first tensor appears twice (JSON objects
    with repeated keys parse silently as the last one)."""
    pairs = list(header.items())
    name, entry = pairs[0]
    return pairs + [(name, {**entry, "shape": [entry["shape"][0] // 2 or 1]})]


def _nest_header(data: bytes):
    _, _, rest = _header_of(data)
    deep = b"[" * 100_000 + b"]" * 100_000
    return struct.pack("<Q", len(deep)) + deep + rest


def _header_garbage(data: bytes):
    n, _, rest = _header_of(data)
    return data[:8] + b"\x00\xff" * (n // 2) + rest


def _mkfifo(path):
    os.mkfifo(path)


def _symlink_to(target):
    return lambda path: os.symlink(target, path)


def _hf_cache_layout(d):
    """Each file replaced by a relative symlink into a blobs/ directory, as the HF cache does."""
    blobs = os.path.join(os.path.dirname(d), os.path.basename(d) + "_blobs")
    os.makedirs(blobs)
    for name in (CONFIG, WEIGHTS):
        blob = os.path.join(blobs, name + ".blob")
        shutil.move(os.path.join(d, name), blob)
        os.symlink(os.path.relpath(blob, d), os.path.join(d, name))


def _bd3_huge_buffer(t):
    t["sampling_eps_min"] = torch.full((1000, 1000), 0.3)


def _gallery():
    refuse_config, refuse_weights = ("refuse", CONFIG), ("refuse", WEIGHTS)
    same = ("load", None)
    nan_at_3 = _put("blocks.0.attn_qkv.weight", lambda v: v.index_fill(0, torch.tensor([3]), float("nan")))
    cases = {
        # -- config.json: malformed JSON
        "config_truncated": ("tiny", lambda d: _write_config_text(open(os.path.join(d, CONFIG), "rb").read()[:40])(d),
                             refuse_config),
        "config_empty": ("tiny", _write_config_text(b""), refuse_config),
        "config_is_a_list": ("tiny", _write_config_text(b"[1, 2, 3]"), refuse_config),
        "config_is_a_string": ("tiny", _write_config_text(b'"did_engine"'), refuse_config),
        "config_is_null": ("tiny", _write_config_text(b"null"), refuse_config),
        "config_nested_100000_deep": ("tiny", _write_config_text(b"[" * 100_000 + b"]" * 100_000), refuse_config),
        "config_extra_nested_40_deep": ("tiny", _cfg(lambda c: c.update(extra={"a": json.loads("[" * 40 + "]" * 40)})),
                                        refuse_config),
        "config_not_utf8": ("tiny", _write_config_text(b'{"format": "\xff\xfe"}'), refuse_config),
        "config_2mb": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG),
                                                   lambda r: r["config"]["extra"].update(pad="x" * (2 << 20))),
                       refuse_config),
        "config_duplicate_key": ("tiny", lambda d: _write_config_text(
            open(os.path.join(d, CONFIG), "rb").read().replace(b'"vocab_size"', b'"vocab_size": 5, "vocab_size"', 1))(d),
            refuse_config),
        "config_integer_of_5000_digits": ("tiny", lambda d: _write_config_text(
            open(os.path.join(d, CONFIG), "rb").read().replace(b'"vocab_size": 37', b'"vocab_size": ' + b"9" * 5000))(d),
            refuse_config),
        # -- config.json: missing, unknown and wrongly typed keys
        "config_lacks_config_object": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG), lambda r: r.pop("config")),
                                       refuse_config),
        "config_config_is_a_list": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG), lambda r: r.update(config=[])),
                                    refuse_config),
        "config_lacks_hidden_dim": ("tiny", _cfg(lambda c: c.pop("hidden_dim")), refuse_config),
        "config_unknown_key": ("tiny", _set(n_layer=3), refuse_config),
        "config_format_version_2": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG),
                                                                lambda r: r.update(format_version=2)), refuse_config),
        "config_format_version_string": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG),
                                                                     lambda r: r.update(format_version="1")),
                                         refuse_config),
        "config_unknown_format": ("tiny", lambda d: edit_json(os.path.join(d, CONFIG), lambda r: r.update(format="x")),
                                  refuse_config),
        "config_vocab_string": ("tiny", _set(vocab_size="37"), refuse_config),
        "config_vocab_float": ("tiny", _set(vocab_size=37.0), refuse_config),
        "config_hidden_bool": ("tiny", _set(n_blocks=True), refuse_config),
        "config_adaln_string": ("tiny", _set(adaln="yes"), refuse_config),
        "config_extra_list": ("tiny", _set(extra=[1]), refuse_config),
        # -- config.json: values out of range
        "config_hidden_zero": ("tiny", _set(hidden_dim=0), refuse_config),
        "config_blocks_negative": ("tiny", _set(n_blocks=-1), refuse_config),
        "config_heads_zero": ("tiny", _set(n_heads=0), refuse_config),
        "config_heads_not_dividing_hidden": ("tiny", _set(n_heads=5), refuse_config),
        "config_odd_head_dim": ("tiny", _set(n_heads=32), refuse_config),
        "config_dropout_1_5": ("tiny", _set(dropout=1.5), refuse_config),
        "config_dropout_nan": ("tiny", _set(dropout=float("nan")), refuse_config),
        "config_rotary_base_infinite": ("tiny", _set(rotary_base=float("inf")), refuse_config),
        "config_rotary_base_negative": ("tiny", _set(rotary_base=-10000.0), refuse_config),
        "config_vocab_10_to_12": ("tiny", _set(vocab_size=10**12), refuse_config),
        "config_model_of_10_to_12_weights": ("tiny", _set(hidden_dim=32768, n_heads=256, n_blocks=1024),
                                             refuse_config),
        "config_block_size_above_length": ("tiny", _set(block_size=25), refuse_config),
        # -- config.json: not a regular file
        "config_fifo": ("tiny", _replace_with(CONFIG, _mkfifo), refuse_config),
        "config_symlink_to_dev_zero": ("tiny", _replace_with(CONFIG, _symlink_to("/dev/zero")), refuse_config),
        "config_directory": ("tiny", _replace_with(CONFIG, os.mkdir), refuse_config),
        "config_dangling_symlink": ("tiny", _replace_with(CONFIG, _symlink_to("/nonexistent/config.json")),
                                    refuse_config),
        # -- model.safetensors: the file
        "weights_empty": ("tiny", _bytes(lambda b: b""), refuse_weights),
        "weights_5_bytes": ("tiny", _bytes(lambda b: b[:5]), refuse_weights),
        "weights_truncated": ("tiny", _bytes(lambda b: b[:-100]), refuse_weights),
        "weights_truncated_in_header": ("tiny", _bytes(lambda b: b[:40]), refuse_weights),
        "weights_trailing_bytes": ("tiny", _bytes(lambda b: b + b"\x00" * 16), refuse_weights),
        "weights_header_length_2_to_62": ("tiny", _bytes(lambda b: struct.pack("<Q", 1 << 62) + b[8:]),
                                          refuse_weights),
        "weights_header_length_is_file_size": ("tiny", _bytes(lambda b: struct.pack("<Q", len(b)) + b[8:]),
                                               refuse_weights),
        "weights_header_length_1": ("tiny", _bytes(lambda b: struct.pack("<Q", 1) + b[8:]), refuse_weights),
        "weights_header_garbage": ("tiny", _bytes(_header_garbage), refuse_weights),
        "weights_header_nested_100000_deep": ("tiny", _bytes(_nest_header), refuse_weights),
        "weights_header_is_a_list": ("tiny", lambda d: write_raw_safetensors(os.path.join(d, WEIGHTS), b"[]", b""),
                                     refuse_weights),
        "weights_header_duplicate_name": ("tiny", _weights(header_edit=_duplicate_name), refuse_weights),
        "weights_metadata_not_strings": ("tiny", _weights(metadata={"format": 1}), refuse_weights),
        "weights_fifo": ("tiny", _replace_with(WEIGHTS, _mkfifo), refuse_weights),
        "weights_symlink_to_dev_zero": ("tiny", _replace_with(WEIGHTS, _symlink_to("/dev/zero")), refuse_weights),
        "weights_directory": ("tiny", _replace_with(WEIGHTS, os.mkdir), refuse_weights),
        # -- model.safetensors: the header against the data
        "weights_offsets_past_end": ("tiny", _weights(header_edit=lambda h: _shift_offsets(_first_key(h), 1 << 40)(h)),
                                     refuse_weights),
        "weights_overlapping_offsets": ("tiny", _weights(header_edit=_overlap), refuse_weights),
        "weights_span_disagrees_with_shape": ("tiny", _weights(header_edit=lambda h: h[_first_key(h)].update(
            shape=[1]) or h), refuse_weights),
        "weights_negative_dimension": ("tiny", _weights(header_edit=lambda h: h[_first_key(h)].update(
            shape=[-1, 32]) or h), refuse_weights),
        "weights_unknown_dtype": ("tiny", _weights(header_edit=lambda h: h[_first_key(h)].update(dtype="Q4") or h),
                                  refuse_weights),
        "weights_dtype_is_a_list": ("tiny", _weights(header_edit=lambda h: h[_first_key(h)].update(dtype=["F32"]) or h),
                                    refuse_weights),
        "weights_extra_10gb_tensor_declared": ("tiny", _weights(header_edit=_declare_10gb), refuse_weights),
        "weights_embedding_declared_10gb": ("tiny", lambda d: (_set(vocab_size=2_441_406, hidden_dim=1024, n_heads=4)(d),
                                                               _weights(header_edit=_embed_10gb)(d)), refuse_weights),
        # -- model.safetensors: the tensors against the config
        "weights_missing_tensor": ("tiny", _weights(lambda t: t.pop("blocks.1.attn_out.weight")), refuse_weights),
        "weights_extra_tensor": ("tiny", _weights(lambda t: t.update({"blocks.9.extra": torch.zeros(2)})),
                                 refuse_weights),
        "weights_transposed": ("tiny", _weights(_put("blocks.0.attn_qkv.weight", lambda v: v.t().contiguous())),
                               refuse_weights),
        "weights_int64_tensor": ("tiny", _weights(_put("blocks.0.mlp.0.bias", lambda v: v.long())), refuse_weights),
        "weights_bool_tensor": ("tiny", _weights(_put("blocks.0.norm1.weight", lambda v: v > 0)), refuse_weights),
        "weights_float8_tensor": ("tiny", _weights(_put("blocks.0.norm1.weight", lambda v: v.to(torch.float8_e4m3fn))),
                                  refuse_weights),
        "weights_nan": ("tiny", _weights(nan_at_3), refuse_weights),
        "weights_inf": ("tiny", _weights(_put("output_layer.linear.bias", lambda v: v.index_fill(0, torch.tensor([0]),
                                                                                              float("-inf")))),
                        refuse_weights),
        "weights_float64_beyond_float32": ("tiny", _weights(lambda t: t.update(
            {"vocab_embed.embedding": t["vocab_embed.embedding"].double().index_fill(0, torch.tensor([1]), 1e300)})),
            refuse_weights),
        # -- loads that must succeed exactly
        "valid_float16_weights": ("tiny", _weights(_cast_all(torch.float16)), ("load", torch.float16)),
        "valid_bfloat16_weights": ("tiny", _weights(_cast_all(torch.bfloat16)), ("load", torch.bfloat16)),
        "valid_float64_weights": ("tiny", _weights(_cast_all(torch.float64)), same),
        "valid_hf_cache_symlinks": ("tiny", _hf_cache_layout, same),
        "valid_unchanged": ("tiny", lambda d: None, same),
        # -- BD3-LM's Hugging Face format
        "bd3lm_unchanged": ("bd3lm", lambda d: None, same),
        "bd3lm_hf_cache_symlinks": ("bd3lm", _hf_cache_layout, same),
        "bd3lm_float16_weights": ("bd3lm", _weights(_cast_all(torch.float16)), ("load", torch.float16)),
        "bd3lm_without_model_type": ("bd3lm", _cfg(lambda c: c.pop("model_type")), same),
        "bd3lm_hf_bookkeeping_keys": ("bd3lm", _set(architectures=["BD3LM"], torch_dtype="float32",
                                                    auto_map={"AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
                                                    transformers_version="4.49.0"), same),
        "bd3lm_huge_extra_buffer": ("bd3lm", _weights(_bd3_huge_buffer), refuse_weights),
        "bd3lm_thousand_scalar_buffers": ("bd3lm", _weights(lambda t: t.update({f"eps_{i}": torch.tensor(0.5)
                                                                                for i in range(1000)})),
                                          refuse_weights),
        "bd3lm_nan_extra_buffer": ("bd3lm", _weights(_put("sampling_eps_min", lambda v: v * float("nan"))),
                                   refuse_weights),
        "bd3lm_nan_backbone_weight": ("bd3lm", _weights(_put("backbone.blocks.0.attn_qkv.weight",
                                                             lambda v: v.index_fill(0, torch.tensor([3]), float("nan")))),
                                      refuse_weights),
        "bd3lm_causal": ("bd3lm", _set(causal=True), refuse_config),
        "bd3lm_unknown_attn_backend": ("bd3lm", _set(attn_backend="xformers"), refuse_config),
        "bd3lm_config_is_a_list": ("bd3lm", _write_config_text(b"[]"), refuse_config),
        "bd3lm_hidden_string": ("bd3lm", _set(hidden_dim="64"), refuse_config),
        "bd3lm_lacks_n_blocks": ("bd3lm", _cfg(lambda c: c.pop("n_blocks")), refuse_config),
        "bd3lm_missing_backbone_tensor": ("bd3lm", _weights(lambda t: t.pop("backbone.output_layer.linear.bias")),
                                          refuse_weights),
        "bd3lm_n_blocks_disagrees": ("bd3lm", _set(n_blocks=3), refuse_weights),
    }
    return cases


def build_gallery(root) -> dict:
    """Write every case directory under root; returns the manifest {name: case}."""
    bases = {"tiny": tiny_reference(root), "bd3lm": BD3LM_FIXTURE}
    manifest = {}
    for name, (base, edit, expect) in _gallery().items():
        d = os.path.join(root, name)
        shutil.copytree(bases[base], d, symlinks=True, ignore=shutil.ignore_patterns("io.safetensors", "*.md"))
        edit(d)
        kind, detail = expect
        manifest[name] = {"dir": d, "base": bases[base], "expect": kind,
                          "file": os.path.join(d, detail) if kind == "refuse" else None,
                          "through": None if kind == "refuse" or detail is None else str(detail).split(".")[-1]}
    return manifest


# ---------------------------------------------------------------------------------------
# The worker (a subprocess) and the parent that survives its crashes and hangs


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(manifest_path, out_dir, start):
    """Load cases[start:] one by one; one JSON line per event on stdout."""
    import signal

    from did_engine.modeling import BlockDiffusionLM

    with open(manifest_path) as f:
        manifest = json.load(f)
    names = list(manifest)

    def on_alarm(signum, frame):
        raise TimeoutError("case timed out")

    signal.signal(signal.SIGALRM, on_alarm)
    BlockDiffusionLM.from_pretrained(manifest[names[0]]["base"])  # warm up lazy imports before measuring memory
    for i in range(start, len(names)):
        name = names[i]
        print(json.dumps({"start": i}), flush=True)
        before, t0 = _peak_rss_mb(), time.perf_counter()
        result = {"case": name}
        signal.alarm(int(CASE_SECONDS))
        try:
            model = BlockDiffusionLM.from_pretrained(manifest[name]["dir"])
            result["outcome"] = "loaded"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, name + ".st"))
        except TimeoutError:
            result["outcome"] = "hang"
        except BaseException as e:  # noqa: BLE001 - every failure is classified by the parent
            result.update(outcome="raised", type=type(e).__name__, message=str(e)[:2000],
                          checkpoint_error=type(e).__name__ in ("CheckpointError", "CheckpointNotFoundError"))
        finally:
            signal.alarm(0)
        result.update(seconds=time.perf_counter() - t0, peak_growth_mb=_peak_rss_mb() - before)
        print(json.dumps(result), flush=True)


def run_gallery(root, env=None) -> dict:
    """Build the gallery under root, load every case in worker subprocesses; {name: result}."""
    manifest = build_gallery(os.path.join(root, "cases"))
    manifest_path, out_dir = os.path.join(root, "manifest.json"), os.path.join(root, "loaded")
    os.makedirs(out_dir)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    names, results, start = list(manifest), {}, 0
    stderr_path = os.path.join(root, "worker_stderr.txt")
    while start < len(names):
        with open(stderr_path, "a") as stderr:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", manifest_path, out_dir,
                                     str(start)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        current, next_start = None, None  # the case in progress; the first case not yet reported
        while True:
            try:  # the first line also waits for torch's import
                line = lines.get(timeout=CASE_SECONDS + (120 if next_start is None else 10))
            except queue.Empty:
                proc.kill()
                line = "hang"
            if line is None or line == "hang":
                proc.wait()
                if current is not None:
                    results[names[current]] = {"case": names[current], "outcome": "crash" if line is None else "hang",
                                               "returncode": proc.returncode}
                    start = current + 1
                elif next_start is None:
                    with open(stderr_path) as f:
                        raise RuntimeError(f"the gallery worker failed: {f.read()[-3000:]}")
                else:
                    start = next_start
                break
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if "start" in event:
                current = event["start"]
            else:
                results[event["case"]] = event
                next_start, current = current + 1, None
    for name, result in results.items():
        result["verdict"] = _verdict(manifest[name], result, out_dir)
    return results


def _reference_state(case) -> dict:
    """What a correct load holds, read with the safetensors library (not our loader): the
    base checkpoint's tensors, BD3-LM's under their backbone names, as float32 after a round
    trip through the dtype the case stored them in."""
    state = load_file(os.path.join(case["base"], WEIGHTS))
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    through = getattr(torch, case["through"]) if case["through"] else torch.float32
    return {k: v.to(through).to(torch.float32) for k, v in state.items()}


def _verdict(case, result, out_dir) -> str:
    outcome = result["outcome"]
    if outcome in ("crash", "hang"):
        return outcome
    if outcome == "loaded":
        if case["expect"] != "load":
            return "silent wrong answer"
        loaded = load_file(os.path.join(out_dir, result["case"] + ".st"))
        reference = _reference_state(case)
        equal = loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
        return "loaded correctly" if equal else "silent wrong answer"
    clear = (result["checkpoint_error"] and case["expect"] == "refuse" and case["file"] in result["message"]
             and "\n" not in result["message"])
    return "refused clearly" if clear else "unclear error"


def figures(results) -> dict:
    verdicts = [r["verdict"] for r in results.values()]
    keys = ("loaded correctly", "refused clearly", "unclear error", "silent wrong answer", "crash", "hang")
    return {"tried": len(verdicts), **{k: verdicts.count(k) for k in keys}}


# ---------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    results = run_gallery(str(root))
    print("\nhostile checkpoint gallery:", json.dumps(figures(results)))
    return results


def test_gallery_has_at_least_42_directories_of_both_formats(gallery):
    assert len(gallery) >= 42
    assert sum(name.startswith("bd3lm_") for name in gallery) >= 10


def test_every_hostile_checkpoint_is_refused_clearly_or_loads_correctly(gallery):
    bad = {name: (r["verdict"], r.get("type"), r.get("message", "")[:300]) for name, r in gallery.items()
           if r["verdict"] not in ("loaded correctly", "refused clearly")}
    assert not bad, bad


def test_refusals_are_fast_and_allocate_little(gallery):
    for name, r in gallery.items():
        if r["verdict"] == "refused clearly":
            limit = FIFO_SECONDS if "fifo" in name or "dev_zero" in name else REFUSAL_SECONDS
            assert r["seconds"] < limit, (name, r["seconds"])
            assert r["peak_growth_mb"] < PEAK_GROWTH_MB, (name, r["peak_growth_mb"])


def test_refusals_say_what_is_wrong(gallery):
    """A sample of messages, each naming the problem (the file is checked for every case)."""
    expected = {
        "config_is_a_list": "holds a JSON array, not an object",
        "config_lacks_config_object": "'config' must be an object, got nothing",
        "config_nested_100000_deep": "nests JSON",
        "config_lacks_hidden_dim": "lacks hidden_dim",
        "config_unknown_key": "unknown model config keys 'n_layer'",
        "config_heads_not_dividing_hidden": "n_heads = 5: must divide hidden_dim 32",
        "config_dropout_1_5": "dropout = 1.5: must be a number in [0, 1)",
        "config_model_of_10_to_12_weights": "weights",
        "config_fifo": "is a FIFO, not a regular file",
        "weights_symlink_to_dev_zero": "is a character device",
        "weights_directory": "is a directory",
        "weights_extra_10gb_tensor_declared": "'blocks.0.attn_qkv.weight_huge' (F32 [50000, 50000]) ends at data byte",
        "weights_overlapping_offsets": "overlaps",
        "weights_offsets_past_end": "ends at data byte 1099511628544 but the file holds",
        "weights_header_duplicate_name": "appears twice",
        "weights_trailing_bytes": "16 bytes after the last tensor are not indexed",
        "weights_int64_tensor": "not floating point: blocks.0.mlp.0.bias (I64)",
        "weights_nan": "'blocks.0.attn_qkv.weight' holds non-finite values",
        "weights_missing_tensor": "missing tensors: blocks.1.attn_out.weight",
        "bd3lm_huge_extra_buffer": "'sampling_eps_min' outside the backbone has shape [1000, 1000]",
        "bd3lm_nan_backbone_weight": "'backbone.blocks.0.attn_qkv.weight' holds non-finite values",
    }
    for name, fragment in expected.items():
        assert fragment in gallery[name]["message"], (name, gallery[name]["message"])


@pytest.mark.parametrize("path", [os.path.join(BD3LM_FIXTURE, "io.safetensors"), os.path.join(BD3LM_FIXTURE, WEIGHTS)])
def test_load_safetensors_reads_what_the_library_reads(path):
    """Our header parser and reader against the safetensors library (int64 and float tensors)."""
    from did_engine.modeling.checkpoint import load_safetensors

    ours, theirs = load_safetensors(path), load_file(path)
    assert ours.keys() == theirs.keys() and {t.dtype for t in ours.values()} >= {torch.float32}
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_bd3lm_scalar_buffers_stay_metadata(tmp_path):
    """The kept BD3-LM buffers are Python scalars in config.extra, so a saved copy's config stays small."""
    from did_engine.modeling import BlockDiffusionLM

    model = BlockDiffusionLM.from_pretrained(BD3LM_FIXTURE)
    assert model.config.extra["sampling_eps_min"] == load_file(os.path.join(BD3LM_FIXTURE, WEIGHTS))[
        "sampling_eps_min"].item()
    model.save_pretrained(tmp_path)
    assert os.path.getsize(tmp_path / CONFIG) < 4096


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            results = run_gallery(tmp)
            for name, r in results.items():
                print(f"{r['verdict']:20s} {name:40s} {r.get('type', '')} {r.get('message', '')[:150]!r}")
            print(json.dumps(figures(results)))


def test_atomic_writes_get_the_permissions_of_an_ordinary_file(tmp_path):
    """The temporary file behind an atomic write is created private (0600); the published
    file must be readable as any file the user writes (0666 minus the umask), or package
    data and shared run directories end up unreadable to others."""
    from did_engine.modeling.checkpoint import atomic_write_json

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_json(str(tmp_path / "x.json"), {"a": 1})
    assert (os.stat(tmp_path / "x.json").st_mode & 0o777) == 0o666 & ~mask
