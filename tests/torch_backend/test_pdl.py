"""Programmatic dependent launch (kernels/pdl.py): where it is chosen, and that a decode layer's
kernels give bit-identical results with and without it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.gemv import norm_gate_up_silu_gemv, norm_gemv  # noqa: E402
from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.paged_decode import paged_decode_attention  # noqa: E402
from llm.backends.torch.kernels.pdl import launch_options, use_pdl  # noqa: E402
from llm.backends.torch.kernels.rope_kv import rope_and_cache  # noqa: E402

CUDA = torch.cuda.is_available()


def test_chosen_only_where_supported() -> None:
    cpu = torch.zeros(1)
    assert use_pdl(cpu) is False and use_pdl(cpu, False) is False
    with pytest.raises(ValueError, match="compute capability >= 9"):
        use_pdl(cpu, True)
    assert launch_options(False) == {} and launch_options(True) == {"launch_pdl": True}


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a CUDA GPU of compute capability >= 9")
def test_decode_kernels_equal_with_and_without_pdl() -> None:
    """One decode layer's kernel chain, back to back on one stream (each kernel reads the one
    before it), with and without PDL: the same bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, h, nh, n_kv, hd, block, b = torch.bfloat16, 2048, 32, 8, 64, 32, 1

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dt)

    x, res, nw = rnd(b, h), rnd(b, h), 1 + rnd(h, scale=0.1)
    wqkv, wgu = rnd((nh + 2 * n_kv) * hd, h, scale=h ** -0.5), rnd(2 * 8192, h, scale=h ** -0.5)
    cos, sin = rnd(b, hd), rnd(b, hd)
    pages = torch.arange(8, device="cuda", dtype=torch.int32)[None]
    blocks, offsets = pages[:, 2].long(), torch.full((b,), 5, device="cuda")
    positions = torch.full((b,), 2 * block + 5, device="cuda", dtype=torch.int32)
    k_init = torch.zeros(8, n_kv, block, hd, dtype=dt, device="cuda")
    v_init = torch.zeros_like(k_init)
    k_init[:3].copy_(rnd(3, n_kv, block, hd))
    v_init[:3].copy_(rnd(3, n_kv, block, hd))
    outs = []
    for pdl in (False, True):
        k_pool, v_pool = k_init.clone(), v_init.clone()
        qkv, total = norm_gemv(x, res, nw, 1e-5, wqkv, pdl=pdl)
        q = rope_and_cache(qkv, cos, sin, blocks, offsets, k_pool, v_pool, nh, pdl=pdl)
        o = paged_decode_attention(q, k_pool, v_pool, pages, positions, hd ** -0.5, 1, pdl=pdl)
        act, total = norm_gate_up_silu_gemv(o.reshape(b, -1)[:, :h], total, nw, 1e-5, wgu,
                                            pdl=pdl)
        y = add_rms_norm(act[:, :h], total, nw, 1e-5, pdl=pdl)[0]
        torch.cuda.synchronize()
        outs.append([qkv, q, k_pool, o, act, y])
    for a, c in zip(*outs):
        assert torch.equal(a, c)
