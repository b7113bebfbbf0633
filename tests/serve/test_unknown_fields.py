"""A field the endpoint does not read is a 400 naming it, as OpenAI's API answers ("unrecognized
request argument"), never accepted and ignored: a misspelt parameter (with the nearest field's
name), the other endpoint's fields, anything unknown; fields that change nothing of the output
(user, metadata, ...) pass. With the official openai client; nothing held after."""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL_NAME

from llm.serve.refusals import NEUTRAL, READ, READ_CHAT, known_fields

MESSAGES = [{"role": "user", "content": "Hi"}]


def _send(client: openai.OpenAI, chat: bool, **extra):
    if chat:
        return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=2,
                                              temperature=0, extra_body=extra)
    return client.completions.create(model=MODEL_NAME, prompt="Once", max_tokens=2,
                                     temperature=0, extra_body=extra)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("extra, message", [
    ({"max_token": 3}, "unrecognized request argument 'max_token'; did you mean 'max_tokens'?"),
    ({"temprature": 0.5}, "did you mean 'temperature'?"),
    ({"frobnicate": {"deep": [1]}}, "unrecognized request argument 'frobnicate'"),
    ({"x" * 300: 1}, "unrecognized request argument 'xxx"),
])
def test_unknown_fields_are_400s_naming_them(live_server, client, chat, extra, message) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _send(client, chat, **extra)
    error, name = info.value.body, next(iter(extra))
    assert message in error["message"]
    assert error["param"] == (name if len(name) <= 64 else name[:61] + "...")
    assert live_server.wait_all_free()


def test_the_other_endpoints_fields_are_refused(live_server, client) -> None:
    with pytest.raises(openai.BadRequestError, match="'prompt' \\(a field of the completions"):
        _send(client, True, prompt="Hi")
    for name, value in (("messages", MESSAGES), ("max_completion_tokens", 4)):
        with pytest.raises(openai.BadRequestError, match=f"'{name}' \\(a field of the chat") as e:
            _send(client, False, **{name: value})
        assert e.value.body["param"] == name
    assert live_server.wait_all_free()


@pytest.mark.parametrize("chat", [False, True])
def test_fields_that_change_nothing_pass(live_server, client, chat) -> None:
    r = _send(client, chat, user="u", metadata={"k": "v"}, store=False, service_tier="auto",
              safety_identifier="s", prompt_cache_key="conversation-1", parallel_tool_calls=True,
              include_reasoning=False)
    assert r.usage.completion_tokens == 2


def test_the_field_sets() -> None:
    """Each endpoint knows the shared fields and its own; neutral fields are not read ones."""
    assert not NEUTRAL & READ and not READ_CHAT & READ
    assert "messages" in known_fields(True) and "messages" not in known_fields(False)
    assert "prompt" in known_fields(False) and "prompt" not in known_fields(True)
    assert READ <= known_fields(True) and READ <= known_fields(False)
