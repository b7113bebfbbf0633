"""Regression tests for review findings: block-float and integer host conversion, the per-core L1
ledger, and reallocate inside a trace.

Expected conversion values were read off ttnn 0.81.1 host conversion (from_torch / to_torch with
no device) under the mock N150 cluster descriptor (mock-cluster/wormhole_N150.yaml) on
2026-11-23; test_emu_real_ttnn.py repeats the comparison live wherever real ttnn imports.
"""

import pytest
import torch

import llm.ttnn_emu as ttnn


def roundtrip(values, dtype):
    x = values if isinstance(values, torch.Tensor) else torch.tensor([values])
    return ttnn.to_torch(ttnn.from_torch(x, dtype=dtype, layout=ttnn.TILE_LAYOUT))


def bits(t):
    return [int(v) & 0xFFFFFFFF for v in t.reshape(-1).view(torch.int32)]


# --- block-float ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,values,expect_bits",
    [
        # a negative value that rounds to 0, and -0.0 itself, give +0.0
        (ttnn.bfloat8_b, [1.0, -1e-5], [0x3F800000, 0x0]),
        (ttnn.bfloat8_b, [-0.0, 1.0], [0x0, 0x3F800000]),
        (ttnn.bfloat4_b, [-0.0], [0x0]),
        # the mantissa is shifted right by (e_max - e) first; the bits shifted out do not count
        (ttnn.bfloat8_b, [2.5, 1.2031251192], [0x40200000, 0x3F980000]),  # 1.1875
        (ttnn.bfloat4_b, [2.5, 1.25 + 2**-23], [0x40200000, 0x3F800000]),  # 1.0
        (ttnn.bfloat8_b, [2.5, 1 + 3 / 64, 1 + 3 / 64 + 2**-20], [0x40200000, 0x3F880000,
                                                                   0x3F880000]),
        (ttnn.bfloat8_b, [4.0, 1 + 3 / 64, 1 + 2 / 64 + 2**-23], [0x40800000, 0x3F880000,
                                                                   0x3F800000]),
        # fp32 subnormals flush to 0; the smallest normals survive
        (ttnn.bfloat8_b, [3e-39], [0x0]),
        (ttnn.bfloat4_b, [1.0, -3e-39, 1e-39], [0x3F800000, 0x0, 0x0]),
        (ttnn.bfloat8_b, [1.5 * 2**-126, 2**-126, 1.75 * 2**-125], [0xC00000, 0x800000,
                                                                    0x1600000]),
        # saturation, never an exponent bump (reference 0.1 worked examples)
        (ttnn.bfloat8_b, [1.999], [0x3FFE0000]),
        (ttnn.bfloat4_b, [1.999], [0x3FE00000]),
        (ttnn.bfloat4_b, [1000.0], [0x44600000]),
        # inf / nan set the shared exponent to 255: ordinary members flush, huge ones survive
        (ttnn.bfloat8_b, [1.0, float("inf"), -2.0, float("-inf"), float("nan")],
         [0x0, 0x7F800000, 0x0, 0xFF800000, 0x7FC00000]),
        (ttnn.bfloat8_b, [2.0**127, float("inf"), 2.0**124, 2.0**121],
         [0x7F000000, 0x7F800000, 0x7D800000, 0x0]),
        (ttnn.bfloat4_b, [2.0**127, float("inf"), 2.0**124, 2.0**121],
         [0x7F000000, 0x7F800000, 0x0, 0x0]),
    ],
)
def test_block_float_values_from_real_ttnn(dtype, values, expect_bits):
    assert bits(roundtrip(values, dtype)) == expect_bits


def _lcg_inputs(seed: int) -> torch.Tensor:
    """64x128 fp32 values from a portable LCG: exponents 2**-15..2**8 (groups cross powers of
    two), every 5th value a bf8 tie pattern with a tail, every 11th a zero or subnormal."""
    s, out = seed, []
    for _ in range(64 * 128):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(s >> 32)
    r = torch.tensor(out, dtype=torch.int64)
    sign = (r >> 31) & 1
    exp = 112 + (r >> 23) % 24
    man = r & 0x7FFFFF
    man = torch.where(r % 5 == 0, man & ~0x1FFFF | 0x10000, man)
    exp = torch.where(r % 11 == 0, torch.zeros_like(exp), exp)
    u = (sign << 31) | (exp << 23) | man
    u = torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)
    return u.view(torch.float32).reshape(64, 128)


def _digest(y: torch.Tensor):
    b = y.contiguous().view(torch.int32).to(torch.int64).reshape(-1) & 0xFFFFFFFF
    w = torch.arange(1, b.numel() + 1, dtype=torch.int64)
    return int((b * w).sum()), int((y == 0).sum()), int(torch.signbit(y).sum())


@pytest.mark.parametrize(
    "seed,dtype,expect",
    [
        (1, ttnn.bfloat8_b, (25714041418809344, 5367, 1454)),
        (1, ttnn.bfloat4_b, (14755377044258816, 6600, 851)),
        (2, ttnn.bfloat8_b, (24878358382641152, 5425, 1399)),
        (2, ttnn.bfloat4_b, (14622684400844800, 6598, 824)),
    ],
)
def test_block_float_bulk_digest_from_real_ttnn(seed, dtype, expect):
    assert _digest(roundtrip(_lcg_inputs(seed), dtype)) == expect


