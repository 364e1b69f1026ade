"""Generation: KV-cached batched decoding against full recomputation and transformers, sampling against
transformers' warpers, MT-Bench answers in FastChat's format, resume, the CLI and the local judge."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_hf_mistral, write_tokenizer_folder
from minidpo.generate import (answer_questions, chat_reply, cli, generate, next_token_probs, read_answered,
                              sample_next, weights_fingerprint)
from minidpo.model import Mistral, MistralConfig
from minidpo.questions import load_answers
from minidpo.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["What is 12 plus 30?", "Now sort: pear, fig."]},
    {"question_id": 2, "category": "math", "turns": ["Count the letters in banana."]},
    {"question_id": "q3", "category": "coding", "turns": ["def add(a, b):", "Answer briefly."]},
]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab_size=97, window=None, seed=0):
    """A random Mistral whose logits are far apart (std 0.2), so greedy paths have no near-ties."""
    config = MistralConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    return Mistral(config).init_weights(std=0.2, seed=seed).eval()


def random_prompts(lengths, vocab_size=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(model, prompt, max_new_tokens, stop_ids=()):
    """One prompt, no padding, no cache: the whole sequence is recomputed for every new token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token in stop_ids:
            break
        ids.append(token)
    return ids[len(prompt):]


def spy(model):
    """Record (input_ids, attention_mask, cached length) of every forward `generate` makes."""
    calls, real = [], model.hidden_states

    def hidden_states(input_ids, attention_mask=None, position_ids=None, cache=None):
        calls.append((input_ids.clone(), attention_mask.clone(), cache.length))
        return real(input_ids, attention_mask, position_ids, cache)

    model.hidden_states = hidden_states
    return calls


def prompts_given(calls):
    """The unpadded prompts of every prefill (a forward on an empty cache)."""
    return [ids[row][mask[row].bool()].tolist()
            for ids, mask, cached in calls if cached == 0 for row in range(len(ids))]


# ---------------------------------------------------------------------------------------------------
# generate

@pytest.mark.parametrize("window", [None, 4])
def test_greedy_with_cache_matches_full_recompute(window):
    # prompts of 1..11 tokens in one left-padded batch, 10 new tokens: 21 > window 4
    model = tiny(window=window)
    prompts = random_prompts([5, 1, 11, 3])
    out = generate(model, prompts, max_new_tokens=10, batch_size=4)
    assert out == [greedy_reference(model, p, 10) for p in prompts]
    assert all(len(o) == 10 for o in out)  # max_new_tokens, with no stop id given


def test_greedy_matches_transformers_generate(tmp_path):
    # transformers' own cached generation of the same checkpoint (sliding window 4, eos 2) is the reference
    hf = make_hf_mistral(tmp_path / "m", sliding_window=4)
    from minidpo.checkpoint import load_model
    model = load_model(tmp_path / "m")
    prompts = random_prompts([2, 9, 5], vocab_size=128, seed=1)
    out = generate(model, prompts, max_new_tokens=12, stop_ids=[hf.config.eos_token_id], batch_size=3)
    for prompt, ours in zip(prompts, out):
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=12, pad_token_id=0,
                             eos_token_id=hf.config.eos_token_id)[0, len(prompt):].tolist()
        if hf.config.eos_token_id in theirs:
            theirs = theirs[:theirs.index(hf.config.eos_token_id)]
        assert ours == theirs


def test_answer_does_not_depend_on_batch():
    model = tiny(window=6)
    prompts = random_prompts([7, 2, 13, 4, 9])
    alone = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    for batch_size in (2, 3, 5):
        assert generate(model, prompts, max_new_tokens=8, batch_size=batch_size) == alone
    # the same prompt next to very different neighbours
    assert generate(model, [prompts[1], [5] * 20, [1]], max_new_tokens=8)[0] == alone[1]


