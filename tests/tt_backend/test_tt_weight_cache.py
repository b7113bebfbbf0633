"""Weight cache: a second construction reads every tensor from the cache and converts none; a
corrupt or tampered cache file is detected (sha256 manifest), rebuilt and not loaded."""

from __future__ import annotations

from hf_reference import hf_model, state_dict
from test_tt_runner import generate
from tt_helpers import TT_CONFIGS

from llm.backends.tt.runner import TTBackend
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig


def test_second_start_converts_nothing_and_corruption_is_rebuilt(tmp_path) -> None:
    config = TT_CONFIGS["qwen2_bias"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=2, max_seq_len=64, block_size=32)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]

    def start(policy: str = "performance") -> TTBackend:  # plain performance: bfloat4_b MLP
        presets = {"performance": "bf4-mlp", "accuracy": None}
        return TTBackend(ck, rt, precision_policy=policy, decoder_precision=presets[policy],
                         implementation="emulator", weights_dir=tmp_path / policy)

    first = start()
    n = first.weights.converted
    assert n > 0 and first.weights.loaded == 0
    files = sorted((tmp_path / "performance").glob("*.tensorbin"))
    assert len(files) == n
    assert any("BFLOAT4_B" in f.name for f in files) and any("BFLOAT8_B" in f.name for f in files)
    want = generate(first, prompts, 6)

    second = start()
    assert second.weights.converted == 0 and second.weights.loaded == n
    assert second.model.layers[1].mlp.cfg is second.cfg  # configs built once, shared
    assert not second.weights.rejected
    assert generate(second, prompts, 6) == want

    garbage = next(f for f in files if "wqkv" in f.name)
    garbage.write_bytes(b"not a tensor file")  # unreadable
    tampered = next(f for f in files if "w2" in f.name)
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still loadable, wrong content
    tampered.write_bytes(bytes(data))
    third = start()
    assert sorted(third.weights.rejected) == sorted([garbage.name, tampered.name])
    assert third.weights.converted == 2 and third.weights.loaded == n - 2
    assert generate(third, prompts, 6) == want
    fourth = start()  # the rebuilt files are good again
    assert fourth.weights.converted == 0 and not fourth.weights.rejected
    # another policy has its own directory and its own conversions
    other = start("accuracy")
    assert other.weights.converted == n


def test_the_default_cache_path_changes_with_the_converter(tmp_path) -> None:
    """The default weight cache's path carries a digest of the tt backend's sources: a change to
    the conversion code cannot load files an older conversion wrote."""
    from llm.backends.tt.runner import converter_key

    (tmp_path / "weights.py").write_text("SCALE = 1\n")
    (tmp_path / "model.py").write_text("x = 1\n")
    before = converter_key(tmp_path)
    assert converter_key(tmp_path) == before and len(before) == 12
    (tmp_path / "weights.py").write_text("SCALE = 2\n")
    assert converter_key(tmp_path) != before
    assert converter_key() != before  # the real package: its own sources
