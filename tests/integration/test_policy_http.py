"""The policy's HTTP routes with the unmodified `text-generation` and `openai` clients, plus TGI's
validation and error bodies (422 / 429 / 503) and the x-flywheel-* headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import openai
import pytest
import requests
import text_generation

from tests.integration.test_policy_service import (
    SIGNER,
    Running,
    fresh_topics,
    gen,
    make_config,
    make_store,
    one_torch_thread,  # noqa: F401 - autouse fixture
    slow_without_eos,
    wait_for,
)
from tests.unit.test_starter import tiny_starter

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]
PROMPT = "how do I bake bread?"


@pytest.fixture(scope="module")
def web(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("http")
    make_store(tmp / "store")
    running = Running(make_config(kafka_bootstrap, fresh_topics(), tmp / "store", tmp / "state"))
    yield running
    running.close()


def test_text_generation_clients(web: Running) -> None:
    client = text_generation.Client(web.http, headers={"x-flywheel-user-id": "u2"})
    r = client.generate(PROMPT, max_new_tokens=8)
    assert r.generated_text and r.details.generated_tokens == len(r.details.tokens) <= 8
    assert r.details.finish_reason in ("length", "eos_token")
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=8))
    assert "".join(s.token.text for s in streamed) == streamed[-1].generated_text == r.generated_text
    assert streamed[-1].details.generated_tokens == len(streamed)
    sampled = client.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=3, top_k=20, temperature=0.9)
    assert sampled.details.seed == 3
    assert client.generate(PROMPT, max_new_tokens=8, return_full_text=True).generated_text == PROMPT + r.generated_text

    async def use_async() -> tuple:
        ac = text_generation.AsyncClient(web.http)
        a = await ac.generate(PROMPT, max_new_tokens=8)
        chunks = [c async for c in ac.generate_stream(PROMPT, max_new_tokens=8)]
        return a, chunks

    a, chunks = asyncio.run(use_async())
    assert a.generated_text == r.generated_text == chunks[-1].generated_text

    # The ids reach HTTP callers as headers and as extra fields.
    resp = requests.post(f"{web.http}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 8}},
                         headers={"x-flywheel-user-id": "u2"})  # fmt: skip
    body, h = resp.json(), resp.headers
    assert h["x-flywheel-interaction-id"] == body["interaction_id"] and h["x-flywheel-policy-version"] == "0"
    assert h["x-flywheel-feedback-token"] == body["feedback_token"] and body["policy_version"] == 0
    SIGNER.verify(body["feedback_token"], body["interaction_id"], "u2")
    resp = requests.post(f"{web.http}/generate_stream", json={"inputs": PROMPT}, stream=True)
    events = [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith(b"data:")]
    assert events[-1]["interaction_id"] == resp.headers["x-flywheel-interaction-id"]
    SIGNER.verify(events[-1]["feedback_token"], events[-1]["interaction_id"], "anonymous")

    info = requests.get(f"{web.http}/info").json()
    assert info["max_total_tokens"] == 256 and info["policy_version"] == 0 and info["max_best_of"] == 1
    assert requests.get(f"{web.http}/health").status_code == 200
    assert requests.get(f"{web.http}/health/details").json()["status"] == "serving"


def test_openai_client(web: Running) -> None:
    client = openai.OpenAI(base_url=f"{web.http}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["policy"]
    c = client.completions.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0, user="u3")
    assert c.choices[0].text and c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 8
    extra = c.model_extra
    assert extra["policy_version"] == 0
    SIGNER.verify(extra["feedback_token"], extra["interaction_id"], "u3")
    raw = client.completions.with_raw_response.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0)
    assert raw.headers["x-flywheel-policy-version"] == "0" and raw.parse().choices[0].text == c.choices[0].text
    parts = list(client.completions.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == c.choices[0].text
    assert parts[-1].choices[0].finish_reason == c.choices[0].finish_reason

    msgs = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="policy", messages=msgs, max_tokens=8, temperature=0, logprobs=True)
    assert chat.choices[0].message.content == c.choices[0].text  # one user turn renders as the raw prompt
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs.content
    assert chat.model_extra["interaction_id"] != extra["interaction_id"]
    stream = client.chat.completions.create(
        model="policy", messages=msgs, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert (
        text == chat.choices[0].message.content and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    )
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals and finals[-1].model_extra["policy_version"] == 0

    for kwargs, why in (
        ({"prompt": PROMPT, "n": 2}, "n=1"),
        ({"prompt": PROMPT, "temperature": 3}, "between 0 and 2"),
        ({"prompt": "", "max_tokens": 4}, "empty"),
        ({"prompt": PROMPT, "extra_body": {"bogus": 1}}, "unknown field(s) 'bogus'"),
    ):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.completions.create(model="policy", **kwargs)
        assert e.value.body and why in e.value.body  # TGI body: {"error": "...", "error_type": ...}


def test_tgi_validation_and_errors(web: Running) -> None:
    def post(body: object, path: str = "/generate") -> requests.Response:
        return requests.post(f"{web.http}{path}", json=body)

    cases = [
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"inputs": "x" * 2500}, "2500 characters, over the limit of 2000"),
        ({"inputs": "word " * 300}, "over the limit of 128 input tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 65}}, "over the limit of 64"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "`max_new_tokens` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "`top_p` must be > 0.0 and < 1.0"),
        ({"inputs": "hi", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"top_k": 0}}, "`top_k` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"repetition_penalty": -1}}, "`repetition_penalty` must be strictly positive"),
        ({"inputs": "hi", "parameters": {"best_of": 2}}, "`best_of` = 2 is not supported"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "many"}}, "`max_new_tokens` must be an integer"),
        ({"inputs": "hi", "bogus": True}, "unknown field(s) 'bogus' in the request"),
        ({"inputs": "hi", "parameters": {"temprature": 1}}, "unknown field(s) 'temprature' in parameters"),
        (["hi"], "must be a JSON object"),
        ({"inputs": "hi", "parameters": 0}, "`parameters` must be a JSON object"),  # not silently {}
        ({"inputs": "hi", "parameters": {"top_k": 10**30}}, "top_k"),  # not an OverflowError (500)
    ]
    for body, why in cases:
        for path in ("/generate", "/generate_stream", "/"):
            resp = post(body, path)
            assert resp.status_code == 422, (path, body, resp.text)
            assert resp.json()["error_type"] == "validation" and why in resp.json()["error"], resp.json()
    with pytest.raises(text_generation.errors.ValidationError, match="over the limit of 64"):
        text_generation.Client(web.http).generate("hi", max_new_tokens=65)


def test_http_overloaded_and_not_loaded(kafka_bootstrap: str, tmp_path) -> None:  # noqa: ANN001
    cold = Running(make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store", tmp_path / "s"), load=False)
    try:
        resp = requests.post(f"{cold.http}/generate", json={"inputs": "hi"})
        assert resp.status_code == 503 and resp.json()["error_type"] == "unavailable"
        assert "not loaded" in resp.json()["error"] and requests.get(f"{cold.http}/health").status_code == 503
    finally:
        cold.close()
    make_store(tmp_path / "store2", slow_without_eos(tiny_starter()))
    cfg = make_config(kafka_bootstrap, fresh_topics(), tmp_path / "store2", tmp_path / "s2",
                      max_concurrent_sequences=1, max_queue=1, max_new_tokens_cap=240)  # fmt: skip
    busy = Running(cfg)
    try:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 240}}
        first = busy.stub.Generate.future(gen("hi", n=240))
        wait_for(lambda: busy.service.engine.info().running == 1, 5, "one running")
        second = busy.stub.Generate.future(gen("hi", n=240))
        wait_for(lambda: busy.service.engine.info().waiting == 1, 5, "one waiting")
        resp = requests.post(f"{busy.http}/generate", json=body)
        assert resp.status_code == 429 and resp.json()["error_type"] == "overloaded" and "Retry-After" in resp.headers
        with pytest.raises(text_generation.errors.OverloadedError):
            text_generation.Client(busy.http).generate("hi", max_new_tokens=4)
        first.result(30), second.result(30)
    finally:
        busy.close()