# --- integer host conversion ---------------------------------------------------------------------
_INTS = [3, -1, -2, 2**31, -2**31 - 1, 2**32 + 5, -2**40 - 7, 65536, 70000]
_FLOATS = [1.5, -2.5, -0.5, 3e9, 5e9, 1e10, -1e10, 2.0**31, 65535.7, 70000.0, -1.0,
           float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize(
    "dtype,src,expect",
    [
        (ttnn.uint32, torch.int64, [3, 4294967295, 4294967294, 2147483648, 2147483647, 5,
                                    4294967289, 65536, 70000]),
        (ttnn.int32, torch.int64, [3, -1, -2, -2147483648, 2147483647, 5, -7, 65536, 70000]),
        (ttnn.uint16, torch.int64, [3, 65535, 65534, 0, 65535, 5, 65529, 0, 4464]),
        (ttnn.uint32, torch.float32, [1, 4294967294, 0, 3000000000, 2147483648, 2147483648,
                                      2147483648, 2147483648, 65535, 70000, 4294967295,
                                      2147483648, 2147483648, 2147483648]),
        (ttnn.int32, torch.float32, [1, -2, 0] + [-2147483648] * 5 + [65535, 70000, -1]
         + [-2147483648] * 3),
        (ttnn.uint16, torch.float32, [1, 0, 0, 0, 0, 0, 0, 0, 65535, 65535, 0, 0, 0, 0]),
        (ttnn.uint32, torch.float64, [1, 4294967294, 0, 3000000000, 0, 0, 2147483648,
                                      2147483648, 65535, 70000, 4294967295, 0, 0, 0]),
        (ttnn.uint16, torch.float64, [1, 65534, 0, 0, 0, 0, 0, 0, 65535, 4464, 65535, 0, 0, 0]),
    ],
)
def test_integer_host_conversion_from_real_ttnn(dtype, src, expect):
    values = _INTS if not src.is_floating_point else _FLOATS
    x = torch.tensor([values], dtype=torch.float64 if src.is_floating_point else torch.int64)
    got = roundtrip(x.to(src), dtype)
    assert got.reshape(-1).to(torch.int64).tolist() == expect


# --- L1 ledger -----------------------------------------------------------------------------------
def test_l1_interleaved_and_sharded_share_the_per_core_ledger():
    dev = ttnn.open_device(device_id=0, worker_l1_size=200_000)
    try:
        # 140 x 32 = 4480 tiles of 2048 B over 64 cores: 70 tiles = 143,360 B on every core
        x = ttnn.from_torch(torch.zeros(1, 1, 4480, 1024), dtype=ttnn.bfloat16,
                            layout=ttnn.TILE_LAYOUT, device=dev,
                            memory_config=ttnn.L1_MEMORY_CONFIG)
        assert dev.l1_used(ttnn.CoreCoord(0, 0)) == 143_360
        assert dev.l1_used(ttnn.CoreCoord(7, 7)) == 143_360
        core = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(0, 0))})
        spec = ttnn.ShardSpec(core, (64, 1024), ttnn.ShardOrientation.ROW_MAJOR)
        mem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1, spec)
        with pytest.raises(RuntimeError, match="Out of L1"):  # 143,360 + 131,072 > 200,000
            ttnn.from_torch(torch.zeros(1, 1, 64, 1024), dtype=ttnn.bfloat16,
                            layout=ttnn.TILE_LAYOUT, device=dev, memory_config=mem)
        ttnn.deallocate(x)
        y = ttnn.from_torch(torch.zeros(1, 1, 64, 1024), dtype=ttnn.bfloat16,
                            layout=ttnn.TILE_LAYOUT, device=dev, memory_config=mem)
        assert dev.l1_used(ttnn.CoreCoord(0, 0)) == 131_072
        assert dev.l1_used(ttnn.CoreCoord(1, 0)) == 0
        ttnn.deallocate(y)
    finally:
        ttnn.close_device(dev)


def test_l1_interleaved_rounds_pages_up_per_core():
    dev = ttnn.open_device(device_id=0)
    try:
        # 65 tiles over 64 cores: 2 pages' worth is reserved on every core
        t = ttnn.from_torch(torch.zeros(1, 1, 32, 65 * 32), dtype=ttnn.bfloat8_b,
                            layout=ttnn.TILE_LAYOUT, device=dev,
                            memory_config=ttnn.L1_MEMORY_CONFIG)
        assert dev.l1_used(ttnn.CoreCoord(5, 3)) == 2 * 1088
        ttnn.deallocate(t)
        # row-major pages are rows: 100 rows of 64 bf16 over 64 cores -> 2 rows of 128 B
        r = ttnn.from_torch(torch.zeros(100, 64), dtype=ttnn.bfloat16,
                            layout=ttnn.ROW_MAJOR_LAYOUT, device=dev,
                            memory_config=ttnn.L1_MEMORY_CONFIG)
        assert dev.l1_used(ttnn.CoreCoord(0, 0)) == 2 * 128
        ttnn.deallocate(r)
    finally:
        ttnn.close_device(dev)


# --- trace ---------------------------------------------------------------------------------------
def test_reallocate_is_recorded_by_trace_capture(device):
    x = ttnn.from_torch(torch.zeros(1, 1, 32, 32), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT, device=device)
    ttnn.multiply(ttnn.reallocate(ttnn.add(x, 1.0)), 2.0)  # compile run
    tid = ttnn.begin_trace_capture(device)
    y = ttnn.add(x, 1.0)
    z = ttnn.reallocate(y)
    w = ttnn.multiply(z, 2.0)
    ttnn.end_trace_capture(device, tid)
    ttnn.execute_trace(device, tid)
    assert ttnn.to_torch(w)[0, 0, 0, 0].item() == 2.0
    ttnn.copy_host_to_device_tensor(
        ttnn.from_torch(torch.full((1, 1, 32, 32), 5.0), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT), x)
    ttnn.execute_trace(device, tid)
    assert ttnn.to_torch(w)[0, 0, 0, 0].item() == 12.0
    ttnn.release_trace(device, tid)
