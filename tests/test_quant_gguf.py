"""GGUF tensors kept quantized: a real GGUF file written with `gguf.GGUFWriter` (random block bytes
for every format, `gguf.quants.quantize` output where it can quantize) is read back with
`gguf.GGUFReader`, repacked, and must dequantize bit for bit like `gguf.quants.dequantize`;
row and block-aligned column slices must equal slices of that matrix.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llm.model.quant import (
    GGUF_FORMATS,
    QuantizedTensor,
    from_gguf_tensor,
    get_format,
    repack_gguf,
)

Q = gguf.GGMLQuantizationType
N, K = 6, 512  # HF (out, in): two K-quant super-blocks, sixteen legacy blocks per row
# Byte offsets of the fp16 fields in each block (ggml's block structs).
F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # those gguf.quants.quantize supports
BLOCK = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32,
         "q4_k": 256, "q5_k": 256, "q6_k": 256}


def random_blocks(qtype: Q, n: int, k: int, seed: int, scale: float | None = None) -> np.ndarray:
    """Random raw blocks uint8 [n, bytes per row]: random code and scale bytes, fp16 fields
    finite random fp16 (any finite bit pattern, or normal * `scale` if given).
    """
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if scale is None:
            bits = rng.integers(0, 1 << 16, (n, k // block), dtype=np.uint16)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits ^ 0x4000, bits)  # inf/NaN -> finite
            f16 = bits.view(np.float16)
        else:
            f16 = (rng.standard_normal((n, k // block)) * scale).astype(np.float16)
        blocks[:, :, off:off + 2] = f16.view(np.uint8).reshape(n, k // block, 2)
    return blocks.reshape(n, -1)


def write_test_gguf(path: Path) -> Path:
    """A GGUF with every repacked format (random blocks, and quantize() output where it exists)
    and the float types F32, F16, BF16.
    """
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(path, "llama")
    for i, qtype in enumerate(GGUF_FORMATS):
        writer.add_tensor(f"raw.{qtype.name}", random_blocks(qtype, N, K, seed=i), raw_dtype=qtype)
    weights = rng.standard_normal((N, K)).astype(np.float32)
    for qtype in QUANTIZABLE:
        writer.add_tensor(f"quantized.{qtype.name}", gguf.quants.quantize(weights, qtype),
                          raw_dtype=qtype)
    writer.add_tensor("float.F32", weights)
    writer.add_tensor("float.F16", weights.astype(np.float16))
    writer.add_tensor("float.BF16", gguf.quants.quantize(weights, Q.BF16), raw_dtype=Q.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> gguf.GGUFReader:
    return gguf.GGUFReader(write_test_gguf(tmp_path_factory.mktemp("gguf") / "quant.gguf"))


def reference(t: gguf.ReaderTensor) -> torch.Tensor:
    """gguf's own dequantization of a reader tensor, float32 [N, K]."""
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(N, K)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaNs and -0.0 included


def quantized(reader: gguf.GGUFReader) -> list[gguf.ReaderTensor]:
    return [t for t in reader.tensors if not t.name.startswith("float.")]


