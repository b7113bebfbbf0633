"""ttnn.experimental.rotary_embedding_llama (reference 5.1).

Per 32-column tile j of head_dim: rot_j = x_j @ T (T is the 32x32 trans_mat tile), and
out = x * cos + rot * sin, in fp32, rounded to bf16. The op really multiplies by the given T, so a
wrong transformation matrix gives wrong results, as on hardware.
"""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .memory import TensorMemoryLayout
from .opsupport import floats, output, require_device, same_device
from .types import TILE_SIZE, DataType, Layout


def _check_common(tensors, compute_kernel_config):
    names = ("input_tensor", "cos_cache", "sin_cache", "trans_mat")
    for t, n in zip(tensors, names):
        require_device(t, "rotary_embedding_llama", n)
        if t.layout != Layout.TILE:
            raise RuntimeError(f"rotary_embedding_llama: {n} must be TILE")
        if t.dtype != DataType.BFLOAT16:
            raise RuntimeError(
                f"rotary_embedding_llama: {n} must be BFLOAT16, got {t.dtype.name}"
            )
    same_device("rotary_embedding_llama", *tensors)
    dh = tensors[0].shape[-1]
    if dh % TILE_SIZE or dh > 256:
        raise RuntimeError(f"rotary_embedding_llama: head_dim {dh} must be a multiple of 32 <= 256")
    fp32 = bool(compute_kernel_config and compute_kernel_config.fp32_dest_acc_en)
    if dh > 128 and fp32:
        raise RuntimeError("rotary_embedding_llama: head_dim > 128 requires fp32_dest_acc_en=False")
    for t, n in zip(tensors[1:3], names[1:3]):
        if t.shape[-1] != dh:
            raise RuntimeError(f"rotary_embedding_llama: {n} last dim must be {dh}")


