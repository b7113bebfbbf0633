"""Matmul and norm program configs (reference 4.2, 4.4) and their validation.

Program configs never change the math; they constrain which shapes and memory layouts are legal.
Units are tiles: Mt, Kt, Nt are padded dims divided by 32.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import BufferType, ShardOrientation, TensorMemoryLayout
from .types import TILE_SIZE


def _grid_xy(g) -> tuple[int, int]:
    if hasattr(g, "x"):
        return int(g.x), int(g.y)
    return int(g[0]), int(g[1])


@dataclass(frozen=True, kw_only=True)
class MatmulMultiCoreReuseMultiCastProgramConfig:
    """2-D multicast matmul (prefill): M over grid.y, N over grid.x (swapped if transpose_mcast)."""

    compute_with_storage_grid_size: object
    in0_block_w: int
    out_subblock_h: int
    out_subblock_w: int
    out_block_h: int | None = None
    out_block_w: int | None = None
    per_core_M: int
    per_core_N: int
    transpose_mcast: bool
    fused_activation: object = None
    fuse_batch: bool = True
    allowed_worker_cores: object = None


@dataclass(frozen=True, kw_only=True)
class MatmulMultiCoreReuseMultiCast1DProgramConfig:
    """1-D multicast matmul: parallel over N (mcast_in0) or over M."""

    compute_with_storage_grid_size: object
    in0_block_w: int
    out_subblock_h: int
    out_subblock_w: int
    out_block_h: int | None = None
    out_block_w: int | None = None
    per_core_M: int
    per_core_N: int
    fuse_batch: bool
    fused_activation: object = None
    mcast_in0: bool
    gather_in0: bool = False
    hop_cores: object = None
    num_global_cb_receivers: int = 1
    untilize_out: bool = False
    allowed_worker_cores: object = None
    stream_in1: bool = False


@dataclass(frozen=True, kw_only=True)
class MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig:
    """DRAM-sharded matmul (decode): a L1 width-sharded with M == 1 tile, b DRAM width-sharded."""

    in0_block_w: int
    per_core_M: int
    per_core_N: int
    fused_activation: object = None
    num_workers_per_dram_bank: int = 1


@dataclass(frozen=True, kw_only=True)
class MatmulMultiCoreReuseProgramConfig:
    """Batched matmul without multicast."""

    compute_with_storage_grid_size: object
    in0_block_w: int
    out_subblock_h: int
    out_subblock_w: int
    per_core_M: int
    per_core_N: int
    allowed_worker_cores: object = None


@dataclass(frozen=True, kw_only=True)
class LayerNormShardedMultiCoreProgramConfig:
    """Sharded norm config (decode): one block of block_h x block_w tiles per core."""

    compute_with_storage_grid_size: object
    subblock_w: int
    block_h: int
    block_w: int
    inplace: bool
    legacy_reduction: bool = False
    legacy_rsqrt: bool = False
    use_welford: bool = False


@dataclass(frozen=True, kw_only=True)
class LayerNormDefaultProgramConfig:
    """Interleaved norm config."""

    legacy_reduction: bool = False
    legacy_rsqrt: bool = False
    use_welford: bool = False


@dataclass(frozen=True, kw_only=True)
class SDPAProgramConfig:
    """Flash attention chunking (reference 5.6, 5.7); chunks are multiples of 32 (0 = auto)."""

    compute_with_storage_grid_size: object
    sub_core_grids: object = None
    q_chunk_size: int
    k_chunk_size: int
    exp_approx_mode: bool | None = None
    max_cores_per_head_batch: int = 16
    max_k_splits: int = 1
    matmul_math_fidelity: object = None
    segmented_accumulation: bool = False


def _fail(msg: str):
    raise RuntimeError(f"matmul: {msg}")


def _check_subblocks(pc, per_core_m, per_core_n, fp32_acc: bool):
    if per_core_m % pc.out_subblock_h:
        _fail(f"per_core_M {per_core_m} must be divisible by out_subblock_h {pc.out_subblock_h}")
    if per_core_n % pc.out_subblock_w:
        _fail(f"per_core_N {per_core_n} must be divisible by out_subblock_w {pc.out_subblock_w}")
    limit = 4 if fp32_acc else 8
    if pc.out_subblock_h * pc.out_subblock_w > limit:
        _fail(f"out_subblock_h * out_subblock_w must be <= {limit} (DST capacity)")


def _check_device_grid(pc, device):
    gx, gy = _grid_xy(pc.compute_with_storage_grid_size)
    dg = device.compute_with_storage_grid_size()
    if gx > dg.x or gy > dg.y:
        _fail(f"program grid {gx}x{gy} exceeds the device grid {dg.x}x{dg.y}")
    return gx, gy


def validate_matmul_program_config(pc, a, b, out_mem, mt: int, kt: int, nt: int, fp32_acc: bool):
    """Raise where ttnn's matmul validation would for this config and these operands."""
    a_mem, b_mem = a.memory_config(), b.memory_config()
    if pc is None:
        if b_mem.memory_layout != TensorMemoryLayout.INTERLEAVED:
            _fail("the automatically chosen program config needs b INTERLEAVED; pass a "
                  "DRAM-sharded program config for sharded weights")
        return
    if kt % pc.in0_block_w:
        _fail(f"K ({kt} tiles) must be divisible by in0_block_w {pc.in0_block_w}")
    if isinstance(pc, MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig):
        _validate_dram_sharded(pc, a_mem, b_mem, out_mem, mt, nt)
        return
    device = a.device()
    gx, gy = _check_device_grid(pc, device)
    _check_subblocks(pc, pc.per_core_M, pc.per_core_N, fp32_acc)
    if isinstance(pc, MatmulMultiCoreReuseMultiCastProgramConfig):
        rows, cols = (gx, gy) if pc.transpose_mcast else (gy, gx)
        if pc.per_core_M * rows < mt or pc.per_core_N * cols < nt:
            _fail(f"per_core_M/N ({pc.per_core_M},{pc.per_core_N}) on a {gx}x{gy} grid do not"
                  f" cover M={mt}, N={nt} tiles")
        if a_mem.is_sharded():
            if not pc.fuse_batch:
                _fail("a sharded input a requires fuse_batch")
            if a_mem.memory_layout not in (TensorMemoryLayout.HEIGHT_SHARDED,
                                           TensorMemoryLayout.BLOCK_SHARDED):
                _fail("2-D mcast matmul needs a HEIGHT or BLOCK sharded input a")
            if a_mem.memory_layout == TensorMemoryLayout.BLOCK_SHARDED:
                want = (ShardOrientation.COL_MAJOR if pc.transpose_mcast
                        else ShardOrientation.ROW_MAJOR)
                if a_mem.shard_spec.orientation != want:
                    _fail(f"block-sharded a needs {want.name} orientation")
        if b_mem.is_sharded() and not (b_mem.memory_layout == TensorMemoryLayout.WIDTH_SHARDED
                                       and b_mem.buffer_type == BufferType.DRAM):
            _fail("2-D mcast matmul needs b interleaved or DRAM width-sharded")
    elif isinstance(pc, MatmulMultiCoreReuseMultiCast1DProgramConfig):
        ncores = gx * gy
        if pc.mcast_in0:
            if pc.per_core_M < mt or pc.per_core_N * ncores < nt:
                _fail(f"1-D mcast_in0: per_core_M {pc.per_core_M} / per_core_N {pc.per_core_N}"
                      f" x {ncores} cores do not cover M={mt}, N={nt} tiles")
            if a_mem.is_sharded():
                spec = a_mem.shard_spec
                if (a_mem.memory_layout != TensorMemoryLayout.WIDTH_SHARDED
                        or spec.orientation != ShardOrientation.ROW_MAJOR):
                    _fail("1-D mcast_in0 needs a WIDTH_SHARDED ROW_MAJOR input a")
                if not mt == pc.per_core_M == spec.shape[0] // TILE_SIZE:
                    _fail("1-D mcast_in0 needs M == per_core_M == shard height in tiles")
                if (spec.shape[1] // TILE_SIZE) % pc.in0_block_w:
                    _fail("shard width in tiles must be divisible by in0_block_w")
                if not (pc.out_subblock_w == pc.per_core_N or pc.out_subblock_h == 1):
                    _fail("sharded 1-D output needs out_subblock_w == per_core_N or "
                          "out_subblock_h == 1")
        else:
            if pc.per_core_M * ncores < mt or pc.per_core_N < nt:
                _fail("1-D mcast_in1: per_core_M x cores must cover M and per_core_N cover N")
        if b_mem.is_sharded() and b_mem.memory_layout != TensorMemoryLayout.WIDTH_SHARDED:
            _fail("1-D matmul needs b interleaved or WIDTH_SHARDED")
    elif isinstance(pc, MatmulMultiCoreReuseProgramConfig):
        if b_mem.is_sharded():
            _fail("MatmulMultiCoreReuseProgramConfig needs b interleaved")
    else:
        _fail(f"unsupported program config {type(pc).__name__}")


def _validate_dram_sharded(pc, a_mem, b_mem, out_mem, mt: int, nt: int):
    if a_mem.memory_layout != TensorMemoryLayout.WIDTH_SHARDED or (
        a_mem.buffer_type != BufferType.L1
    ):
        _fail("DRAM-sharded matmul needs input a L1 WIDTH_SHARDED")
    spec = a_mem.shard_spec
    if spec.orientation != ShardOrientation.ROW_MAJOR:
        _fail("DRAM-sharded matmul needs a ROW_MAJOR shard orientation for a")
    if not (mt == pc.per_core_M == 1):
        _fail(f"DRAM-sharded matmul needs M == per_core_M == 1 tile (got M={mt} tiles, "
              f"per_core_M={pc.per_core_M})")
    if (spec.shape[1] // TILE_SIZE) % pc.in0_block_w:
        _fail("DRAM-sharded matmul: shard width in tiles must be divisible by in0_block_w")
    if b_mem.memory_layout != TensorMemoryLayout.WIDTH_SHARDED or (
        b_mem.buffer_type != BufferType.DRAM
    ):
        _fail("DRAM-sharded matmul needs b WIDTH_SHARDED in DRAM")
    if pc.per_core_N * spec.num_cores() < nt:
        _fail(f"per_core_N {pc.per_core_N} x {spec.num_cores()} cores does not cover N={nt}")
    if out_mem.memory_layout != a_mem.memory_layout or out_mem.buffer_type != a_mem.buffer_type:
        _fail("DRAM-sharded matmul output must be sharded like a (L1_WIDTH_SHARDED_MEMORY_CONFIG)")
    if pc.num_workers_per_dram_bank != 1:
        _fail("num_workers_per_dram_bank > 1 is Blackhole only")
