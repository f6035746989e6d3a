"""judge.py against a local OpenAI-compatible server: broken 200 replies, a cache shared by processes
(issue 14, point 8); the judge at scale (issue 17): a bounded pool, a 429 storm, a killed run, the cache key,
newer models' settings, the length-controlled win rate and two judges' agreement.

A local OpenAI-compatible server (http.server in a thread on 127.0.0.1) answers POST
/v1/chat/completions, so the real `openai` client and the judge's real retry loop run.
It answers "A" (or by `answer`, a function of the request) unless the test queued a raw
(content type, body) for the next request, scripted statuses (429 with Retry-After: 1),
or made it refuse settings with OpenAI's 400 for a newer model; each answer takes `delay` s.
"""

import json
import math
import multiprocessing
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import numpy as np
import openai
import pytest
from conftest import serve

import judge
from judge import Judge, agreement, cache_key, length_controlled_win_rate, win_rates

API_KEY = "sk-test-do-not-leak-5e1b2d"
HTML = ("text/html", "<html><body>502 Bad Gateway</body></html>")
TRUNCATED = ("application/json", '{"id": "c1", "choices": [{"index": 0, "mess')
NO_CHOICES = ("application/json", json.dumps({"id": "c1", "object": "chat.completion", "choices": []}))
NO_CONTENT = ("application/json", json.dumps({"choices": [{"index": 0, "message": {"role": "assistant"}}]}))
NO_MESSAGE = ("application/json", json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}))
# what OpenAI's API answers a newer model's request with max_tokens or temperature 0 (and an unrelated 400)
REFUSALS = {
    "max_tokens": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter",
    },
    "temperature": {
        "message": "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) value is supported.",
        "type": "invalid_request_error", "param": "temperature", "code": "unsupported_value",
    },
    "messages": {
        "message": "This model's maximum context length is 8192 tokens.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
    },
}  # fmt: skip


def completion(content, finish_reason="stop"):
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
    return ("application/json", json.dumps({"id": "c1", "object": "chat.completion", "choices": [choice]}))


def replies(body):
    """Reply A and reply B of a request's user message."""
    text = body["messages"][1]["content"]
    reply_a = text.split("[Reply A]\n", 1)[1].split("\n\n[Reply B]\n", 1)[0]
    return reply_a, text.split("\n\n[Reply B]\n", 1)[1].rsplit("\n\nBetter reply", 1)[0]


def by_length(body):
    """A judge that prefers the longer reply, and A when they are as long."""
    reply_a, reply_b = replies(body)
    return "A" if len(reply_a) >= len(reply_b) else "B"


def expected_outcome(policy_reply, base_reply):
    """What by_length makes of a pair in both orders."""
    return "win" if len(policy_reply) > len(base_reply) else "tie" if len(policy_reply) == len(base_reply) else "loss"


class FakeOpenAI:
    def __init__(self):
        self.queue, self.requests = [], []  # queued (content type, body); Authorization header of each request
        self.log = []  # (arrival time.monotonic(), request body, status replied) of each request, as it arrives
        self.statuses = []  # scripted statuses of the next requests (429: with Retry-After: 1)
        self.refused = set()  # settings (REFUSALS' keys) answered with a 400 when the request holds them
        self.answer, self.delay = (lambda body: "A"), 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    arrived = time.monotonic()
                    fake.requests.append(self.headers.get("Authorization"))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    refused = next((s for s in REFUSALS if s in fake.refused and s in body), None)
                    status = 400 if refused else fake.statuses.pop(0) if fake.statuses else 200
                    reply = fake.queue.pop(0) if fake.queue and status == 200 else None
                    fake.log.append((arrived, body, status))
                try:
                    if status == 200:
                        if fake.delay:  # (a test's `delays` fixture records time.sleep: no sleep when none is set)
                            time.sleep(fake.delay)
                        self.reply(200, *(reply or completion(fake.answer(body))))
                    elif status == 400:
                        self.reply(400, "application/json", json.dumps({"error": REFUSALS[refused]}))
                    else:
                        error = {"error": {"message": f"scripted {status}", "type": "test", "code": status}}
                        self.reply(status, "application/json", json.dumps(error), {"Retry-After": "1"})
                except (BrokenPipeError, ConnectionResetError):  # a killed client's request
                    pass
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def reply(self, status, content_type, body, headers=()):
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in dict(headers).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.server, self.url = serve(Handler)

    def answered(self):
        """How many 200 answers each question (system prompt, user message) got."""
        return Counter(
            (b["messages"][0]["content"], b["messages"][1]["content"]) for _, b, status in self.log if status == 200
        )


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


