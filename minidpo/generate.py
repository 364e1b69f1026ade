"""Sampling from a minidpo model, and MT-Bench answers in FastChat's format: questions -> answers.

`generate` decodes a list of prompts (token ids) in batches with the model's KV cache. Prompts are
left-padded, so every row's next token sits in the last column; positions come from the attention
mask (the model counts real tokens only), so a prompt's continuation does not depend on which other
prompts share its batch. Prompts are sorted by length before batching to waste little on padding,
and a row that has finished (a stop id, or `max_new_tokens`) is dropped from the batch and its cache.

Decoding is greedy at `temperature == 0`; otherwise tokens are drawn from the softmax of
`logits / temperature` restricted to the top-p nucleus, each prompt with its own `torch.Generator`
seeded from `(seed, index of the prompt)`, so a seeded run gives the same tokens whatever the batch
size or the device's batch composition.

`answer_questions` answers MT-Bench questions turn by turn (turn 2 sees turn 1's question and the
model's own answer through the chat template) and appends one FastChat answer record per question
to a JSONL file, which makes a rerun skip the questions already answered. Each record also carries
its `generation` key: a fingerprint of the weights in use (base and adapters), of the tokenizer and
chat template, and the sampling settings. A file holding answers of another key is refused rather
than resumed or overwritten: its answers are not this model's.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch

from minidpo.files import parse_jsonl
from minidpo.questions import as_questions, load_questions, parse_answer

# FastChat's per-category sampling temperatures for MT-Bench answers (`temperature_config` in
# fastchat/llm_judge/common.py); `--temperature mt-bench` uses them, as `gen_model_answer.py` does.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                         "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
DEFAULT_MAX_NEW_TOKENS = 1024  # FastChat's `--max-new-token` default for MT-Bench answers


# ---------------------------------------------------------------------------------------------------
# Sampling.

def mix_seed(*parts) -> int:
    """A 63-bit seed from any ints/strings: distinct parts give unrelated streams (not seed + i)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_sampling(temperature, top_p, max_new_tokens):
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")


def _check_prompts(prompts, vocab_size):
    """Prompts are non-empty lists of ids in [0, vocab_size); errors name the prompt."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    checked = []
    for i, p in enumerate(prompts):
        p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
        if not p:
            raise ValueError(f"prompt {i} is empty: there is no token to continue")
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in p):
            bad = next(t for t in p if not (isinstance(t, int) and 0 <= t < vocab_size))
            raise ValueError(f"prompt {i} holds {bad!r}, not a token id of a {vocab_size}-token vocabulary")
        checked.append(p)
    return checked


def next_token_probs(logits, temperature=1.0, top_p=1.0):
    """Sampling distribution (B, V) fp32 from logits (B, V): softmax(logits / temperature) cut to the
    top-p nucleus (the fewest most likely tokens whose mass reaches top_p), not renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep a token while the mass ranked above it is below top_p: the most likely always stays
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs


def sample_next(logits, temperature=0.0, top_p=1.0, generators=None):
    """Next token per row from `logits` (B, V): argmax when temperature == 0, else a draw from
    `next_token_probs`, row i with `generators[i]` (None: the global RNG). Returns (B,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_p)
    generators = generators or [None] * len(probs)
    # one draw per row with its own generator: a row's tokens do not depend on its batch mates
    draws = [torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)]
    return torch.cat(draws)


def _left_pad(prompts, pad_id, device):
    """(B, L) int64 ids and (B, L) mask (1 = real token) with each prompt flush right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _next_logits(model, ids, mask, cache):
    """Logits (B, V) fp32 after `ids` (B, T): the head runs on the last position only, so a long
    prompt never materialises (B, T, V) logits."""
    hidden = model.hidden_states(ids, attention_mask=mask, cache=cache)  # (B, T, H)
    return model.lm_head(hidden[:, -1]).float()  # (B, V)


def _keep_rows(cache, rows):
    """Shrink the KV cache to the batch rows `rows` (a (B',) index tensor): finished rows cost no
    more attention or cache memory."""
    cache.k = [k.index_select(0, rows) for k in cache.k]
    cache.v = [v.index_select(0, rows) for v in cache.v]


