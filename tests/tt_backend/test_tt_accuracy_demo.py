"""demos/tt_accuracy.py: the precision policies' teacher-forced agreement table, on a small
random Hugging Face model with a tokenizer (built here) and a short text, on the emulator."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from test_eval_demo import model_dir

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def accuracy_demo():
    spec = importlib.util.spec_from_file_location("tt_accuracy_demo",
                                                  ROOT / "demos" / "tt_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tt_accuracy_demo"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_table_of_policies_and_presets(tmp_path, accuracy_demo, capsys) -> None:
    d = model_dir(tmp_path, hidden=128)  # head_dim 32, as the tt backend needs
    text = tmp_path / "text.txt"
    text.write_text("The river ran fast under the old bridge, and the town grew around it. "
                    * 6, encoding="utf-8")
    out = tmp_path / "rows.json"
    configs = ["accuracy", "performance", "performance:bf4-mlp"]
    assert accuracy_demo.main(["--model", str(d), "--text", str(text), "--window", "64",
                               "--max-tokens", "100", "--configs", *configs,
                               "--json", str(out)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == configs
    assert all(r["tokens"] == 98 for r in rows)  # windows of 64 + 36: 63 + 35 predictions
    for r in rows:
        assert 0 <= r["top1_fp32"] <= r["top5_fp32"] <= 1 and 0 <= r["top1_bf16"] <= 1
        assert f"| {r['config']} | 98 | {r['top1_fp32']:.3f} |" in table
    accuracy, small, plain = rows
    assert accuracy["top1_fp32"] >= 0.9 and accuracy["top5_fp32"] == 1.0
    # this model is under 1B parameters: performance = its bf16-attention-bf8-mlp preset
    assert "bf16-attention-bf8-mlp" in small["described"]
    assert "bf16-attention-bf8-mlp" not in plain["described"]
    assert "BFLOAT4_B" in plain["described"].upper()


def test_bad_configuration_is_refused(tmp_path, accuracy_demo, capsys) -> None:
    assert accuracy_demo.main(["--configs", "performance:fastest"]) == 2
    assert "preset must be one of" in capsys.readouterr().err
    assert accuracy_demo.main(["--configs", "fast"]) == 2
    assert "policy must be one of" in capsys.readouterr().err
