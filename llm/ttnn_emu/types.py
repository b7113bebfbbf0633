"""Enums and small value types of the ttnn subset: dtypes, layouts, compute configs, activations."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

TILE_SIZE = 32  # ttnn.TILE_SIZE: tiles are 32x32 (four 16x16 faces)


class DataType(enum.Enum):
    """ttnn.DataType (reference 0)."""

    BFLOAT16 = 0
    FLOAT32 = 1
    UINT32 = 2
    BFLOAT8_B = 3
    BFLOAT4_B = 4
    UINT8 = 5
    UINT16 = 6
    INT32 = 7
    INT8 = 8
    FP8_E4M3 = 9
    INVALID = 10


class Layout(enum.Enum):
    """ttnn.Layout."""

    ROW_MAJOR = 0
    TILE = 1
    INVALID = 2


class StorageType(enum.Enum):
    """Where a tensor's buffer lives."""

    HOST = 0
    DEVICE = 1


class MathFidelity(enum.Enum):
    """ttnn.MathFidelity (reference 0.3)."""

    LoFi = 0
    HiFi2 = 2
    HiFi3 = 3
    HiFi4 = 4
    Invalid = 255


class ThrottleLevel(enum.Enum):
    """ttnn.ThrottleLevel."""

    NO_THROTTLE = 0


class UnaryOpType(enum.Enum):
    """The unary activations fused into matmul / eltwise ops (a subset of ttnn 0.81.1's members,
    same names; eltwise.apply_unary gives each its meaning)."""

    RELU = 0
    SILU = 1
    GELU = 2
    SIGMOID = 3
    TANH = 4
    IDENTITY = 5
    EXP = 6
    LOG = 7
    NEG = 8
    GTZ = 9
    LTZ = 10
    EQZ = 11


@dataclass(frozen=True)
class UnaryWithParam:
    """ttnn.UnaryWithParam(op_type[, param]): positional-only, as in ttnn 0.81.1."""

    op_type: UnaryOpType
    param: float | None = None

    def __init__(self, op_type, param=None, /):
        object.__setattr__(self, "op_type", op_type)
        object.__setattr__(self, "param", param)


EltwiseUnaryWithParam = UnaryWithParam


@dataclass(frozen=True, kw_only=True)
class WormholeComputeKernelConfig:
    """ttnn.WormholeComputeKernelConfig (keyword-only in ttnn; reference 0.3)."""

    math_fidelity: MathFidelity = MathFidelity.Invalid
    math_approx_mode: bool = True
    fp32_dest_acc_en: bool = False
    packer_l1_acc: bool = False
    dst_full_sync_en: bool = False
    throttle_level: ThrottleLevel = ThrottleLevel.NO_THROTTLE


BlackholeComputeKernelConfig = WormholeComputeKernelConfig

bfloat16 = DataType.BFLOAT16
float32 = DataType.FLOAT32
uint32 = DataType.UINT32
int32 = DataType.INT32
uint16 = DataType.UINT16
uint8 = DataType.UINT8
bfloat8_b = DataType.BFLOAT8_B
bfloat4_b = DataType.BFLOAT4_B

ROW_MAJOR_LAYOUT = Layout.ROW_MAJOR
TILE_LAYOUT = Layout.TILE

BLOCK_FLOAT_DTYPES = (DataType.BFLOAT8_B, DataType.BFLOAT4_B)
FLOAT_DTYPES = (DataType.BFLOAT16, DataType.FLOAT32, DataType.BFLOAT8_B, DataType.BFLOAT4_B)
INT_DTYPES = (DataType.UINT32, DataType.INT32, DataType.UINT16, DataType.UINT8)
SUPPORTED_DTYPES = FLOAT_DTYPES + (DataType.UINT32, DataType.INT32, DataType.UINT16)

# Bytes of one 32x32 tile (reference 0.1, ttnn.Tile((32,32)).get_tile_size(dt)).
_TILE_BYTES = {
    DataType.BFLOAT16: 2048,
    DataType.FLOAT32: 4096,
    DataType.UINT32: 4096,
    DataType.INT32: 4096,
    DataType.UINT16: 2048,
    DataType.BFLOAT8_B: 1088,
    DataType.BFLOAT4_B: 576,
}
_ELEMENT_BYTES = {
    DataType.BFLOAT16: 2,
    DataType.FLOAT32: 4,
    DataType.UINT32: 4,
    DataType.INT32: 4,
    DataType.UINT16: 2,
}


def check_supported(dtype: DataType) -> None:
    """Raise for dtypes the emulator does not model."""
    if dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(f"ttnn_emu: dtype {dtype} is not supported by the emulator")


def tile_bytes(dtype: DataType) -> int:
    """Bytes of one 32x32 tile in `dtype`."""
    check_supported(dtype)
    return _TILE_BYTES[dtype]


def storage_bytes(num_elements: int, dtype: DataType) -> int:
    """Bytes needed to store `num_elements` values (block-float counts whole tiles' worth)."""
    if dtype in BLOCK_FLOAT_DTYPES:
        return num_elements * tile_bytes(dtype) // (TILE_SIZE * TILE_SIZE)
    check_supported(dtype)
    return num_elements * _ELEMENT_BYTES[dtype]


def storage_torch_dtype(dtype: DataType) -> torch.dtype:
    """The torch dtype the emulator keeps a tensor's values in."""
    check_supported(dtype)
    if dtype == DataType.BFLOAT16:
        return torch.bfloat16
    if dtype in INT_DTYPES:
        return torch.int64
    return torch.float32


def to_torch_dtype(dtype: DataType) -> torch.dtype:
    """The torch dtype `ttnn.to_torch` returns (reference 0: float32 for the block-float types)."""
    check_supported(dtype)
    return {
        DataType.BFLOAT16: torch.bfloat16,
        DataType.FLOAT32: torch.float32,
        DataType.BFLOAT8_B: torch.float32,
        DataType.BFLOAT4_B: torch.float32,
        DataType.UINT32: torch.uint32,
        DataType.INT32: torch.int32,
        DataType.UINT16: torch.uint16,
    }[dtype]


def dtype_from_torch(dtype: torch.dtype) -> DataType:
    """Default ttnn dtype of `from_torch` for a torch dtype (reference 2). As ttnn 0.81.1 (read
    off its host from_torch): int64 -> UINT32, int16 -> UINT16, uint8 -> UINT8 (not modelled
    here, so that raises), float16 -> BFLOAT16; float64 has no default there either."""
    table = {
        torch.bfloat16: DataType.BFLOAT16,
        torch.float16: DataType.BFLOAT16,
        torch.float32: DataType.FLOAT32,
        torch.int32: DataType.INT32,
        torch.int64: DataType.UINT32,
        torch.int16: DataType.UINT16,
        torch.uint8: DataType.UINT8,
        torch.uint16: DataType.UINT16,
        torch.uint32: DataType.UINT32,
    }
    if dtype not in table:
        raise RuntimeError(f"ttnn_emu: no default ttnn dtype for torch dtype {dtype}")
    return table[dtype]