def test_stop_ids_end_rows_and_are_dropped():
    model = tiny()
    prompts = random_prompts([4, 6, 3])
    free = [greedy_reference(model, p, 10) for p in prompts]
    stop = {free[0][3], free[2][0]}  # row 0 stops at its 4th token, row 2 at once
    out = generate(model, prompts, max_new_tokens=10, stop_ids=stop)
    for o, f in zip(out, free):
        cut = next((i for i, t in enumerate(f) if t in stop), len(f))
        assert o == f[:cut]
    assert len(out[0]) <= 3 and out[2] == []


def test_finished_rows_leave_the_batch():
    model = tiny()
    prompts = random_prompts([4, 6, 3])
    first = [greedy_reference(model, p, 1)[0] for p in prompts]
    calls = spy(model)
    generate(model, prompts, max_new_tokens=5, stop_ids=[first[1]])
    rows = [len(ids) for ids, _, _ in calls]
    live = 3 - sum(f == first[1] for f in first)
    assert rows == [3] + [live] * 4  # prefill of 3, then only the unfinished rows, 4 more steps
    calls.clear()
    generate(model, prompts, max_new_tokens=5, stop_ids=first)  # every row stops at once
    assert len(calls) == 1


def test_mode_restored_and_no_grad():
    model = tiny().train()
    calls = spy(model)
    generate(model, random_prompts([3]), max_new_tokens=2)
    assert model.training
    assert all(m.training for m in model.modules())
    assert len(calls) == 2


def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy():
    model = tiny(window=5)
    prompts = random_prompts([5, 1, 8, 3])
    kw = dict(max_new_tokens=10, temperature=1.0)
    a = generate(model, prompts, seed=3, batch_size=4, **kw)
    assert a == generate(model, prompts, seed=3, batch_size=4, **kw)
    assert a == generate(model, prompts, seed=3, batch_size=1, **kw)  # each prompt has its own stream
    assert a != generate(model, prompts, seed=4, batch_size=4, **kw)
    twice = generate(model, [prompts[2], prompts[2]], seed=3, **kw)
    assert twice[0] != twice[1]  # one prompt twice: two independent streams, not one stream copied
    greedy = generate(model, prompts, max_new_tokens=10)
    assert a != greedy
    assert generate(model, prompts, seed=3, top_p=1e-6, **kw) == greedy


def test_sampling_distribution_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)]:
        warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        expected = torch.softmax(warped, dim=-1)
        ours = next_token_probs(logits, temperature, top_p)
        assert torch.equal(ours > 0, expected > 0)  # the same nucleus
        torch.testing.assert_close(ours / ours.sum(-1, keepdim=True), expected, rtol=1e-5, atol=1e-6)
    # the draws follow the nucleus distribution: frequencies within 5 binomial sigmas, zero outside
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    n, g = 20000, torch.Generator().manual_seed(1)
    draws = sample_next(probs.log().expand(n, 4), 1.0, 0.7, [g] * n)
    freq = torch.bincount(draws, minlength=4).double() / n
    expected = torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64)  # {0.5, 0.3} renormalised
    assert torch.all((freq - expected).abs() <= 5 * (expected * (1 - expected) / n).sqrt())


def test_bad_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 0 holds 97"):
        generate(model, [[1, 97]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)


# ---------------------------------------------------------------------------------------------------
# chat_reply and MT-Bench answers

@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """(model, tokenizer): a random Mistral over the ChatML test tokenizer's vocabulary."""
    tok = load_tokenizer(write_tokenizer_folder(tmp_path_factory.mktemp("tok")))
    return tiny(vocab_size=len(tok), window=16, seed=1), tok


@pytest.mark.parametrize("template", ["chatml", "mistral"])
def test_chat_reply_with_system_message(chat, template):
    model, tok = chat
    tok.set_template(template)
    try:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "12 plus 30?"}]
        calls = spy(model)
        reply = chat_reply(model, tok, messages, max_new_tokens=6)
        del model.hidden_states
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert prompts_given(calls) == [prompt]
        # mistral has no system role: its template opens the first [INST] with the system text
        assert "Answer briefly." in tok.decode(prompt)
        expected = greedy_reference(model, prompt, 6, stop_ids=tok.stop_ids)
        assert reply == tok.decode(expected, skip_special_tokens=True).strip()
    finally:
        tok.set_template("chatml")


