"""The OpenAI-compatible gateway against the real stack (redis + store + worker + scheduler + gateway),
driven by the official `openai` Python client, streaming and not.

Promises checked: /v1/models lists the base and the pushed fine-tunes; completions and chat answers equal
what the SDK gets over gRPC for the same greedy request; streamed chunks join to the same text and the
usage chunk counts the tokens; errors arrive in OpenAI's shape with the right HTTP status.
"""

import http.client
import json
import time
import urllib.request

import openai
import pytest

from deltazip.client import Client
from deltazip.stack import stop
from tests.integration.gateway_proc import add_chat_template, start_gateway
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)
from tests.integration.tiny_models import MAX_TOKENS, models  # noqa: F401

pytestmark = pytest.mark.timeout(240)

GREEDY = {"temperature": 0.0, "max_tokens": MAX_TOKENS}
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture
def stack(launcher, models, tmp_path):
    base_dir, artifacts, _ = models
    add_chat_template(base_dir)
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        client.push(artifacts["ft-a"], "ft-a", progress=False)
    launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2", "--max-deltas-per-batch", "2",
                   "--num-kv-blocks", "64", "--kv-block-size", "8", "--heartbeat-s", "0.5",
                   "--disk-cache-dir", str(tmp_path / "cache"))
    scheduler = launcher.start("scheduler")
    gateway = start_gateway(scheduler.address, tmp_path / "logs")
    try:
        yield scheduler, gateway
    finally:
        stop(gateway)


def test_one_request_id_from_client_to_worker(stack, launcher):
    scheduler, gateway = stack
    api = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = api.completions.with_raw_response.create(model="ft-a", prompt="hi", max_tokens=2,
                                                     extra_headers={"X-Request-Id": "trace-me-42"})
    assert reply.headers["x-request-id"] == "trace-me-42"
    assert reply.parse().id == "cmpl-trace-me-42"
    for proc in [gateway, *launcher.procs]:
        if proc.name in ("gateway", "scheduler", "worker"):
            lines = [json.loads(line) for line in proc.log_tail(200_000).splitlines() if "trace-me-42" in line]
            assert any(line.get("request_id") == "trace-me-42" for line in lines), proc.name


def test_openai_client_non_streaming_and_streaming(stack):
    scheduler, gateway = stack
    api = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0, timeout=120)
    names = {m.id for m in api.models.list().data}
    assert {"tiny-base", "ft-a"} <= names
    with Client(scheduler.address, timeout_s=120) as sdk:
        expected = sdk.generate("ft-a", "hello world", ignore_eos=True, **GREEDY)
        expected_chat = sdk.chat("ft-a", CHAT, ignore_eos=True, **GREEDY)

    done = api.completions.create(model="ft-a", prompt="hello world", extra_body={"ignore_eos": True}, **GREEDY)
    assert done.choices[0].text == expected.text
    assert done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len("hello world"), MAX_TOKENS)

    chunks = list(api.completions.create(model="ft-a", prompt="hello world", stream=True, extra_body={"ignore_eos": True},
                                         stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS

    chat = api.chat.completions.create(model="ft-a", messages=CHAT, extra_body={"ignore_eos": True}, **GREEDY)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected_chat.text
    assert chat.usage.prompt_tokens == expected_chat.usage.prompt_tokens > len("hello")  # the template was applied

    parts = list(api.chat.completions.create(model="ft-a", messages=CHAT, stream=True, extra_body={"ignore_eos": True},
                                             stream_options={"include_usage": True}, **GREEDY))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == expected_chat.text
    assert parts[-1].usage.total_tokens == expected_chat.usage.prompt_tokens + MAX_TOKENS


def test_errors_have_openai_shape_and_http_status(stack):
    _, gateway = stack
    api = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError, match="no-such-model") as err:
        api.completions.create(model="no-such-model", prompt="hi")
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # streaming: the status comes before any event
        list(api.chat.completions.create(model="no-such-model", messages=CHAT, stream=True))
    with pytest.raises(openai.BadRequestError, match="top_p"):
        api.completions.create(model="ft-a", prompt="hi", top_p=1.5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="ft-a", messages=[])
    request = urllib.request.Request(f"http://{gateway.address}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(request, timeout=30)
    assert http_err.value.code == 400
    assert json.loads(http_err.value.read())["error"]["type"] == "invalid_request_error"


def test_client_leaving_a_stream_cancels_the_request(stack, launcher):
    _, gateway = stack
    body = {"model": "ft-a", "prompt": "a", "max_tokens": 110, "temperature": 0.0, "ignore_eos": True, "stream": True}
    host, port = gateway.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json",
                                                              "X-Request-Id": "leave-early-7"})
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: ")
    conn.close()  # the client goes away after the first event
    scheduler_log = next(p for p in launcher.procs if p.name == "scheduler")
    deadline = time.monotonic() + 15
    while True:
        states = [json.loads(line).get("state") for line in scheduler_log.log_tail(200_000).splitlines()
                  if "leave-early-7" in line and "request_finished" in line]
        if states:
            break
        assert time.monotonic() < deadline, "the scheduler never finished the abandoned request"
        time.sleep(0.1)
    assert states == ["cancelled"]