def _decode_batch(model, prompts, generators, *, max_new_tokens, stop_ids, pad_id, temperature, top_p):
    """New token ids for one batch of prompts, stop ids excluded (see `generate`)."""
    device = model.lm_head.weight.device
    ids, mask = _left_pad(prompts, pad_id, device)
    # the last sampled token is never fed back, so the cache needs one slot less than the total
    cache = model.new_cache(len(prompts), ids.shape[1] + max_new_tokens - 1)
    logits = _next_logits(model, ids, mask, cache)
    live = list(range(len(prompts)))  # prompt index of each batch row still decoding
    out = [[] for _ in prompts]
    while True:
        tokens = sample_next(logits, temperature, top_p, [generators[i] for i in live])  # (B',)
        keep = []
        for row, (i, token) in enumerate(zip(live, tokens.tolist())):
            if token in stop_ids:
                continue  # the stop token ends the answer and is not part of it
            out[i].append(token)
            if len(out[i]) < max_new_tokens:
                keep.append(row)
        if not keep:
            return out
        if len(keep) < len(live):
            rows = torch.tensor(keep, device=device)
            _keep_rows(cache, rows)
            mask, tokens = mask.index_select(0, rows), tokens.index_select(0, rows)
            live = [live[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        logits = _next_logits(model, tokens[:, None], mask, cache)


def generate(model, prompts, *, max_new_tokens, stop_ids=(), pad_id=0, temperature=0.0, top_p=1.0,
             seed=None, batch_size=8):
    """Continue each prompt (a list of token ids) with the KV cache; returns the new ids per prompt.

    A row ends at the first of `stop_ids` (not included in its ids) or after `max_new_tokens` ids.
    Greedy at `temperature == 0`; otherwise temperature/top-p sampling, prompt i drawing from a
    generator seeded with `mix_seed(seed, i)`, or with `seed[i]` when `seed` is a list (one per
    prompt); `seed=None` draws from fresh entropy. `pad_id` only fills left padding (masked out).
    Runs in eval mode under `torch.inference_mode()` and restores the model's previous mode.
    """
    _check_sampling(temperature, top_p, max_new_tokens)
    prompts = _check_prompts(prompts, model.config.vocab_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generators = _generators(seed, len(prompts), model.lm_head.weight.device, temperature)
    stop = frozenset(int(i) for i in stop_ids)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together
    out = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                new = _decode_batch(model, [prompts[i] for i in chunk], [generators[i] for i in chunk],
                                    max_new_tokens=max_new_tokens, stop_ids=stop,
                                    pad_id=0 if pad_id is None else pad_id,
                                    temperature=temperature, top_p=top_p)
                for i, ids in zip(chunk, new):
                    out[i] = ids
    finally:
        model.train(was_training)
    return out


def _generators(seed, n, device, temperature):
    """One generator per prompt (None when greedy: nothing is drawn)."""
    if temperature == 0:
        return [None] * n
    if seed is None:
        seeds = [int(torch.randint(0, 2**62, ())) for _ in range(n)]
    elif isinstance(seed, int):
        seeds = [mix_seed(seed, i) for i in range(n)]
    else:
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"seed holds {len(seeds)} seeds for {n} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


def chat_reply(model, tokenizer, messages, *, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0,
               top_p=1.0, seed=None):
    """The model's reply to a chat (`[{"role", "content"}, ...]`, a system message allowed where the
    tokenizer's template allows one), as text without special tokens or surrounding whitespace."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    [ids] = generate(model, [prompt], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                     pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p, seed=seed)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------
# MT-Bench answers.

def weights_fingerprint(model, samples=4096):
    """SHA-256 of a model's state dict: every tensor's name, shape and dtype, and its raw values,
    whole when small (norms, LoRA factors of small layers), else at `samples` evenly spaced elements,
    so a 7B model is fingerprinted in about a second and another checkpoint of the same shapes differs."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            if flat.numel() > samples:  # integer steps: float indices would round past the end
                flat = flat[torch.arange(samples, device=flat.device) * (flat.numel() - 1) // (samples - 1)]
            h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
            h.update(flat.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer):
    """SHA-256 of how the tokenizer renders a probe chat (template and token ids) and its stop ids."""
    probe = [{"role": "user", "content": "Hi, 12 + 30 = ? ü"}, {"role": "assistant", "content": "42."},
             {"role": "user", "content": "Again."}]
    ids = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True)
    return hashlib.sha256(json.dumps([list(ids), sorted(tokenizer.stop_ids)]).encode()).hexdigest()


def generation_key(model, tokenizer, *, max_new_tokens, temperature, top_p, seed):
    """What an answer depends on: weights, tokenizer and template, and the sampling settings (greedy
    decoding ignores top_p and the seed, so they are left out of its key)."""
    key = {"weights": weights_fingerprint(model), "tokenizer": _tokenizer_fingerprint(tokenizer),
           "max_new_tokens": max_new_tokens, "temperature": temperature}
    if temperature != 0:
        key.update(top_p=top_p, seed=seed)
    return key


def _check_key(found, key, where):
    if found is None:
        raise ValueError(f"{where}: an answer without a generation key (another tool or an older minidpo "
                         f"wrote it), so it cannot be told to come from this model and settings; delete "
                         f"the file or pick another --out")
    changed = [f"{k} {found.get(k)!r:.20} -> {key.get(k)!r:.20}" for k in sorted(set(found) | set(key))
               if found.get(k) != key.get(k)]
    if changed:
        raise ValueError(f"{where}: answered with other weights or settings ({'; '.join(changed)}); these "
                         f"are not this model's answers: delete the file or pick another --out")


def read_answered(path, model_id, key=None):
    """Question ids already answered in a FastChat answers file (none when it does not exist).

    A last line without its newline was cut by a crash: it is removed from the file (that question
    is answered again). Any other bad line, a line of another model, or (with `key`) a line of
    another generation key raises ValueError naming it.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete, _, tail = data.rpartition(b"\n")  # no newline at all: everything is the tail
    if tail.strip():
        try:
            json.loads(tail)
            with open(path, "ab") as f:  # a whole record that merely lacks its newline: keep it
                f.write(b"\n")
            complete = data
        except (json.JSONDecodeError, UnicodeDecodeError):
            warnings.warn(f"{path}: dropping a cut last line (an interrupted run); that question is "
                          f"answered again", stacklevel=3)
            os.truncate(path, data.rfind(b"\n") + 1)
    answered = set()
    for lineno, obj in parse_jsonl(complete, path):
        where = f"{path}:{lineno}"
        answer = parse_answer(obj, where)
        if answer.model_id != model_id:
            raise ValueError(f"{where}: an answer of model {answer.model_id!r}, not {model_id!r}; "
                             f"one file holds one model's answers (pick another --out)")
        if key is not None:
            _check_key(obj.get("generation"), key, where)
        answered.add(answer.question_id)
    return answered


def answer_record(question_id, model_id, turns, generation=None):
    """One FastChat answer record (`gen_model_answer.py`'s fields), with our `generation` key if given."""
    record = {"question_id": question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
              "choices": [{"index": 0, "turns": list(turns)}], "tstamp": time.time()}
    return record if generation is None else {**record, "generation": generation}


def _temperature_of(question, temperature):
    if temperature != "mt-bench":
        return float(temperature)
    if question.category not in MT_BENCH_TEMPERATURES:
        raise ValueError(f"question {question.question_id!r}: category {question.category!r} has no "
                         f"MT-Bench temperature (known: {', '.join(MT_BENCH_TEMPERATURES)})")
    return MT_BENCH_TEMPERATURES[question.category]


def _chunks(questions, temperature, size):
    """Consecutive runs of at most `size` questions sharing one sampling temperature."""
    chunk = []
    for q in questions:
        if chunk and (len(chunk) == size or _temperature_of(q, temperature) != chunk[-1][1]):
            yield chunk
            chunk = []
        chunk.append((q, _temperature_of(q, temperature)))
    if chunk:
        yield chunk


def _answer_chunk(model, tokenizer, chunk, *, max_new_tokens, top_p, seed):
    """Every turn of every question in `chunk` [(question, temperature)]: one batch per turn."""
    answers = [[] for _ in chunk]
    for turn in range(max(len(q.turns) for q, _ in chunk)):
        rows = [i for i, (q, _) in enumerate(chunk) if len(q.turns) > turn]
        prompts = []
        for i in rows:
            q = chunk[i][0]
            messages = []
            for question, answer in zip(q.turns[:turn], answers[i]):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append({"role": "user", "content": q.turns[turn]})
            prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        new = generate(model, prompts, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids,
                       pad_id=tokenizer.pad_id, temperature=chunk[0][1], top_p=top_p,
                       seed=[mix_seed(seed, chunk[i][0].question_id, turn) for i in rows],
                       batch_size=len(prompts))
        for i, ids in zip(rows, new):
            answers[i].append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return answers


def answer_questions(model, tokenizer, questions, *, model_id, out_path,
                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=0.0, top_p=1.0, batch_size=8,
                     seed=0, progress=True):
    """Answer MT-Bench questions and append FastChat answer records to `out_path` (JSONL).

    questions: `Question`s, MT-Bench dicts, or a path / "mt-bench". Questions already answered in
    `out_path` are skipped. Up to `batch_size` questions are decoded together, turn by turn; turn 2's
    prompt is the chat template over [user turn 1, the model's answer, user turn 2]. `temperature`
    is a float or "mt-bench" (FastChat's per-category temperatures). A question's sampling seed
    comes from `(seed, question_id, turn)`, so answers do not depend on batching or resuming.
    Each record is flushed and fsynced when its question is done and carries the `generation_key`;
    a file with answers of another key raises ValueError. Returns the new records.
    """
    from tqdm import tqdm

    questions = as_questions(questions)
    out_path = Path(out_path)
    key = generation_key(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)
    answered = read_answered(out_path, model_id, key)
    pending = [q for q in questions if q.question_id not in answered]
    for q in pending:
        _temperature_of(q, temperature)  # refuse an unknown category before any work
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with open(out_path, "a", encoding="utf-8") as out, \
            tqdm(total=len(questions), initial=len(questions) - len(pending), desc=f"answering ({model_id})",
                 unit="question", file=sys.stderr, disable=not progress) as bar:
        for chunk in _chunks(pending, temperature, batch_size):
            answers = _answer_chunk(model, tokenizer, chunk, max_new_tokens=max_new_tokens, top_p=top_p,
                                    seed=seed)
            for (q, _), turns in zip(chunk, answers):
                record = answer_record(q.question_id, model_id, turns, key)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                os.fsync(out.fileno())  # an answer computed is on disk before the next batch
                written.append(record)
                bar.update()
    return written


# ---------------------------------------------------------------------------------------------------
# Command line.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _temperature_arg(text):
    if text == "mt-bench":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'mt-bench'") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"temperature must be >= 0, got {text}")
    return value


def build_parser(command="generate"):
    p = argparse.ArgumentParser(prog=f"python -m minidpo {command}",
                                description="Answer MT-Bench-format questions; writes FastChat answers JSONL.")
    p.add_argument("--model", required=True, help="Hugging Face model folder, hub repo id or .gguf file")
    p.add_argument("--lora", help="PEFT adapter folder applied on top of --model")
    p.add_argument("--tokenizer", help="tokenizer folder or repo id (default: --model)")
    p.add_argument("--template", help="pin a built-in chat template (chatml, mistral)")
    p.add_argument("--questions", required=True, help="questions JSONL, or 'mt-bench' (80 from the hub)")
    p.add_argument("--out", required=True, help="answers JSONL (appended to; answered questions skipped)")
    p.add_argument("--model-id", required=True, help="name recorded in every answer")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer per turn")
    p.add_argument("--temperature", type=_temperature_arg, default=0.0,
                   help="0 = greedy; or 'mt-bench' for FastChat's per-category temperatures")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="questions decoded together")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="weights' dtype (auto: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def load_for_generation(model, *, lora=None, tokenizer=None, template=None, dtype="auto", device="auto"):
    """(model, tokenizer) as the command uses them; the tokenizer must fit in the embedding."""
    from minidpo.checkpoint import load_model
    from minidpo.tokenizer import load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    tok = load_tokenizer(tokenizer or model, template=template)
    net = load_model(model, dtype=None if dtype == "auto" else _DTYPES[dtype], device=device)
    if lora:
        from minidpo.lora import load_lora  # only this option needs the adapter code
        net = load_lora(net, lora)
    if tok.vocab_size > net.config.vocab_size:
        raise ValueError(f"tokenizer of {tokenizer or model} has {tok.vocab_size} tokens, more than the "
                         f"{net.config.vocab_size} rows of the model's embedding")
    return net.eval(), tok


def cli(argv, command="generate"):
    """`python -m minidpo generate ...`: exit 0, or 2 on bad input (the message names it)."""
    args = build_parser(command).parse_args(argv)
    try:
        _check_sampling(0.0 if args.temperature == "mt-bench" else args.temperature, args.top_p,
                        args.max_new_tokens)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        questions = load_questions(args.questions)
        model, tokenizer = load_for_generation(args.model, lora=args.lora, tokenizer=args.tokenizer,
                                               template=args.template, dtype=args.dtype, device=args.device)
        new = answer_questions(model, tokenizer, questions, model_id=args.model_id, out_path=args.out,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
                               progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(new)} answer(s) to {args.out} ({len(questions) - len(new)} already there)",
          file=sys.stderr)
    return 0