def expected_answers(model, tok, question, max_new_tokens):
    """A question answered one turn at a time through chat_reply (batch of one)."""
    messages, answers = [], []
    for turn in question["turns"]:
        messages.append({"role": "user", "content": turn})
        answers.append(chat_reply(model, tok, messages, max_new_tokens=max_new_tokens))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers


def test_answers_in_fastchat_format_and_turn2_sees_turn1(chat, tmp_path):
    model, tok = chat
    out = tmp_path / "answers.jsonl"
    calls = spy(model)
    records = answer_questions(model, tok, QUESTIONS, model_id="tiny", out_path=out, max_new_tokens=6,
                               batch_size=3, progress=False)
    del model.hidden_states
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records and len(lines) == 3
    for q, r in zip(QUESTIONS, lines):
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "generation"}
        assert r["generation"] == {"weights": weights_fingerprint(model), "tokenizer": r["generation"]["tokenizer"],
                                   "max_new_tokens": 6, "temperature": 0.0}  # greedy: no seed, no top_p
        assert r["question_id"] == q["question_id"] and r["model_id"] == "tiny"
        assert isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert r["choices"] == [{"index": 0, "turns": expected_answers(model, tok, q, 6)}]
    assert set(load_answers(out)) == {1, 2, "q3"}  # the judge's reader takes it
    # turn 2's prompt, as given to the model, is the template over [q1, the answer written, q2]
    given = prompts_given(calls)
    for q, r in zip(QUESTIONS, lines):
        if len(q["turns"]) == 2:
            first = r["choices"][0]["turns"][0]
            assert first  # a non-empty answer, or the check below would prove little
            turn2 = tok.apply_chat_template(
                [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": first},
                 {"role": "user", "content": q["turns"][1]}], add_generation_prompt=True, tokenize=True)
            assert turn2 in given
    assert len(given) == 5  # 3 first turns + 2 second turns, nothing asked twice


def test_resume_skips_answered_and_drops_a_cut_line(chat, tmp_path):
    model, tok = chat
    out = tmp_path / "answers.jsonl"
    full = answer_questions(model, tok, QUESTIONS, model_id="tiny", out_path=out, max_new_tokens=4,
                            progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[2] + lines[1][:25])  # q1 and q3 done, q2 cut by a crash
    calls = spy(model)
    with pytest.warns(UserWarning, match="cut last line"):
        new = answer_questions(model, tok, QUESTIONS, model_id="tiny", out_path=out, max_new_tokens=4,
                               progress=False)
    del model.hidden_states
    assert [r["question_id"] for r in new] == [2]
    assert prompts_given(calls) == [tok.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[1]["turns"][0]}], add_generation_prompt=True, tokenize=True)]
    assert new[0]["choices"] == full[1]["choices"]  # greedy: resuming changes no answer
    text = out.read_text()
    assert text.startswith(lines[0] + lines[2]) and text.count("\n") == 3
    assert answer_questions(model, tok, QUESTIONS, model_id="tiny", out_path=out, max_new_tokens=4,
                            progress=False) == []


