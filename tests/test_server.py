"""The OpenAI-compatible server, through OpenAI's own client against a server on 127.0.0.1: completions
and chat, streamed or not, n, seeds, stop strings, usage; errors in OpenAI's format; a client that
disconnects mid-stream frees its KV blocks."""

import http.client
import itertools
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


def test_streams_end_with_the_usage_when_asked(server):
    [alone], _ = generate(server.model, server.tokenizer, ["the king"], Sampling(temperature=0, max_new_tokens=9))
    chunks = list(server.client.completions.create(model="tiny", prompt="the king", max_tokens=9, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.token_ids) == 9
    assert chunks[-1].usage.prompt_tokens == 8 and all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == alone.text
    with pytest.raises(openai.BadRequestError, match="stream_options: expected"):
        server.client.completions.create(model="tiny", prompt="a", stream=True, stream_options={"include_usage": 1})


def test_chat_prompts_use_the_models_own_chat_template():
    from scratchlm.serve.server import BadRequest
    from scratchlm.tokenizer import Tokenizer

    template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip
    vocab = {i: bytes([i]) for i in range(256)}
    tokenizer = Tokenizer(vocab, [], ["<|im_start|>", "<|im_end|>"], end_token="<|im_end|>", chat_template=template)
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat(messages, tokenizer) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(messages, Tokenizer(vocab, [])) == render_chat(messages) == "user: hi\nassistant:"
    with pytest.raises(BadRequest, match=r"messages: the chat template refused the messages \(unknown role tool\)"):
        render_chat([{"role": "tool", "content": "x"}], tokenizer)


def chrome():
    """Headless Chromium driven by Selenium, from the Debian packages (chromium, chromium-driver)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("the browser test needs Chromium and its driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


def test_the_chat_page_streams_a_reply_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chrome()
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        # every change of the reply's text, as the page makes it
        browser.execute_script("""
            window.updates = [];
            new MutationObserver(() => {
              const reply = document.querySelector('#log .assistant');
              if (reply) window.updates.push(reply.textContent);
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
        """)
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        browser.find_element(By.ID, "message").send_keys("hello")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda b: b.execute_script("return document.body.dataset.state") == "done")
        reply = browser.execute_script("return document.querySelector('#log .assistant').textContent")
        updates = [u for u in browser.execute_script("return window.updates") if u]
        stats = browser.find_element(By.ID, "stats").text
        you = browser.find_element(By.CSS_SELECTOR, "#log .user").text
    finally:
        browser.quit()
    [alone], _ = generate(server.model, server.tokenizer, [render_chat([{"role": "user", "content": "hello"}])],
                          Sampling(temperature=0, max_new_tokens=64))  # fmt: skip
    assert you == "you: hello" and reply == "model: " + alone.text  # the model's greedy reply, whole
    assert len(set(updates)) >= 3 and updates[-1] == reply  # it grew piece by piece
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(updates))
    assert stats.startswith(f"{len(alone.token_ids)} tokens in ") and stats.endswith(" tokens/s")


@pytest.fixture(scope="module")
def served_run(data_dir, tmp_path_factory):
    """A trained tiny run for `scratchlm serve` in its own process."""
    from conftest import tiny_config

    from scratchlm.train.trainer import train

    out = tmp_path_factory.mktemp("served") / "run"
    train(tiny_config(data_dir, out, max_steps=2, **{"model.context_length": 128, "model.d_model": 64}))
    return out


def serve_process(run, *args: str):
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "scratchlm.cli", "serve", "--run", str(run), "--port", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    pytest.fail(f"the server did not start: {process.communicate()[1][-2000:]}")


def stream_lines(port: int, max_tokens: int, n: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"prompt": "the", "max_tokens": max_tokens, "n": n, "stream": True, "temperature": 1.0, "seed": 0}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return response


@pytest.mark.parametrize("timeout", ["30", "0"])
def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits(served_run, timeout):
    import signal

    process, port = serve_process(served_run, "--shutdown-timeout", timeout)
    try:
        response = stream_lines(port, 120, 16)
        assert response.readline().startswith(b"data: ")  # in flight
        process.send_signal(signal.SIGTERM)
        start = time.time()
        rest = b""
        try:
            while line := response.readline():
                rest += line
        except (http.client.IncompleteRead, ConnectionError):
            pass
        _, stderr = process.communicate(timeout=30)
        waited = time.time() - start
    finally:
        process.kill()
    assert process.returncode == -signal.SIGTERM and "Traceback" not in stderr, stderr  # stopped as asked
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith(b"data: {")]
    reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    if timeout == "30":  # the request in flight was allowed to finish: every sample ends, then [DONE]
        assert rest.rstrip().endswith(b"data: [DONE]") and len(reasons) == 16
    else:  # cancelled at once: the stream is cut short, the process does not wait for it
        assert b"[DONE]" not in rest and len(reasons) < 16 and waited < 10
    assert set(reasons) <= {"length", "stop"}
    with pytest.raises(OSError):  # and nothing listens any more
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/v1/models")
