"""Pairwise judging of two models' answers in MT-Bench's protocol: questions -> verdicts -> table.

A judge is a plain callable `judge(messages) -> str`: it receives a chat, a list of
`{"role": "system"|"user", "content": str}` dicts (the instructions, then the question and the two
answers between MT-Bench's markers), and returns the judge's reply text, which must end with a verdict
`[[A]]`, `[[B]]` or `[[C]]` (tie). `openai_judge` and `local_judge` build such callables; any Python
function will do (a verifier can read the two answers back with `answers_in_prompt`).

Protocol. Each question turn is judged twice, model A's answer shown first ("AB") and model B's
first ("BA"). A side wins the question turn only when both orders pick it; a tie in either order
or a disagreement is a tie. A reply with no verdict is asked again (`max_reasks` times), then
recorded as an error; an error in either order makes the question turn an error, which is counted
and reported, never folded into ties. Math, reasoning and coding prompts show the reference answer
when the question has one.

Files. Every verdict is appended to `OUT/judgments.jsonl` as it arrives (flushed and fsynced), so a
crash loses at most the line being written and a rerun asks only for the missing verdicts.
`OUT/summary.json` holds wins, ties, losses and errors of A against B per question turn, the win
rates and a bootstrap interval over questions, overall, per category and per turn.

Missing answers: a question without an answer from A or B is an error listing every such question,
unless `allow_missing=True` (`--allow-missing`), which judges the rest and warns with the list.
"""
import argparse
import email.utils
import http.client
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from minidpo.questions import (REFERENCE_CATEGORIES, Answer, Question, load_answers, load_questions,
                               parse_answer, parse_question)

ORDERS = ("AB", "BA")  # AB: model A's answer shown as assistant A; BA: model B's answer shown as A
JUDGMENTS_FILE = "judgments.jsonl"
SUMMARY_FILE = "summary.json"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_VERDICT = re.compile(r"\[\[([ABC])\]\]")


class JudgeError(RuntimeError):
    """The judge refused a request (bad request, bad key, unusable reply): retrying would not help."""


class JudgeUnavailable(JudgeError):
    """The judge stayed unreachable (429, 5xx, timeouts, dropped connections) through every retry."""


# ---------------------------------------------------------------------------------------------------
# Prompts. The marker strings are MT-Bench's (FastChat `llm_judge/data/judge_prompts.jsonl`, the
# pair-v2 and pair-math-v1 prompts and their multi-turn forms); the instructions are our own words.

_FAIR = ("Judge the content alone: the order in which the answers appear, their length and the "
         "assistants' names must not influence you. Be as objective as you can. ")
_VERDICT_RULE = ("After your explanation, end with your verdict written exactly as [[A]] if assistant A "
                 "is better, [[B]] if assistant B is better, or [[C]] for a tie.")
SYSTEM_TURN1 = (
    "You are a careful, impartial judge. Below is a user question followed by the answers of two AI "
    "assistants, A and B. Decide which assistant follows the user's instructions and answers the "
    "question better, weighing helpfulness, relevance, accuracy, depth, creativity and level of detail. "
    "Begin with a short comparison of the two answers that explains your reasoning. " + _FAIR + _VERDICT_RULE)
SYSTEM_TURN1_REFERENCE = (
    "You are a careful, impartial judge. Below is a user question, a reference answer, and the answers "
    "of two AI assistants, A and B. Decide which assistant's answer is better, judging correctness first "
    "and helpfulness second. Begin by checking each assistant's answer against the reference answer, "
    "pointing out and correcting any mistakes. " + _FAIR + _VERDICT_RULE)
SYSTEM_TURN2 = (
    "You are a careful, impartial judge. Below are two conversations, each between the same user and one "
    "of two AI assistants, A and B. Decide which assistant answers the user's second question better, "
    "weighing helpfulness, relevance, accuracy, depth, creativity and level of detail; the first exchange "
    "is context. Begin with a short comparison of the two assistants' second answers that explains your "
    "reasoning. " + _FAIR + _VERDICT_RULE)