# --- the judge at scale (issue 17) ------------------------------------------------------------


def pairs_of(n, prefix="prompt"):
    """n (prompt, policy reply, base reply) with every outcome: the policy's reply shorter, as long, or longer."""
    return [(f"{prefix} {i}", "p" * (1 + i % 3), "bb") for i in range(n)]


def test_300_pairs_at_200_ms_an_answer_take_well_under_the_sequential_120_s(server, tmp_path):
    server.answer, server.delay = by_length, 0.2
    pairs = pairs_of(300)
    j = Judge(cache_path=tmp_path / "c.json")  # the default pool of 8
    start = time.monotonic()
    outcomes = j.compare_many(pairs)
    took = time.monotonic() - start
    print(f"300 pairs (600 requests at 0.2 s) with {j.concurrency} concurrent requests: {took:.1f} s")
    assert took < 40  # sequentially 600 x 0.2 s = 120 s; 8 at a time about 15 s
    assert outcomes == [expected_outcome(policy, base) for _, policy, base in pairs]
    assert len(server.log) == j.requests == 600 and set(server.answered().values()) == {1}
    assert server.max_in_flight == 8  # bounded: never more than the pool
    assert len(json.loads((tmp_path / "c.json").read_text())) == 600
    assert API_KEY not in (tmp_path / "c.json").read_text()


def test_a_question_shared_by_pairs_is_asked_once(server, tmp_path):
    j = Judge(cache_path=tmp_path / "c.json")
    pairs = [("p", "a", "bb"), ("p", "a", "bb"), ("q", "a", "bb")]  # a pair twice
    assert j.compare_many(pairs) == ["tie"] * 3  # the fake always answers A: position bias, cancelled to ties
    assert j.requests == len(server.log) == 4  # each new judgement once: 2 pairs x 2 orders
    asked = Counter(replies(body) for _, body, _ in server.log)  # (reply A, reply B) of each request
    assert asked == {("a", "bb"): 2, ("bb", "a"): 2}


def test_identical_replies_are_a_tie_asked_of_no_one(server, tmp_path):
    j = Judge(cache_path=tmp_path / "c.json")
    server.answer = lambda body: "A" if replies(body)[0] == "good" else "B"  # prefers "good" in either place
    pairs = [("p", "good", "bad"), ("q", "same", "same"), ("r", "bad", "good"), ("s", "good", "good")]
    outcomes = j.compare_many(pairs)
    assert outcomes == ["win", "tie", "loss", "tie"]  # "good" against "good" would be a win if it were asked
    assert j.requests == len(server.log) == 4  # 2 pairs x 2 orders: the identical pairs sent nothing
    assert {replies(body) for _, body, _ in server.log} == {("good", "bad"), ("bad", "good")}
    assert j.compare("s", "good", "good") == "tie" and j.requests == 4
    assert len(json.loads((tmp_path / "c.json").read_text())) == 4  # nor cached
    rates = win_rates(outcomes)  # a tie is a pair in the denominator, neither a win nor a loss
    assert rates["n"] == 4 and [rates[o][0] for o in ("win", "tie", "loss")] == [0.25, 0.5, 0.25]


