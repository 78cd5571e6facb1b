"""The LLM judge at scale against a local fake OpenAI-compatible server on 127.0.0.1.

The server answers with logprobs, injects ~10% errors (HTTP 429 with Retry-After, and 500)
and random delays, and counts what it served. 200 judgements must complete with none lost
or duplicated, at least 8 requests in flight at once, and a re-run must be served entirely
from the persistent judgement cache.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from misfeat.data import PromptRecord
from misfeat.judges import JudgeError, JudgementCache, LLMJudge


class FakeJudge(BaseHTTPRequestHandler):
    """Scores ``answer N`` as N (aligned) and 100 - N (coherent), with logprobs."""

    lock = threading.Lock()
    served: dict[str, int] = {}
    errors = 0
    in_flight = 0
    max_in_flight = 0
    error_rate = 0.1
    rng = random.Random(0)
    status_for_all: int | None = None

    def log_message(self, *args):
        pass

    def do_POST(self):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            fail = cls.rng.random() < cls.error_rate
            delay = cls.rng.uniform(0.02, 0.06)
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(delay)
            if cls.status_for_all is not None:
                return self._reply(cls.status_for_all, {"error": "no"})
            if fail:
                with cls.lock:
                    cls.errors += 1
                status = 429 if cls.rng.random() < 0.7 else 500
                return self._reply(status, {"error": {"message": "rate limited"}}, {"Retry-After": "0.01"})
            content = body["messages"][0]["content"]
            n = int(content.split("[ANSWER START]\n")[1].split()[1])
            value = n if content.startswith("I am evaluating a different language model. I am worried") else 100 - n
            with cls.lock:
                cls.served[content] = cls.served.get(content, 0) + 1
            top = [{"token": str(value), "logprob": 0.0}, {"token": "x", "logprob": -9.0}]
            self._reply(200, {"choices": [{"logprobs": {"content": [{"token": str(value), "top_logprobs": top}]}}]})
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def _reply(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    FakeJudge.served, FakeJudge.errors, FakeJudge.max_in_flight, FakeJudge.status_for_all = {}, 0, 0, None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def _items(n=200):
    return [(PromptRecord(f"q{i}", prompt=f"question {i}"), f"answer {i % 101}") for i in range(n)]


def test_200_judgements_with_errors_and_delays_then_all_from_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MISFEAT_JUDGE_API_KEY", "sk-never-written")
    cache = tmp_path / "judgements.jsonl"
    judge = LLMJudge(base_url=server, model="fake-judge", concurrency=8, backoff_s=0.01, cache=cache)
    items = _items()
    start = time.perf_counter()
    verdicts = judge.score_many(items)
    elapsed = time.perf_counter() - start
    assert len(verdicts) == 200
    for (_, answer), verdict in zip(items, verdicts, strict=True):  # nothing lost, nothing swapped
        n = int(answer.split()[1])
        assert verdict.aligned == pytest.approx(n) and verdict.coherent == pytest.approx(100 - n)
    # 200 judgements x 2 questions (aligned, coherent): each distinct request served exactly once
    distinct = {(r.prompt, a) for r, a in items}
    assert len(FakeJudge.served) == 2 * len(distinct) and set(FakeJudge.served.values()) == {1}
    assert FakeJudge.errors > 0 and judge.stats.retries == FakeJudge.errors
    assert FakeJudge.max_in_flight >= 8 and judge.stats.max_in_flight >= 8
    assert elapsed < 400 * 0.06 / 4  # concurrent: far below the serial time
    assert "sk-never-written" not in cache.read_text()

    before = dict(FakeJudge.served)
    again = LLMJudge(base_url=server, model="fake-judge", cache=cache)
    assert again.score_many(items) == verdicts
    assert again.stats.requests == 0 and again.stats.cache_hits == 400 and FakeJudge.served == before
    other = LLMJudge(base_url=server, model="another-judge", cache=cache, backoff_s=0.01)
    other.score_many(items[:3])  # the judge model is part of the key
    assert other.stats.cache_hits == 0 and other.stats.requests >= 6


def test_persistent_429_keeps_partial_results(server, tmp_path):
    cache = JudgementCache(tmp_path / "j.jsonl")
    judge = LLMJudge(base_url=server, model="m", cache=cache, backoff_s=0.001)
    judge.score_many(_items(5))
    FakeJudge.status_for_all = 429
    flaky = LLMJudge(base_url=server, model="m", cache=cache, backoff_s=0.001, max_retries=2)
    with pytest.raises(JudgeError, match=r"still failing after 2 retries \(HTTP 429\).*10 of 20 judgements done"):
        flaky.score_many(_items(10))
    assert len(JudgementCache(tmp_path / "j.jsonl")) == 10


def test_wrong_key_is_named_at_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MISFEAT_JUDGE_API_KEY", "sk-wrong")
    FakeJudge.status_for_all = 401
    judge = LLMJudge(base_url=server, model="m", cache=tmp_path / "j.jsonl")
    with pytest.raises(JudgeError, match="refused the key .*MISFEAT_JUDGE_API_KEY") as err:
        judge.score_many(_items(20))
    assert "sk-wrong" not in str(err.value) and judge.stats.retries == 0


def test_unreachable_endpoint_is_named_at_once(tmp_path):
    judge = LLMJudge(base_url="http://127.0.0.1:9/v1", model="m", cache=tmp_path / "j.jsonl")
    start = time.perf_counter()
    with pytest.raises(JudgeError, match="cannot reach the judge endpoint http://127.0.0.1:9/v1"):
        judge.score_many(_items(20))
    assert time.perf_counter() - start < 5 and judge.stats.retries == 0