def test_answers_file_of_another_model_or_bad_line_is_refused(tmp_path):
    out = tmp_path / "a.jsonl"
    record = {"question_id": 1, "model_id": "other", "choices": [{"index": 0, "turns": ["x"]}]}
    out.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: an answer of model 'other'"):
        read_answered(out, "tiny")
    out.write_text("{oops\n" + json.dumps({**record, "model_id": "tiny"}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:1: not valid JSON"):
        read_answered(out, "tiny")
    out.write_text(json.dumps({**record, "model_id": "tiny"}))  # whole record, newline missing: kept
    assert read_answered(out, "tiny") == {1} and out.read_text().endswith("}\n")


def test_answers_are_keyed_by_weights_and_settings(chat, tmp_path):
    """A rerun resumes only answers of the same weights, tokenizer and sampling settings; any other
    key is refused with the fields that differ, before anything is generated."""
    model, tok = chat
    out = tmp_path / "answers.jsonl"
    kw = dict(model_id="tiny", out_path=out, max_new_tokens=4, progress=False)
    answer_questions(model, tok, QUESTIONS[:2], **kw)
    assert len(answer_questions(model, tok, QUESTIONS, **kw)) == 1  # same key: resumes, answers q3 only
    before = out.read_bytes()
    other = tiny(vocab_size=len(tok), window=16, seed=2)  # same shapes, other weights
    stepped = tiny(vocab_size=len(tok), window=16, seed=1)  # the same weights after a tiny update
    with torch.no_grad():
        stepped.model.layers[1].mlp.down_proj.weight.add_(1e-6 * torch.randn(64, 96))
    cases = [(other, {}, r"weights '[0-9a-f]+ -> '[0-9a-f]+"), (stepped, {}, r"weights "),
             (model, {"max_new_tokens": 5}, r"max_new_tokens 4 -> 5\)"),
             (model, {"temperature": 0.7}, r"seed None -> 0; temperature 0.0 -> 0.7; top_p None -> 1.0\)"),
             (model, {"temperature": "mt-bench"}, r"temperature 0.0 -> 'mt-bench'")]
    for net, change, message in cases:
        calls = spy(net)
        with pytest.raises(ValueError, match=r"answers.jsonl:1: answered with other weights or settings \(.*"
                           + message):
            answer_questions(net, tok, QUESTIONS, **{**kw, **change})
        assert calls == [] and out.read_bytes() == before  # refused before any decoding, file untouched
        del net.hidden_states
    from minidpo.lora import apply_lora
    adapted = apply_lora(tiny(vocab_size=len(tok), window=16, seed=1), r=2, alpha=4)
    assert weights_fingerprint(adapted) != weights_fingerprint(model)  # adapters are part of the weights
    # a file written without keys (another tool, an older minidpo) is refused too
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps({"question_id": 1, "model_id": "tiny", "choices": [{"turns": ["x", "y"]}]}) + "\n")
    with pytest.raises(ValueError, match=r"legacy.jsonl:1: an answer without a generation key"):
        answer_questions(model, tok, QUESTIONS, **{**kw, "out_path": legacy})


def test_mt_bench_temperatures_sample_per_category(chat, tmp_path):
    model, tok = chat
    kw = dict(model_id="tiny", max_new_tokens=6, temperature="mt-bench", seed=5, progress=False)
    a = answer_questions(model, tok, QUESTIONS, out_path=tmp_path / "a.jsonl", batch_size=3, **kw)
    b = answer_questions(model, tok, QUESTIONS, out_path=tmp_path / "b.jsonl", batch_size=1, **kw)
    assert [r["choices"] for r in a] == [r["choices"] for r in b]  # seeds per (question, turn)
    # math and coding are greedy in FastChat's table (temperature 0)
    for q, r in zip(QUESTIONS[1:], a[1:]):
        assert r["choices"][0]["turns"] == expected_answers(model, tok, q, 6)
    with pytest.raises(ValueError, match="question_id 2 appears twice"):
        answer_questions(model, tok, QUESTIONS + QUESTIONS[1:2], out_path=tmp_path / "d.jsonl", **kw)
    with pytest.raises(ValueError, match="category 'poetry' has no MT-Bench temperature"):
        answer_questions(model, tok, [{"question_id": 9, "category": "poetry", "turns": ["x"]}],
                         out_path=tmp_path / "c.jsonl", **kw)


# ---------------------------------------------------------------------------------------------------
# command line, LoRA, local judge

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An HF model folder (random tiny transformers Mistral) holding the ChatML tokenizer files too."""
    folder = tmp_path_factory.mktemp("model")
    tok_dir = write_tokenizer_folder(tmp_path_factory.mktemp("tok_for_model"))
    make_hf_mistral(folder, vocab_size=len(load_tokenizer(tok_dir)), sliding_window=8, seed=2)
    for f in tok_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def test_cli_end_to_end(model_dir, questions_file, tmp_path):
    out = tmp_path / "answers.jsonl"
    args = ["--model", str(model_dir), "--questions", str(questions_file), "--out", str(out),
            "--model-id", "tiny", "--max-new-tokens", "5", "--batch-size", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "minidpo", "generate", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    answers = load_answers(out)
    assert list(answers) == [1, 2, "q3"] and all(a.model_id == "tiny" for a in answers.values())
    assert [len(a.turns) for a in answers.values()] == [2, 1, 2]
    # the same answers as the Python API on the loaded folder
    from minidpo.checkpoint import load_model
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    for q in QUESTIONS:
        assert list(answers[q["question_id"]].turns) == expected_answers(model, tok, q, 5)
    assert cli(args) == 0 and len(out.read_text().splitlines()) == 3  # a rerun adds nothing
    assert cli([*args, "--template", "mistral", "--out", str(tmp_path / "m.jsonl")]) == 0
    assert cli([*args, "--questions", str(tmp_path / "missing.jsonl")]) == 2


def test_cli_lora_matches_peft(model_dir, questions_file, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM
    torch.manual_seed(0)
    peft_model = get_peft_model(MistralForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()  # random B: a visible change
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "answers.jsonl"
    assert cli(["--model", str(model_dir), "--lora", str(tmp_path / "adapter"), "--questions",
                str(questions_file), "--out", str(out), "--model-id", "lora", "--max-new-tokens", "6",
                "--no-progress"]) == 0
    tok = load_tokenizer(model_dir)
    for qid, answer in load_answers(out).items():
        q = next(q for q in QUESTIONS if q["question_id"] == qid)
        prompt = tok.apply_chat_template([{"role": "user", "content": q["turns"][0]}],
                                         add_generation_prompt=True, tokenize=True)
        ids = peft_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                  dtype=torch.long), do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_id,
                                  eos_token_id=list(tok.stop_ids))[0, len(prompt):].tolist()
        ids = ids[:next((i for i, t in enumerate(ids) if t in tok.stop_ids), len(ids))]
        assert answer.turns[0] == tok.decode(ids, skip_special_tokens=True).strip()
    base = load_answers(tmp_path / "base.jsonl") if cli(
        ["--model", str(model_dir), "--questions", str(questions_file), "--out", str(tmp_path / "base.jsonl"),
         "--model-id", "base", "--max-new-tokens", "6", "--no-progress"]) == 0 else {}
    assert base and all(base[qid].turns != a.turns for qid, a in load_answers(out).items())  # adapter used


def test_local_judge_runs_on_a_tiny_model(model_dir, tmp_path):
    from minidpo.judge import judge_pairwise, local_judge, parse_verdict, read_judgments
    answers = {name: [{"question_id": q["question_id"], "model_id": name,
                       "choices": [{"index": 0, "turns": [f"{name} says {t}" for t in q["turns"]]}]}
                      for q in QUESTIONS[:2]] for name in ("a", "b")}
    summary = judge_pairwise(QUESTIONS[:2], answers["a"], answers["b"],
                             local_judge(str(model_dir), max_new_tokens=8), tmp_path / "judge",
                             max_reasks=1, progress=False, n_bootstrap=10)
    records = [r for _, r in read_judgments(tmp_path / "judge" / "judgments.jsonl")]
    assert len(records) == 6  # 3 question turns x 2 orders
    for r in records:  # a random model's garbage is recorded as it parsed, errors included
        assert isinstance(r["judgment"], str) and r["verdict"] == parse_verdict(r["judgment"])
        assert (r["winner"] == "error") == (r["verdict"] is None)
    assert summary["wins"] + summary["ties"] + summary["losses"] + summary["errors"] == 3