SYSTEM_TURN2_REFERENCE = (
    "You are a careful, impartial judge. Below are reference answers to a user's two questions, then two "
    "conversations, each between that user and one of two AI assistants, A and B. Decide which assistant "
    "answers the second question better, judging correctness first and helpfulness second. Begin by "
    "checking both assistants' second answers against the reference, pointing out and correcting any "
    "mistakes. " + _FAIR + _VERDICT_RULE)


def _reference_for(question, turn):
    """The reference answers to show for `turn`, or None (only some categories use them)."""
    ref = question.reference
    if question.category in REFERENCE_CATEGORIES and ref is not None and len(ref) >= turn:
        return ref
    return None


def _turn1_prompt(question, first, second, reference):
    parts = [f"[User Question]\n{question.turns[0]}"]
    if reference is not None:
        parts.append(f"[The Start of Reference Answer]\n{reference[0]}\n[The End of Reference Answer]")
    for name, answer in (("A", first), ("B", second)):
        parts.append(f"[The Start of Assistant {name}'s Answer]\n{answer[0]}\n"
                     f"[The End of Assistant {name}'s Answer]")
    return "\n\n".join(parts)


def _conversation(user_turns, replies, speaker):
    return "\n\n".join(f"### User:\n{q}\n\n### {speaker}:\n{r}" for q, r in zip(user_turns, replies))


def _turn2_prompt(question, first, second, reference):
    turns = question.turns[:2]
    blocks = []
    if reference is not None:
        blocks.append("<|The Start of Reference Answer|>\n\n" + _conversation(turns, reference, "Reference answer")
                      + "\n\n<|The End of Reference Answer|>")
    for name, answer in (("A", first), ("B", second)):
        blocks.append(f"<|The Start of Assistant {name}'s Conversation with User|>\n\n"
                      + _conversation(turns, answer, f"Assistant {name}")
                      + f"\n\n<|The End of Assistant {name}'s Conversation with User|>")
    return "\n\n\n".join(blocks)


def build_messages(question, turn, first, second):
    """The judge's chat for one question `turn` (1 or 2): `first`/`second` are the answer turns of the
    assistants shown as A and B. Returns `[{"role": "system", ...}, {"role": "user", ...}]`."""
    if turn not in (1, 2) or turn > len(question.turns):
        raise ValueError(f"question {question.question_id!r} has no turn {turn}")
    reference = _reference_for(question, turn)
    if turn == 1:
        system = SYSTEM_TURN1 if reference is None else SYSTEM_TURN1_REFERENCE
        user = _turn1_prompt(question, first, second, reference)
    else:
        system = SYSTEM_TURN2 if reference is None else SYSTEM_TURN2_REFERENCE
        user = _turn2_prompt(question, first, second, reference)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def answers_in_prompt(messages):
    """The two answers being compared in a judge chat built by `build_messages`: `(shown as A, shown
    as B)`; for turn 2, the assistants' second answers. For verifier judges and tests."""
    text = messages[-1]["content"]
    if text.startswith("[User Question]"):
        pattern = r"\[The Start of Assistant {0}'s Answer\]\n(.*?)\n\[The End of Assistant {0}'s Answer\]"
    else:
        pattern = (r"<\|The Start of Assistant {0}'s Conversation with User\|>\n\n(?:.*)### Assistant {0}:\n"
                   r"(.*?)\n\n<\|The End of Assistant {0}'s Conversation with User\|>")
    found = [re.search(pattern.format(name), text, re.DOTALL) for name in "AB"]
    if not all(found):
        raise ValueError("not a pairwise judge prompt: answer markers not found")
    return found[0].group(1), found[1].group(1)