def test_a_429_storm_pauses_the_whole_pool_and_every_pair_is_judged_once(server, tmp_path):
    server.answer, server.delay = by_length, 0.05
    server.statuses = [200] * 10 + [429] * 24  # the storm breaks while the pool's requests are in full flow
    pairs = pairs_of(40)
    j = Judge(cache_path=tmp_path / "c.json", base_delay=0.1)  # Retry-After: 1 is longer, so it rules
    start = time.monotonic()
    assert j.compare_many(pairs) == [expected_outcome(policy, base) for _, policy, base in pairs]
    assert time.monotonic() - start > 1.0  # waited out
    statuses = Counter(status for _, _, status in server.log)
    assert statuses == {200: 80, 429: 24} and j.requests == 104
    answered = server.answered()
    assert len(answered) == 80 and set(answered.values()) == {1}  # every judgement asked, and answered once
    # a 429 holds the whole pool for its Retry-After: besides the requests already under way when it came
    # (the first 0.3 s), no request of any thread arrives until the second is over
    limited = [t for t, _, status in server.log if status == 429]
    arrivals = [t for t, _, _ in server.log]
    assert not [(t, a) for t in limited for a in arrivals if t + 0.3 < a < t + 0.95]


def judge_pairs(cache_path, pairs):
    Judge(cache_path=cache_path).compare_many(pairs)


def test_a_run_killed_midway_and_rerun_sends_only_the_missing_requests(server, tmp_path):
    server.answer, server.delay = by_length, 0.05
    cache, pairs = tmp_path / "c.json", pairs_of(60)
    child = multiprocessing.get_context("fork").Process(target=judge_pairs, args=(cache, pairs))
    child.start()
    deadline = time.monotonic() + 60
    while len(server.log) < 40:  # killed with 40 of 120 answers sent and more in flight
        assert child.is_alive() and time.monotonic() < deadline
        time.sleep(0.005)
    child.kill()
    child.join(timeout=30)
    assert child.exitcode == -9
    saved = json.loads(cache.read_text())  # never torn
    asked_before = len(server.log)
    assert len(saved) < 120 and {v["answer"] for v in saved.values()} <= {"A", "B"}
    # each of the 8 threads has at most one question out (sent, or answered and not yet saved): all others kept
    assert len(saved) >= asked_before - 8

    j = Judge(cache_path=cache)
    assert j.compare_many(pairs) == [expected_outcome(policy, base) for _, policy, base in pairs]
    # only the missing ones, each once: with the saved ones they make the whole, so none was asked twice
    assert j.requests == len(server.log) - asked_before == 120 - len(saved)
    assert len({json.dumps(b) for _, b, _ in server.log[asked_before:]}) == 120 - len(saved)
    assert len(json.loads(cache.read_text())) == 120
    for path in tmp_path.rglob("*"):  # the cache, its lock and a killed write's temporary file, if any
        assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "change, seen",
    [
        ({"model": "another-judge"}, lambda body: body["model"] == "another-judge"),
        ({"system_prompt": "Be strict."}, lambda body: body["messages"][0]["content"] == "Be strict."),
        (
            {"template": judge.USER_TEMPLATE.replace("Better reply", "Which is better")},
            lambda body: body["messages"][1]["content"].endswith("\n\nWhich is better (A or B):"),
        ),
        ({"decoding": {"temperature": 0, "max_tokens": 2}}, lambda body: body["max_tokens"] == 2),
    ],
    ids=["model", "system_prompt", "template", "decoding"],
)
def test_a_changed_question_asks_again_and_the_same_one_does_not(server, tmp_path, change, seen):
    cache = tmp_path / "c.json"
    assert Judge(cache_path=cache).compare_many([("p", "a", "b")]) == ["tie"]
    assert not any(seen(body) for _, body, _ in server.log)
    changed = Judge(cache_path=cache, **change)
    assert changed.compare_many([("p", "a", "b")]) == ["tie"] and changed.requests == 2
    assert all(seen(body) for _, body, _ in server.log[2:])  # the changed question went out
    again = [Judge(cache_path=cache), Judge(cache_path=cache, **change)]
    assert [j.compare_many([("p", "a", "b")]) for j in again] == [["tie"], ["tie"]]
    assert [j.requests for j in again] == [0, 0] and len(server.log) == 4


def test_cache_key_depends_on_every_part_of_the_question():
    question = ["gpt-4o", "system", "template {prompt}", {"temperature": 0, "max_tokens": 1}, "prompt", "a", "b"]
    keys = {cache_key(*question, "policy_first")}
    for i, part in enumerate(question):
        changed = {**part, "max_tokens": 2} if isinstance(part, dict) else part + "x"
        keys.add(cache_key(*question[:i], changed, *question[i + 1 :], "policy_first"))
    keys.add(cache_key(*question, "base_first"))
    assert len(keys) == len(question) + 2 and all(len(k) == 64 for k in keys)
    # the decoding settings are a mapping: their order in it changes nothing
    assert cache_key(*question[:3], {"max_tokens": 1, "temperature": 0}, *question[4:], "policy_first") in keys


