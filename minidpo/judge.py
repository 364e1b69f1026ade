"""Pairwise judging of two models' answers in MT-Bench's protocol: questions -> verdicts -> table.

A judge is a plain callable `judge(messages) -> str`: it receives a chat, a list of
`{"role": "system"|"user", "content": str}` dicts (the instructions, then the question and the two
answers between MT-Bench's markers), and returns the judge's reply text, which must end with a verdict
`[[A]]`, `[[B]]` or `[[C]]` (tie). A judge that also takes `temperature=` can be re-asked with a
sampled request. `openai_judge` and `local_judge` build such callables; any Python function will do
(a verifier can read the turns and answers back with `read_judge_prompt`).

Protocol. Each question turn is judged twice, model A's answer shown first ("AB") and model B's
first ("BA"). A side wins the question turn only when both orders pick it; a tie in either order
or a disagreement is a tie; an error in either order makes the question turn an error, counted and
reported, never folded into ties. Prompts come from a prompt set (`minidpo.judge_prompts`: the
built-in one, or FastChat's `judge_prompts.jsonl`); math, reasoning and coding questions are shown
with their reference answers when they have them.

Errors are data. A request that fails for good (HTTP 400 at once; 429, 5xx, timeouts and dropped
connections after backoff) is written as an error record of its kind and asked again on the next
run. A reply without a verdict is recorded as `no_verdict`; it is re-asked only with a request
that differs (`max_reasks` sampled re-asks, none by default, as in FastChat), and a rerun does not
repeat the identical request unless `retry_errors`. The run stops at once only for what no request
can survive: a rejected key (401/403), an unknown model or URL (404), a judge whose first
`give_up_after` replies hold no verdict, or `give_up_after` requests in a row failing through all
their retries (the judge is down).

Files and resume. Every record is appended to `OUT/judgments.jsonl` as it arrives (flushed and
fsynced), so a crash loses at most the line being written. A record is keyed by the question, the
turn, the order, the judge and the SHA-256 of the exact request (which holds the two answers, the
prompt set and the references): a rerun asks only for keys without a verdict, and regenerated
answers are judged again while unchanged ones are not. `OUT/summary.json` holds wins, ties, losses
and errors of A against B per question turn, the error kinds per request, the win rates and a
bootstrap interval over questions, overall, per category and per turn, and the prompt set and
references used (name and digest).
"""
import argparse
import email.utils
import hashlib
import http.client
import inspect
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from minidpo.files import parse_jsonl, write_json
from minidpo.judge_prompts import load_prompts
from minidpo.questions import (REFERENCE_CATEGORIES, Answer, Question, as_questions, check_unique, load_answers,
                               load_questions, parse_answer)

ORDERS = ("AB", "BA")  # AB: model A's answer shown as assistant A; BA: model B's answer shown as A
JUDGMENTS_FILE = "judgments.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


class JudgeError(RuntimeError):
    """A failure no request can survive (rejected key, unknown model or URL, a judge that gives no
    verdicts): the run stops at once, keeping every record received."""


class JudgeUnavailable(JudgeError):
    """The judge stayed unreachable: many requests in a row failed through all their retries."""


class RequestFailed(Exception):
    """One judge request failed for good, after the retries that fit its error: recorded as an error
    of `kind` (`http_400`, `http_503`, `timeout`, `connection`, `bad_reply`) and asked again on the
    next run. `transient`: it was retried (the judge may be down), rather than refused."""

    def __init__(self, kind, message, transient=False):
        super().__init__(message)
        self.kind, self.transient, self.asks = kind, transient, 0


# ---------------------------------------------------------------------------------------------------
# Prompts.

def _reference_for(question, turn):
    """The reference answers to show for `turn`, or None (only some categories use them)."""
    ref = question.reference
    if question.category in REFERENCE_CATEGORIES and ref is not None and len(ref) >= turn:
        return ref
    return None


def build_messages(question, turn, first, second, prompts=None):
    """The judge's chat for one question `turn` (1 or 2): `first`/`second` are the answer turns of the
    assistants shown as A and B; `prompts` a prompt set or FastChat file (None: the built-in set).
    Returns `[{"role": "system", ...}, {"role": "user", ...}]`."""
    if turn not in (1, 2) or turn > len(question.turns):
        raise ValueError(f"question {question.question_id!r} has no turn {turn}")
    return load_prompts(prompts).messages(turn, question.turns, first, second, _reference_for(question, turn))


_TURN_1 = r"\[The Start of Assistant {0}'s Answer\]\n(.*?)\n\[The End of Assistant {0}'s Answer\]"
_TURN_1_QUESTION = r"\[User Question\]\n(.*?)\n\n\[The Start of "
# Turn 2: the judged reply is the last before the end marker; the first reply runs greedily to the last
# follow-up header, so a reply that itself prints '### User:' stays whole.
_TURN_2 = (r"<\|The Start of Assistant {0}'s Conversation with User\|>\n\n### User:\n(.*?)\n\n### Assistant {0}:\n"
           r"(.*)\n\n### User:\n(.*?)\n\n### Assistant {0}:\n(.*?)\n\n<\|The End of Assistant {0}'s "
           r"Conversation with User\|>")