def parse_verdict(text):
    """'A', 'B' or 'C' from the last `[[X]]` in the reply (the final verdict follows the reasoning,
    which may quote the format), or None when there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------
# Backends: callables `messages -> reply text`.

class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


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
        raise _Transient(f"malformed reply ({type(e).__name__}): {_redact(raw[:200], key)}") from None
    return content if isinstance(content, str) else ""  # no text: no verdict, so it is asked again


def _error_body(error):
    """The body of an HTTP error response, or '' when the connection broke while reading it."""
    try:
        return error.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        error.close()


def _post_chat(url, body, key, timeout):
    """One POST to the chat-completions endpoint; raises _Transient for what a retry may cure."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        detail = _redact(_error_body(e), key)
        retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code}: {detail}", retry_after) from None
        hint = " (is OPENAI_API_KEY right?)" if e.code in (401, 403) else ""
        raise JudgeError(f"judge at {url} refused the request: HTTP {e.code}{hint}: {detail}") from None
    except urllib.error.URLError as e:  # connection refused, DNS, timeout while connecting
        raise _Transient(f"connection failed: {_redact(e.reason, key)}") from None
    except (OSError, http.client.HTTPException) as e:  # read timeout, dropped connection, cut body
        raise _Transient(f"{type(e).__name__}: {_redact(e, key)}") from None
    return _reply_text(raw, key)


def openai_judge(model, base_url=DEFAULT_BASE_URL, *, api_key=None, timeout=120.0, max_retries=6,
                 backoff=1.0, max_backoff=60.0, max_tokens=2048, sleep=time.sleep):
    """A judge speaking OpenAI's `POST {base_url}/chat/completions` (OpenAI, vLLM, llama.cpp, ...).

    Greedy (temperature 0). HTTP 408/429/5xx, timeouts, refused or dropped connections and malformed
    replies are retried up to `max_retries` times, waiting the server's `Retry-After` when given and
    `backoff * 2**attempt` seconds (at most `max_backoff`) otherwise, through `sleep` (injectable for
    tests); then `JudgeUnavailable`. Other HTTP errors raise `JudgeError` at once. The key comes from
    `api_key` or `OPENAI_API_KEY` (none: no Authorization header) and appears in no message.
    """
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    url = base_url.rstrip("/") + "/chat/completions"

    def ask(messages):
        body = json.dumps({"model": model, "messages": messages, "temperature": 0.0,
                           "max_tokens": max_tokens}).encode("utf-8")
        for attempt in range(max_retries + 1):
            try:
                return _post_chat(url, body, key, timeout)
            except _Transient as e:
                last = e
                if attempt < max_retries:
                    sleep(e.retry_after if e.retry_after is not None
                          else min(max_backoff, backoff * 2 ** attempt))
        raise JudgeUnavailable(f"judge at {url} unreachable after {max_retries + 1} attempts; "
                               f"last error: {last}")

    ask.judge_name = f"openai:{model}"
    return ask


def local_judge(model_path, *, max_new_tokens=1024, device="cpu", dtype=None):
    """A minidpo model as the judge, greedy, through `minidpo.generate.chat_reply`; the model is loaded
    at the first call. Calls are serialised (one model, one stream)."""
    loaded, lock = {}, threading.Lock()

    def ask(messages):
        import torch

        from minidpo.generate import chat_reply
        with lock, torch.no_grad():
            if not loaded:
                from minidpo.checkpoint import load_model
                from minidpo.tokenizer import load_tokenizer
                loaded["model"] = load_model(model_path, dtype=dtype, device=device).eval()
                loaded["tokenizer"] = load_tokenizer(model_path)
            return chat_reply(loaded["model"], loaded["tokenizer"], messages,
                              max_new_tokens=max_new_tokens, temperature=0.0)

    ask.judge_name = f"local:{model_path}"
    return ask


# ---------------------------------------------------------------------------------------------------
# The verdict log: one JSON record per (question, turn, order), appended as verdicts arrive.

_RECORD_KEYS = ("question_id", "turn", "order", "winner", "model_a", "model_b")


