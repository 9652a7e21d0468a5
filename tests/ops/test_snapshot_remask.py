"""snapshot_remask against the pure-PyTorch reference, on every device (tests/ops/cases.py
says which and how to dry-run the CUDA cases on the CPU).

Every check compares the kernel's tokens, confidence and indices with
``reference_snapshot_remask`` run on CPU clones of the same inputs; the kernel is never its
own oracle. Inputs are random (never all-zero), with tie-heavy variants, prompt prefixes,
NaN/inf, odd sizes and non-contiguous layouts. A case draws the same inputs on every
device, so bit-equality with the reference on each also makes the CUDA and CPU kernels
agree.

Tests without a ``device`` argument check the CPU kernel and the wrapper: semantics spelled
out, layouts, refused calls, fuzzing. The CUDA kernel's own behaviour (out-of-range counts
clamped, not refused) is in test_cuda_only.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from did_engine.ops import snapshot_remask
from did_engine.ops.reference import reference_snapshot_remask

from .cases import (CONFIDENCE_PATTERNS, DEVICES, MASK_ID, VOCAB, bad_args_builder, make_confidence, make_eligible,
                    random_counts, remask_inputs)

OP = torch.ops.did_engine.snapshot_remask.default


def assert_same(actual, expected, what):
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def run_and_compare(tokens, confidence, num_remask, eligible, mask_id=MASK_ID, reset_value=float("inf"), max_k=None,
                    via_op=False):
    """Run the kernel in place on tokens/confidence and compare with the reference run on
    CPU clones taken before. Returns the kernel's indices."""
    cpu = lambda t: t.cpu().clone() if torch.is_tensor(t) else t  # noqa: E731
    ref_tokens, ref_conf, ref_idx = reference_snapshot_remask(cpu(tokens), cpu(confidence), cpu(num_remask),
                                                              cpu(eligible), mask_id, reset_value, max_k)
    if via_op:
        idx = OP(tokens, confidence, num_remask, eligible, mask_id, reset_value, max_k)
    else:
        idx = snapshot_remask(tokens, confidence, num_remask, eligible, mask_id, reset_value, max_k)
    assert idx.device == tokens.device
    assert_same(idx.cpu(), ref_idx, "indices")
    assert_same(tokens.cpu(), ref_tokens, "tokens")
    assert_same(confidence.cpu(), ref_conf, "confidence")
    return idx


# ---------------------------------------------------------------------------------------
# Agreement with the reference, on every device


SHAPES = [(1, 1), (3, 3), (3, 97), (4, 97), (5, 97), (64, 97), (2, 1025), (3, 1025), (1, 8192), (2, 8192), (1, 10000)]