def _rotate(x: torch.Tensor, t_tile: torch.Tensor) -> torch.Tensor:
    """x [..., dh] -> x_j @ T for every 32-wide column block j."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // TILE_SIZE, TILE_SIZE)
    return (blocks @ t_tile).reshape(x.shape)


def _is_height_sharded(t) -> bool:
    return t.memory_config().memory_layout == TensorMemoryLayout.HEIGHT_SHARDED


@op("rotary_embedding_llama")
def rotary_embedding_llama(input_tensor, cos_cache, sin_cache, trans_mat, *,
                           is_decode_mode=False, memory_config=None, compute_kernel_config=None):
    """Fused Llama RoPE. Prefill: x [B,nh,S,dh], cos/sin [1,nh|1,S,dh], trans_mat [1,1,32,32].
    Decode: x [1,B,nh,dh] height-sharded, cos/sin [1,B,1,dh] (row 0 broadcast over heads),
    trans_mat [1,1,32*B,32] height-sharded with one [32,32] tile per user."""
    tensors = (input_tensor, cos_cache, sin_cache, trans_mat)
    _check_common(tensors, compute_kernel_config)
    x_shape = tuple(input_tensor.shape)
    if len(x_shape) != 4:
        raise RuntimeError("rotary_embedding_llama: input must be 4-D")
    if is_decode_mode:
        batch = x_shape[1]
        if x_shape[0] != 1:
            raise RuntimeError("rotary_embedding_llama decode: input dim 0 must be 1")
        for t, n in zip(tensors, ("input", "cos", "sin", "trans_mat")):
            if not _is_height_sharded(t):
                raise RuntimeError(f"rotary_embedding_llama decode: {n} must be HEIGHT_SHARDED")
        if tuple(cos_cache.shape[:2]) != (1, batch) or tuple(sin_cache.shape[:2]) != (1, batch):
            raise RuntimeError("rotary_embedding_llama decode: cos/sin must be [1, B, 1, dh]")
        if tuple(trans_mat.padded_shape[-2:]) != (TILE_SIZE * batch, TILE_SIZE):
            raise RuntimeError("rotary_embedding_llama decode: trans_mat must be [1,1,32*B,32]")
        if batch > input_tensor.device().num_worker_cores():
            raise RuntimeError("rotary_embedding_llama decode: batch exceeds the number of cores")
    else:
        if input_tensor.is_sharded() or cos_cache.is_sharded() or sin_cache.is_sharded():
            raise RuntimeError("rotary_embedding_llama prefill: inputs must be interleaved")
        if cos_cache.shape[0] != 1 or sin_cache.shape[0] != 1:
            raise RuntimeError("rotary_embedding_llama prefill: cos/sin dim 0 must be 1")
        if cos_cache.shape[1] not in (1, x_shape[1]) or cos_cache.shape[-2] != x_shape[-2]:
            raise RuntimeError("rotary_embedding_llama prefill: cos/sin must be [1, nh|1, S, dh]")
        if tuple(trans_mat.shape[-2:]) != (TILE_SIZE, TILE_SIZE):
            raise RuntimeError("rotary_embedding_llama prefill: trans_mat must be [1,1,32,32]")
    outs = []
    for x, c, s, tm in zip(floats(input_tensor), floats(cos_cache), floats(sin_cache),
                           floats(trans_mat)):
        if is_decode_mode:
            # per user b: T_b = rows [32b, 32b+32); cos/sin row 0 broadcast over heads
            tiles = tm.reshape(-1, TILE_SIZE, TILE_SIZE)[: x.shape[1]]  # [B, 32, 32]
            rot = torch.stack([_rotate(x[0, b], tiles[b]) for b in range(x.shape[1])])[None]
            c, s = c[:, :, :1, :], s[:, :, :1, :]  # [1, B, 1, dh]
        else:
            rot = _rotate(x, tm.reshape(-1, TILE_SIZE, TILE_SIZE)[0])
        outs.append(x * c + rot * s)  # [.., dh]
    set_cost(flops=(2 * TILE_SIZE + 3) * math.prod(input_tensor.padded_shape))
    return output(input_tensor, outs, memory_config=memory_config or input_tensor.memory_config(),
                  op="rotary_embedding_llama", padded_shape=tuple(input_tensor.padded_shape))


@op("rotary_embedding_llama_fused_qk")
def rotary_embedding_llama_fused_qk(q_input_tensor, k_input_tensor, cos_cache, sin_cache,
                                    trans_mat, *, compute_kernel_config=None):
    """Decode RoPE of q and k in one op. The rope setup doubles the batch: cos/sin are
    [1, Bq+Bk, 1, dh] and trans_mat [1,1,32*(Bq+Bk),32], rows [0, Bq) for q and the rest for k.
    q and k are height-sharded on disjoint core sets. Returns (q, k)."""
    name = "rotary_embedding_llama_fused_qk"
    q, k = q_input_tensor, k_input_tensor
    _check_common((q, cos_cache, sin_cache, trans_mat), compute_kernel_config)
    _check_common((k, cos_cache, sin_cache, trans_mat), compute_kernel_config)
    for t, n in ((q, "q"), (k, "k"), (cos_cache, "cos"), (sin_cache, "sin"), (trans_mat, "T")):
        if not _is_height_sharded(t):
            raise RuntimeError(f"{name}: {n} must be HEIGHT_SHARDED")
    bq, bk = q.shape[1], k.shape[1]
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise RuntimeError(f"{name}: q and k must be [1, B, heads, dh]")
    if cos_cache.shape[1] != bq + bk or sin_cache.shape[1] != bq + bk:
        raise RuntimeError(f"{name}: cos/sin batch must be Bq + Bk = {bq + bk}")
    if tuple(trans_mat.padded_shape[-2:]) != (TILE_SIZE * (bq + bk), TILE_SIZE):
        raise RuntimeError(f"{name}: trans_mat must be [1, 1, 32*(Bq+Bk), 32]")
    q_cores = set(q.memory_config().shard_spec.grid.cores())
    if q_cores & set(k.memory_config().shard_spec.grid.cores()):
        raise RuntimeError(f"{name}: q and k must be sharded on disjoint core sets")
    outs_q, outs_k = [], []
    for x_q, x_k, c, s, tm in zip(floats(q), floats(k), floats(cos_cache), floats(sin_cache),
                                  floats(trans_mat)):
        tiles = tm.reshape(-1, TILE_SIZE, TILE_SIZE)  # [Bq+Bk, 32, 32]
        for x, first, outs in ((x_q, 0, outs_q), (x_k, bq, outs_k)):
            users = x.shape[1]
            rot = torch.stack([_rotate(x[0, u], tiles[first + u]) for u in range(users)])[None]
            cu = c[:, first:first + users, :1, :]  # [1, B, 1, dh]
            su = s[:, first:first + users, :1, :]
            outs.append(x * cu + rot * su)
    set_cost(flops=(2 * TILE_SIZE + 3) * (math.prod(q.padded_shape) + math.prod(k.padded_shape)))
    return (
        output(q, outs_q, op=name, padded_shape=tuple(q.padded_shape)),
        output(k, outs_k, op=name, padded_shape=tuple(k.padded_shape)),
    )