def read_judgments(path):
    """Records of a judgments file, oldest first. A last line without its newline was cut by a crash
    and is ignored (its verdict is asked again); any other bad line raises ValueError naming it."""
    path = Path(path)
    if not path.exists():
        return []
    complete = path.read_bytes().rpartition(b"\n")[0]
    records = []
    for lineno, line in enumerate(complete.split(b"\n") if complete else [], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or any(k not in record for k in _RECORD_KEYS):
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


def _known_verdicts(path, names, retry_errors):
    """`{(question_id, turn, order): record}` already in the log (the latest record of a key wins).
    A log of other models or another judge is refused: its verdicts must not be mixed with ours."""
    done = {}
    for lineno, r in read_judgments(path):
        if (r["model_a"], r["model_b"]) != (names["model_a"], names["model_b"]):
            raise ValueError(f"{path}:{lineno}: judges {r['model_a']!r} vs {r['model_b']!r}, not "
                             f"{names['model_a']!r} vs {names['model_b']!r}; use another output folder")
        if None not in (r.get("judge"), names["judge"]) and r["judge"] != names["judge"]:
            raise ValueError(f"{path}:{lineno}: verdict of judge {r['judge']!r}, not {names['judge']!r}; "
                             f"use another output folder")
        done[(r["question_id"], r["turn"], r["order"])] = r
    if retry_errors:
        done = {k: r for k, r in done.items() if r["winner"] != "error"}
    return done


# ---------------------------------------------------------------------------------------------------
# Judging.

@dataclass(frozen=True)
class _Unit:
    """One judge request: a question turn in one order."""
    question: Question
    turn: int
    order: str
    messages: list

    @property
    def key(self):
        return (self.question.question_id, self.turn, self.order)


def _units(questions, answers_a, answers_b):
    for q in questions:
        a, b = answers_a[q.question_id].turns, answers_b[q.question_id].turns
        for turn in range(1, len(q.turns) + 1):
            for order in ORDERS:
                first, second = (a, b) if order == "AB" else (b, a)
                yield _Unit(q, turn, order, build_messages(q, turn, first, second))


def _ask(judge, messages, max_reasks):
    """Ask until the reply holds a verdict, at most 1 + max_reasks times: (verdict|None, text, asks)."""
    for asks in range(1, max_reasks + 2):
        text = judge([dict(m) for m in messages])
        if not isinstance(text, str):
            raise TypeError(f"a judge must return a str, got {type(text).__name__}")
        verdict = parse_verdict(text)
        if verdict is not None:
            break
    return verdict, text, asks


def _record(unit, verdict, text, asks, names):
    """The log line for one answered unit; `winner` maps the shown position back to the model."""
    if verdict is None:
        winner = "error"
    elif verdict == "C":
        winner = "tie"
    else:
        shown_first = verdict == "A"
        winner = "model_a" if shown_first == (unit.order == "AB") else "model_b"
    return {"question_id": unit.question.question_id, "category": unit.question.category,
            "turn": unit.turn, "order": unit.order, "verdict": verdict, "winner": winner,
            "model_a": names["model_a"], "model_b": names["model_b"], "judge": names["judge"],
            "asks": asks, "judgment": text, "tstamp": time.time()}


def _run_units(units, judge, log_path, done, names, *, workers, max_reasks, progress):
    """Ask for every unit with `workers` threads, appending each verdict to the log as it arrives.
    If the judge fails for good, verdicts that other workers already received are still written."""
    from tqdm import tqdm

    failed = threading.Event()

    def work(unit):
        if failed.is_set():  # the judge is down: do not spend another retry cycle on it
            return None
        try:
            return _ask(judge, unit.messages, max_reasks)
        except BaseException:
            failed.set()  # set in this thread, before it can take the next unit
            raise

    with open(log_path, "a", encoding="utf-8") as log, \
            tqdm(total=len(units), desc="judging", unit="verdict", file=sys.stderr,
                 disable=not progress) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(work, u): u for u in units}

        def keep(future):
            if future.result() is None:
                return
            unit = futures[future]
            done[unit.key] = _record(unit, *future.result(), names)
            _append(log, done[unit.key])
            bar.update()

        try:
            for future in as_completed(futures):
                keep(future)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            for future, unit in futures.items():
                if unit.key not in done and future.done() and not future.cancelled() \
                        and future.exception() is None:
                    keep(future)
            raise


