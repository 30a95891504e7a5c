"""OpenAI request bodies → DeltaZip sampling; DeltaZip tokens → OpenAI objects; errors → HTTP status."""

import grpc
import pytest

from deltazip.client.errors import DeltaZipError, NotFoundError, UnavailableError
from deltazip.client.types import Completion, Token, Usage
from services.gateway.errors import RequestError, status_for
from services.gateway.openai_format import completion_object, parse_chat, parse_completion, stream_chunk, usage_chunk


def test_completion_body_maps_to_sampling():
    req = parse_completion({"model": "ft", "prompt": ["hi"], "max_tokens": 5, "temperature": 0, "stop": "\n",
                            "top_k": 3, "stream": True, "stream_options": {"include_usage": True}}, 16)
    assert (req.model, req.prompt, req.messages, req.stream, req.include_usage) == ("ft", "hi", None, True, True)
    assert req.sampling == {"max_tokens": 5, "temperature": 0.0, "top_k": 3, "ignore_eos": False, "stop": ["\n"]}
    assert parse_completion({"model": "ft", "prompt": "x"}, 16).sampling["max_tokens"] == 16


def test_chat_body_keeps_roles_and_joins_text_parts():
    req = parse_chat({"model": "ft", "messages": [{"role": "system", "content": "s"},
                                                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 7}, 16)
    assert req.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}]
    assert req.sampling["max_tokens"] == 7


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x"}, "model"),
    ({"model": "ft", "prompt": [1, 2]}, "prompt"),
    ({"model": "ft", "prompt": "x", "n": 2}, "n"),
    ({"model": "ft", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "ft", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "ft", "prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"model": "ft", "prompt": "x", "logprobs": 2}, "logprobs"),
])
def test_bad_completion_bodies_name_the_parameter(body, param):
    with pytest.raises(RequestError) as err:
        parse_completion(body, 16)
    assert err.value.param == param and err.value.status == 400


def test_bad_chat_role_is_rejected():
    with pytest.raises(RequestError, match="role"):
        parse_chat({"model": "ft", "messages": [{"role": "robot", "content": "x"}]}, 16)


def test_response_objects_have_openai_shape():
    chat = parse_chat({"model": "ft", "messages": [{"role": "user", "content": "x"}]}, 16)
    done = Completion("hey", [1, 2], "length", Usage(3, 2), "w1", "r1", "ft")
    obj = completion_object(chat, "chatcmpl-r1", done)
    assert obj["object"] == "chat.completion" and obj["choices"][0]["message"] == {"role": "assistant", "content": "hey"}
    assert obj["choices"][0]["finish_reason"] == "length" and obj["usage"]["total_tokens"] == 5
    assert stream_chunk(chat, "c", None, first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = stream_chunk(chat, "c", Token("", [], "stop", Usage(3, 2)), first=False)
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert usage_chunk(chat, "c", Usage(3, 2))["choices"] == []


@pytest.mark.parametrize("exc, status", [
    (NotFoundError("no model x"), 404),
    (UnavailableError("no worker"), 503),
    (DeltaZipError("bad", grpc.StatusCode.INVALID_ARGUMENT), 400),
    (DeltaZipError("boom", grpc.StatusCode.INTERNAL), 500),
])
def test_grpc_codes_map_to_http_status(exc, status):
    got, body = status_for(exc)
    assert got == status and body["error"]["message"] == exc.message