def test_an_old_cache_with_old_keys_is_no_hit(server, tmp_path):
    import hashlib

    old_key = hashlib.sha256(json.dumps(["gpt-4o", "p", "a", "b", "policy_first"]).encode("utf-8")).hexdigest()
    cache = tmp_path / "c.json"
    cache.write_text(json.dumps({old_key: {"answer": "B", "raw": "B", "model": "gpt-4o", "order": "policy_first"}}))
    j = Judge(cache_path=cache)
    assert j.judge("p", "a", "b", "policy_first") == "A" and j.requests == 1  # asked: the old "B" is not used
    assert set(json.loads(cache.read_text())) == {old_key, j.key("p", "a", "b", "policy_first")}  # kept, not lost


def test_an_invalid_answer_is_recorded_but_asked_again_on_a_rerun(server, tmp_path):
    cache = tmp_path / "c.json"
    server.queue = [completion("Neither")] * 3
    assert Judge(cache_path=cache, invalid_retries=2).judge("p", "a", "b", "policy_first") == "invalid"
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["answer"] == "invalid" and entry["raw"] == "Neither" and len(server.log) == 3
    rerun = Judge(cache_path=cache)
    assert rerun.judge("p", "a", "b", "policy_first") == "A" and rerun.requests == 1
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["answer"] == "A" and entry["raw"] == "A"


def test_a_newer_model_refusing_max_tokens_and_temperature_0_is_switched_once(server, tmp_path, capsys):
    server.refused = {"max_tokens", "temperature"}
    j = Judge(model="new-model", cache_path=tmp_path / "c.json")
    assert j.judge("p", "a", "b", "policy_first") == "A" and j.requests == 3  # refused twice, then answered
    said = capsys.readouterr().out.splitlines()
    assert said == [
        "judge: new-model refused a setting (" + REFUSALS["max_tokens"]["message"] + "); sending "
        "max_completion_tokens=1 instead of max_tokens from now on",
        "judge: new-model refused a setting (" + REFUSALS["temperature"]["message"] + "); sending no temperature "
        "(the model's default) instead of 0 from now on",
    ]
    body = server.log[-1][1]
    assert body["max_completion_tokens"] == 1 and "max_tokens" not in body and "temperature" not in body
    assert j.judge("p", "a", "c", "policy_first") == "A" and j.requests == 4  # the accepted form from now on
    entries = json.loads((tmp_path / "c.json").read_text()).values()
    assert [e["sent"] for e in entries] == [{"max_completion_tokens": 1}] * 2  # what was really asked

    # the same with the pool: the requests already out when the first refusal came go again in the new form
    server.answer = by_length
    many = Judge(model="new-model", cache_path=tmp_path / "many.json")
    pairs = pairs_of(20)
    assert many.compare_many(pairs) == [expected_outcome(policy, base) for _, policy, base in pairs]
    assert len(capsys.readouterr().out.splitlines()) == 2  # each switch said once
    new = server.log[5:]
    answered = [b for _, b, status in new if status == 200]
    assert len(answered) == 40 and set(server.answered().values()) == {1}
    assert all(b.get("max_completion_tokens") == 1 and "temperature" not in b for b in answered)
    assert len(new) - 40 <= 2 * many.concurrency  # at most one refusal per request in flight, per setting


def test_a_400_about_anything_else_stops_at_once(server, tmp_path):
    server.refused = {"messages"}
    j = Judge(cache_path=tmp_path / "c.json")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        j.compare_many([("p", "a", "b")])
    assert len(server.log) <= 2 and not (tmp_path / "c.json").exists()  # one request per order, no retry


def test_the_concurrency_is_at_least_one():
    with pytest.raises(ValueError, match="judge: the concurrency must be at least 1, got 0"):
        Judge(concurrency=0, client=object())