def test_reader_gives_raw_blocks_per_row(reader) -> None:
    for t in quantized(reader):
        block, size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        assert t.data.dtype == np.uint8 and t.data.shape == (N, K // block * size), t.name
        assert t.shape.tolist() == [K, N]  # GGUF dims fastest first


def test_every_format_dequantizes_bit_exactly_like_gguf(reader) -> None:
    seen = set()
    for t in quantized(reader):
        w = from_gguf_tensor(t)
        assert isinstance(w, QuantizedTensor) and w.shape == (N, K), t.name
        assert w.format == GGUF_FORMATS[t.tensor_type]
        assert_bits_equal(w.dequantize(), reference(t))
        seen.add(t.tensor_type)
    assert seen == set(GGUF_FORMATS)


def test_realistic_scales_dequantize_bit_exactly() -> None:
    for i, qtype in enumerate(GGUF_FORMATS):
        data = random_blocks(qtype, N, K, seed=100 + i, scale=0.01)
        expected = torch.from_numpy(gguf.quants.dequantize(data, qtype)).reshape(N, K)
        assert_bits_equal(repack_gguf(data, qtype, (N, K)).dequantize(), expected)


def test_float_types_pass_through_as_plain_tensors(reader) -> None:
    by_name = {t.name: t for t in reader.tensors}
    weights = torch.from_numpy(np.array(by_name["float.F32"].data))
    for name, dtype in (("F32", torch.float32), ("F16", torch.float16),
                        ("BF16", torch.bfloat16)):
        w = from_gguf_tensor(by_name[f"float.{name}"])
        assert not isinstance(w, QuantizedTensor)
        assert w.dtype == dtype and w.shape == (N, K), name
        assert torch.equal(w, weights.to(dtype)), name  # gguf and torch both round to nearest even


def test_planes_hold_the_gguf_bytes(reader) -> None:
    """Legacy formats keep the GGUF's byte count exactly; Q4_K/Q5_K unpack the 12 bytes of 6-bit
    scales and mins per super-block to 16.
    """
    for t in quantized(reader):
        w = from_gguf_tensor(t)
        extra = 4 * N * (K // 256) if w.format in ("q4_k", "q5_k") else 0
        assert w.nbytes == t.data.nbytes + extra, t.name
        assert w.nbytes == w.layout.nbytes(N, K)
    bpw = {f: get_format(f).bits_per_weight(N, K) for f in BLOCK}
    assert bpw == {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0,
                   "q4_k": 4.625, "q5_k": 5.625, "q6_k": 6.5625}


def test_row_and_aligned_column_slices_equal_slices_of_the_matrix(reader) -> None:
    for t in quantized(reader):
        w = from_gguf_tensor(t)
        full = reference(t)
        block = BLOCK[w.format]
        assert_bits_equal(w.slice_rows(1, 4).dequantize(), full[1:4])
        assert_bits_equal(w.slice_rows(5, 6).dequantize(), full[5:6])
        for lo, hi in ((0, block), (block, K), (K - 2 * block, K - block)):
            part = w.slice_cols(lo, hi)
            assert part.shape == (N, hi - lo)
            assert_bits_equal(part.dequantize(), full[:, lo:hi])
        both = w.slice_rows(2, 5).slice_cols(block, 2 * block).contiguous()
        assert all(p.is_contiguous() for p in both.planes.values())
        assert_bits_equal(both.dequantize(), full[2:5, block:2 * block])
        order = torch.tensor([4, 0, 5, 1])
        assert_bits_equal(w.take_rows(order).dequantize(), full[order])


@pytest.mark.parametrize("fmt", sorted(BLOCK))
def test_misaligned_column_slice_names_the_block_size(reader, fmt) -> None:
    t = next(t for t in quantized(reader) if GGUF_FORMATS[t.tensor_type] == fmt)
    w = from_gguf_tensor(t)
    block = BLOCK[fmt]
    for lo, hi in ((16, block), (0, block + 16), (block // 2, K)):
        with pytest.raises(ValueError, match=f"block size {block}"):
            w.slice_cols(lo, hi)
    with pytest.raises(ValueError, match="outside"):
        w.slice_cols(0, K + block)
    with pytest.raises(ValueError, match="empty"):
        w.slice_rows(3, 3)


def test_unsupported_types_and_bad_sizes_are_refused() -> None:
    data = random_blocks(Q.Q4_K, 2, 256, seed=0)
    with pytest.raises(ValueError, match="Q2_K cannot be kept quantized"):
        repack_gguf(data, Q.Q2_K, (2, 256))
    with pytest.raises(ValueError, match="expected 432 uint8 bytes"):
        repack_gguf(data, Q.Q4_K, (3, 256))
    with pytest.raises(ValueError, match="not a multiple of 256"):
        repack_gguf(data, Q.Q4_K, (2, 288))