def read_judge_prompt(messages):
    """A pairwise judge chat (MT-Bench's markers, as `build_messages` and FastChat's prompt files write
    them) -> `(user turns up to the judged one, A's replies, B's replies)`: for turn 2 each assistant's
    own first reply, then the judged one. `messages` is the chat or the text of its last message. For
    verifier judges and tests."""
    text = messages if isinstance(messages, str) else messages[-1]["content"]
    if "<|The Start of Assistant A's Conversation with User|>" in text:
        found = [re.search(_TURN_2.format(name), text, re.DOTALL) for name in "AB"]
        if not all(found):
            raise ValueError("not a pairwise judge prompt: conversation markers not found")
        (q1, a1, q2, a2), (_, b1, _, b2) = (m.groups() for m in found)
        return [q1, q2], [a1, a2], [b1, b2]
    found = [re.search(_TURN_1.format(name), text, re.DOTALL) for name in "AB"]
    question = re.search(_TURN_1_QUESTION, text, re.DOTALL)
    if not all(found) or question is None:
        raise ValueError("not a pairwise judge prompt: answer markers not found")
    return [question.group(1)], [found[0].group(1)], [found[1].group(1)]


def answers_in_prompt(messages):
    """The two judged answers of a pairwise judge chat: `(shown as A, shown as B)`."""
    _, replies_a, replies_b = read_judge_prompt(messages)
    return replies_a[-1], replies_b[-1]


def parse_verdict(text):
    """'A', 'B' or 'C' from the last `[[X]]` in the reply (the final verdict follows the reasoning,
    which may quote the format), or None when there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------
# Backends: callables `messages -> reply text`.

class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, kind, message, retry_after=None):
        super().__init__(message)
        self.kind, self.retry_after = kind, retry_after


def _redact(text, key):
    """`text` without the API key (a server may echo it in an error body), cut to a readable length."""
    text = str(text)
    if key:
        text = text.replace(key, "***")
    return text[:300]


def _retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _reply_text(raw, key):
    """`choices[0].message.content` of an OpenAI chat-completions response body."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        # proxies answer 200 with an HTML page when the upstream hiccups: worth another try
        raise _Transient("bad_reply", f"malformed reply ({type(e).__name__}): {_redact(raw[:200], key)}") from None
    return content if isinstance(content, str) else ""  # no text: no verdict


def _error_body(error):
    """The body of an HTTP error response, or '' when the connection broke while reading it."""
    try:
        return error.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        error.close()


def _http_error(e, url, model, key):
    """What an HTTP error status means for the run: retry, record this request, or stop."""
    detail = f"HTTP {e.code}: {_redact(_error_body(e), key)}"
    if e.code in (408, 409, 425, 429) or e.code >= 500:
        return _Transient(f"http_{e.code}", detail, _retry_after(e.headers.get("Retry-After") if e.headers else None))
    if e.code in (401, 403):
        return JudgeError(f"judge at {url} rejected the API key: {detail} (set OPENAI_API_KEY to a key "
                          f"valid for this endpoint)")
    if e.code in (404, 405):
        return JudgeError(f"judge at {url}: {detail} (is the model {model!r} served there? --judge-base-url "
                          f"is the API root, e.g. http://localhost:8000/v1)")
    return RequestFailed(f"http_{e.code}", detail)  # 400 (context too long, ...), 413, 422: this request only


