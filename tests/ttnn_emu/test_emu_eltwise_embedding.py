"""add / multiply / silu / softmax and embedding (reference 4.1, 4.3)."""

import pytest
import torch
from emu_helpers import bf16, on, width_sharded_l1

import llm.ttnn_emu as ttnn


def test_add_broadcast_and_scalar(device):
    a, b = torch.randn(1, 2, 32, 64), torch.randn(1, 1, 1, 64)
    out = ttnn.add(on(device, a), on(device, b))
    assert torch.equal(ttnn.to_torch(out).float(), bf16(bf16(a) + bf16(b)))
    s = ttnn.add(on(device, a), 1.5, dtype=ttnn.float32)
    torch.testing.assert_close(ttnn.to_torch(s), bf16(a) + 1.5)
    with pytest.raises(RuntimeError, match="do not broadcast"):
        ttnn.add(on(device, a), on(device, torch.randn(1, 3, 32, 64)))


def test_multiply_swiglu(device):
    a, b = torch.randn(1, 1, 32, 96), torch.randn(1, 1, 32, 96)
    out = ttnn.mul(on(device, a), on(device, b),
                   input_tensor_a_activations=[ttnn.UnaryOpType.SILU], dtype=ttnn.bfloat8_b)
    assert out.dtype == ttnn.bfloat8_b
    ref = bf16(a) * torch.sigmoid(bf16(a)) * bf16(b)
    ref_q = ttnn.to_torch(ttnn.from_torch(ref, dtype=ttnn.bfloat8_b))
    torch.testing.assert_close(ttnn.to_torch(out), ref_q, rtol=0, atol=1e-6)
    assert ttnn.mul is ttnn.multiply


def test_activation_forms(device):
    a, b = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    ta, tb = on(device, a, ttnn.float32), on(device, b, ttnn.float32)
    r1 = ttnn.add(ta, tb, activations=[(ttnn.UnaryOpType.GELU, 1.0)])
    ref = torch.nn.functional.gelu(a + b, approximate="tanh")
    torch.testing.assert_close(ttnn.to_torch(r1), ref)
    r2 = ttnn.multiply(ta, tb, input_tensor_b_activations=[ttnn.UnaryWithParam(
        ttnn.UnaryOpType.RELU)])
    torch.testing.assert_close(ttnn.to_torch(r2), a * torch.relu(b))


def test_sfpu_activations_exp_log_and_comparisons(device):
    """EXP / LOG / NEG and the comparisons GTZ / LTZ / EQZ (1.0 where true, else 0.0), as the tt
    backend's penalties and logprobs use them: one-hot rows by EQZ(iota - id), log-sum-exp."""
    x = torch.tensor([[-2.0, 0.0, 3.0, 0.5] * 8] * 32)[None, None]  # [1, 1, 32, 32]
    t = on(device, x, ttnn.float32)
    U = ttnn.UnaryOpType

    def act(kind, b=0.0):
        return ttnn.to_torch(ttnn.add(t, b, activations=[kind]))

    assert torch.equal(act(U.GTZ), (x > 0).float())
    assert torch.equal(act(U.LTZ), (x < 0).float())
    assert torch.equal(act(U.EQZ, -3.0), (x == 3.0).float())
    torch.testing.assert_close(act(U.EXP), torch.exp(x))
    torch.testing.assert_close(act(U.LOG, 3.0), torch.log(x + 3.0))
    assert torch.equal(act(U.NEG), -x)
    logz = ttnn.add(t, 2.5, input_tensor_a_activations=[U.EXP], activations=[U.LOG])
    torch.testing.assert_close(ttnn.to_torch(logz), torch.log(torch.exp(x) + 2.5))
    with pytest.raises(RuntimeError, match="takes no parameter"):
        ttnn.add(t, 0.0, activations=[(U.GTZ, 1.0)])


def test_singular_activation_kwarg_is_type_error(device):
    t = on(device, torch.randn(1, 1, 32, 32))
    with pytest.raises(TypeError):
        ttnn.mul(t, t, input_tensor_a_activation=ttnn.UnaryOpType.SILU)


def test_sharded_add_keeps_sharding(device):
    mem = width_sharded_l1(32, 256, 8)
    a, b = torch.randn(1, 1, 32, 256), torch.randn(1, 1, 32, 256)
    out = ttnn.add(on(device, a, mem=mem), on(device, b, mem=mem), memory_config=mem)
    assert out.memory_config() == mem
    assert torch.equal(ttnn.to_torch(out).float(), bf16(bf16(a) + bf16(b)))


def test_silu_softmax(device):
    x = torch.randn(1, 1, 32, 64)
    torch.testing.assert_close(ttnn.to_torch(ttnn.silu(on(device, x, ttnn.float32))),
                               x * torch.sigmoid(x))
    sm = ttnn.softmax(on(device, x, ttnn.float32), dim=-1)
    torch.testing.assert_close(ttnn.to_torch(sm), torch.exp(x) / torch.exp(x).sum(-1, True))


def _table(device, vocab=50, dim=64):
    w = torch.randn(1, 1, vocab, dim)
    return w, on(device, w, layout=ttnn.ROW_MAJOR_LAYOUT)


def test_embedding_shapes(device):
    w, tw = _table(device)
    idx = torch.randint(0, 50, (2, 1, 1, 32))
    ti = on(device, idx, ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT)
    out = ttnn.embedding(ti, tw)
    assert tuple(out.shape) == (2, 32, 64) and out.layout == ttnn.ROW_MAJOR_LAYOUT
    ref = bf16(w[0, 0])[idx.reshape(2, 32)]
    assert torch.equal(ttnn.to_torch(out).float(), ref)
    tile = ttnn.embedding(ti, tw, layout=ttnn.TILE_LAYOUT, dtype=ttnn.bfloat8_b)
    assert tile.layout == ttnn.TILE_LAYOUT and tile.dtype == ttnn.bfloat8_b
    idx2 = torch.randint(0, 50, (1, 5))
    out2 = ttnn.embedding(on(device, idx2, ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT), tw)
    assert tuple(out2.shape) == (1, 5, 64)
    assert torch.equal(ttnn.to_torch(out2).float(), bf16(w[0, 0])[idx2])


def test_embedding_validation(device):
    w, tw = _table(device)
    ti = on(device, torch.randint(0, 50, (1, 1, 1, 8)), ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT)
    with pytest.raises(RuntimeError, match="ROW_MAJOR"):
        ttnn.embedding(ti, on(device, w))
    with pytest.raises(RuntimeError, match="BFLOAT16"):
        ttnn.embedding(ti, on(device, w, ttnn.float32, ttnn.ROW_MAJOR_LAYOUT))
    with pytest.raises(RuntimeError, match="S % 32"):
        ttnn.embedding(ti, tw, layout=ttnn.TILE_LAYOUT)
    with pytest.raises(RuntimeError, match="needs layout=TILE"):
        ttnn.embedding(ti, tw, dtype=ttnn.float32)
    bad = on(device, torch.tensor([[[[50]]]]), ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT)
    with pytest.raises(RuntimeError, match="out of range"):
        ttnn.embedding(bad, tw)
    with pytest.raises(RuntimeError, match="UINT32"):
        ttnn.embedding(on(device, torch.zeros(1, 1, 1, 8), ttnn.float32, ttnn.ROW_MAJOR_LAYOUT),
                       tw)
