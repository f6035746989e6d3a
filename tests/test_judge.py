"""judge.py on broken 200 replies and on a cache shared by processes (issue 14, point 8).

A local OpenAI-compatible server (http.server in a thread on 127.0.0.1) answers POST
/v1/chat/completions, so the real `openai` client and the judge's real retry loop run.
It answers "A" unless the test queued a raw (content type, body) for the next request.
"""

import json
import multiprocessing
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from judge import Judge

API_KEY = "sk-test-do-not-leak-5e1b2d"
HTML = ("text/html", "<html><body>502 Bad Gateway</body></html>")
TRUNCATED = ("application/json", '{"id": "c1", "choices": [{"index": 0, "mess')
NO_CHOICES = ("application/json", json.dumps({"id": "c1", "object": "chat.completion", "choices": []}))
NO_CONTENT = ("application/json", json.dumps({"choices": [{"index": 0, "message": {"role": "assistant"}}]}))
NO_MESSAGE = ("application/json", json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}))


def completion(content, finish_reason="stop"):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
    return ("application/json", json.dumps({"id": "c1", "object": "chat.completion", "choices": [choice]}))


class FakeOpenAI:
    def __init__(self):
        self.queue, self.requests = [], []  # queued (content type, body); Authorization header of each request
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with fake.lock:
                    fake.requests.append(self.headers.get("Authorization"))
                    content_type, body = fake.queue.pop(0) if fake.queue else completion("A")
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    fake = FakeOpenAI()
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url)
    yield fake
    fake.server.shutdown()


# --- a 200 reply with no answer in it is a server error -------------------------------------


@pytest.mark.parametrize("bad", [HTML, TRUNCATED, NO_CHOICES, NO_CONTENT, NO_MESSAGE])
def test_an_answerless_200_is_retried_with_the_server_error_backoff(server, tmp_path, delays, bad):
    j = Judge(cache_path=tmp_path / "c.json", base_delay=0.5)
    server.queue = [bad, bad, completion("B")]
    assert j.judge("p", "a", "b", "policy_first") == "B"
    assert len(server.requests) == 3 and j.requests == 3
    assert delays == [0.5, 1.0]  # as for a 5xx: base_delay * 2**attempt
    assert [v["answer"] for v in json.loads((tmp_path / "c.json").read_text()).values()] == ["B"]


@pytest.mark.parametrize(
    "bad, what",
    [
        (HTML, "a 200 reply that is not JSON: '<html><body>502 Bad Gateway</body></html>'"),
        (TRUNCATED, 'a 200 reply that is not JSON: \'{"id": "c1", "choices": [{"index": 0, "mess\''),
        (NO_CHOICES, 'a 200 reply with no choice or message in it: \'{"id": "c1"'),
        (NO_MESSAGE, 'a 200 reply with no choice or message in it: \'{"choices": [{"index": 0, "finish_reason"'),
        (NO_CONTENT, 'a 200 reply with no message content in it: \'{"choices": [{"index": 0, "message": {"role"'),
    ],
)
def test_an_always_answerless_server_gives_up_in_one_line(server, tmp_path, delays, bad, what):
    j = Judge(model="judge-model", cache_path=tmp_path / "c.json", api_retries=2, base_delay=0.1)
    server.queue = [bad] * 3
    with pytest.raises(RuntimeError) as error:
        j.judge("p", "a", "b", "policy_first")
    message = str(error.value)
    assert message.startswith("judge: giving up after 3 attempts (" + what) and message.endswith(
        ") from model judge-model"
    )
    assert "\n" not in message and "Error" not in message  # no raw JSONDecodeError / IndexError, in name or chain
    assert error.value.__cause__ is None and error.value.__suppress_context__
    assert len(server.requests) == 3 and delays == [0.1, 0.2]
    assert not (tmp_path / "c.json").exists()  # failures are not cached


def test_the_key_echoed_by_a_broken_server_is_masked(server, tmp_path, delays):
    j = Judge(cache_path=tmp_path / "c.json", api_retries=1)
    server.queue = [("text/plain", f"proxy error, request had Authorization: Bearer {API_KEY}")] * 2
    with pytest.raises(RuntimeError, match="Bearer \\*\\*\\*'\\) from model gpt-4o") as error:
        j.judge("p", "a", "b", "policy_first")
    assert API_KEY not in str(error.value) and all(auth == f"Bearer {API_KEY}" for auth in server.requests)


def test_a_filtered_null_content_is_an_invalid_answer_not_a_server_error(server, tmp_path, delays):
    j = Judge(cache_path=tmp_path / "c.json", invalid_retries=1)
    server.queue = [completion(None, finish_reason="content_filter")] * 2
    assert j.judge("p", "a", "b", "policy_first") == "invalid"
    assert len(server.requests) == 2 and delays == []  # asked again as an invalid answer, without backoff


# --- one cache, two processes ---------------------------------------------------------------


def judge_into(cache_path, worker, ready):
    j = Judge(cache_path=cache_path)
    ready.wait(timeout=60)  # both judges have read the (empty) cache before either writes
    for i in range(100):
        j.judge(f"prompt {worker}-{i}", "a", "b", "policy_first")


def test_two_processes_judging_into_one_cache_lose_nothing(server, tmp_path):
    cache = tmp_path / "gpt4_judgements.json"
    ctx = multiprocessing.get_context("fork")  # the children inherit the imported modules: no second torch import
    ready = ctx.Barrier(2)
    workers = [ctx.Process(target=judge_into, args=(cache, w, ready)) for w in (0, 1)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    saved = json.loads(cache.read_text())
    assert len(saved) == 200 and len(server.requests) == 200
    assert {v["answer"] for v in saved.values()} == {"A"}
    assert sorted(q.name for q in tmp_path.iterdir()) == [".gpt4_judgements.json.lock", "gpt4_judgements.json"]
    assert API_KEY not in cache.read_text()


@pytest.mark.parametrize("garbage", ['{"abc": {"answer": "A", "ra', "[]", "\xff\xfe not text"])
def test_an_unreadable_cache_is_said_in_one_line_and_moved_aside(server, tmp_path, capsys, garbage):
    cache = tmp_path / "c.json"
    cache.write_bytes(garbage.encode("latin-1"))
    j = Judge(cache_path=cache)
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and f"judge: {cache} cannot be read as a judgement cache" in said
    assert j.judge("p", "a", "b", "policy_first") == "A"
    assert len(json.loads(cache.read_text())) == 1
    (aside,) = tmp_path.glob("c.json.unreadable-*")
    assert aside.read_bytes() == garbage.encode("latin-1")  # the user's file is kept, not overwritten
    assert f"judge: moved the unreadable {cache} aside to {aside}" in capsys.readouterr().out