def _post_chat(url, body, key, timeout, model):
    """One POST to the chat-completions endpoint; raises _Transient for what a retry may cure."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        raise _http_error(e, url, model, key) from None
    except urllib.error.URLError as e:  # connection refused, DNS, timeout while connecting
        kind = "timeout" if isinstance(e.reason, TimeoutError) else "connection"
        raise _Transient(kind, f"connection failed: {_redact(e.reason, key)}") from None
    except (OSError, http.client.HTTPException) as e:  # read timeout, dropped connection, cut body
        kind = "timeout" if isinstance(e, TimeoutError) else "connection"
        raise _Transient(kind, f"{type(e).__name__}: {_redact(e, key)}") from None
    return _reply_text(raw, key)


class _Throttle:
    """What every thread of one judge shares: a pause (a 429's or 503's Retry-After, or the backoff)
    and a limit on requests in flight, halved when the server pushes back and raised by one after
    four times as many answers. N workers so settle at what the server takes, instead of each
    hammering on alone or all of them firing again together when a pause ends."""

    def __init__(self, sleep, clock):
        self.sleep, self.clock, self.cond = sleep, clock, threading.Condition()
        self.until, self.limit, self.in_flight, self.answered = 0.0, float("inf"), 0, 0

    def __enter__(self):
        with self.cond:
            delay = self.until - self.clock()
        if delay > 0:
            self.sleep(delay)
        with self.cond:
            while self.in_flight >= self.limit:
                self.cond.wait()
            self.in_flight += 1

    def __exit__(self, *exc):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify()

    def answered_ok(self):
        with self.cond:
            self.answered += 1
            if self.answered >= 4 * self.limit:  # probe upwards slowly: each 429 pauses everyone
                self.limit, self.answered = self.limit + 1, 0
                self.cond.notify()

    def push_back(self, seconds):
        with self.cond:
            if self.clock() >= self.until:  # once per pause: a burst of 429s is one signal
                self.limit, self.answered = max(1, min(self.limit, self.in_flight + 1) // 2), 0
            self.until = max(self.until, self.clock() + seconds)


def openai_judge(model, base_url=DEFAULT_BASE_URL, *, api_key=None, timeout=120.0, max_retries=6,
                 backoff=1.0, max_backoff=60.0, max_tokens=2048, sleep=time.sleep, clock=time.monotonic):
    """A judge speaking OpenAI's `POST {base_url}/chat/completions` (OpenAI, vLLM, llama.cpp, Ollama).

    Greedy (temperature 0) unless called with `temperature=`. HTTP 408/429/5xx, timeouts, refused or
    dropped connections and malformed replies are retried up to `max_retries` times, waiting the
    server's `Retry-After` when given and `backoff * 2**attempt` seconds (at most `max_backoff`)
    otherwise, through `sleep` and `clock` (injectable for tests); a 429 or 503 pauses every thread
    using this judge and halves the requests they keep in flight (raised again as answers come).
    Then, and at once for other 4xx, `RequestFailed`; 401/403/404 raise `JudgeError`. The key comes
    from `api_key` or `OPENAI_API_KEY` (none: no Authorization header) and appears in no message.
    """
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    url = base_url.rstrip("/") + "/chat/completions"
    throttle = _Throttle(sleep, clock)

    def ask(messages, temperature=0.0):
        body = json.dumps({"model": model, "messages": messages, "temperature": temperature,
                           "max_tokens": max_tokens}).encode("utf-8")
        for attempt in range(max_retries + 1):
            with throttle:
                try:
                    text = _post_chat(url, body, key, timeout, model)
                except _Transient as e:
                    last = e
                else:
                    throttle.answered_ok()
                    return text
            wait = last.retry_after if last.retry_after is not None else min(max_backoff, backoff * 2 ** attempt)
            if last.kind in ("http_429", "http_503"):
                throttle.push_back(wait)  # the next request of every thread waits it out
            elif attempt < max_retries:
                sleep(wait)
        raise RequestFailed(last.kind, f"judge at {url}: {max_retries + 1} attempt(s) failed; last: {last}",
                            transient=True)

    ask.judge_name = f"openai:{model}"
    return ask


def local_judge(model_path, *, max_new_tokens=1024, device="cpu", dtype=None):
    """A minidpo model as the judge, through `minidpo.generate.chat_reply` (greedy unless called with
    `temperature=`); the model is loaded at the first call. Calls are serialised (one model)."""
    loaded, lock = {}, threading.Lock()

    def ask(messages, temperature=0.0):
        import torch

        from minidpo.generate import chat_reply
        with lock, torch.no_grad():
            if not loaded:
                from minidpo.checkpoint import load_model
                from minidpo.tokenizer import load_tokenizer
                loaded["model"] = load_model(model_path, dtype=dtype, device=device).eval()
                loaded["tokenizer"] = load_tokenizer(model_path)
            return chat_reply(loaded["model"], loaded["tokenizer"], messages,
                              max_new_tokens=max_new_tokens, temperature=temperature)

    ask.judge_name = f"local:{model_path}"
    return ask


# ---------------------------------------------------------------------------------------------------
# The log: one JSON record per judge request, appended as they arrive; the latest record of a key wins.

_RECORD_KEYS = ("question_id", "turn", "order", "winner", "model_a", "model_b")


def read_judgments(path):
    """`(line number, record)` of a judgments file, oldest first. A last line without its newline was
    cut by a crash and is ignored (that request is asked again); any other bad line raises ValueError."""
    path = Path(path)
    if not path.exists():
        return []
    complete = path.read_bytes().rpartition(b"\n")[0]
    records = []
    for lineno, record in parse_jsonl(complete, path):
        if any(k not in record for k in _RECORD_KEYS):
            raise ValueError(f"{path}:{lineno}: not a judgment record (needs {', '.join(_RECORD_KEYS)})")
        records.append((lineno, record))
    return records


def _drop_partial_line(path):
    """Cut a crash's half-written last line so that new records start on a line of their own."""
    if path.exists() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


def _append(handle, record):
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())  # a verdict paid for is on disk before the next is asked


