"""vLLM's extensions through the official `openai` client: continue_final_message (the model
continues an assistant message the client began) and add_generation_prompt; stop_token_ids,
include_stop_str_in_output and skip_special_tokens; and fields this server cannot honour refused
by name instead of ignored.
"""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL_NAME

from llm.engine.contract.sampling_params import SamplingParams

BEGUN = [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is"}]


def test_continue_final_message_continues_the_begun_answer(client, serve_model) -> None:
    """The server's prompt is the template's render cut after the begun answer (the Python API
    the same), and the greedy text is the in-process model's continuation of it."""
    want = serve_model.chat(BEGUN, SamplingParams(max_new_tokens=8), continue_final_message=True)
    text = serve_model.tokenizer.apply_chat_template(BEGUN, add_generation_prompt=False,
                                                     continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe capital of France is")
    assert want.prompt_token_ids == serve_model.tokenizer.encode(text, add_special_tokens=False)
    for extra in ({"continue_final_message": True},
                  {"continue_final_message": True, "add_generation_prompt": False}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=BEGUN, max_tokens=8,
                                           temperature=0, extra_body=extra)
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    opened = serve_model.chat(BEGUN, SamplingParams(max_new_tokens=8))  # a new assistant turn
    assert len(opened.prompt_token_ids) > len(want.prompt_token_ids)


def test_add_generation_prompt_false_renders_without_a_new_turn(client, serve_model) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    want = serve_model.chat(messages, SamplingParams(max_new_tokens=4),
                            add_generation_prompt=False)
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4,
                                       temperature=0,
                                       extra_body={"add_generation_prompt": False})
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.choices[0].message.content == want.text


def test_chat_template_kwargs_and_add_special_tokens(client, serve_model) -> None:
    """chat_template_kwargs reach the template (SmolLM2's reads none: the same prompt) and may
    not replace the server's variables; add_special_tokens at either value encodes as the
    tokenizer does (SmolLM2 adds no BOS: the same ids)."""
    messages = [{"role": "user", "content": "Hi"}]
    want = serve_model.chat(messages, SamplingParams(max_new_tokens=4))
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}},
                  {"add_special_tokens": True}, {"add_special_tokens": False}):
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4,
                                           temperature=0, extra_body=extra)
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.choices[0].message.content == want.text
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"messages": []}})
    assert e.value.body["param"] == "chat_template_kwargs" and "messages" in e.value.message
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, temperature=0,
                                  extra_body={"add_special_tokens": False})
    assert r.usage.prompt_tokens == len(serve_model.tokenizer.encode("Hi"))


def test_text_parts_reach_the_template_as_the_python_api_sends_them(client, serve_model) -> None:
    """Content as text parts: the server renders what LLM.chat renders for the same parts
    (SmolLM2's template prints the content, so they are joined by newlines), and a continued
    answer given as parts continues after its last part."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital"},
                                          {"type": "text", "text": "of France?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "The capital"},
                                               {"type": "text", "text": "of France is"}]}]
    joined = [{"role": m["role"], "content": "\n".join(p["text"] for p in m["content"])}
              for m in parts]
    for cont in (False, True):
        want = serve_model.chat(parts, SamplingParams(max_new_tokens=6),
                                continue_final_message=cont)
        same = serve_model.chat(joined, SamplingParams(max_new_tokens=6),
                                continue_final_message=cont)
        assert want.prompt_token_ids == same.prompt_token_ids
        r = client.chat.completions.create(model=MODEL_NAME, messages=parts, max_tokens=6,
                                           temperature=0,
                                           extra_body={"continue_final_message": cont})
        assert r.usage.prompt_tokens == len(want.prompt_token_ids)
        assert r.choices[0].message.content == want.text


def test_python_api_refuses_both_turn_flags(serve_model) -> None:
    from llm.model.tokenizer.errors import TokenizerError
    with pytest.raises(TokenizerError, match="exclude each other"):
        serve_model.chat(BEGUN, SamplingParams(max_new_tokens=2), add_generation_prompt=True,
                         continue_final_message=True)


def test_stop_token_ids_end_the_output(client, serve_model) -> None:
    """The third greedy token as a stop id: the output ends before it, finish_reason "stop"."""
    full = serve_model.generate(["The capital of France is"],
                                SamplingParams(max_new_tokens=8))[0]
    stop = full.token_ids[2]
    first = full.token_ids.index(stop)
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is",
                                  max_tokens=8, temperature=0,
                                  extra_body={"stop_token_ids": [stop]})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == first + 1  # the stop token is generated, not shown
    assert r.choices[0].text == serve_model.tokenizer.decode(full.token_ids[:first])


def test_min_p_samples_as_the_python_api(client, serve_model) -> None:
    """min_p (vLLM's extension) with a seed: the server's sample is the in-process one."""
    params = SamplingParams(temperature=1.3, min_p=0.1, seed=5, max_new_tokens=10)
    want = serve_model.generate(["Once upon a time"], params)[0]
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=10,
                                  temperature=1.3, seed=5, extra_body={"min_p": 0.1})
    assert r.choices[0].text == want.text
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                  extra_body={"min_p": 1.5})
    assert e.value.body["param"] == "min_p"


@pytest.mark.parametrize("field, value", [("use_beam_search", True),
                                          ("spaces_between_special_tokens", "no"),
                                          ("structural_tag", "<json>"),
                                          ("kv_transfer_params", {"do_remote_prefill": True}),
                                          ("early_stopping", True), ("cache_salt", ""),
                                          ("thinking_token_budget", 32)])
def test_unhonoured_fields_are_refused_by_name(client, live_server, field, value) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=BEGUN[:1], max_tokens=2,
                                       extra_body={field: value})
    assert field in e.value.message and e.value.body["param"] == field
    assert live_server.wait_all_free()


def test_out_of_vocabulary_stop_token_ids_are_refused(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                  extra_body={"stop_token_ids": [5, 10**6]})
    assert e.value.body["param"] == "stop_token_ids" and "1000000" in e.value.message


def test_stop_text_and_special_tokens_shown_on_request(client, serve_model) -> None:
    """include_stop_str_in_output keeps the stop string (and, with skip_special_tokens false,
    the EOS token's text) at the end of the output; the defaults leave both out."""
    full = serve_model.generate(["The capital of France is"],
                                SamplingParams(max_new_tokens=8))[0]
    stop = full.text[3:6]
    base = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                temperature=0, stop=[stop])
    plain = client.completions.create(**base).choices[0]
    shown = client.completions.create(
        **base, extra_body={"include_stop_str_in_output": True}).choices[0]
    at = full.text.index(stop)
    assert plain.text == full.text[:at] and shown.text == full.text[:at + len(stop)]
    assert plain.finish_reason == shown.finish_reason == "stop"
    hi = [{"role": "user", "content": "Say hello."}]
    default = client.chat.completions.create(model=MODEL_NAME, messages=hi, max_tokens=60,
                                             temperature=0).choices[0]
    raw = client.chat.completions.create(
        model=MODEL_NAME, messages=hi, max_tokens=60, temperature=0,
        extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True}).choices[0]
    assert default.finish_reason == raw.finish_reason == "stop"
    assert raw.message.content == default.message.content + "<|im_end|>"
    for spaces in (False, True):  # no space before the special token's text either way (as
        again = client.chat.completions.create(  # HF's fast tokenizers and vLLM with one)
            model=MODEL_NAME, messages=hi, max_tokens=60, temperature=0,
            extra_body={"skip_special_tokens": False, "include_stop_str_in_output": True,
                        "spaces_between_special_tokens": spaces}).choices[0]
        assert again.message.content == raw.message.content
