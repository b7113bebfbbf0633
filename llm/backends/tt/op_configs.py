"""Memory configs, program configs and compute-kernel configs of every op, built once.

`OpConfigs.build` derives everything from the model shapes, the mesh and the precision policy at
construction; the forward code only looks configs up (prefill configs are tabulated for every
padded prompt length the runtime allows). Shapes are per device: with 1-D tensor parallelism over
N devices, QKV/w1/w3 (column-parallel) have N/ndev columns and wo/w2 (row-parallel) K/ndev rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm.backends.tt.heads import HeadLayout, head_layout
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.precision import Precision
from llm.model.config import ModelConfig, RuntimeConfig


class TTConfigError(ValueError):
    """The model, runtime or mesh cannot be laid out on the device as the tt backend builds it."""


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil(a, b) * b


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@dataclass(frozen=True)
class DecodeMatmul:
    """One DRAM-sharded decode matmul [32, k] x [k, n]: the L1 width-sharded input grid
    (`ncores` cores dividing K and N), the DRAM width-sharded weight layout, the program config."""

    k: int
    n: int
    ncores: int
    input_memcfg: Any
    weight_memcfg: Any
    program_config: Any


@dataclass(frozen=True)
class Geometry:
    """Per-device sizes of one model on one mesh."""

    dim: int
    dim_local: int  # prefill residual width per device (dim / ndev if fractured, else dim)
    fractured: bool  # prefill residual split over the mesh's width (dim divides into tiles)
    heads: HeadLayout  # which query / KV heads each device holds (padding, KV replication)
    n_heads: int  # local query heads (padding heads included)
    n_kv: int  # local KV heads (replicas included)
    head_dim: int
    qkv: int  # local fused QKV width
    hidden: int  # local MLP hidden width (the intermediate size padded to 32 ndev, split)
    vocab: int
    vocab_padded: int  # multiple of 32 * ndev
    vocab_local: int
    batch: int  # decode users (rows of the 32-row decode tile)


def geometry(config: ModelConfig, runtime: RuntimeConfig, ndev: int) -> Geometry:
    """Check that the model lays out over `ndev` devices in tiles; per-device sizes.

    Head counts need not divide the mesh (heads.py pads query heads and replicates KV heads),
    the intermediate size is zero-padded to a multiple of 32 ndev, and a hidden size that is not
    a multiple of 32 ndev keeps the prefill residual replicated (all-reduce instead of
    reduce-scatter) instead of fractured."""
    c = config
    problems = []
    if c.hidden_size % TILE:
        problems.append(f"hidden_size {c.hidden_size} must be a multiple of 32")
    if c.head_dim % TILE:
        problems.append(f"head_dim {c.head_dim} must be a multiple of 32 (rotary_embedding_llama)")
    if ndev > c.num_heads:
        problems.append(f"a mesh of {ndev} devices exceeds the model's {c.num_heads} query "
                        "heads")
    if runtime.block_size % TILE:
        problems.append(f"block_size {runtime.block_size} must be a multiple of 32 (paged cache "
                        "pages are whole tiles)")
    if runtime.max_batch > TILE:
        problems.append(f"max_batch {runtime.max_batch} exceeds the 32 users of a decode tile")
    heads = head_layout(c, ndev) if ndev <= c.num_heads else None
    if heads is not None and heads.n_heads > TILE:
        problems.append(f"{heads.n_heads} query heads per device exceed 32")
    if problems:
        raise TTConfigError("tt backend: " + "; ".join(problems))
    vocab_padded = _round_up(c.vocab_size, TILE * ndev)
    fractured = ndev > 1 and c.hidden_size % (TILE * ndev) == 0
    nh, nkv = heads.n_heads, heads.n_kv
    return Geometry(
        dim=c.hidden_size, dim_local=c.hidden_size // ndev if fractured else c.hidden_size,
        fractured=fractured, heads=heads, n_heads=nh, n_kv=nkv, head_dim=c.head_dim,
        qkv=(nh + 2 * nkv) * c.head_dim,
        hidden=_round_up(c.intermediate_size, TILE * ndev) // ndev,
        vocab=c.vocab_size, vocab_padded=vocab_padded, vocab_local=vocab_padded // ndev,
        batch=runtime.max_batch,
    )


@dataclass(frozen=True)
class OpConfigs:
    """Every memory / program / kernel config the model uses."""

    geo: Geometry
    precision: Precision
    # decode residual stream: [1, 1, B (32 padded), dim] width-sharded in L1 on a core rectangle
    residual_grid: tuple[int, int]
    residual_memcfg: Any
    norm_program_config: Any
    qkv: DecodeMatmul
    wo: DecodeMatmul
    w1: DecodeMatmul  # also w3
    w2: DecodeMatmul
    lm_head: tuple[DecodeMatmul, ...]  # one per vocabulary chunk
    user_height_memcfg: Any  # [32, dh] per user on `batch` cores (rope cos/sin)
    trans_mat_memcfg: Any  # [32, 32] per user on `batch` cores
    sdpa_out_memcfg: Any  # [pad32(nh), dh] per user, input of nlp_concat_heads_decode
    sdpa_decode_program_config: Any
    kernels: dict[str, Any]  # precision.KERNELS name -> WormholeComputeKernelConfig
    # prefill
    prefill_lengths: tuple[int, ...]  # allowed padded prompt lengths
    qkv_chunk: int  # prefill rows per QKV matmul (longer prompts are reshaped into chunks)
    mlp_chunk: int  # prefill rows per MLP / wo matmul
    # (weight shape "wqkv" | "wo" | "w1" (also w3) | "w2", rows per matmul, fp32 dest
    # accumulation) -> 2-D program config, for the accumulation modes the policy uses
    prefill_matmuls: dict[tuple[str, int, bool], Any]
    sdpa_prefill: dict[int, Any]  # padded length -> SDPAProgramConfig
    sdpa_chunked: dict[int, Any]  # q/k chunk size -> SDPAProgramConfig (prefill at start > 0)

    @classmethod
    def build(cls, mesh: Mesh, config: ModelConfig, runtime: RuntimeConfig, prec: Precision, *,
              max_columns_per_device: int = 16384, qkv_chunk: int = 2048,
              mlp_chunk: int = 1024) -> OpConfigs:
        """Derive all configs; raises TTConfigError when the shapes cannot be laid out."""
        ttnn, dev = mesh.ttnn, mesh.device
        geo = geometry(config, runtime, mesh.ndev)
        if len(prec.decoders) != config.num_layers:
            raise TTConfigError(f"precision policy has {len(prec.decoders)} decoders, the model "
                                f"{config.num_layers}")
        if qkv_chunk % mlp_chunk or mlp_chunk % TILE:
            raise TTConfigError("qkv_chunk must be a multiple of mlp_chunk, a multiple of 32")
        grid = dev.compute_with_storage_grid_size()
        dim_t = geo.dim // TILE
        rx, ry = max(((x, y) for x in range(1, grid.x + 1) for y in range(1, grid.y + 1)
                      if dim_t % (x * y) == 0), key=lambda xy: (xy[0] * xy[1], xy[0]))
        residual = ttnn.create_sharded_memory_config(
            (TILE, geo.dim), ttnn.CoreGrid(y=ry, x=rx), ttnn.ShardStrategy.WIDTH,
            ttnn.ShardOrientation.ROW_MAJOR)
        block_w = dim_t // (rx * ry)
        norm_pc = ttnn.LayerNormShardedMultiCoreProgramConfig(
            compute_with_storage_grid_size=(rx, ry), subblock_w=_largest_divisor(block_w, 4),
            block_h=1, block_w=block_w, inplace=False)
        chunk = max(TILE, min(_round_up(max_columns_per_device, TILE), geo.vocab_local))
        widths = [min(chunk, geo.vocab_local - s) for s in range(0, geo.vocab_local, chunk)]
        lm = tuple(_decode_matmul(ttnn, dev, geo.dim, w) for w in widths)
        users = ttnn.num_cores_to_corerangeset(geo.batch, grid, row_wise=True)

        def per_user(h: int, w: int):
            return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1,
                                     ttnn.ShardSpec(users, (h, w), ttnn.ShardOrientation.ROW_MAJOR))

        kernels = _kernels(ttnn)
        lengths = _prefill_lengths(runtime.max_seq_len, mlp_chunk, qkv_chunk)
        prefill_mm = {}
        groups = {"wqkv": ("wqkv",), "wo": ("wo",), "w1": ("w1", "w3"), "w2": ("w2",)}
        for rows in sorted({min(s, mlp_chunk) for s in lengths} | {min(s, qkv_chunk)
                                                                   for s in lengths}):
            for name, k, n in (("wqkv", geo.dim, geo.qkv),
                               ("wo", geo.n_heads * geo.head_dim, geo.dim),
                               ("w1", geo.dim, geo.hidden), ("w2", geo.hidden, geo.dim)):
                for fp32 in {kernels[d.fidelity[g]].fp32_dest_acc_en
                             for d in prec.decoders for g in groups[name]}:
                    prefill_mm[(name, rows, fp32)] = _prefill_matmul(ttnn, grid, rows, k, n,
                                                                     fp32)
        sdpa_prefill = {s: ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=(grid.x, grid.y),
            q_chunk_size=_sdpa_chunk(s), k_chunk_size=_sdpa_chunk(s), exp_approx_mode=False)
            for s in lengths}
        sdpa_chunked = {c: ttnn.SDPAProgramConfig(
            compute_with_storage_grid_size=(grid.x, grid.y), q_chunk_size=c, k_chunk_size=c,
            exp_approx_mode=False) for c in (32, 64, 128, 256)}
        return cls(
            geo=geo, precision=prec, residual_grid=(rx, ry), residual_memcfg=residual,
            norm_program_config=norm_pc,
            qkv=_decode_matmul(ttnn, dev, geo.dim, geo.qkv),
            wo=_decode_matmul(ttnn, dev, geo.n_heads * geo.head_dim, geo.dim,
                              ncores=geo.n_heads),
            w1=_decode_matmul(ttnn, dev, geo.dim, geo.hidden),
            w2=_decode_matmul(ttnn, dev, geo.hidden, geo.dim),
            lm_head=lm,
            user_height_memcfg=per_user(TILE, geo.head_dim),
            trans_mat_memcfg=per_user(TILE, TILE),
            sdpa_out_memcfg=per_user(_round_up(geo.n_heads, TILE), geo.head_dim),
            sdpa_decode_program_config=ttnn.SDPAProgramConfig(
                compute_with_storage_grid_size=(grid.x, grid.y), q_chunk_size=0,
                k_chunk_size=0, exp_approx_mode=False),
            kernels=kernels, prefill_lengths=lengths, qkv_chunk=qkv_chunk, mlp_chunk=mlp_chunk,
            prefill_matmuls=prefill_mm, sdpa_prefill=sdpa_prefill, sdpa_chunked=sdpa_chunked,
        )

    def kernel(self, group: str, layer: int):
        """The compute-kernel config of op group `group` (precision.FIDELITY_GROUPS) in decoder
        `layer` under this precision policy."""
        return self.kernels[self.precision.decoder(layer).fidelity[group]]

    def lm_head_kernel(self):
        """The compute-kernel config of the LM head matmuls."""
        return self.kernels[self.precision.lm_head_fidelity]

    def prefill_matmul(self, shape: str, seq_len: int, chunk: int, kernel):
        """2-D program config of the weight shape `shape` ("wqkv" | "wo" | "w1" | "w2") for a
        prefill of `seq_len` rows run in matmuls of at most `chunk` rows under compute-kernel
        config `kernel` (its fp32 accumulation bounds the output subblock)."""
        return self.prefill_matmuls[(shape, min(seq_len, chunk), kernel.fp32_dest_acc_en)]

    def sdpa_chunked_config(self, start: int, seq_len: int):
        """SDPA config of a prefill chunk of `seq_len` rows starting at position `start`: q/k
        chunks dividing both (chunked_scaled_dot_product_attention needs start % chunk == 0)."""
        size = max(c for c in self.sdpa_chunked if start % c == 0 and seq_len % c == 0
                   and c <= _sdpa_chunk(seq_len))
        return self.sdpa_chunked[size]

    def prefill_length(self, s: int) -> int:
        """Padded length a prompt of `s` tokens runs at (tile multiple; chunk multiple when
        longer than one MLP chunk)."""
        for length in self.prefill_lengths:
            if length >= s:
                return length
        raise TTConfigError(f"prompt of {s} tokens exceeds the longest prefill "
                            f"{self.prefill_lengths[-1]}")


def _prefill_lengths(max_seq_len: int, mlp_chunk: int, qkv_chunk: int) -> tuple[int, ...]:
    """Tile multiples up to one MLP chunk, then multiples of the chunk each matmul is split
    into: the MLP chunk up to one QKV chunk, the QKV chunk beyond."""
    lengths = set(range(TILE, min(max_seq_len, mlp_chunk) + TILE, TILE))
    s = mlp_chunk
    while s < max_seq_len:
        s += mlp_chunk if s < qkv_chunk else qkv_chunk
        lengths.add(_round_up(s, qkv_chunk) if s > qkv_chunk else s)
    return tuple(sorted(lengths))


def _sdpa_chunk(s: int) -> int:
    for c in ((256, 128, 64, 32) if s >= 2048 else (64, 32)):
        if s % c == 0:
            return c
    return TILE


def _decode_matmul(ttnn, dev, k: int, n: int, ncores: int | None = None) -> DecodeMatmul:
    kt, nt = k // TILE, _ceil(n, TILE)
    if ncores is None:
        ncores = max(d for d in range(1, 65) if kt % d == 0 and nt % d == 0)
    grid = ttnn.num_cores_to_corerangeset(ncores, dev.compute_with_storage_grid_size(),
                                          row_wise=True)
    in_mem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.L1,
                               ttnn.ShardSpec(grid, (TILE, k // ncores),
                                              ttnn.ShardOrientation.ROW_MAJOR))
    banks = dev.dram_grid_size().x
    bank_grid = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0),
                                                  ttnn.CoreCoord(banks - 1, 0))})
    w_mem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.DRAM,
                              ttnn.ShardSpec(bank_grid, (k, _ceil(n, TILE * banks) * TILE),
                                             ttnn.ShardOrientation.ROW_MAJOR))
    pc = ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=_largest_divisor(kt // ncores, 8), per_core_M=1,
        per_core_N=_ceil(nt, ncores), fused_activation=None)
    return DecodeMatmul(k, n, ncores, in_mem, w_mem, pc)


def _prefill_matmul(ttnn, grid, rows: int, k: int, n: int, fp32_acc: bool):
    """2-D multicast config for [rows, k] x [k, n]: M over grid rows, N over grid columns."""
    mt, kt, nt = _ceil(rows, TILE), k // TILE, _ceil(n, TILE)
    gx, gy = min(grid.x, nt), min(grid.y, mt)
    per_m, per_n = _ceil(mt, gy), _ceil(nt, gx)
    return ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(
        compute_with_storage_grid_size=(gx, gy), in0_block_w=_largest_divisor(kt, 4),
        out_subblock_h=1, out_subblock_w=_largest_divisor(per_n, 4 if fp32_acc else 8),
        per_core_M=per_m, per_core_N=per_n, transpose_mcast=False, fused_activation=None,
        fuse_batch=False)


def _kernels(ttnn) -> dict[str, Any]:
    """The compute-kernel configs of precision.KERNELS, as tt_transformers' ModelArgs builds
    them (compute_kernel_config_hifi4 / _hifi2 / _hifi2_fp16 / _lofi)."""
    def cfg(fidelity, approx, fp32):
        return ttnn.WormholeComputeKernelConfig(math_fidelity=fidelity, math_approx_mode=approx,
                                                fp32_dest_acc_en=fp32, packer_l1_acc=True)

    mf = ttnn.MathFidelity
    return {"hifi4": cfg(mf.HiFi4, False, True), "hifi2": cfg(mf.HiFi2, True, True),
            "hifi2_fp16": cfg(mf.HiFi2, False, False), "lofi": cfg(mf.LoFi, False, False)}