def _record_key(r):
    return (r["question_id"], r["turn"], r["order"], r.get("judge"), r.get("request_sha256"))


def _latest(path, names, keys):
    """`{key: latest record}` for the keys of this run. Records of other keys (other answers, judge
    or prompts) stay in the log unused; a log comparing other models is refused."""
    latest = {}
    for lineno, r in read_judgments(path):
        if (r["model_a"], r["model_b"]) != (names["model_a"], names["model_b"]):
            raise ValueError(f"{path}:{lineno}: judges {r['model_a']!r} vs {r['model_b']!r}, not "
                             f"{names['model_a']!r} vs {names['model_b']!r}; use another output folder")
        if _record_key(r) in keys:
            latest[_record_key(r)] = r
    return latest


def _settled(record, max_asks, retry_errors):
    """Whether a unit's latest record stands: a verdict, or a reply without one that no allowed
    request could change (another identical greedy request would get the same reply)."""
    if record["winner"] != "error":
        return True
    return record.get("error") == "no_verdict" and not retry_errors and record.get("asks", 1) >= max_asks


# ---------------------------------------------------------------------------------------------------
# Judging.

def _sha256(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Unit:
    """One judge request: a question turn in one order, and the digests that key it."""
    question: Question
    turn: int
    order: str
    messages: list
    answer_sha256: dict  # model_a / model_b -> digest of that model's answer turns shown
    judge: str
    request_sha256: str

    @property
    def key(self):
        return (self.question.question_id, self.turn, self.order, self.judge, self.request_sha256)


def _units(questions, answers_a, answers_b, prompt_set, judge):
    for q in questions:
        a, b = answers_a[q.question_id].turns, answers_b[q.question_id].turns
        for turn in range(1, len(q.turns) + 1):
            digests = {"model_a": _sha256(a[:turn]), "model_b": _sha256(b[:turn])}
            for order in ORDERS:
                first, second = (a, b) if order == "AB" else (b, a)
                messages = build_messages(q, turn, first, second, prompt_set)
                yield _Unit(q, turn, order, messages, digests, judge, _sha256(messages))


def _can_sample(judge):
    try:
        return "temperature" in inspect.signature(judge).parameters
    except (TypeError, ValueError):
        return False


def _ask(judge, messages, asks, max_asks, temperature):
    """Ask until the reply holds a verdict, at most `max_asks` asks in all: the first greedy, re-asks
    sampled at `temperature`. Returns (verdict|None, reply, asks made so far)."""
    text = None
    while asks < max_asks:
        chat = [dict(m) for m in messages]
        try:
            text = judge(chat) if asks == 0 else judge(chat, temperature=temperature)
        except RequestFailed as e:
            e.asks = asks  # replies already had, so that a rerun does not repeat them
            raise
        asks += 1
        if not isinstance(text, str):
            raise TypeError(f"a judge must return a str, got {type(text).__name__}")
        if parse_verdict(text) is not None:
            break
    return parse_verdict(text), text, asks


def _record(unit, names, *, verdict=None, text=None, asks=0, error=None, detail=None):
    """The log line for one unit; `winner` maps the shown position back to the model."""
    if verdict is None:
        winner, error = "error", error or "no_verdict"
    elif verdict == "C":
        winner = "tie"
    else:
        winner = "model_a" if (verdict == "A") == (unit.order == "AB") else "model_b"
    return {"question_id": unit.question.question_id, "category": unit.question.category,
            "turn": unit.turn, "order": unit.order, "verdict": verdict, "winner": winner, "error": error,
            "detail": detail, "model_a": names["model_a"], "model_b": names["model_b"],
            "judge": unit.judge, "prompts": names["prompts"], "request_sha256": unit.request_sha256,
            "answer_sha256": unit.answer_sha256, "asks": asks, "judgment": text, "tstamp": time.time()}


class _Watch:
    """When a run stops at once: its first `n` replies all without a verdict, and none in the log (the
    judge or prompt set cannot work), or `n` requests in a row failing through all their retries (the judge is down).
    Workers report to it as they finish, so the one that decides stops the others taking more."""

    def __init__(self, n, judge, failed, parsed):
        self.n, self.judge, self.failed, self.lock = n, judge, failed, threading.Lock()
        self.replies, self.parsed, self.down, self.stop = 0, parsed, 0, None

    def see(self, record, transient):
        with self.lock:
            self.stop = self.stop or self._verdict(record, transient)
            if self.stop:
                self.failed.set()

    def _verdict(self, record, transient):
        if self.n <= 0:
            return None
        self.down = self.down + 1 if transient else 0
        if self.down >= self.n:
            return JudgeUnavailable(f"{self.n} requests in a row failed through all their retries; the judge "
                                    f"{self.judge} looks down. Last: {record['detail']}")
        if record["error"] in (None, "no_verdict"):
            self.replies += 1
            self.parsed = self.parsed or record["error"] is None
            if self.replies == self.n and not self.parsed:
                return JudgeError(f"the first {self.n} replies of {self.judge} hold no [[A]]/[[B]]/[[C]] verdict "
                                  f"(last: {record['judgment']!r:.200}); is it a chat model that follows the "
                                  f"judge prompt? (--give-up-after 0 judges on anyway)")
        return None


def _error_note(counts):
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))


