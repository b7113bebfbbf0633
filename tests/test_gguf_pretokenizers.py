"""GGUF byte-level BPE vocabularies under every supported ``tokenizer.ggml.pre``, against a
reference built here as llama.cpp tokenizes: its regex sequence for that value (transcribed from
llama.cpp's vocabulary loader as C++ string literals), run by the ``regex`` module, the pieces
spelled in GPT-2's byte alphabet and merged by a ``tokenizers`` BPE model. The vocabulary is
trained without any pre-splitting, so it holds tokens across the boundaries the regexes draw."""

from __future__ import annotations

import re

import pytest
from gguf_vocab_files import byte_spelling, write_vocab_gguf

from llm.model.tokenizer.errors import TokenizerError
from llm.model.tokenizer.pretokenizers import PRE_TOKENIZERS
from llm.model.tokenizer.tokenizer import Tokenizer

regex = pytest.importorskip("regex")

TEXTS = [
    "Hello world, it's 12345 o'clock; we'LL see, they'Re fine and I'D go. 'S",
    "Numbers: 1 22 333 4444 55555 666666 3.14159 1,000,000 and ½ ² Ⅷ x2024y",
    "東京は日本の首都です。北京欢迎你！한국어 텍스트",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇫🇷 rocket🚀 ok🙂",
    "   leading   spaces\tand\t\ttabs  \n\n\n  indented\r\nwindows\n",
    "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(12))",
    "Punctuation!!! ??? ... --- === ''' ``` \"\"\" $100 +5 <a> ^~| a+b=c",
    "CamelCase HTMLParser iPhone ÉCOLE ÀÉÎ naïve Straße ΑΒΓ αβγ Привет МИР aÉ",
    "paths a/b/c // x/\n/y url https://example.com/a?b=c&d=e",
    "Ελληνικά ﬁ Ｆｕｌｌ ｗｉｄｔｈ　spaces　。，、 … । ۔ ، end  ",
    "wide\u3000!\u3000。\u3000a x\u2003y\u00a0!\u00a0。 」「 ‘q’ 」",
]
# A vocabulary token no merge builds: only pre-tokenizers that ignore merges emit it whole.
UNMERGED = " zyxwv"
TEXTS.append(f"merges{UNMERGED}{UNMERGED}s")