def _check_unique(items, what):
    seen = set()
    for item in items:
        if item.question_id in seen:
            raise ValueError(f"{what}: question_id {item.question_id!r} appears twice ({item.source})")
        seen.add(item.question_id)


def _as_questions(questions):
    if isinstance(questions, (str, Path)):
        return load_questions(questions)
    questions = [q if isinstance(q, Question) else parse_question(q, f"questions[{i}]")
                 for i, q in enumerate(questions)]
    _check_unique(questions, "questions")
    return questions


def _as_answers(answers, side):
    """`{question_id: Answer}` from a path, a dict, or a list of Answer/FastChat records."""
    if isinstance(answers, (str, Path)):
        answers = load_answers(answers)
    elif not isinstance(answers, dict):
        answers = [a if isinstance(a, Answer) else parse_answer(a, f"answers_{side}[{i}]")
                   for i, a in enumerate(answers)]
        _check_unique(answers, f"answers {side.upper()}")
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


def judge_pairwise(questions, answers_a, answers_b, judge, out_dir, *, workers=1, max_reasks=3,
                   allow_missing=False, retry_errors=False, seed=0, n_bootstrap=1000, progress=False,
                   judge_name=None):
    """Judge model A's answers against model B's on every question turn, in both orders; resume from
    `out_dir/judgments.jsonl`, write `out_dir/summary.json` and return the summary dict.

    questions: list of `Question` (or MT-Bench dicts) or a path/"mt-bench"; answers_a/answers_b:
    `{question_id: Answer}`, a list of FastChat answer dicts, or a path; judge: `messages -> str`.
    `retry_errors` asks again for verdicts recorded as errors. Raises `JudgeError` when the judge
    fails for good, with every verdict received so far kept in the log.
    """
    questions = _as_questions(questions)
    answers_a, answers_b = _as_answers(answers_a, "a"), _as_answers(answers_b, "b")
    questions, skipped = _answered(questions, answers_a, answers_b, allow_missing)
    names = {"model_a": next(iter(answers_a.values())).model_id,
             "model_b": next(iter(answers_b.values())).model_id,
             "judge": judge_name or getattr(judge, "judge_name", None)}
    _warn_missing_references(questions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / JUDGMENTS_FILE
    done = _known_verdicts(log_path, names, retry_errors)
    _drop_partial_line(log_path)
    units = [u for u in _units(questions, answers_a, answers_b) if u.key not in done]
    _run_units(units, judge, log_path, done, names, workers=workers, max_reasks=max_reasks,
               progress=progress)
    summary = summarize(questions, done.values(), seed=seed, n_bootstrap=n_bootstrap)
    summary.update(names, skipped_questions=skipped)
    _write_json(out / SUMMARY_FILE, summary)
    return summary


def _warn_missing_references(questions):
    lacking = [q.question_id for q in questions
               if q.category in REFERENCE_CATEGORIES and q.reference is None]
    if lacking:
        warnings.warn(f"{len(lacking)} {'/'.join(REFERENCE_CATEGORIES)} question(s) have no reference "
                      f"answer and are judged without one: {lacking}", stacklevel=3)


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a summary


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


def summarize(questions, records, *, seed=0, n_bootstrap=1000, level=0.95):
    """Wins, ties, losses and errors of model A against B per question turn, `win_rate` =
    W/(W+T+L), `adjusted_win_rate` = (W+T/2)/(W+T+L), and a `level` percentile-bootstrap interval
    over questions (seeded); the same `per_category` and `per_turn`. Rates are None with W+T+L = 0."""
    questions = list(questions)
    outcomes = question_turn_outcomes(questions, list(records))
    category = {q.question_id: q.category for q in questions}
    args = (seed, n_bootstrap, level)
    summary = _slice_stats(_grouped(outcomes, lambda q, t: True), *args)
    summary["pending"] = sum(len(q.turns) for q in questions) - len(outcomes)
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


def markdown_table(summary):
    """The summary as a Markdown table: overall, per turn, per category."""
    level = round(100 * summary.get("bootstrap", {}).get("level", 0.95))
    lines = [f"**{summary.get('model_a', 'A')}** vs **{summary.get('model_b', 'B')}**"
             f" (judge: {summary.get('judge') or 'callable'})", "",
             f"| slice | questions | wins | ties | losses | errors | win rate | {level}% CI "
             f"| adjusted win rate | {level}% CI |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    rows = [("all", summary)] + [(f"turn {t}", s) for t, s in summary.get("per_turn", {}).items()] \
        + list(summary.get("per_category", {}).items())
    for name, s in rows:
        lines.append(f"| {name} | {s['questions']} | {s['wins']} | {s['ties']} | {s['losses']} "
                     f"| {s['errors']} | {_fmt_rate(s['win_rate'])} | {_fmt_interval(s['interval']['win_rate'])} "
                     f"| {_fmt_rate(s['adjusted_win_rate'])} "
                     f"| {_fmt_interval(s['interval']['adjusted_win_rate'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Command line.

def build_parser(command="judge"):
    p = argparse.ArgumentParser(prog=f"python -m minidpo {command}",
                                description="Judge model A's answers against model B's, MT-Bench pairwise.")
    p.add_argument("--questions", required=True, help="questions JSONL, or 'mt-bench' (80 from the hub)")
    p.add_argument("--references", help="reference answers (FastChat answers JSONL) for math/reasoning/coding")
    p.add_argument("--answers-a", required=True, help="model A's answers (FastChat format)")
    p.add_argument("--answers-b", required=True, help="model B's answers (FastChat format)")
    p.add_argument("--judge", choices=("openai", "local"), default="openai")
    p.add_argument("--judge-model", required=True, help="model name at the endpoint, or a minidpo model path")
    p.add_argument("--judge-base-url", default=DEFAULT_BASE_URL, help="OpenAI-compatible API root")
    p.add_argument("--out", required=True, help="folder for judgments.jsonl and summary.json")
    p.add_argument("--workers", type=int, default=1, help="concurrent judge requests")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--max-retries", type=int, default=6, help="retries of a failed request")
    p.add_argument("--retry-backoff", type=float, default=1.0, help="first retry wait in seconds, doubling")
    p.add_argument("--max-tokens", type=int, default=2048, help="longest judge reply")
    p.add_argument("--max-reasks", type=int, default=3, help="re-asks of a reply with no verdict")
    p.add_argument("--allow-missing", action="store_true", help="skip questions lacking an answer")
    p.add_argument("--retry-errors", action="store_true", help="ask again for verdicts recorded as errors")
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
    """`python -m minidpo judge ...`: prints the Markdown table; exit 0, 1 when the judge failed for
    good (verdicts kept, rerun to resume), 2 on bad input."""
    args = build_parser(command).parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    log_path = Path(args.out) / JUDGMENTS_FILE
    try:
        questions = load_questions(args.questions, references=args.references)
        summary = judge_pairwise(questions, load_answers(args.answers_a), load_answers(args.answers_b),
                                 _make_judge(args), args.out, workers=args.workers,
                                 max_reasks=args.max_reasks, allow_missing=args.allow_missing,
                                 retry_errors=args.retry_errors, seed=args.seed,
                                 n_bootstrap=args.bootstrap, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except JudgeError as e:
        kept = len(read_judgments(log_path))
        print(f"error: {e}\n{kept} verdict(s) kept in {log_path}; run the same command again to ask "
              f"only for the missing ones.", file=sys.stderr)
        return 1
    print(markdown_table(summary))
    if summary["errors"]:
        print(f"warning: {summary['errors']} question turn(s) got no verdict after {1 + args.max_reasks} "
              f"asks and count as errors (see {log_path}; --retry-errors asks again)", file=sys.stderr)
    print(f"wrote {Path(args.out) / SUMMARY_FILE}", file=sys.stderr)
    return 0