def _run_units(units, judge, log_path, latest, names, *, workers, max_asks, temperature, give_up_after,
               retry_errors, progress):
    """Ask for every unit with `workers` threads, appending each record to the log as it arrives. When
    the run must stop, records that other workers already received are still written."""
    from tqdm import tqdm

    failed, errors = threading.Event(), Counter()
    # a judge with verdicts in the log can give them: re-asking its hard cases is no reason to stop
    watch = _Watch(give_up_after, names["judge"], failed, any(r["winner"] != "error" for r in latest.values()))

    def work(unit):
        if failed.is_set():  # the run is stopping: do not spend another request
            return None
        prior = latest.get(unit.key)
        fresh = prior is None or (retry_errors and prior.get("error") == "no_verdict")
        try:  # a unit resumes after the asks it already had: a rerun never repeats a greedy request
            verdict, text, asks = _ask(judge, unit.messages, 0 if fresh else prior.get("asks", 0),
                                       max_asks, temperature)
            record, transient = _record(unit, names, verdict=verdict, text=text, asks=asks), False
        except RequestFailed as e:
            record, transient = _record(unit, names, asks=e.asks, error=e.kind, detail=str(e)), e.transient
        except BaseException:
            failed.set()  # set in this thread, before it can take the next unit
            raise
        watch.see(record, transient)
        return record

    with open(log_path, "a", encoding="utf-8") as log, \
            tqdm(total=len(units), desc="judging", unit="request", file=sys.stderr,
                 disable=not progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures, kept = {pool.submit(work, u): u for u in units}, set()

        def keep(future):
            kept.add(future)
            record = future.result()
            if record is not None:
                latest[futures[future].key] = record
                _append(log, record)
                errors.update([record["error"]] if record["error"] else [])
                note = f"errors {sum(errors.values())}" + (f" ({_error_note(errors)})" if errors else "")
                bar.set_postfix_str(note, refresh=False)
                bar.update()

        try:
            for future in as_completed(futures):
                keep(future)
                if watch.stop:
                    raise watch.stop
        except BaseException:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future in futures:
                if future not in kept and future.done() and not future.cancelled() and future.exception() is None:
                    keep(future)
            raise


def _as_answers(answers, side):
    """`{question_id: Answer}` from a path, a dict, or a list of Answer/FastChat records."""
    if isinstance(answers, (str, Path)):
        answers = load_answers(answers)
    elif not isinstance(answers, dict):
        answers = [a if isinstance(a, Answer) else parse_answer(a, f"answers_{side}[{i}]")
                   for i, a in enumerate(answers)]
        check_unique(answers, f"answers {side.upper()}")
        answers = {a.question_id: a for a in answers}
    if not answers:
        raise ValueError(f"answers {side.upper()}: no answers")
    return answers


def _answered(questions, answers_a, answers_b, allow_missing):
    """Questions both sides answered (every turn); missing answers are an error unless allowed."""
    missing = {side: [q.question_id for q in questions if q.question_id not in answers]
               for side, answers in (("A", answers_a), ("B", answers_b))}
    if missing["A"] or missing["B"]:
        message = "; ".join(f"answers {side} lack {len(ids)} question(s): {ids}"
                            for side, ids in missing.items() if ids)
        if not allow_missing:
            raise ValueError(message + " (allow_missing=True / --allow-missing judges the rest)")
        warnings.warn(f"skipping questions without answers: {message}", stacklevel=3)
    skipped = sorted(set(missing["A"]) | set(missing["B"]), key=str)
    kept = [q for q in questions if q.question_id not in skipped]
    for q in kept:
        for answers in (answers_a, answers_b):
            a = answers[q.question_id]
            if len(a.turns) < len(q.turns):
                raise ValueError(f"{a.source or 'answers'}: question {q.question_id!r} has {len(q.turns)} "
                                 f"turn(s), the answer of {a.model_id!r} only {len(a.turns)}")
    return kept, skipped


def judge_pairwise(questions, answers_a, answers_b, judge, out_dir, *, prompts=None, workers=1,
                   max_reasks=0, reask_temperature=0.7, give_up_after=10, allow_missing=False,
                   retry_errors=False, seed=0, n_bootstrap=1000, progress=False, judge_name=None):
    """Judge model A's answers against model B's on every question turn, in both orders; resume from
    `out_dir/judgments.jsonl`, write `out_dir/summary.json` and return the summary dict.

    questions: list of `Question` (or MT-Bench dicts) or a path/"mt-bench" (references come in with
    `load_questions(path, references=FILE)`); answers_a/answers_b: `{question_id: Answer}`, a list of
    FastChat answer dicts, or a path; judge: `messages -> str`; prompts: None (built-in), a FastChat
    `judge_prompts.jsonl` path, "fastchat" (the pinned download) or a `PromptSet`. `max_reasks`:
    re-asks of a reply without a verdict, sampled at `reask_temperature` (0 = none; a judge without a
    `temperature` parameter is never re-asked). `retry_errors` also asks again, from the start, the
    units recorded without a verdict. `give_up_after`: see the module docstring (0 = never stop).
    Raises `JudgeError` when the run must stop, with every record received kept in the log.
    """
    questions = as_questions(questions)
    prompt_set = load_prompts(prompts)
    answers_a, answers_b = _as_answers(answers_a, "a"), _as_answers(answers_b, "b")
    questions, skipped = _answered(questions, answers_a, answers_b, allow_missing)
    names = {"model_a": next(iter(answers_a.values())).model_id,
             "model_b": next(iter(answers_b.values())).model_id,
             "judge": judge_name or getattr(judge, "judge_name", None) or "callable",
             "prompts": prompt_set.sha256}
    _warn_missing_references(questions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / JUDGMENTS_FILE
    units = list(_units(questions, answers_a, answers_b, prompt_set, names["judge"]))
    latest = _latest(log_path, names, {u.key for u in units})
    max_asks = 1 + (max(0, max_reasks) if _can_sample(judge) else 0)
    todo = [u for u in units if u.key not in latest or not _settled(latest[u.key], max_asks, retry_errors)]
    _drop_partial_line(log_path)
    _run_units(todo, judge, log_path, latest, names, workers=workers, max_asks=max_asks,
               temperature=reask_temperature, give_up_after=give_up_after, retry_errors=retry_errors,
               progress=progress)
    summary = summarize(questions, latest.values(), seed=seed, n_bootstrap=n_bootstrap)
    summary.update(model_a=names["model_a"], model_b=names["model_b"], judge=names["judge"],
                   prompts=prompt_set.describe(), references=_references_used(questions),
                   skipped_questions=skipped)
    write_json(out / SUMMARY_FILE, summary)
    return summary


def _warn_missing_references(questions):
    lacking = [q.question_id for q in questions
               if q.category in REFERENCE_CATEGORIES and q.reference is None]
    if lacking:
        warnings.warn(f"{len(lacking)} {'/'.join(REFERENCE_CATEGORIES)} question(s) have no reference "
                      f"answer and are judged without one: {lacking}", stacklevel=3)


def _references_used(questions):
    """Which references the judge saw: how many questions, a digest of their text, their files."""
    shown = [q for q in questions if _reference_for(q, 1) is not None]
    files = dict(sorted({q.reference_source for q in shown if q.reference_source}))
    return {"questions": len(shown), "sha256": _sha256([[q.question_id, list(q.reference)] for q in shown])
            if shown else None, "files": files}




# ---------------------------------------------------------------------------------------------------
# Summary.

OUTCOMES = ("win", "tie", "loss", "error")


def combine_orders(winner_ab, winner_ba):
    """A question turn's outcome for model A from its two verdicts ('model_a'|'model_b'|'tie'|'error')."""
    if "error" in (winner_ab, winner_ba):
        return "error"
    if winner_ab == winner_ba == "model_a":
        return "win"
    if winner_ab == winner_ba == "model_b":
        return "loss"
    return "tie"  # a tie in either order, or the orders disagree (position bias)


def question_turn_outcomes(questions, records):
    """`{(question_id, turn): outcome}` for the question turns judged in both orders."""
    by_key = {(r["question_id"], r["turn"], r["order"]): r for r in records}
    outcomes = {}
    for q in questions:
        for turn in range(1, len(q.turns) + 1):
            ab, ba = by_key.get((q.question_id, turn, "AB")), by_key.get((q.question_id, turn, "BA"))
            if ab is not None and ba is not None:
                outcomes[(q.question_id, turn)] = combine_orders(ab["winner"], ba["winner"])
    return outcomes


def _rates(counts):
    """win rate and adjusted win rate of summed counts `[..., 4]` (win, tie, loss, error)."""
    decided = counts[..., 0] + counts[..., 1] + counts[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts[..., 0] / decided, (counts[..., 0] + counts[..., 1] / 2) / decided


def _bootstrap(per_question, seed, n_bootstrap, level):
    """Percentile interval of both rates, resampling questions with replacement (turns stay together).
    per_question: int array [Q, 4]. Resamples with no decided question turn are left out."""
    if len(per_question) == 0 or n_bootstrap <= 0 or per_question[:, :3].sum() == 0:
        return {"win_rate": None, "adjusted_win_rate": None}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(per_question), size=(n_bootstrap, len(per_question)))
    win, adjusted = _rates(per_question[draws].sum(axis=1).astype(np.float64))
    tails = [50 * (1 - level), 50 * (1 + level)]
    return {"win_rate": [float(x) for x in np.nanpercentile(win, tails)],
            "adjusted_win_rate": [float(x) for x in np.nanpercentile(adjusted, tails)]}


def _slice_stats(groups, seed, n_bootstrap, level):
    """Counts, rates and interval for `{question_id: [outcome per judged turn]}`."""
    per_question = np.array([[outs.count(o) for o in OUTCOMES] for outs in groups.values()],
                            dtype=np.int64).reshape(-1, 4)
    wins, ties, losses, errors = (int(x) for x in per_question.sum(axis=0))
    decided = wins + ties + losses
    win_rate, adjusted = _rates(per_question.sum(axis=0).astype(np.float64))
    return {"questions": len(groups), "question_turns": decided + errors, "wins": wins, "ties": ties,
            "losses": losses, "errors": errors,
            "win_rate": float(win_rate) if decided else None,
            "adjusted_win_rate": float(adjusted) if decided else None,
            "interval": _bootstrap(per_question, seed, n_bootstrap, level)}


def _grouped(outcomes, keep):
    groups = {}
    for (qid, turn), outcome in outcomes.items():
        if keep(qid, turn):
            groups.setdefault(qid, []).append(outcome)
    return groups


def _one(values, what):
    """The single value of a field across records or summaries that may be combined."""
    values = set(values) - {None}
    if len(values) > 1:
        raise ValueError(f"cannot combine results judged with different {what}: {sorted(values)}")
    return next(iter(values), None)


def summarize(questions, records, *, seed=0, n_bootstrap=1000, level=0.95):
    """Wins, ties, losses and errors of model A against B per question turn, `win_rate` =
    W/(W+T+L), `adjusted_win_rate` = (W+T/2)/(W+T+L), and a `level` percentile-bootstrap interval
    over questions (seeded); the same `per_category` and `per_turn`; `error_kinds` counts failed
    requests by kind. Rates are None with W+T+L = 0. Records of different prompt sets or judges
    are refused."""
    questions, records = list(questions), list(records)
    _one((r.get("prompts") for r in records), "prompt sets")
    _one((r.get("judge") for r in records), "judges")
    outcomes = question_turn_outcomes(questions, records)
    category = {q.question_id: q.category for q in questions}
    args = (seed, n_bootstrap, level)
    summary = _slice_stats(_grouped(outcomes, lambda q, t: True), *args)
    summary["pending"] = sum(len(q.turns) for q in questions) - len(outcomes)
    summary["error_kinds"] = dict(sorted(Counter(r.get("error") or "error" for r in records
                                                 if r["winner"] == "error").items()))
    summary["bootstrap"] = {"level": level, "samples": n_bootstrap, "seed": seed, "unit": "question"}
    summary["per_category"] = {c: _slice_stats(_grouped(outcomes, lambda q, t: category[q] == c), *args)
                               for c in dict.fromkeys(q.category for q in questions)}
    turns = sorted({t for _, t in outcomes})
    summary["per_turn"] = {str(t): _slice_stats(_grouped(outcomes, lambda q, u: u == t), *args)
                           for t in turns}
    return summary


def _fmt_rate(x):
    return "n/a" if x is None else f"{x:.3f}"


def _fmt_interval(x):
    return "n/a" if x is None else f"[{x[0]:.3f}, {x[1]:.3f}]"


def _row(name, s):
    return (f"| {name} | {s['questions']} | {s['wins']} | {s['ties']} | {s['losses']} | {s['errors']} "
            f"| {_fmt_rate(s['win_rate'])} | {_fmt_interval(s['interval']['win_rate'])} "
            f"| {_fmt_rate(s['adjusted_win_rate'])} | {_fmt_interval(s['interval']['adjusted_win_rate'])} |")


def markdown_table(summary):
    """A summary as a Markdown table: overall, per turn, per category, then the failed requests by
    kind. Given a list of summaries: one row per comparison, refusing summaries judged by different
    judges or prompt sets (their numbers are not comparable)."""
    many = isinstance(summary, (list, tuple))
    summaries = list(summary) if many else [summary]
    judge = _one((s.get("judge") for s in summaries), "judges")
    prompts = _one(((s.get("prompts") or {}).get("sha256") for s in summaries), "prompt sets")
    name = next((s["prompts"]["name"] for s in summaries if s.get("prompts")), None)
    level = round(100 * summaries[0].get("bootstrap", {}).get("level", 0.95))
    head = f"judge: {judge or 'callable'}" + (f", prompts: {name} ({prompts[:12]})" if prompts else "")
    lines = [head if many else f"**{summary.get('model_a', 'A')}** vs **{summary.get('model_b', 'B')}** ({head})",
             "", f"| {'comparison' if many else 'slice'} | questions | wins | ties | losses | errors | win rate "
             f"| {level}% CI | adjusted win rate | {level}% CI |", "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    if many:
        lines += [_row(f"{s.get('model_a', 'A')} vs {s.get('model_b', 'B')}", s) for s in summaries]
        return "\n".join(lines)
    rows = [("all", summary)] + [(f"turn {t}", s) for t, s in summary.get("per_turn", {}).items()] \
        + list(summary.get("per_category", {}).items())
    lines += [_row(n, s) for n, s in rows]
    if summary.get("error_kinds"):
        lines += ["", f"Requests without a verdict, by kind: {_error_note(summary['error_kinds'])}."]
    if summary.get("pending"):
        lines += ["", f"{summary['pending']} question turn(s) not judged in both orders yet."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line.

def build_parser(command="judge"):
    p = argparse.ArgumentParser(prog=f"python -m minidpo {command}",
                                description="Judge model A's answers against model B's, MT-Bench pairwise.")
    p.add_argument("--questions", required=True, help="questions JSONL, or 'mt-bench' (80 from the hub)")
    p.add_argument("--references", help="reference answers for math/reasoning/coding: FastChat answers "
                                        "JSONL, or 'fastchat' (reference_answer/gpt-4.jsonl, pinned)")
    p.add_argument("--judge-prompts", help="FastChat-format judge_prompts.jsonl, or 'fastchat' (the pinned "
                                           "file; default: the built-in prompts)")
    p.add_argument("--answers-a", required=True, help="model A's answers (FastChat format)")
    p.add_argument("--answers-b", required=True, help="model B's answers (FastChat format)")
    p.add_argument("--judge", choices=("openai", "local"), default="openai")
    p.add_argument("--judge-model", required=True, help="model name at the endpoint, or a minidpo model path")
    p.add_argument("--judge-base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible API root")
    p.add_argument("--out", required=True, help="folder for judgments.jsonl and summary.json")
    p.add_argument("--workers", type=int, default=1, help="concurrent judge requests")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--max-retries", type=int, default=6, help="retries of a request that failed (429, 5xx, ...)")
    p.add_argument("--retry-backoff", type=float, default=1.0, help="first retry wait in seconds, doubling")
    p.add_argument("--max-tokens", type=int, default=2048, help="longest judge reply")
    p.add_argument("--max-reasks", type=int, default=0, help="re-asks of a reply without a verdict, sampled")
    p.add_argument("--reask-temperature", type=float, default=0.7, help="temperature of those re-asks")
    p.add_argument("--give-up-after", type=int, default=10,
                   help="stop when the first N replies hold no verdict, or N requests in a row fail (0: never)")
    p.add_argument("--retry-errors", action="store_true",
                   help="also repeat the request of units whose reply held no verdict")
    p.add_argument("--allow-missing", action="store_true", help="skip questions lacking an answer")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _make_judge(args):
    if args.judge == "local":
        return local_judge(args.judge_model, max_new_tokens=args.max_tokens)
    return openai_judge(args.judge_model, args.judge_base_url, timeout=args.timeout,
                        max_retries=args.max_retries, backoff=args.retry_backoff, max_tokens=args.max_tokens)


def cli(argv, command="judge"):
    """`python -m minidpo judge ...`: prints the Markdown table; exit 0 (failed requests, if any, are
    listed and asked again by a rerun), 1 when the run had to stop (records kept), 2 on bad input."""
    args = build_parser(command).parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    log_path = Path(args.out) / JUDGMENTS_FILE
    try:
        questions = load_questions(args.questions, references=args.references)
        summary = judge_pairwise(questions, load_answers(args.answers_a), load_answers(args.answers_b),
                                 _make_judge(args), args.out, prompts=args.judge_prompts, workers=args.workers,
                                 max_reasks=args.max_reasks, reask_temperature=args.reask_temperature,
                                 give_up_after=args.give_up_after, allow_missing=args.allow_missing,
                                 retry_errors=args.retry_errors, seed=args.seed,
                                 n_bootstrap=args.bootstrap, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeError as e:
        print(f"error: {e}\n{len(read_judgments(log_path))} record(s) kept in {log_path}; once the cause is "
              f"fixed, the same command asks only for what is missing.", file=sys.stderr)
        return 1
    print(markdown_table(summary))
    failed = {k: n for k, n in summary["error_kinds"].items() if k != "no_verdict"}
    if failed:
        print(f"warning: {sum(failed.values())} request(s) failed ({_error_note(failed)}); run the same "
              f"command again to ask for them again (see {log_path})", file=sys.stderr)
    unparsed = summary["error_kinds"].get("no_verdict", 0)
    if unparsed:
        print(f"warning: {unparsed} judge repl{'y' if unparsed == 1 else 'ies'} held no verdict and count as "
              f"errors (--max-reasks N re-asks with a sampled temperature)", file=sys.stderr)
    print(f"wrote {Path(args.out) / SUMMARY_FILE}", file=sys.stderr)
    return 0
