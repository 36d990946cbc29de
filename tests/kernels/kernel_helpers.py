"""Size/dtype cases and tolerance checks shared by the kernel tests."""

import math

import torch

STORAGE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES_D = [1, 7, 1000, 4099]
SIZES_M = [1, 3, 33, 64]
# Every (d, m) pair in float32; each half-precision dtype on pairs that still cover every d and
# every m (the storage dtype changes only the load, not the tiling; the interpreter is slow).
SIZE_DTYPE_CASES = [(d, m, torch.float32) for d in SIZES_D for m in SIZES_M] + [
    (d, m, dtype)
    for dtype in (torch.bfloat16, torch.float16)
    for d, m in zip(SIZES_D, reversed(SIZES_M))
]
EPS = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def assert_close_scaled(actual, expected, scale, *, out_dtype, acc_dtype, n):
    """Check ``actual`` against a float64 ``expected`` with a rounding-error bound.

    The bound is the output rounding (``2 eps_out (|expected| + tiny_out)``) plus the
    accumulation error of a sum of ``n`` products (``8 sqrt(n) eps_acc scale``), where ``scale``
    is the same sum over absolute values (for a dot product ``|G| |V|^T``). A wrong tile, index
    or mask gives an error of the order of ``scale`` itself and fails.
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == out_dtype, (actual.dtype, out_dtype)
    # Compared on actual's device (a GPU result need not come back to the CPU in full).
    expected = expected.to(actual.device, torch.float64)
    scale = scale.to(actual.device, torch.float64)
    err = (actual.double() - expected).abs()
    # Output rounding, relative for normal numbers and absolute for subnormals (float16).
    bound = 2 * EPS[out_dtype] * (expected.abs() + torch.finfo(out_dtype).tiny)
    bound += 8 * math.sqrt(max(n, 1)) * EPS[acc_dtype] * scale + 1e-30
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g} x the bound (max abs error {err.max().item():.3g})"
