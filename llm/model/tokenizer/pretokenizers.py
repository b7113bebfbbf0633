"""The BPE pre-tokenizers of GGUF files: ``tokenizer.ggml.pre`` -> how llama.cpp splits text.

llama.cpp cuts text into words with a sequence of regular expressions (each one splits every
piece the previous one left, keeping both the matches and the text between them), then spells
each word in GPT-2's byte alphabet and runs BPE on it. This table gives, for every
``tokenizer.ggml.pre`` value supported here, the exact expressions llama.cpp uses (its own
rewrites, not the ones of the models' ``tokenizer.json`` where llama.cpp changed them: Tekken's
case classes, for one, treat every non-ASCII letter as both upper and lower case there), whether
a word found whole in the vocabulary skips the merges (``ignore_merges``), and whether BOS is
added when the file does not say.

Supported are the values of Llama-family models (Llama 3, Falcon3, Mistral-Nemo's Tekken,
Pixtral, Qwen2, DeepSeek LLM and Coder, SmolLM, Minerva, Viking, Seed-Coder, Megrez, Mellum,
Trillion, A.X, Mi:dm...), Falcon's, and the values of other families that share one of these
splits (GPT-2, StarCoder, Command-R...). A value outside the table is refused by name: among
them llama.cpp's own refusal "gpt2", and families this engine cannot run (Llama 4, GLM,
Chameleon, BLOOM, the BERT-like embedders).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, pre_tokenizers

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}", 1)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tekken as llama.cpp runs it: "upper" is a letter outside a-z, "lower" a letter outside A-Z.
_UPPER, _LOWER = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM's letters: a list of cased-letter ranges (code points, inclusive).
_DEEPSEEK_LETTER_RANGES = (
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376-377 37B-37D 37F 386"
    " 388-38A 38C 38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD"
    " 1C90-1CBA 1CBD-1CBF 1D00-1D2B 1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D"
    " 1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3"
    " 1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 2115 2119-211D 2124 2126 2128"
    " 212A-212D 212F-2134 2139 213C-213F 2145-2149 214E 2183-2184 2C00-2C7B 2C7E-2CE4 2CEB-2CEE"
    " 2CF2-2CF3 A640-A66D A680-A69B A722-A76F A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17"
    " FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB 10C80-10CB2 10CC0-10CF2"
    " 118A0-118DF 1E900-1E943"
)
# llama.cpp runs an expression without \p{..} classes over the text with every non-ASCII space
# replaced by a vertical tab: \s still matches those spaces, a literal range never does.
_WIDE_SPACES = "\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _no_spaces(body: str) -> str:
    """The class ``[body]`` less the non-ASCII spaces (Oniguruma's class intersection)."""
    return f"[{body}&&[^{_WIDE_SPACES}]]"


_CJK = _no_spaces("\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff") + "+"


def _char_class(ranges: str) -> str:
    """``"41-5A B5"`` -> ``"[A-Zµ]"``: a regex class from hex code point ranges."""
    parts = []
    for item in ranges.split():
        low, _, high = item.partition("-")
        parts.append(chr(int(low, 16)) + (f"-{chr(int(high, 16))}" if high else ""))
    return "[" + "".join(parts) + "]"


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp pre-tokenizes one family of ``tokenizer.ggml.pre`` values.

    ``regexes`` are applied in order, each splitting every piece left by the previous ones;
    ``ignore_merges``: a word that is a vocabulary token is taken whole; ``add_bos``: BOS is
    prepended when the file has no ``tokenizer.ggml.add_bos_token``.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False

    def build(self) -> pre_tokenizers.PreTokenizer:
        """The ``tokenizers`` pre-tokenizer: the splits, then the GPT-2 byte alphabet."""
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in self.regexes]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return pre_tokenizers.Sequence([*splits, byte_level])


DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
GPT2 = PreTokenizer((_GPT2,))
DIGITS = PreTokenizer((r"\p{N}", _GPT2))
LLAMA3 = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
LLAMA3_MERGING = PreTokenizer((_LLAMA3,))
QWEN2 = PreTokenizer((_QWEN2,))
TEKKEN = PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)
DEEPSEEK_LLM = PreTokenizer(
    (
        r"[\r\n]",
        r"\s?" + _char_class(_DEEPSEEK_LETTER_RANGES) + "+",
        r"\s?" + _no_spaces("!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002") + "+",
        r"\s+$",
        _CJK,
        r"\p{N}+",
    )
)
DEEPSEEK_CODER = PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"))
FALCON = PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))
VIKING = PreTokenizer((" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+", r"\p{N}"))
SEED_CODER = PreTokenizer((_SEED_CODER,))


def _names(family: PreTokenizer, *names: str) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names, family)


# tokenizer.ggml.pre -> family, as llama.cpp's vocabulary loader maps them. A file without the
# key gets "default" (llama.cpp warns that quality degrades; so does the loader here).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_names(DEFAULT, "default"),
    **_names(GPT2, "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "a.x-4.0", "mellum"),
    **_names(
        DIGITS, "starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"
    ),
    **_names(LLAMA3, "llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "midm-2.0"),
    **_names(LLAMA3_MERGING, "dbrx", "smaug-bpe"),
    **_names(QWEN2, "qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"),
    **_names(TEKKEN, "tekken"),
    **_names(DEEPSEEK_LLM, "deepseek-llm"),
    **_names(DEEPSEEK_CODER, "deepseek-coder"),
    **_names(FALCON, "falcon"),
    **_names(VIKING, "viking"),
    **_names(SEED_CODER, "seed-coder"),
}
