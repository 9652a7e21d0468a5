"""Shared fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def check_lowp_error():
    """The FlashAttention error rule, as a function ``check(out, ref64, ref_same_dtype)``.

    ``ref64`` is the reference computed in float64, ``ref_same_dtype`` the same reference
    computed in the kernel's dtype. float32 kernels must be within 1e-5 (max abs) of the
    float64 result; bfloat16/float16 kernels may err at most twice as much as the
    low-precision reference does (plus 1e-5 of absolute slack for tiny outputs).
    """

    def check(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor | None) -> None:
        assert out.shape == ref64.shape
        err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
        if out.dtype == torch.float32:
            assert err <= 1e-5, f"float32 max abs error {err:.3g} > 1e-5"
        else:
            assert ref_same_dtype is not None and ref_same_dtype.dtype == out.dtype
            ref_err = (ref_same_dtype.double() - ref64).abs().max().item() if out.numel() else 0.0
            assert err <= 2 * ref_err + 1e-5, (
                f"{out.dtype} max abs error {err:.3g} > 2 x {ref_err:.3g} (reference in {out.dtype}) + 1e-5"
            )

    return check


def bad_args_builder(valid_args):
    """bad(name=fn, ...) -> a builder of valid_args() with args[name] replaced by fn(args)."""

    def bad(**changes):
        def build():
            args = valid_args()
            for name, fn in changes.items():
                args[name] = fn(args)
            return args
        return build

    return bad