# llama.cpp's regex sequences (src/llama-vocab.cpp), written as its C++ literals are.
GPT2 = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
CONTR = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
TAIL = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
HAN_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
DEEPSEEK_LETTERS = "".join(
    f"{chr(a)}-{chr(b)}" if a != b else chr(a)
    for a, b in [
        (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
        (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377),
        (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C),
        (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
        (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA), (0x1CBD, 0x1CBF),
        (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
        (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B),
        (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
        (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC),
        (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107), (0x210A, 0x2113),
        (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128),
        (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
        (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE),
        (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787),
        (0xA78B, 0xA78E), (0xAB70, 0xABBF), (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A),
        (0xFF41, 0xFF5A), (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB),
        (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943),
    ]
)
UP, LO = "((?=[\\p{L}])([^a-z]))", "((?=[\\p{L}])([^A-Z]))"
FAMILIES = {  # family: (regexes, ignore_merges, add_bos by default)
    "default": (["[\\p{P}\\$\\+<=>\\^~\\|]+", GPT2, "\\p{N}+", "[0-9][0-9][0-9]"], False, False),
    "gpt2": ([GPT2], False, False),
    "starcoder": (["\\p{N}", GPT2], False, False),
    "llama3": ([CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" + TAIL], True, True),
    "dbrx": ([CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" + TAIL], False, False),
    "qwen2": ([CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" + TAIL], False, False),
    "tekken": (
        [
            f"[^\\r\\n\\p{{L}}\\p{{N}}]?{UP}*{LO}+|[^\\r\\n\\p{{L}}\\p{{N}}]?{UP}+{LO}*|\\p{{N}}"
            "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ],
        True,
        True,
    ),
    "deepseek-llm": (
        [
            "[\r\n]",
            f"\\s?[{DEEPSEEK_LETTERS}]+",
            "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
            "\\s+$",
            HAN_HANGUL,
            "\\p{N}+",
        ],
        False,
        False,
    ),
    "deepseek-coder": (
        ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", HAN_HANGUL, "\\p{N}"], False, False
    ),
    "falcon": (["[\\p{P}\\$\\+<=>\\^~\\|`]+", GPT2, "[0-9][0-9][0-9]"], False, False),
    "viking": ([" ?[^(\\s|.,!?…。，、।۔،)]+", "\\p{N}"], False, False),
    "seed-coder": (
        [
            CONTR + "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+"
            "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        ],
        False,
        False,
    ),
}
EXPECTED = {
    "default": "default", "gpt-2": "gpt2", "phi-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2",
    "jais": "gpt2", "trillion": "gpt2", "a.x-4.0": "gpt2", "mellum": "gpt2",
    "starcoder": "starcoder", "refact": "starcoder", "command-r": "starcoder",
    "smollm": "starcoder", "codeshell": "starcoder", "exaone": "starcoder",
    "minerva-7b": "starcoder", "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3",
    "falcon3": "llama3", "pixtral": "llama3", "midm-2.0": "llama3", "dbrx": "dbrx",
    "smaug-bpe": "dbrx", "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "megrez": "qwen2",
    "stablelm2": "qwen2", "tekken": "tekken", "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder", "falcon": "falcon", "viking": "viking",
    "seed-coder": "seed-coder",
}


def llama_cpp_words(text: str, regexes: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex splits every piece, matches and gaps kept.
    An expression without \\p{..} classes sees non-ASCII spaces as vertical tabs."""
    pieces = [text]
    for expression in regexes:
        pattern, out = regex.compile(expression), []
        for piece in pieces:
            seen = piece
            if "\\p{" not in expression:
                seen = "".join("\v" if c.isspace() and ord(c) > 0x7F else c for c in piece)
            end = 0
            for match in pattern.finditer(seen):
                out += [piece[end : match.start()]] if match.start() > end else []
                out.append(piece[match.start() : match.end()])
                end = match.end()
            out += [piece[end:]] if end < len(piece) else []
        pieces = out
    return [byte_spelling(p) for p in pieces]


@pytest.fixture(scope="module")
def vocab():
    """A byte-level BPE vocabulary trained on whole lines (no pre-splitting)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS[:-1] * 4, trainer)
    merges = [" ".join(m) for m in _merges_of(tok)]
    tokens = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    assert byte_spelling(UNMERGED) not in tokens
    return [*tokens, byte_spelling(UNMERGED)], merges


def _merges_of(tok) -> list[tuple[str, str]]:
    import json

    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(tok.to_str())["model"]["merges"]]


def reference_ids(vocab, family: str, text: str) -> list[int]:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    tokens, merges = vocab
    regexes, ignore_merges, _ = FAMILIES[family]
    model = models.BPE({t: i for i, t in enumerate(tokens)},
                       [tuple(m.split(" ")) for m in merges], ignore_merges=ignore_merges)
    words = llama_cpp_words(text, regexes)
    return HFTokenizer(model).encode(words, is_pretokenized=True).ids if words else []


def _gguf(tmp_path, vocab, pre: str | None) -> Tokenizer:
    tokens, merges = vocab
    types = [3 if t in ("<s>", "</s>") else 1 for t in tokens]
    path = write_vocab_gguf(tmp_path / f"{pre}.gguf", "gpt2", tokens, types, merges=merges,
                            pre=pre, bos_id=tokens.index("<s>"), eos_id=tokens.index("</s>"))
    return Tokenizer.from_path(path)


def test_every_supported_value_is_tested():
    assert set(PRE_TOKENIZERS) == set(EXPECTED)


@pytest.mark.parametrize("pre", sorted(EXPECTED))
def test_gguf_pre_tokenizer_matches_llama_cpp_reference(tmp_path, vocab, pre):
    tok = _gguf(tmp_path, vocab, pre)
    family = EXPECTED[pre]
    for text in TEXTS + ["", " ", "\n", "x"]:
        assert tok.encode(text, add_special_tokens=False) == reference_ids(vocab, family, text), (
            pre, text)
    assert tok.add_bos is FAMILIES[family][2]
    assert tok.decode(tok.encode(TEXTS[3]), skip_special_tokens=True) == TEXTS[3]


def test_texts_tell_every_family_apart(vocab):
    outputs = {f: [reference_ids(vocab, f, t) for t in TEXTS] for f in FAMILIES}
    names = sorted(outputs)
    same = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :] if outputs[a] == outputs[b]]
    assert same == []  # a value mapped to the wrong family cannot pass the test above


def test_missing_pre_is_llama_cpp_default(tmp_path, vocab):
    tok = _gguf(tmp_path, vocab, None)
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == reference_ids(vocab, "default", text)


@pytest.mark.parametrize("pre", ["no-such-pre", "gpt2", "llama4", "chameleon", "roberta-bpe"])
def test_unsupported_pre_tokenizer_names_value_and_file(tmp_path, vocab, pre):
    message = f"{tmp_path / f'{pre}.gguf'}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}"
    with pytest.raises(TokenizerError, match=re.escape(message)):
        _gguf(tmp_path, vocab, pre)