# --- the length-controlled win rate and two judges' agreement ---------------------------------


def logistic_fit(wins, diffs, steps=50):
    """An independent logistic regression: Newton's method on the log-likelihood, intercept and slope."""
    x = np.column_stack([np.ones_like(diffs), diffs])
    beta = np.zeros(2)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ beta))
        beta += np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]), x.T @ (wins - p))
    return beta


def test_the_length_controlled_rate_is_the_fitted_rate_at_equal_length():
    rng = np.random.default_rng(1)
    diffs = rng.normal(30, 60, 200)
    wins = rng.random(200) < 1 / (1 + np.exp(-(0.4 + diffs / 50)))
    outcomes = np.where(wins, "win", np.where(rng.random(200) < 0.5, "tie", "loss")).tolist()
    intercept, _ = logistic_fit(wins.astype(float), diffs)
    rate, low, high = length_controlled_win_rate(outcomes + ["invalid"], [*diffs, 1e6], samples=200)
    assert rate == pytest.approx(1 / (1 + math.exp(-intercept)), abs=1e-6)  # the invalid pair left out
    assert low < rate < high


def test_where_length_explains_the_wins_the_controlled_rate_is_a_half():
    rng = np.random.default_rng(0)
    diffs = rng.normal(100, 100, 1000)  # the policy mostly writes longer (characters)
    outcomes = np.where(rng.random(1000) < 1 / (1 + np.exp(-diffs / 40)), "win", "loss").tolist()
    raw = win_rates(outcomes)["win"][0]
    rate, low, high = length_controlled_win_rate(outcomes, diffs, samples=300)
    assert raw > 0.75 and abs(rate - 0.5) < 0.05 and low < 0.5 < high < raw


def test_where_length_is_irrelevant_the_two_rates_agree():
    rng = np.random.default_rng(0)
    diffs = rng.normal(80, 100, 1000)
    outcomes = rng.choice(["win", "tie", "loss"], 1000, p=[0.35, 0.3, 0.35]).tolist()
    raw = win_rates(outcomes)["win"][0]
    rate, low, high = length_controlled_win_rate(outcomes, diffs, samples=300)
    assert abs(rate - raw) < 0.03 and low < raw < high


def test_the_length_controlled_rate_where_it_cannot_be_fitted():
    assert length_controlled_win_rate(["tie"] * 5, [0] * 5) == (0.0, 0.0, 0.0)  # identical replies: no wins
    assert length_controlled_win_rate(["win", "loss", "win"], [0, 0, 0])[0] == 2 / 3  # all as long: the raw rate
    # length alone separates wins from the rest: no finite fit, no rate at equal length
    assert all(math.isnan(x) for x in length_controlled_win_rate(["win", "win", "loss", "tie"], [5, 3, 3, -1]))
    assert all(math.isnan(x) for x in length_controlled_win_rate(["win", "loss"], [4, 4]))  # one length only
    assert all(math.isnan(x) for x in length_controlled_win_rate(["invalid"], [1]))


def test_agreement_and_cohens_kappa_against_hand_values():
    a = ["win", "win", "win", "tie", "tie", "loss", "loss", "win", "invalid"]
    b = ["win", "win", "tie", "tie", "loss", "loss", "win", "win", "win"]
    # 8 valid pairs, 5 agree: p_o = 5/8; margins a (4, 2, 2), b (4, 2, 2) of 8: p_e = (16 + 4 + 4) / 64 = 3/8
    result = agreement(a, b)
    assert result["pairs"] == 8 and result["agreement"] == 5 / 8
    assert result["kappa"] == pytest.approx((5 / 8 - 3 / 8) / (1 - 3 / 8))
    assert agreement(a, a)["kappa"] == pytest.approx(1.0)
    always_tie = agreement(["tie"] * 4, ["tie"] * 4)  # chance agrees on every pair: kappa undefined
    assert always_tie["agreement"] == 1.0 and math.isnan(always_tie["kappa"])
    assert agreement(["win", "tie"], ["tie"] * 2)["kappa"] == 0.0  # one judge constant: no agreement beyond chance
    assert agreement(["invalid"], ["win"])["pairs"] == 0
