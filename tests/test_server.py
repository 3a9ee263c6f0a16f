"""`lm serve` (lm/server.py): a real uvicorn server on 127.0.0.1 and real clients (the official
`openai` client, httpx). Answers equal `model.generate` on the chat template's prompt; the chat
history is whole JSON lines that `lm.load_examples` reads; concurrent streams are batched and
correct; every refusal is an OpenAI-shaped 4xx and the server goes on; a client that leaves frees
its slot; and the `lm serve` command end to end."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lm
from lm.quantize import for_decoding
from lm.server import History, Server, Settings, create_app

from helpers import sharp_model

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
TEXT = "Human: Assistant: what is a cat? a cat is an animal. /0123456789 Context:\n"
TOKENIZER = lm.CharTokenizer.train(TEXT)
TEMPLATE = lm.chat_template("human")
NAME = "tiny-chat"
BLOCK = 64
WAIT = 60  # seconds: a client's timeout, so that a hang fails a test instead of stopping the run


@pytest.fixture(scope="module")
def model() -> lm.GPT:
    torch.manual_seed(0)
    model = sharp_model(lm.ModelConfig(vocab_size=TOKENIZER.vocab_size, block_size=BLOCK, n_layer=2, n_head=4,
                                       d_model=32))
    model.tokenizer = TOKENIZER
    return for_decoding(model)  # the layout generate() gives it on a CPU, before the copy below


@pytest.fixture(scope="module")
def reference_model(model) -> lm.GPT:
    """A copy for the expected answers, so that the tests never run the served model themselves."""
    return copy.deepcopy(model)


def app_for(model, **options):
    options = {"model_name": NAME, "history": None, "max_batch": 8,
               "settings": Settings(max_new_tokens=30, temperature=0.8, top_k=200), **options}
    return create_app(model, **options)


@pytest.fixture(scope="module")
def server(model):
    with Server(app_for(model)) as server:
        yield server


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=WAIT) as client:
        yield client


def openai_client(server, api_key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=WAIT)


# ---- what the server should answer -----------------------------------------------------------------
def chat_reference(model, messages, max_tokens, stop=(), **sampling):
    """(content, streamed text, finish_reason, completion_tokens) of a chat completion, from
    `model.generate` on the template's prompt ids: the answer ends at the end-of-text token or the
    first stop string; a finished answer is stripped, one cut by max_tokens only lstripped; the
    stream sends the text without its leading space."""
    sampling = sampling or dict(temperature=0)
    ids = TEMPLATE.encode_prompt(messages, TOKENIZER)
    new = model.generate(torch.tensor([ids]), max_new_tokens=min(max_tokens, BLOCK - len(ids)), **sampling)
    new = new[0, len(ids):].tolist()
    stops = [*TEMPLATE.stop, *stop]
    for k in range(1, len(new) + 1):
        if new[k - 1] == TOKENIZER.eos_id:
            text = TOKENIZER.decode(new[:k - 1])
            return text.strip(), text.lstrip(), "stop", k - 1
        text = TOKENIZER.decode(new[:k])
        hits = [text.index(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)].strip(), text[:min(hits)].lstrip(), "stop", k
    text = TOKENIZER.decode(new)
    return text.lstrip(), text.lstrip(), "length", len(new)


def completion_reference(model, prompt, max_tokens, **sampling):
    """(text, finish_reason, completion_tokens) of a text completion: up to the end-of-text token."""
    sampling = sampling or dict(temperature=0)
    ids = TOKENIZER.encode(prompt)
    new = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, **sampling)[0, len(ids):].tolist()
    if TOKENIZER.eos_id in new:
        k = new.index(TOKENIZER.eos_id)
        return TOKENIZER.decode(new[:k]), "stop", k
    return TOKENIZER.decode(new), "length", len(new)


def user(content):
    return [{"role": "user", "content": content}]


def sse_events(lines) -> list:
    """The JSON payloads of a server-sent event stream, up to [DONE] (which must come)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            if line == "data: [DONE]":
                return events
            events.append(json.loads(line[6:]))
    raise AssertionError(f"the stream ended without [DONE] after {events}")


