"""GGUF vocabularies with unusual token types or spellings, against references configured as
llama.cpp reads such files: a SentencePiece vocabulary whose ``<unk>`` is typed CONTROL and whose
padding tokens are typed UNKNOWN (Phi-3's GGUF), and byte-level BPE vocabularies that store some
normal tokens as raw text (Command-R's), so that two ids share one byte-level spelling."""

from __future__ import annotations

import io

import pytest
from gguf_vocab_files import byte_spelling, write_vocab_gguf

from llm.model.tokenizer.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "Café naïve résumé 東京 👋 emoji and more emoji",
    "def f(x):\n    return x + 1\n",
] * 20
TEXTS = ["Hello world", "Café 東京 👋!", "  two  spaces\nnew line", "def f(x): return 12345"]


@pytest.fixture(scope="module")
def spm():
    sentencepiece = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    return sentencepiece.SentencePieceProcessor(model_proto=buffer.getvalue())


def _phi3_like_gguf(tmp_path, sp, *, unk_id: int | None, pads: int = 4):
    """The sentencepiece vocabulary typed as Phi-3's GGUF types it, plus UNKNOWN-typed pads."""
    size = len(sp)

    def kind(i: int) -> int:
        if sp.is_unknown(i) or sp.is_control(i):
            return CONTROL  # <unk> included: the converter marks it a special added token
        return BYTE if sp.is_byte(i) else NORMAL

    tokens = [sp.id_to_piece(i) for i in range(size)] + [f"[PAD{size + i}]" for i in range(pads)]
    types = [kind(i) for i in range(size)] + [UNKNOWN] * pads
    scores = [sp.get_score(i) for i in range(size)] + [-1000.0] * pads
    path = write_vocab_gguf(tmp_path / f"phi3-{unk_id}.gguf", "llama", tokens, types,
                            scores=scores, bos_id=1, eos_id=2, unk_id=unk_id)
    return Tokenizer.from_path(path)


@pytest.mark.parametrize("unk_id", [0, None])
def test_sentencepiece_vocab_with_unknown_typed_pads_and_control_unk(tmp_path, spm, unk_id):
    tok = _phi3_like_gguf(tmp_path, spm, unk_id=unk_id)
    size = len(spm)
    assert tok.vocab_size == size + 4 and tok.add_bos
    for text in TEXTS:
        assert tok.encode(text) == [1, *spm.encode(text)], text
        assert tok.decode(tok.encode(text)) == spm.decode(spm.encode(text))
    # llama.cpp matches UNKNOWN- and CONTROL-typed tokens written in the text whole.
    pad = f"[PAD{size + 2}]"
    assert tok.encode(f"a{pad}b<unk>c", add_special_tokens=False) == [
        *spm.encode("a"), size + 2, *spm.encode("b"), 0, *spm.encode("c")
    ]
    assert tok.decode([size + 2, 0]) == ""
    assert tok.decode([size + 2, 0], skip_special_tokens=False) == f"{pad}<unk>"


def _bpe_gguf(tmp_path, name: str, extra: list[str]) -> tuple[Tokenizer, list[str]]:
    """Bytes, the merges that build 👋 in byte-level spelling, and ``extra`` tokens."""
    wave = byte_spelling("👋")
    halves = [wave[:2], wave[2:]]
    merges = [" ".join(halves[0]), " ".join(halves[1]), " ".join(halves)]
    tokens = [byte_spelling(bytes([b])) for b in range(256)]  # token id == byte
    tokens += halves + extra
    path = write_vocab_gguf(tmp_path / f"{name}.gguf", "gpt2", tokens, [NORMAL] * len(tokens),
                            merges=merges, pre="gpt-2")
    return Tokenizer.from_path(path), tokens


@pytest.mark.parametrize("order", ["raw_first", "raw_last"])
def test_bpe_raw_text_token_never_displaces_the_byte_level_one(tmp_path, order):
    wave = byte_spelling("👋")
    extra = ["👋", wave] if order == "raw_first" else [wave, "👋"]
    tok, tokens = _bpe_gguf(tmp_path, order, extra)
    byte_level = tokens.index(wave)
    assert tokens.index("👋") != byte_level
    # llama.cpp looks words up in the byte-level spelling only: whichever id comes first.
    assert tok.encode("👋a👋", add_special_tokens=False) == [byte_level, ord("a"), byte_level]
    assert tok.decode([byte_level]) == "👋"


def test_bpe_raw_text_token_alone_is_respelled(tmp_path):
    tok, tokens = _bpe_gguf(tmp_path, "raw_only", ["👋"])
    assert tok.encode("a👋", add_special_tokens=False) == [ord("a"), tokens.index("👋")]
    assert tok.decode(tok.encode("a👋")) == "a👋"


def test_bpe_duplicate_spellings_keep_the_last_id(tmp_path):
    wave = byte_spelling("👋")
    tok, tokens = _bpe_gguf(tmp_path, "dups", [wave, "x", wave, "👋", "👋"])
    last = len(tokens) - 1 - tokens[::-1].index(wave)
    assert last == len(tokens) - 3
    assert tok.encode("👋", add_special_tokens=False) == [last]
    tok, tokens = _bpe_gguf(tmp_path, "raw_dups", ["👋", "y", "👋"])
    assert tok.encode("👋", add_special_tokens=False) == [len(tokens) - 1]
