"""The OpenAI-compatible server, through OpenAI's own client against a server on 127.0.0.1: completions
and chat, streamed or not, n, seeds, stop strings, usage; errors in OpenAI's format; a client that
disconnects mid-stream frees its KV blocks."""

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from test_generate import FakeTokenizer

pytest.importorskip("starlette", reason="the server needs starlette and uvicorn (pip install 'scratchlm[serve]')")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai", reason="the tests talk to the server with the openai client")

from scratchlm.infer.generate import Sampling, generate  # noqa: E402
from scratchlm.model import ModelConfig, TransformerLM  # noqa: E402
from scratchlm.serve.engine import Engine  # noqa: E402
from scratchlm.serve.server import create_app, render_chat  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, max_queue: int = 256) -> None:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=260, context_length=128, d_model=32, n_layers=2, n_heads=4)
        self.model, self.tokenizer = TransformerLM(config).eval(), FakeTokenizer()
        self.engine = Engine(self.model, self.tokenizer, num_blocks=64, block_size=8, max_batch=8, token_budget=64)
        self.port = free_port()
        app = create_app(self.engine, "tiny", max_queue=max_queue)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def greedy_alone(server: Server, prompt: str, n: int) -> str:
    [out], _ = generate(server.model, server.tokenizer, [prompt], Sampling(temperature=0, max_new_tokens=n))
    return out.text


def test_models_and_the_chat_page(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and b"/v1/chat/completions" in page.read()


def test_completions_streamed_or_not_equal_generate_alone(server):
    expected = greedy_alone(server, "the king", 20)
    out = server.client.completions.create(model="tiny", prompt="the king", max_tokens=20, temperature=0)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 8 and out.usage.completion_tokens == 20 and out.usage.total_tokens == 28
    pieces = list(server.client.completions.create(model="tiny", prompt="the king", max_tokens=20, temperature=0,
                                                   stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces) == expected and pieces[-1].choices[0].finish_reason == "length"


def test_chat_n_seeds_and_stop_strings(server):
    messages = [{"role": "user", "content": "hello"}]
    expected = greedy_alone(server, render_chat(messages), 12)
    chat = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == expected and chat.choices[0].message.role == "assistant"
    streamed = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    kwargs = {"model": "tiny", "prompt": "abc", "max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 2}
    a, b = server.client.completions.create(**kwargs), server.client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    stop = greedy_alone(server, "the king", 20)[5:7]
    [alone], _ = generate(server.model, server.tokenizer, ["the king"], Sampling(temperature=0, max_new_tokens=20,
                                                                               stop=[stop]))  # fmt: skip
    out = server.client.completions.create(model="tiny", prompt="the king", max_tokens=20, temperature=0, stop=[stop])
    assert alone.stop_reason == "stop string" and len(alone.text) < 7
    assert out.choices[0].text == alone.text and out.choices[0].finish_reason == "stop"
    streamed = server.client.completions.create(model="tiny", prompt="the king", max_tokens=20, temperature=0,
                                                stop=[stop], stream=True)  # fmt: skip
    assert "".join(p.choices[0].text for p in streamed) == alone.text  # the stop's first part was held back


def test_streaming_holds_back_what_may_start_a_stop_string():
    from scratchlm.serve.server import sendable

    assert sendable("hello wor", ["world"]) == 6 and sendable("hello", ["xyz"]) == 5
    assert sendable("ab", ["b", "abc"]) == 0 and sendable("", ["a"]) == 0


def test_bad_requests_get_openai_errors(server):
    with pytest.raises(openai.BadRequestError, match=r"temperature: expected a value in \[0, 2\], got -1"):
        server.client.completions.create(model="tiny", prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError, match="the model 'gpt-9' does not exist"):
        server.client.completions.create(model="gpt-9", prompt="a")
    with pytest.raises(openai.BadRequestError, match="exceeds the context length 128"):
        server.client.completions.create(model="tiny", prompt="a" * 120, max_tokens=20)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("the request body is not valid JSON")


def test_a_full_queue_is_a_429():
    s = Server(max_queue=0)
    try:
        with pytest.raises(openai.RateLimitError, match="the queue is full"):
            s.client.completions.create(model="tiny", prompt="a")
    finally:
        s.close()


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    body = json.dumps({"model": "tiny", "prompt": "the king", "max_tokens": 100, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.read(20).startswith(b"data: ")
    conn.close()  # gone mid-stream
    deadline = time.time() + 10
    while time.time() < deadline and (server.engine.pool.num_free < 64 or server.engine.has_work()):
        time.sleep(0.05)
    assert server.engine.pool.num_free == 64 and not server.engine.has_work()


def test_bench_serve_loads_the_server_with_poisson_arrivals(server, capsys):
    from scratchlm.cli import main
    from scratchlm.serve.load import run_load

    summary = run_load(f"http://127.0.0.1:{server.port}", ["the king", "abc"], rate=50, requests=8, max_tokens=6,
                       duration=30)  # fmt: skip
    assert summary["completed"] == 8 and not summary["errors"] and summary["output_tokens_per_s"] > 0
    assert 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"] <= summary["e2e_ms"]["p99"]
    assert main(["bench", "serve", "--url", f"http://127.0.0.1:{server.port}", "--requests", "3", "--max-tokens", "4",
                 "--rate", "20"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("3/3 requests in") and "TTFT" in out and "E2E" in out