def wait_until_idle(client, headers=None) -> dict:
    """/health once the engine has no active request (polled for at most WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while True:
        stats = client.get("/health", headers=headers).json()
        if stats["active"] == 0 and stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


# ---- the openai client -----------------------------------------------------------------------------
def test_chat_completion_equals_greedy_generation_on_the_template_prompt(server, reference_model):
    messages = user("what is a cat?")
    content, _, reason, tokens = chat_reference(reference_model, messages, 30)
    assert len(content) > 5  # a real answer to compare, not an empty one
    reply = openai_client(server).chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                           max_tokens=30)
    assert reply.object == "chat.completion" and reply.model == NAME and len(reply.choices) == 1
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", content, reason)
    ids = TEMPLATE.encode_prompt(messages, TOKENIZER)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), tokens)
    assert reply.usage.total_tokens == len(ids) + tokens


def test_a_stopped_answer_is_cut_at_the_stop_and_stripped(server, reference_model):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1."},
                {"role": "user", "content": "is it?"}]
    full = chat_reference(reference_model, messages, 30)[0]
    stop = full[8:10]
    content, _, reason, tokens = chat_reference(reference_model, messages, 30, stop=[stop])
    assert reason == "stop" and len(content) < len(full)
    reply = openai_client(server).chat.completions.create(model=NAME, messages=messages, temperature=0,
                                                           max_tokens=30, stop=stop)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (content, "stop")
    assert reply.usage.completion_tokens == tokens


def test_an_answer_that_ends_at_once_is_empty_and_stopped(server, reference_model):
    messages = user("what is 42?")
    assert chat_reference(reference_model, messages, 30)[2:] == ("stop", 2)  # "\n\n" first
    reply = openai_client(server).chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "stop")


def test_streamed_chat_completion_sends_the_same_answer(server, reference_model):
    messages = user("a cat")
    content, streamed, reason, tokens = chat_reference(reference_model, messages, 25)
    chunks = list(openai_client(server).chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=25, stream=True,
        stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == streamed and "".join(pieces).strip() == content
    # Tokens made while the client was still reading the last chunk go out together in the next, so
    # how many chunks there are depends on the two sides' speeds (on a busy machine all of them may
    # come at once); test_a_slow_answer_streams_piece_by_piece checks that they do not have to.
    assert sum(1 for piece in pieces if piece) >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == tokens
    assert chunks[-1].usage.prompt_tokens == len(TEMPLATE.encode_prompt(messages, TOKENIZER))


def test_seeded_sampling_draws_what_generate_draws_with_that_seed(server, reference_model):
    messages = user("is it?")
    sampling = dict(temperature=0.8, top_k=200, seed=7)
    content = chat_reference(reference_model, messages, 30, **sampling)[0]
    others = {chat_reference(reference_model, messages, 30, **{**sampling, "seed": s})[0] for s in (8, 9)}
    assert others != {content}  # the seed matters
    client = openai_client(server)
    for _ in range(2):  # the same seed twice: the same answer
        reply = client.chat.completions.create(model=NAME, messages=messages, temperature=0.8, seed=7, max_tokens=30)
        assert reply.choices[0].message.content == content


def test_completions_both_ways(server, reference_model):
    client = openai_client(server)
    text, reason, tokens = completion_reference(reference_model, "a cat is", 20)
    assert len(text) >= 10
    reply = client.completions.create(model=NAME, prompt="a cat is", max_tokens=20, temperature=0)
    assert reply.object == "text_completion" and reply.model == NAME
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (text, reason)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (8, tokens)
    chunks = list(client.completions.create(model=NAME, prompt="a cat is", max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage.completion_tokens == tokens
    default = client.completions.create(model=NAME, prompt="a cat is", temperature=0)  # OpenAI's default: 16
    text, _, tokens = completion_reference(reference_model, "a cat is", 16)
    assert (default.choices[0].text, default.usage.completion_tokens) == (text, tokens)
    sampled = completion_reference(reference_model, "a cat", 12, temperature=1.0, top_k=200, seed=3)[0]
    assert client.completions.create(model=NAME, prompt="a cat", max_tokens=12, seed=3, temperature=1.0,
                                     ).choices[0].text == sampled


def test_a_completion_prompt_is_plain_text_even_where_it_names_a_special_token():
    """A user's prompt that contains "<EOS>" is encoded as those five characters, never as the
    end-of-text token (which would end the document the model is continuing)."""
    tokenizer = lm.CharTokenizer.train(TEXT + "<EOS>")
    torch.manual_seed(0)
    model = sharp_model(lm.ModelConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=4,
                                       d_model=32))
    model.tokenizer = tokenizer
    prompt = "a cat <EOS> is"
    plain = tokenizer.encode(prompt, parse_special=False)
    assert len(plain) == len(prompt) and tokenizer.eos_id in tokenizer.encode(prompt)  # the two readings differ
    new = copy.deepcopy(model).generate(torch.tensor([plain]), max_new_tokens=12, temperature=0)[0, len(plain):]
    new = new.tolist()
    expected = tokenizer.decode(new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)
    with Server(app_for(model)) as server:
        reply = openai_client(server).completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.choices[0].text == expected


def test_models_list_and_health(server, client):
    assert [m.id for m in openai_client(server).models.list()] == [NAME]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["block_size"] == BLOCK
    assert health["max_batch"] == 8 and health["batched"] is True


# ---- POST /chat and the history ----------------------------------------------------------------------
def test_chat_endpoint_and_the_history_lm_finetune_reads(model, reference_model, tmp_path):
    path = tmp_path / "chat_history.jsonl"
    conversation = [{"role": "system", "content": "1"}, {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "1."}, {"role": "user", "content": "a cat"}]
    with Server(app_for(model, history=path)) as server, httpx.Client(base_url=server.url, timeout=WAIT) as client:
        answer = client.post("/chat", json={"message": "what is a cat?", "temperature": 0, "max_new_tokens": 30})
        assert answer.status_code == 200
        expected = chat_reference(reference_model, user("what is a cat?"), 30)[0]
        assert answer.json() == {"response": expected}
        reply = openai_client(server).chat.completions.create(model=NAME, messages=conversation, temperature=0,
                                                               max_tokens=20)
        assert reply.choices[0].message.content == chat_reference(reference_model, conversation, 20)[0]
        streamed = "".join(c.choices[0].delta.content or "" for c in openai_client(server).chat.completions.create(
            model=NAME, messages=user("a cat"), temperature=0, max_tokens=20, stream=True))
        assert client.post("/v1/completions", json={"prompt": "a cat", "max_tokens": 3}).status_code == 200
        assert client.post("/chat", json={"message": "what is a dog?"}).status_code == 400  # not kept
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4  # three whole lines: the completion is no conversation
    records = [json.loads(line) for line in lines[:-1]]
    assert {k: records[0][k] for k in ("user", "assistant", "model")} == {
        "user": "what is a cat?", "assistant": expected, "model": NAME}
    assert records[1]["messages"] == [*conversation, {"role": "assistant", "content": reply.choices[0].message.content}]
    assert records[2]["user"] == "a cat" and records[2]["assistant"] == streamed.strip()
    assert all("timestamp" in r for r in records)
    examples = lm.load_examples(path)
    assert examples[0] == [{"role": "user", "content": "what is a cat?"}, {"role": "assistant", "content": expected}]
    assert examples[1] == records[1]["messages"] and len(examples) + sum(examples.skipped.values()) == 3


def test_history_repairs_a_half_last_line(tmp_path):
    path = tmp_path / "chat_history.jsonl"
    whole = [{"user": "a", "assistant": "b"}, {"user": "c", "assistant": "d"}]
    text = "".join(json.dumps(r) + "\n" for r in whole)
    path.write_text(text + '{"user": "e", "assis')  # a crash in the middle of a line
    history = History(path)
    assert history.repaired == len('{"user": "e", "assis') and path.read_text() == text
    history.append({"user": "é", "assistant": "ü\nnew line"})
    assert [e[0]["content"] for e in lm.load_examples(path)] == ["a", "c", "é"]
    assert History(path).repaired == 0 and path.read_text().endswith('"}\n')
    half = tmp_path / "half.jsonl"
    half.write_text('{"user": "x"')  # nothing whole at all
    assert History(half).repaired == 12 and half.read_bytes() == b""
    assert History(tmp_path / "none.jsonl").repaired == 0


def test_concurrent_writers_keep_every_line_whole(tmp_path):
    history = History(tmp_path / "h.jsonl")
    record = {"user": "x" * 5000, "assistant": "y" * 5000}
    threads = [threading.Thread(target=lambda: [history.append(record) for _ in range(10)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lm.load_examples(history.path)) == 40


# ---- many clients at once ----------------------------------------------------------------------------
QUESTIONS = ["what is a cat?", "a cat", "is it?", "what is 1?", "a cat is an animal.", "what is it?",
             "Context: a cat", "is a cat an animal?"]


def test_concurrent_streaming_clients_get_their_own_answers_batched(model, reference_model):
    expected = [chat_reference(reference_model, user(q), 30)[1] for q in QUESTIONS]
    assert len(set(expected)) == len(QUESTIONS)
    got, errors, start = {}, [], threading.Barrier(len(QUESTIONS))

    def ask(i, url):
        try:
            with httpx.Client(base_url=url, timeout=WAIT) as client:
                start.wait(WAIT)
                body = {"model": NAME, "messages": user(QUESTIONS[i]), "temperature": 0, "max_tokens": 30,
                        "stream": True}
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    assert response.status_code == 200
                    events = sse_events(response.iter_lines())
            got[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        except Exception as err:  # reported below, in the test's thread
            errors.append(err)

    with Server(app_for(model, max_batch=8)) as server:
        threads = [threading.Thread(target=ask, args=(i, server.url)) for i in range(len(QUESTIONS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not errors, errors
        with httpx.Client(base_url=server.url, timeout=WAIT) as client:
            stats = wait_until_idle(client)
    assert [got[i] for i in range(len(QUESTIONS))] == expected
    assert stats["requests"] == len(QUESTIONS) and stats["mean_batch"] > 1


# ---- refusals ---------------------------------------------------------------------------------------
MESSAGES = user("what is a cat?")
CHAT = "/v1/chat/completions"
REFUSALS = {  # name: (method, path, body (bytes, or JSON), status, param)
    "invalid JSON": ("POST", CHAT, b'{"messages": [', 400, None),
    "empty body": ("POST", "/chat", b"", 400, None),
    "not an object": ("POST", CHAT, [1, 2], 400, None),
    "nested too deep": ("POST", "/v1/completions", b"[" * 50_000 + b"]" * 50_000, 400, None),
    "no message": ("POST", "/chat", {"text": "hi"}, 400, "message"),
    "blank message": ("POST", "/chat", {"message": "  "}, 400, "message"),
    "no messages": ("POST", CHAT, {"model": NAME}, 400, "messages"),
    "messages not a list": ("POST", CHAT, {"messages": "hi"}, 400, "messages"),
    "a message without content": ("POST", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0]"),
    "unknown role": ("POST", CHAT, {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages[0].role"),
    "role not a string": ("POST", CHAT, {"messages": [{"role": ["user"], "content": "a"}]}, 400, "messages[0].role"),
    "content not text": ("POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    "last message not the user's": ("POST", CHAT, {"messages": [*MESSAGES, {"role": "assistant", "content": "a"}]},
                                    400, "messages"),
    "turns out of order": ("POST", CHAT, {"messages": [*MESSAGES, *MESSAGES]}, 400, "messages"),
    "no prompt": ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    "max_tokens a string": ("POST", CHAT, {"messages": MESSAGES, "max_tokens": "5"}, 400, "max_tokens"),
    "max_tokens 0": ("POST", CHAT, {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    "temperature too high": ("POST", CHAT, {"messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    "temperature not a number": ("POST", "/chat", {"message": "a", "temperature": "hot"}, 400, "temperature"),
    "top_p over 1": ("POST", "/v1/completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    "stream not a bool": ("POST", CHAT, {"messages": MESSAGES, "stream": "yes"}, 400, "stream"),
    "n=2": ("POST", CHAT, {"messages": MESSAGES, "n": 2}, 400, "n"),
    "empty stop": ("POST", CHAT, {"messages": MESSAGES, "stop": [""]}, 400, "stop"),
    "logprobs": ("POST", "/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs"),
    "a character the tokenizer lacks": ("POST", CHAT, {"messages": user("what is a dog?")}, 400, "messages"),
    "chat prompt over the context": ("POST", CHAT, {"messages": user("a cat " * 12)}, 400, None),
    "streamed prompt over the context": ("POST", CHAT, {"messages": user("a cat " * 12), "stream": True}, 400, None),
    "completion prompt over the context": ("POST", "/v1/completions", {"prompt": "a" * BLOCK, "stream": True}, 400,
                                           None),
    "unknown model": ("POST", CHAT, {"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    "unknown path": ("GET", "/v1/engines", None, 404, None),
    "wrong method": ("GET", "/chat", None, 405, None),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_bad_requests_get_an_openai_shaped_error_and_the_server_goes_on(name, client):
    method, path, body, status, param = REFUSALS[name]
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    if "over the context" in name:
        assert error["code"] == "context_length_exceeded" and "context holds 64" in error["message"]
    if name == "unknown model":
        assert error["code"] == "model_not_found" and NAME in error["message"]
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/chat", json={"message": "a cat", "max_new_tokens": 2}).status_code == 200


def test_the_openai_client_raises_the_servers_errors(server):
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=MESSAGES, temperature=5)
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_bodies_over_the_limit_are_refused_with_413(model):
    with Server(app_for(model, max_body_bytes=1000)) as server, \
            httpx.Client(base_url=server.url, timeout=WAIT) as client:
        big = json.dumps({"prompt": "a" * 2000}).encode()
        response = client.post("/v1/completions", content=big)  # with its content-length
        assert response.status_code == 413 and "limit is 1000" in response.json()["error"]["message"]

        def chunks():  # chunked transfer: no length announced
            for i in range(0, len(big), 100):
                yield big[i:i + 100]

        response = client.post("/v1/completions", content=chunks())
        assert "content-length" not in response.request.headers
        assert response.status_code == 413 and "limit of 1000" in response.json()["error"]["message"]
        small = json.dumps({"prompt": "a cat", "max_tokens": 2}).encode()
        assert client.post("/v1/completions", content=iter([small[:5], small[5:]])).status_code == 200
        assert client.get("/health").status_code == 200


def test_an_api_key_guards_every_endpoint(model):
    with Server(app_for(model, api_key="s3cret")) as server, \
            httpx.Client(base_url=server.url, timeout=WAIT) as client:
        endpoints = [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/chat"), ("POST", CHAT),
                     ("POST", "/v1/completions"), ("GET", "/nowhere")]
        for method, path in endpoints:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = client.request(method, path, headers=headers, json={"message": "a"})
                assert response.status_code == 401, (method, path, headers)
                error = response.json()["error"]
                assert error["type"] == "authentication_error" and "Authorization: Bearer" in error["message"]
        good = {"Authorization": "Bearer s3cret"}
        assert client.get("/health", headers=good).status_code == 200
        assert client.get("/nowhere", headers=good).status_code == 404
        assert client.post("/chat", headers=good, json={"message": "a cat", "max_new_tokens": 3}).status_code == 200
        reply = openai_client(server, api_key="s3cret").chat.completions.create(model=NAME, messages=MESSAGES,
                                                                                 max_tokens=3)
        assert reply.usage.completion_tokens <= 3
        with pytest.raises(openai.AuthenticationError):
            openai_client(server, api_key="wrong").models.list()


def test_a_full_waiting_line_is_503(model):
    with Server(app_for(model, max_waiting=0)) as server, httpx.Client(base_url=server.url, timeout=WAIT) as client:
        for stream in (False, True):
            response = client.post(CHAT, json={"messages": MESSAGES, "stream": stream})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "server_busy"
        assert client.get("/health").json()["status"] == "ok"


def test_a_failing_generation_is_a_500_and_the_next_request_is_served(server, client, model, reference_model,
                                                                     monkeypatch):
    forward, failed = model.forward, []

    def fail_once(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fail_once)
    response = client.post(CHAT, json={"messages": MESSAGES, "temperature": 0})
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert "RuntimeError: boom" in response.json()["error"]["message"]
    failed.clear()
    with client.stream("POST", CHAT, json={"messages": MESSAGES, "stream": True}) as response:
        events = sse_events(response.iter_lines())
    assert response.status_code == 200 and "boom" in events[-1]["error"]["message"]
    reply = openai_client(server).chat.completions.create(model=NAME, messages=MESSAGES, temperature=0, max_tokens=30)
    assert reply.choices[0].message.content == chat_reference(reference_model, MESSAGES, 30)[0]


# ---- clients that leave --------------------------------------------------------------------------------
@pytest.fixture
def slow_server(model, tmp_path):
    """A server whose model takes 50 ms a step: a 50-token answer takes seconds, leaving is quick."""
    slow = copy.deepcopy(model)
    forward = slow.forward

    def slowly(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    slow.forward = slowly
    with Server(app_for(slow, history=tmp_path / "history.jsonl")) as server:
        server.history = tmp_path / "history.jsonl"
        yield server


def test_a_slow_answer_streams_piece_by_piece(slow_server, reference_model):
    """A model taking 50 ms a token: the text reaches the client as it is made, in several chunks,
    and they add up to the whole answer."""
    text = completion_reference(reference_model, "a cat is", 6)[0]
    with httpx.Client(base_url=slow_server.url, timeout=WAIT) as client:
        body = {"prompt": "a cat is", "max_tokens": 6, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
    pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert "".join(pieces) == text and sum(1 for piece in pieces if piece) >= 2


def test_a_client_that_leaves_mid_stream_frees_its_slot(slow_server, reference_model):
    assert completion_reference(reference_model, "a cat is", 50)[1:] == ("length", 50)
    with httpx.Client(base_url=slow_server.url, timeout=WAIT) as client:
        body = {"prompt": "a cat is", "max_tokens": 50, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            first = [json.loads(next(lines)[6:]) for _ in range(2)]
        assert all(e["choices"][0]["finish_reason"] is None for e in first)
        stats = wait_until_idle(client)
        assert stats["active"] == 0 and stats["requests"] == 1 and stats["tokens"] < 50
        text = client.post("/v1/completions", json={"prompt": "a cat is", "max_tokens": 3, "temperature": 0})
        assert text.json()["choices"][0]["text"] == completion_reference(reference_model, "a cat is", 3)[0]


def test_a_client_that_leaves_before_the_answer_cancels_it_and_it_is_not_kept(slow_server):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(slow_server.url + "/chat", json={"message": "a cat", "temperature": 0, "max_new_tokens": 50},
                   timeout=0.3)
    with httpx.Client(base_url=slow_server.url, timeout=WAIT) as client:
        stats = wait_until_idle(client)
        assert stats["active"] == 0 and stats["requests"] == 1 and stats["tokens"] < 50
        assert client.post("/chat", json={"message": "a cat", "max_new_tokens": 2}).status_code == 200
    assert len(slow_server.history.read_text().splitlines()) == 1  # the finished one only


# ---- the command ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lm_serve_end_to_end(reference_model, tmp_path):
    ckpt = lm.save_checkpoint(tmp_path / "chat" / "best.pt", reference_model)
    history, port = tmp_path / "history.jsonl", free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LM_API_KEY", None)
    command = [sys.executable, "-m", "lm", "serve", "--ckpt", str(ckpt), "--port", str(port), "--history",
               str(history), "--device", "cpu", "--max_batch", "4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # python, torch and the model start
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
        assert [m.id for m in client.models.list()] == ["chat"]  # the checkpoint's folder
        reply = client.chat.completions.create(model="chat", messages=MESSAGES, temperature=0, max_tokens=20)
        assert reply.choices[0].message.content == chat_reference(reference_model, MESSAGES, 20)[0]
    finally:
        process.terminate()
        out, err = process.communicate(timeout=WAIT)
    assert f"serving 'chat' ({ckpt}, template 'human', history in {history}) on http://127.0.0.1:{port}" in err
    assert "Traceback" not in err
    assert lm.load_examples(history)[0][0] == MESSAGES[0]


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port 70000 is not a port number (0-65535)"),
    (["--max_batch", "0"], "--max_batch 0 must be at least 1"),
    (["--temperature", "-1"], "temperature"),
])
def test_lm_serve_bad_settings_are_clear_errors(flags, message, reference_model, tmp_path, capsys):
    from lm.cli import main

    ckpt = lm.save_checkpoint(tmp_path / "m.pt", reference_model)
    assert main(["serve", "--ckpt", str(ckpt), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lm serve: error: ") and message in err


def test_lm_serve_flags_checked_by_the_parser(capsys):
    from lm.cli import main

    for flags in (["--port", "abc"], ["--ckpt", "x.pt", "--max_batch", "many"], []):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *flags])
        assert exit_.value.code == 2
    assert "--ckpt" in capsys.readouterr().err


def test_lm_serve_on_a_port_in_use_is_a_clear_error(reference_model, tmp_path, capsys):
    from lm.cli import main

    ckpt = lm.save_checkpoint(tmp_path / "m.pt", reference_model)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--ckpt", str(ckpt), "--port", str(port), "--no_history"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lm serve: error: cannot listen on 127.0.0.1:{port}") and "another --port" in err


def test_top_p_zero_keeps_only_the_most_likely_token(server, reference_model):
    messages = user("what is a cat?")
    greedy = chat_reference(reference_model, messages, 20)[0]
    reply = openai_client(server).chat.completions.create(model=NAME, messages=messages, temperature=1.0, top_p=0,
                                                           max_tokens=20, seed=3)
    assert reply.choices[0].message.content == greedy
