"""Chat templates rendered as transformers renders them: a sandboxed Jinja2 environment with
transformers' globals and filters (raise_exception, strftime_now, tojson, loop controls, the
`{% generation %}` block), continue_final_message, and each message's content in the form the
template reads.

Content forms (vLLM's "auto" content format): a template that loops over a message's content
(`{% for part in message['content'] %}`, e.g. Gemma 3's or Llama 3.2 Vision's) gets every
content as OpenAI's list of text parts, a string content as one part; any other template gets
one string, text parts joined by newlines.

continue_final_message (transformers' semantics): the last message's text gets a marker
appended before rendering; the render is cut where the marker is (its last occurrence), so
markup after the message (an end-of-turn such as "<|im_end|>") is left out, wherever else the
text itself appears. Where the template trimmed the marker's trailing space (e.g. `| trim`), the
message's trailing whitespace was trimmed too, and the cut text is right-stripped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from llm.model.tokenizer.errors import TokenizerError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
# the chat template variables render_chat sets (template_kwargs may not replace them)
TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                                *SPECIAL_NAMES})
CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker: the same cuts


def compile_template(source: str, origin: Path) -> Any:
    """Compile a chat template in the environment transformers uses for chat templates."""
    import jinja2

    env = _environment()
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"{origin}: chat template does not compile: {exc}") from exc


def reads_parts(source: str) -> bool:
    """Whether the template loops over a message's content (directly, or through a variable
    set from it), i.e. reads content as a list of parts; False for a template that does not
    parse (compile_template reports that)."""
    import jinja2
    from jinja2 import nodes

    def is_content(node: nodes.Node) -> bool:
        return (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                and node.arg.value == "content") or (
            isinstance(node, nodes.Getattr) and node.attr == "content")

    try:
        tree = _environment().parse(source)
    except jinja2.TemplateError:
        return False
    aliases = {a.target.name for a in tree.find_all(nodes.Assign)
               if isinstance(a.target, nodes.Name) and is_content(a.node)}
    return any(is_content(f.iter) or (isinstance(f.iter, nodes.Name) and f.iter.name in aliases)
               for f in tree.find_all(nodes.For))


def _environment() -> Any:
    """transformers' sandboxed environment for chat templates, with its globals and filters."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_block()]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _generation_block() -> type:
    """The `{% generation %} ... {% endgeneration %}` block of training templates (transformers
    marks the assistant's tokens with it): rendered as its body."""
    import jinja2
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


def render_chat(template: Any, origin: Path, messages: object, special_tokens: Mapping[str, str],
                *, add_generation_prompt: bool, continue_final_message: bool = False,
                template_kwargs: Mapping[str, Any] | None = None, parts: bool = False) -> str:
    """`messages` rendered by the compiled `template` (see the module), contents as lists of
    text parts if `parts` (`reads_parts` of the template), else as strings; TokenizerError for
    bad messages, a template error, both add_generation_prompt and continue_final_message, or
    template_kwargs that set TEMPLATE_VARIABLES."""
    import jinja2

    if continue_final_message and add_generation_prompt:
        raise TokenizerError("continue_final_message and add_generation_prompt exclude each "
                             "other: a continued message gets no new turn after it")
    texts = _text_messages(messages)
    begun = texts[-1]["content"] if texts else ""
    extra = dict(template_kwargs or {})
    taken = sorted(set(extra) & (TEMPLATE_VARIABLES | set(special_tokens)))
    if taken:
        raise TokenizerError(f"template_kwargs may not set {taken}: apply_chat_template sets them")
    if parts:
        texts = [{**m, "content": _parts(raw["content"])}
                 for m, raw in zip(texts, messages, strict=True)]
    if continue_final_message:
        if not texts:
            raise TokenizerError("continue_final_message needs at least one message to continue")
        texts[-1] = {**texts[-1], "content": _with_marker(texts[-1]["content"])}
    try:
        rendered = template.render(messages=texts, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **special_tokens, **extra)
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"{origin}: chat template error: {exc}") from exc
    if not continue_final_message:
        return rendered
    at = rendered.rfind(CONTINUE_MARKER.strip())
    if at < 0:
        raise TokenizerError(f"{origin}: continue_final_message: the chat template does not keep "
                             f"the last message's text ({begun[:40]!r}...), so "
                             "there is no place to continue it")
    if rendered.startswith(CONTINUE_MARKER, at):  # the template kept the trailing space
        return rendered[:at]
    return rendered[:at].rstrip()


def message_text(content: object, role: str) -> str | None:
    """A chat message's content as one string: a string as is, OpenAI's list of text parts
    ({"type": "text", "text": ...}) joined by newlines (as vLLM joins them), an assistant
    turn's None as ""; None for anything else (the caller says what is wrong, in its own
    terms)."""
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "\n".join(p["text"] for p in content)
    if content is None and role == "assistant":
        return ""
    return content if isinstance(content, str) else None


def _parts(content: object) -> list[dict[str, str]]:
    """A valid message content (see `message_text`) as OpenAI's text parts."""
    if isinstance(content, list):
        return [{"type": "text", "text": p["text"]} for p in content]
    return [{"type": "text", "text": content or ""}]


def _with_marker(content: str | list[dict[str, str]]) -> str | list[dict[str, str]]:
    """The content with CONTINUE_MARKER after its text (after its last part's, for parts)."""
    if isinstance(content, str):
        return content + CONTINUE_MARKER
    last = content[-1] if content else {"type": "text", "text": ""}
    return [*content[:-1], {**last, "text": last["text"] + CONTINUE_MARKER}]


def _text_messages(messages: object) -> list[dict[str, str]]:
    """`messages` with each content as one string (`message_text`); TokenizerError naming the
    first message that is not a {"role": str, "content": str | text parts} object."""
    if not isinstance(messages, (list, tuple)):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} objects, got "
                             f"{type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TokenizerError(f"messages[{i}] must be an object with a string 'role' and a "
                                 f"'content', got {m!r:.80}")
        content = message_text(m["content"], m["role"])
        if content is None:
            raise TokenizerError(f"messages[{i}].content must be a string or a list of text "
                                 f"parts ({{'type': 'text', 'text': ...}}), got "
                                 f"{m['content']!r:.80}")
        out.append({**m, "content": content})
    return out