@pytest.mark.parametrize("count_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("pattern", CONFIDENCE_PATTERNS)
@pytest.mark.parametrize("B,S", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_per_row_counts(device, B, S, pattern, count_dtype):
    tokens, confidence, eligible, gen = remask_inputs(B, S, pattern, seed=B * 7919 + S, device=device)
    counts = random_counts(eligible, gen, count_dtype)
    run_and_compare(tokens, confidence, counts, eligible)


@pytest.mark.parametrize("device", DEVICES)
def test_sampler_shape(device):
    # The DiD refine step and the benchmark shape: B = 64 rows of 1024, a quarter (256)
    # remasked each, max_k fixed in advance.
    tokens, confidence, eligible, _ = remask_inputs(64, 1024, "rand", seed=5, holes=False, device=device)
    num_remask = torch.full((64,), 256, device=device)
    run_and_compare(tokens, confidence, num_remask, eligible, max_k=256)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_counts(device):
    tokens, confidence, eligible, _ = remask_inputs(4, 50, "ties", seed=3, device=device)
    eligible[1] = False
    eligible[2] = True
    counts = torch.tensor([0, 0, 50, int(eligible[3].sum())], device=device)
    run_and_compare(tokens, confidence, counts, eligible, max_k=50, reset_value=-1.5, mask_id=7)  # max_k = S


@pytest.mark.parametrize("device", DEVICES)
def test_zero_width_and_empty_batch(device):
    tokens, confidence, eligible, _ = remask_inputs(3, 10, device=device)
    run_and_compare(tokens, confidence, torch.zeros(3, dtype=torch.long, device=device), eligible, max_k=0)
    tokens, confidence, eligible, _ = remask_inputs(0, 10, device=device)
    run_and_compare(tokens, confidence, torch.zeros(0, dtype=torch.long, device=device), eligible, max_k=0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    B, S = 4, 300
    gen = torch.Generator().manual_seed(37)
    tokens = torch.randint(0, VOCAB, (S, B), generator=gen).to(device).t()
    confidence = make_confidence(S, B, "rand", gen).to(device).t()
    eligible = (torch.rand(B, 2 * S, generator=gen) < 0.7).to(device)[:, ::2]
    assert not any(t.is_contiguous() for t in (tokens, confidence, eligible))
    counts = torch.tensor([0, 5, 100, 17], dtype=torch.int32, device=device)
    run_and_compare(tokens, confidence, counts, eligible, max_k=120)


def opcheck_samples(device):
    samples = {}
    tokens, confidence, eligible, gen = remask_inputs(3, 97, "rand", seed=47, device=device)
    samples["rand"] = (tokens, confidence, random_counts(eligible, gen), eligible, MASK_ID, float("inf"), 97)
    tokens, confidence, eligible, gen = remask_inputs(4, 33, "ties", seed=53, device=device)
    counts = random_counts(eligible, gen, torch.int32)
    samples["ties-int32"] = (tokens, confidence, counts, eligible, 7, -1.0, int(counts.max()) + 2)
    tokens, confidence, eligible, gen = remask_inputs(3, 97, "ties", seed=54, device=device)
    counts = random_counts(eligible, gen)
    samples["ties-tight"] = (tokens, confidence, counts, eligible, 5, 2.0, int(counts.max()))
    tokens, confidence, eligible, gen = remask_inputs(2, 50, "special", seed=59, device=device)
    samples["strided-zero"] = (tokens[:, ::2], confidence[:, 1::2], torch.zeros(2, dtype=torch.int64, device=device),
                               eligible[:, ::2], 3, 0.0, 0)
    tokens, confidence, eligible, gen = remask_inputs(1, 1025, "narrow", seed=61, holes=False, device=device)
    samples["narrow-all"] = (tokens, confidence, eligible.sum(1), eligible, 1, float("inf"), 1025)
    return samples


OPCHECK_SAMPLES = list(opcheck_samples("cpu"))


@pytest.mark.parametrize("sample", OPCHECK_SAMPLES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, sample):
    # Schema (mutations declared), fake kernel, autograd registration, aot dispatch.
    torch.library.opcheck(OP, opcheck_samples(device)[sample])


# ---------------------------------------------------------------------------------------
# The CPU kernel and the wrapper


@pytest.mark.parametrize("B,S", [(1, 1), (3, 97), (64, 97), (3, 1025), (1, 8192)])
@pytest.mark.parametrize("pattern", ["rand", "ties"])
def test_int_count(B, S, pattern):
    tokens, confidence, eligible, gen = remask_inputs(B, S, pattern, seed=S + 1)
    k = int(eligible.sum(1).min()) * 2 // 3
    idx = run_and_compare(tokens, confidence, k, eligible)
    assert idx.shape == (B, k)


@pytest.mark.parametrize("B,S", [(1, 1), (3, 97), (3, 1025), (1, 8192)])
def test_zero_count(B, S):
    tokens, confidence, eligible, _ = remask_inputs(B, S, "rand", seed=11)
    before = tokens.clone(), confidence.clone()
    idx = run_and_compare(tokens, confidence, 0, eligible)
    assert idx.shape == (B, 0)
    assert torch.equal(tokens, before[0]) and torch.equal(confidence, before[1])
    # Zero counts with a wider output: all padding.
    idx = run_and_compare(tokens, confidence, torch.zeros(B, dtype=torch.int64), eligible, max_k=min(S, 5))
    assert (idx == -1).all()


@pytest.mark.parametrize("B,S", [(1, 1), (3, 97), (3, 1025), (1, 8192)])
@pytest.mark.parametrize("pattern", ["rand", "special"])
def test_count_equal_to_eligible_count(B, S, pattern):
    tokens, confidence, eligible, _ = remask_inputs(B, S, pattern, seed=13)
    eligible[:, -1] = True  # at least one eligible position per row
    counts = eligible.sum(1)
    idx = run_and_compare(tokens, confidence, counts, eligible)
    # Every eligible position is selected, and nothing else.
    for b in range(B):
        assert torch.equal(idx[b, : counts[b]], eligible[b].nonzero().flatten())


def test_all_eligible_full_count():
    tokens, confidence, _, _ = remask_inputs(3, 97, "ties", seed=17)
    eligible = torch.ones(3, 97, dtype=torch.bool)
    idx = run_and_compare(tokens, confidence, 97, eligible)
    assert torch.equal(idx, torch.arange(97).expand(3, 97))


def test_explicit_max_k_pads_with_minus_one():
    tokens, confidence, eligible, gen = remask_inputs(3, 97, "rand", seed=19)
    eligible[:, 50:] = True
    counts = torch.tensor([0, 7, 20])
    idx = run_and_compare(tokens, confidence, counts, eligible, max_k=40)
    assert idx.shape == (3, 40)
    assert (idx[0] == -1).all() and (idx[1, 7:] == -1).all() and (idx[2, 20:] == -1).all()
    # max_k == S with a small count.
    run_and_compare(tokens, confidence, 3, eligible, max_k=97)


def test_reset_value_and_mask_id_are_written():
    tokens, confidence, eligible, gen = remask_inputs(3, 97, "rand", seed=23)
    eligible[:, -10:] = True
    run_and_compare(tokens, confidence, 4, eligible, mask_id=0, reset_value=-2.5)
    run_and_compare(tokens, confidence, 4, eligible, mask_id=2**40, reset_value=float("nan"))


# ---------------------------------------------------------------------------------------
# Semantics spelled out: prompt positions, ties, NaN / inf


def test_prompt_positions_never_touched():
    # The prompt holds the row's lowest confidences (even -inf): it must still be skipped.
    B, S = 4, 64
    tokens, confidence, _, gen = remask_inputs(B, S, "rand", seed=29)
    prompt = torch.tensor([0, 5, 31, 60])
    eligible = torch.arange(S)[None, :] >= prompt[:, None]
    confidence[~eligible] = float("-inf")
    confidence[1, :5] = -1.0
    before_tokens, before_conf = tokens.clone(), confidence.clone()
    counts = eligible.sum(1) // 2
    idx = run_and_compare(tokens, confidence, counts, eligible)
    assert torch.equal(tokens[~eligible], before_tokens[~eligible])
    torch.testing.assert_close(confidence[~eligible], before_conf[~eligible], rtol=0, atol=0)
    for b in range(B):
        assert (idx[b, : counts[b]] >= prompt[b]).all()


def test_ties_go_to_the_lower_index():
    tokens = torch.arange(10).repeat(2, 1)
    confidence = torch.full((2, 10), 0.5)
    confidence[1, 7] = 0.25  # strictly lowest, then ties
    eligible = torch.ones(2, 10, dtype=torch.bool)
    eligible[:, 0] = False
    idx = run_and_compare(tokens, confidence, 3, eligible)
    assert idx.tolist() == [[1, 2, 3], [1, 2, 7]]


def test_negative_zero_ties_with_zero():
    tokens = torch.arange(6)[None]
    confidence = torch.tensor([[0.0, -0.0, 0.0, -0.0, -0.0, 0.0]])
    eligible = torch.ones(1, 6, dtype=torch.bool)
    idx = run_and_compare(tokens, confidence, 3, eligible)
    assert idx.tolist() == [[0, 1, 2]]


def test_nan_ranks_last_and_infinities_order():
    nan, inf = float("nan"), float("inf")
    tokens = torch.arange(7)[None]
    confidence = torch.tensor([[nan, 1.0, -inf, inf, nan, -0.5, 3.0e38]])
    eligible = torch.ones(1, 7, dtype=torch.bool)
    expected_order = [2, 5, 1, 6, 3, 0, 4]  # -inf, -0.5, 1, 3e38, inf, then NaNs by index
    for k in range(8):
        idx = run_and_compare(tokens.clone(), confidence.clone(), k, eligible)
        assert idx[0].tolist() == sorted(expected_order[:k])


@pytest.mark.parametrize("B,S", [(3, 97), (3, 1025)])
def test_all_nan_rows(B, S):
    tokens, confidence, eligible, gen = remask_inputs(B, S, "rand", seed=31)
    confidence[:] = float("nan")
    run_and_compare(tokens, confidence, random_counts(eligible, gen), eligible)


# ---------------------------------------------------------------------------------------
# Layouts: non-contiguous inputs are modified in place


def test_strided_slices_in_place():
    B, S = 5, 301
    gen = torch.Generator().manual_seed(37)
    big_tokens = torch.randint(0, VOCAB, (B, 2 * S), generator=gen)
    big_conf = torch.rand(B, 2 * S, generator=gen) + 1e-3
    big_elig = torch.rand(B, 3 * S, generator=gen) > 0.3
    tokens, confidence, eligible = big_tokens[:, ::2], big_conf[:, 1::2], big_elig[:, ::3]
    counts_big = torch.zeros(2 * B, dtype=torch.int32)
    counts = counts_big[::2]
    counts.copy_(random_counts(eligible, gen, torch.int32))
    untouched_tokens, untouched_conf = big_tokens[:, 1::2].clone(), big_conf[:, ::2].clone()
    run_and_compare(tokens, confidence, counts, eligible)
    # The interleaved columns the views skip are left alone.
    assert torch.equal(big_tokens[:, 1::2], untouched_tokens)
    assert torch.equal(big_conf[:, ::2], untouched_conf)


def test_transposed_storage_in_place():
    B, S = 6, 257
    gen = torch.Generator().manual_seed(41)
    tokens = torch.randint(0, VOCAB, (S, B), generator=gen).t()  # stride (1, B)
    confidence = make_confidence(S, B, "ties", gen).t()
    eligible = make_eligible(B, S, gen).t().contiguous().t()
    assert not tokens.is_contiguous() and not confidence.is_contiguous() and not eligible.is_contiguous()
    counts = random_counts(eligible, gen)
    tokens_ptr, conf_ptr = tokens.data_ptr(), confidence.data_ptr()
    run_and_compare(tokens, confidence, counts, eligible)
    assert tokens.data_ptr() == tokens_ptr and confidence.data_ptr() == conf_ptr


def test_row_slices_and_expanded_eligible():
    # Rows taken from a bigger batch, and one eligibility row broadcast to all rows
    # (eligible is only read, so a stride-0 view is fine).
    gen = torch.Generator().manual_seed(43)
    big_tokens = torch.randint(0, VOCAB, (9, 130), generator=gen)
    big_conf = torch.rand(9, 130, generator=gen) + 1e-3
    tokens, confidence = big_tokens[1::3, 3:120], big_conf[2::3, 5:122]
    eligible = (torch.rand(117, generator=gen) > 0.4).expand(3, 117)
    rest_tokens = big_tokens.clone()
    counts = random_counts(eligible, gen)
    run_and_compare(tokens, confidence, counts, eligible)
    mask = torch.ones_like(big_tokens, dtype=torch.bool)
    mask[1::3, 3:120] = False
    assert torch.equal(big_tokens[mask], rest_tokens[mask])


# ---------------------------------------------------------------------------------------
# Refused calls: ValueError naming the argument, and nothing written


def valid_args():
    tokens, confidence, eligible, gen = remask_inputs(3, 20, "rand", seed=67, holes=False)
    eligible[:, :4] = False  # 16 eligible per row
    return dict(tokens=tokens, confidence=confidence, num_remask=torch.tensor([2, 3, 4]), eligible=eligible,
                mask_id=MASK_ID, reset_value=float("inf"), max_k=4)


bad = bad_args_builder(valid_args)


BAD_INPUTS = {
    "tokens 1-D": (bad(tokens=lambda a: a["tokens"][0]), "tokens"),
    "tokens 3-D": (bad(tokens=lambda a: a["tokens"][None]), "tokens"),
    "confidence 1-D": (bad(confidence=lambda a: a["confidence"].flatten()), "confidence"),
    "eligible 3-D": (bad(eligible=lambda a: a["eligible"][None]), "eligible"),
    "num_remask 2-D": (bad(num_remask=lambda a: a["num_remask"][None]), "num_remask"),
    "num_remask 0-D": (bad(num_remask=lambda a: torch.tensor(2)), "num_remask"),
    "tokens int32": (bad(tokens=lambda a: a["tokens"].int()), "tokens"),
    "confidence float64": (bad(confidence=lambda a: a["confidence"].double()), "confidence"),
    "confidence float16": (bad(confidence=lambda a: a["confidence"].half()), "confidence"),
    "eligible uint8": (bad(eligible=lambda a: a["eligible"].to(torch.uint8)), "eligible"),
    "num_remask float": (bad(num_remask=lambda a: a["num_remask"].float()), "num_remask"),
    "num_remask int16": (bad(num_remask=lambda a: a["num_remask"].to(torch.int16)), "num_remask"),
    "confidence shape": (bad(confidence=lambda a: torch.rand(3, 21)), "confidence"),
    "eligible shape": (bad(eligible=lambda a: torch.ones(4, 20, dtype=torch.bool)), "eligible"),
    "num_remask length": (bad(num_remask=lambda a: torch.tensor([1, 1, 1, 1])), "num_remask"),
    "count above eligible": (bad(num_remask=lambda a: torch.tensor([2, 17, 3]), max_k=lambda a: 17), r"num_remask.*row 1"),
    "count above eligible, last row": (bad(num_remask=lambda a: torch.tensor([16, 16, 17], dtype=torch.int32),
                                           max_k=lambda a: 20), r"num_remask.*row 2"),
    "negative count": (bad(num_remask=lambda a: torch.tensor([2, 3, -1])), r"num_remask.*row 2"),
    "count above max_k": (bad(num_remask=lambda a: torch.tensor([2, 5, 1])), r"num_remask.*row 1"),
    "mask_id negative": (bad(mask_id=lambda a: -1), "mask_id"),
    "max_k above S": (bad(max_k=lambda a: 21), "max_k"),
    "max_k negative": (bad(max_k=lambda a: -1, num_remask=lambda a: torch.zeros(3, dtype=torch.int64)), "max_k"),
    "tokens and confidence share memory": (
        bad(confidence=lambda a: a["tokens"].view(torch.float32)[:, :20]), "confidence"),
    "tokens expanded": (bad(tokens=lambda a: a["tokens"][:1].expand(3, 20)), "tokens"),
    "confidence expanded": (bad(confidence=lambda a: a["confidence"][:, :1].expand(3, 20)), "confidence"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_refused_and_nothing_written(case):
    build, pattern = BAD_INPUTS[case]
    args = build()
    tokens_before, conf_before = args["tokens"].clone(), args["confidence"].clone()
    with pytest.raises(ValueError, match=pattern):
        OP(*args.values())
    assert torch.equal(args["tokens"], tokens_before)
    torch.testing.assert_close(args["confidence"], conf_before, rtol=0, atol=0, equal_nan=True)


def test_reference_refuses_the_same_counts():
    # The value errors above are errors of the contract, not just of the kernel.
    for case in ["count above eligible", "negative count", "count above max_k"]:
        args = BAD_INPUTS[case][0]()
        with pytest.raises(ValueError):
            reference_snapshot_remask(*args.values())


def test_wrapper_refuses_bad_int_counts():
    args = valid_args()
    with pytest.raises(ValueError, match="num_remask"):
        snapshot_remask(args["tokens"], args["confidence"], -1, args["eligible"], MASK_ID)
    with pytest.raises(ValueError, match="num_remask"):
        snapshot_remask(args["tokens"], args["confidence"], 2.0, args["eligible"], MASK_ID)
    with pytest.raises(ValueError, match=r"num_remask.*row 0"):
        snapshot_remask(args["tokens"], args["confidence"], 17, args["eligible"], MASK_ID)


@pytest.mark.parametrize("name", ["confidence", "num_remask", "eligible"])
def test_cpu_kernel_refuses_other_device(name):
    # Calls the CPU kernel itself with one argument on the meta device.
    args = valid_args()
    tokens_before, conf_before = args["tokens"].clone(), args["confidence"].clone()
    args[name] = args[name].to("meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match=name):
        OP.redispatch(cpu, *args.values())
    if name != "confidence":
        torch.testing.assert_close(args["confidence"], conf_before, rtol=0, atol=0)
    assert torch.equal(args["tokens"], tokens_before)


def test_public_op_refuses_mixed_devices():
    # Mixed cpu/meta calls dispatch to the fake kernel, which must refuse them too.
    args = valid_args()
    args["eligible"] = args["eligible"].to("meta")
    with pytest.raises(ValueError, match="eligible"):
        OP(*args.values())


# ---------------------------------------------------------------------------------------
# Fuzz


@settings(max_examples=50, deadline=None)
@given(
    B=st.integers(1, 5),
    S=st.integers(1, 300),
    pattern=st.sampled_from(["rand", "ties", "special", "narrow", "constant"]),
    count_form=st.sampled_from(["int", "int32", "int64"]),
    holes=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    extra_width=st.integers(0, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_against_reference(B, S, pattern, count_form, holes, layout, extra_width, seed):
    gen = torch.Generator().manual_seed(seed)
    if pattern == "constant":
        confidence = torch.full((B, S), 0.625)
    else:
        confidence = make_confidence(B, S, pattern, gen)
    tokens = torch.randint(0, VOCAB, (B, S), generator=gen)
    eligible = make_eligible(B, S, gen, holes)
    if layout == "strided":
        tokens = torch.randint(0, VOCAB, (B, 2 * S), generator=gen)[:, ::2].copy_(tokens)
        confidence = torch.empty(B, 2 * S)[:, 1::2].copy_(confidence)
    elif layout == "transposed":
        tokens, confidence = tokens.t().contiguous().t(), confidence.t().contiguous().t()
        eligible = eligible.t().contiguous().t()
    if count_form == "int":
        counts = int(torch.randint(0, int(eligible.sum(1).min()) + 1, (), generator=gen))
        max_k = min(S, counts + extra_width)
    else:
        counts = random_counts(eligible, gen, torch.int32 if count_form == "int32" else torch.int64)
        max_k = min(S, int(counts.max()) + extra_width)
    run_and_compare(tokens, confidence, counts, eligible, max_k=max_k, reset_value=-3.0)


def test_wrapper_refuses_non_int_scalars_and_counts_above_s():
    # Never truncated by int(), and a count above the row length names num_remask (not the
    # max_k it would have become).
    args = valid_args()
    tokens, confidence, eligible = args["tokens"], args["confidence"], args["eligible"]
    cases = [
        (dict(num_remask=21), r"num_remask = 21 exceeds the row length S=20"),
        (dict(num_remask=torch.tensor([1, 21, 0])), r"num_remask.max\(\) = 21 exceeds the row length S=20"),
        (dict(num_remask=True), "num_remask must be an int"),
        (dict(num_remask=2, max_k=2.5), "max_k must be an int"),
        (dict(num_remask=2, max_k=True), "max_k must be an int"),
        (dict(num_remask=2, mask_id=7.5), "mask_id must be an int"),
        (dict(num_remask=2, mask_id=2**63), "mask_id = .* does not fit in int64"),
        (dict(num_remask=2, reset_value="x"), "reset_value must be a float"),
        (dict(num_remask=torch.tensor([1.0, 2.0, 0.0])), "num_remask must be an int"),
    ]
    for kwargs, pattern in cases:
        kwargs.setdefault("mask_id", MASK_ID)
        t, c = tokens.clone(), confidence.clone()
        with pytest.raises(ValueError, match=pattern):
            snapshot_remask(t, c, eligible=eligible, **kwargs)
        assert torch.equal(t, tokens)
