"""Head layouts over a mesh (llm/backends/tt/heads.py): every device gets the same number of
query and KV slots, every real query head appears once, each slot's KV slot holds its group's KV
head; no padding or replication where the counts divide; the default model's 9 / 3 heads."""

from __future__ import annotations

import pytest
import torch

from llm.backends.tt.heads import head_layout
from llm.model.config import ModelConfig


def _config(nh: int, nkv: int) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=64, hidden_size=32 * nh, intermediate_size=64,
                       num_layers=1, num_heads=nh, num_kv_heads=nkv, head_dim=32,
                       max_position_embeddings=64)


@pytest.mark.parametrize("nh,nkv", [(9, 3), (16, 8), (4, 2), (8, 2), (12, 4), (7, 7), (6, 1),
                                    (32, 8), (15, 5)])
@pytest.mark.parametrize("ndev", [1, 2, 3, 4, 8])
def test_layout_invariants(nh: int, nkv: int, ndev: int) -> None:
    if ndev > nh:
        with pytest.raises(ValueError, match=f"{ndev} devices exceeds the model's {nh}"):
            head_layout(_config(nh, nkv), ndev)
        return
    lay = head_layout(_config(nh, nkv), ndev)
    group = nh // nkv
    assert len(lay.q) == len(lay.kv) == ndev
    assert all(len(d) == lay.n_heads for d in lay.q) and all(len(d) == lay.n_kv for d in lay.kv)
    assert lay.n_heads == -(-nh // ndev) and lay.n_heads % lay.n_kv == 0
    assert [h for d in lay.q for h in d if h is not None] == list(range(nh))
    local_group = lay.n_heads // lay.n_kv
    for q, kv in zip(lay.q, lay.kv):
        for i, h in enumerate(q):
            if h is not None:
                assert kv[i // local_group] == h // group
    if nh % ndev == 0 and nkv % ndev == 0:  # the plain even split: no padding, no replicas
        assert lay.n_kv == nkv // ndev
        assert [k for d in lay.kv for k in d] == list(range(nkv))


def test_default_model_heads() -> None:
    c = _config(9, 3)
    two = head_layout(c, 2)  # 4 + 5 heads; KV head 1's group is cut by the boundary
    assert two.q == ((0, 1, 2, 3, None), (4, 5, 6, 7, 8))
    assert two.kv == ((0, 0, 0, 1, 1), (1, 1, 2, 2, 2))
    eight = head_layout(c, 8)  # 1 or 2 heads per device, each KV head replicated
    assert eight.n_heads == 2 and eight.n_kv == 1
    assert eight.kv == ((0,), (0,), (0,), (1,), (1,), (1,), (2,), (2,))


def test_rows_pad_and_replicate() -> None:
    lay = head_layout(_config(9, 3), 2)
    w = torch.arange(9 * 2, dtype=torch.float32).reshape(9 * 2, 1)  # head_dim 2, one column
    q = lay.q_rows(w, 2).reshape(2, 5, 2)
    assert q[0, 4].eq(0).all() and torch.equal(q[1, 4], w[16:18, 0])
    kv = lay.kv_rows(w[:6], 2).reshape(2, 5, 2)
    assert torch.equal(kv[0, 3], w[2:4, 0]) and torch.equal(kv[1, 0], w[2:4, 0])
