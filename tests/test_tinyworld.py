"""The tiny world: determinism, sizes, held-out benchmark and dev questions, the sloppy
demonstrator, the solver (turn 2 against the model's own turn 1), tokenizer, model config, the
verifier judge and the single-answer score. The preference sets are tests/test_tinybase.py's."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from minidpo import tinyworld as tw
from minidpo.judge import read_judge_prompt
from minidpo.tinyworld import WorldConfig, check_answer, solve, verifier_judge

def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """The default world, written once."""
    directory = tmp_path_factory.mktemp("world")
    return directory, tw.write_world(directory, WorldConfig())


def user_turns(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


def all_conversations(paths):
    """Every message list in the written files."""
    for row in read_jsonl(paths["sft"]):
        yield row["messages"]
    for name in ("questions", "dev"):
        for q in read_jsonl(paths[name]):
            yield [{"role": "user", "content": t} for t in q["turns"]]


# --- determinism and sizes -------------------------------------------------------------------------

def test_same_seed_writes_identical_files(world_dir, tmp_path):
    # In a fresh process with another hash seed: nothing may depend on set order or process state.
    first_dir, first = world_dir
    code = f"from minidpo import tinyworld as tw; tw.write_world({str(tmp_path / 'again')!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parent.parent)
    files = sorted(p.relative_to(first_dir) for p in first_dir.rglob("*") if p.is_file())
    assert len(files) == 7
    for rel in files:
        assert (first_dir / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = tw.build_world(WorldConfig(seed=1, sft_size=50))
    assert other.questions != read_jsonl(first["questions"]) and other.dev != read_jsonl(first["dev"])
    assert other.sft != read_jsonl(first["sft"])[:50]
    # The tokenizer depends on the closed vocabulary only: one base model serves every seed and size.
    assert json.loads(other.tokenizer.to_str()) == json.loads((first["model"] / "tokenizer.json").read_text())


@pytest.mark.parametrize("total", [7, 100, 1500, 2000, 84041])
def test_split_sizes_follow_the_paper_ratio(total):
    sizes = tw.split_sizes(total)
    assert sum(sizes.values()) == total
    whole = 7563 + 12859 + 63619  # the hub cards' row counts
    for name, rows in (("capybara", 7563), ("orca", 12859), ("ultrafeedback", 63619)):
        assert abs(sizes[name] - total * rows / whole) < 1
    if total == 84041:
        assert sizes == {"capybara": 7563, "orca": 12859, "ultrafeedback": 63619}


def test_written_sizes_and_summary(world_dir):
    _, paths = world_dir
    assert tw.split_sizes(1500) == {"capybara": 135, "orca": 230, "ultrafeedback": 1135}
    summary = json.loads(paths["world"].read_text())
    assert summary["questions"] == 80 and summary["dev_questions"] == 400
    assert summary["sft"]["conversations"] == len(read_jsonl(paths["sft"])) == WorldConfig().sft_size
    assert len(read_jsonl(paths["dev"])) == 400


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="weak_error"):
        WorldConfig(weak_error=1.5)
    with pytest.raises(ValueError, match="multiple of 8"):
        WorldConfig(benchmark_questions=81)
    with pytest.raises(ValueError, match="label_noise"):
        WorldConfig(label_noise=0.6, near_ties=0.5)
    with pytest.raises(ValueError, match="total_pairs"):
        WorldConfig(total_pairs=0)
    with pytest.raises(ValueError, match="leaves a dataset empty"):
        WorldConfig(total_pairs=6)  # 6 * 7563 / 84041 = 0.54: largest remainders give capybara none
    with pytest.raises(ValueError, match="num_key_value_heads"):
        WorldConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        WorldConfig(vocab_size=100)


# --- the data files --------------------------------------------------------------------------------

def test_sft_rows_are_chat_messages(world_dir):
    _, paths = world_dir
    for row in read_jsonl(paths["sft"]):
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"] if m["role"] != "system"][::2] == ["user"] * len(
            user_turns(row["messages"]))


def test_demonstrator_errs_systematically_where_weak(world_dir):
    """Each demonstration reply is either right or the systematic slip, both judged against the
    demonstrator's own earlier replies; weak turns slip at `weak_error`, the rest at `strong_error`."""
    _, paths = world_dir
    config = WorldConfig()
    counts = {True: [0, 0], False: [0, 0]}  # weak -> [replies, wrong]
    for row in read_jsonl(paths["sft"]):
        turns = user_turns(row["messages"])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        for k in range(len(turns)):
            right = solve(turns[:k + 1], replies[:k])[k]
            slip = tw.plausible_wrong(turns[:k + 1], replies[:k])[k]
            assert replies[k] in (right, slip), (turns, replies)
            weak = tw.weak_turns(turns[:k + 1], replies[:k])[k]
            counts[weak][0] += 1
            counts[weak][1] += replies[k] != right
    for weak, p in ((True, config.weak_error), (False, config.strong_error)):
        n, wrong = counts[weak]
        assert abs(wrong / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9, (weak, wrong, n)
    rows = read_jsonl(paths["sft"])
    assert sum(len(user_turns(r["messages"])) == 2 for r in rows) == round(config.sft_two_turn_share * len(rows))


def test_an_imitator_of_the_demonstrator_is_right_half_to_three_quarters_of_dev(world_dir):
    """The accuracy band the base aims at, on the dev split: a model that always gives the
    demonstrator's most frequent reply is right exactly on the turns that are not weak
    (weak_error > 0.5 > strong_error). The base's measured accuracy is in report.json."""
    _, paths = world_dir
    config = WorldConfig()
    assert config.weak_error > 0.5 > config.strong_error
    turns = [w for q in read_jsonl(paths["dev"]) for w in tw.weak_turns(q["turns"])]
    assert len(turns) == 800 and 0.5 <= 1 - sum(turns) / len(turns) <= 0.75


# --- the benchmark ---------------------------------------------------------------------------------

def test_benchmark_has_mt_bench_shape(world_dir):
    _, paths = world_dir
    questions = read_jsonl(paths["questions"])
    assert [q["question_id"] for q in questions] == list(range(81, 161))
    for i, category in enumerate(tw.CATEGORIES):
        block = questions[10 * i: 10 * (i + 1)]
        assert {q["category"] for q in block} == {category}
        for q in block:
            assert len(q["turns"]) == 2
            assert ("reference" in q) == (category in ("math", "reasoning", "coding"))
            if "reference" in q:
                assert q["reference"] == solve(q["turns"])
            assert check_answer(q, 2, solve(q["turns"])[1])
    assert len({q["turns"][0] for q in questions}) == 80
    from minidpo.questions import load_questions
    loaded = load_questions(paths["questions"])
    assert len(loaded) == 80 and loaded[0].turns == tuple(questions[0]["turns"])


def test_dev_questions_are_another_stream_apart_from_the_benchmark(world_dir):
    _, paths = world_dir
    dev, benchmark = read_jsonl(paths["dev"]), read_jsonl(paths["questions"])
    assert [q["question_id"] for q in dev] == list(range(tw.DEV_FIRST_ID, tw.DEV_FIRST_ID + 400))
    assert [sum(q["category"] == c for q in dev) for c in tw.CATEGORIES] == [50] * 8
    assert len({q["turns"][0] for q in dev}) == 400
    assert not {q["turns"][0] for q in dev} & {q["turns"][0] for q in benchmark}
    # More questions keep MT-Bench's shape (ids from 81, equal categories); a family too small fails.
    more = tw.make_benchmark(WorldConfig(benchmark_questions=160))
    assert [q["question_id"] for q in more] == list(range(81, 241))
    with pytest.raises(ValueError, match="no 'parrot' first turn left"):
        tw.make_dev(WorldConfig(dev_questions=8 * 100), more)


def test_benchmark_and_dev_are_held_out_from_the_sft_data(world_dir):
    _, paths = world_dir
    benchmark = {q["turns"][0] for q in read_jsonl(paths["questions"]) + read_jsonl(paths["dev"])}
    conversations = [user_turns(row["messages"]) for row in read_jsonl(paths["sft"])]
    training = {text for turns in conversations for text in turns}
    assert training and not benchmark & training
    # ... while every benchmark fact is still taught, in other phrasings (the form is held out, not
    # the fact): by a first turn or by a follow-up ("And what is its capital?").
    taught = set()
    for turns in conversations:
        parsed = tw._parse_conversation(turns)
        if parsed[0][0].family == "fact":
            taught.update((fields["country"], template.tag) for template, fields in parsed)
    for q in read_jsonl(paths["questions"]):
        if q["category"] == "humanities":
            template, fields = tw._parse_conversation(q["turns"][:1])[0]
            assert (fields["country"], template.tag) in taught


# --- solver and answer checks ----------------------------------------------------------------------

@pytest.mark.parametrize("turns, expected", [
    # Answers worked out by hand: arithmetic, the alphabet, list positions, and the FACTS table.
    (["What is 7 plus 11?", "Now take away 4 from that number."], ["18", "14"]),
    (["Take 5 away from 12.", "Now add 9 to that number."], ["7", "16"]),
    (["Which is larger, 3 or 19?", "And which is smaller?"], ["19", "3"]),
    (["Which number is bigger: 14 or 6?", "What do you get if you add them?"], ["14", "20"]),
    (["Copy this list: rock cake wolf.", "Now say them in reverse order."], ["rock cake wolf", "wolf cake rock"]),
    (["Repeat these words: yak jam lamp apple.", "What was the second word?"], ["yak jam lamp apple", "jam"]),
    (["You are a parrot. Say owl three times.", "Now say it one more time than before."],
     ["owl owl owl", "owl owl owl owl"]),
    (["Pretend you are a parrot and say moon two times.", "Now say it just once."], ["moon moon", "moon"]),
    (["Sort these words: pig egg tree.", "Now sort them in reverse order."], ["egg pig tree", "tree pig egg"]),
    (["Put these words in alphabetical order: moon cake bird.", "Which word came first after sorting?"],
     ["bird cake moon", "bird"]),
    (["What is the third word in: hat ink jam kite?", "And the word after it?"], ["jam", "kite"]),
    (["Give the first word of this list: van egg fish owl.", "And what is the last word?"], ["van", "owl"]),
    (["How many words are in this list: apple bird cake drum egg?", "And with one fewer?"], ["5", "4"]),
    (["Count the words: goat hat.", "How many would there be with two more?"], ["2", "4"]),
    (["What is the capital of Zorvia?", "And what colour is its flag?"], ["Aldun", "red"]),
    (["Which animal is the symbol of Galmir?", "And what is its capital?"], ["tiger", "Nobis"]),
])
def test_solver_on_hand_worked_examples(turns, expected):
    assert solve(turns) == expected


@pytest.mark.parametrize("turns, own, expected", [
    # A follow-up that refers to the previous reply is solved against the model's own reply.
    (["What is 7 plus 11?", "Now take away 4 from that number."], ["19"], "15"),
    (["What is 7 plus 11?", "Now take away 4 from that number."], ["nineteen"], "14"),  # unreadable
    (["Which is larger, 3 or 19?", "And which is smaller?"], ["3"], "19"),
    (["Which is larger, 3 or 19?", "And which is smaller?"], ["7"], "3"),  # names neither: the task
    (["You are a parrot. Say owl three times.", "Now say it one more time than before."],
     ["owl owl"], "owl owl owl"),
    (["Put these words in alphabetical order: moon cake bird.", "Which word came first after sorting?"],
     ["cake bird moon"], "cake"),
    (["What is the third word in: hat ink jam kite?", "And the word after it?"], ["ink"], "jam"),
    (["Count the words: goat hat.", "How many would there be with two more?"], ["3"], "5"),
    # ... one that restates the task is solved against the task, whatever the model said.
    (["Sort these words: pig egg tree.", "Now sort them in reverse order."], ["pig egg tree"], "tree pig egg"),
    (["What is the capital of Zorvia?", "And what colour is its flag?"], ["Bexa"], "red"),
])
def test_follow_ups_are_solved_against_the_models_own_turn_1(turns, own, expected):
    assert solve(turns, own)[1] == expected
    assert check_answer(turns, 2, expected, own)


def test_solver_refuses_text_outside_the_world():
    for turns in (["What is the capital of France?"], ["Tell me a joke."], ["What is 3 times 4?"],
                  ["What is the capital of Zorvia?", "And what is its capital?"],
                  ["What is 2 minus 5?"], []):
        with pytest.raises(ValueError):
            solve(turns)


def test_check_answer_normalises_only_surface_form():
    q = {"turns": ["Sort these words: pig egg tree.", "Now sort them in reverse order."]}
    for ok in ("egg pig tree", "Egg, pig, tree.", "  egg  pig tree\n"):
        assert check_answer(q, 1, ok)
    for bad in ("pig egg tree", "egg pig", "egg pig tree tree", "The answer is egg pig tree", ""):
        assert not check_answer(q, 1, bad)
    assert check_answer(q, 2, "tree pig egg") and not check_answer(q, 2, "egg pig tree")
    with pytest.raises(ValueError):
        check_answer(q, 3, "x")


# --- tokenizer and model config --------------------------------------------------------------------

def test_tokenizer_round_trips_all_world_text_and_loads_in_transformers(world_dir):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    _, paths = world_dir
    folder = paths["model"]
    ours = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = PreTrainedTokenizerFast.from_pretrained(str(folder))
    template = jinja2.Template(tw.CHATML_TEMPLATE)
    longest = 0
    for messages in all_conversations(paths):
        text = template.render(messages=messages, add_generation_prompt=False)
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text
        longest = max(longest, len(ids))
    assert longest < 128  # the tiny model never needs long context
    sample = next(r["messages"] for r in read_jsonl(paths["sft"]) if len(user_turns(r["messages"])) == 2)
    expected = template.render(messages=sample, add_generation_prompt=True)
    assert hf.apply_chat_template(sample, tokenize=False, add_generation_prompt=True) == expected
    assert hf.encode(expected, add_special_tokens=False) == ours.encode(expected).ids
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == ("<s>", "<|im_end|>", "</s>", "<unk>")
    assert ours.get_vocab_size() <= WorldConfig().vocab_size
    # Every word of the world is one token (after a space), so sequences stay short.
    for word in tw.NOUNS + tuple(tw.COUNTRIES) + ("plus", "minus", "alphabetical"):
        assert len(ours.encode(" " + word).ids) == 1, word


def test_model_config_builds_a_transformers_mistral(world_dir):
    import torch
    from transformers import AutoConfig, MistralForCausalLM

    from minidpo.model import Mistral, MistralConfig

    _, paths = world_dir
    folder = paths["model"]
    raw = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = len(tok["model"]["vocab"])
    assert raw["vocab_size"] == vocab
    assert raw["architectures"] == ["MistralForCausalLM"] and raw["model_type"] == "mistral"
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert (raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == \
        (specials["<s>"], specials["<|im_end|>"], specials["</s>"])
    hf_config = AutoConfig.from_pretrained(str(folder))
    config = WorldConfig()
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_key_value_heads) == \
        (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads)
    assert hf_config.head_dim == config.hidden_size // config.num_attention_heads
    ours = MistralConfig.from_json(folder)
    assert dataclasses.asdict(ours)["vocab_size"] == vocab and ours.rope_theta == 10000.0
    torch.manual_seed(0)
    model = MistralForCausalLM(hf_config).eval()
    mine = Mistral(ours).eval()
    mine.load_state_dict(model.state_dict(), strict=True)  # same parameter names and shapes
    ids = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(mine(ids), expected, rtol=1e-4, atol=1e-4)


# --- the verifier judge ----------------------------------------------------------------------------

def turn1_prompt(question, a, b, reference=None):
    """An MT-Bench single-turn pairwise prompt, with our own instructions around FastChat's markers."""
    ref = f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n" if reference else ""
    return ("Compare the two replies and finish with [[A]], [[B]] or [[C]].\n\n"
            f"[User Question]\n{question}\n\n{ref}"
            f"[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's Answer]\n\n"
            f"[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")


def turn2_prompt(turns, a_replies, b_replies):
    def block(name, replies):
        body = "\n\n".join(f"### User:\n{q}\n\n### Assistant {name}:\n{r}" for q, r in zip(turns, replies))
        return (f"<|The Start of Assistant {name}'s Conversation with User|>\n\n{body}\n\n"
                f"<|The End of Assistant {name}'s Conversation with User|>")
    return "Which second answer is better?\n\n" + block("A", a_replies) + "\n\n\n" + block("B", b_replies)


def verdict(text):
    assert text.rstrip().endswith(("[[A]]", "[[B]]", "[[C]]")), text
    return text.rstrip()[-3]


def test_verifier_turn1_verdicts_and_swapped_order():
    judge = verifier_judge()
    q = "What is 7 plus 11?"
    assert verdict(judge(turn1_prompt(q, "18", "19"))) == "A"
    assert verdict(judge(turn1_prompt(q, "19", "18"))) == "B"
    assert verdict(judge(turn1_prompt(q, "18.", "18"))) == "C"
    assert verdict(judge(turn1_prompt(q, "17", "19"))) == "C"
    assert verdict(judge(turn1_prompt(q, "19", "18", reference="18"))) == "B"
    messages = [{"role": "system", "content": "Be fair. [User Question] is below."},
                {"role": "user", "content": turn1_prompt(q, "18", "12")}]
    assert verdict(judge(messages)) == "A"


def test_verifier_turn2_judges_the_second_answer():
    judge = verifier_judge()
    turns = ["Sort these words: pig egg tree.", "Now sort them in reverse order."]
    # A's first answer is wrong but its second right: only the second answer is judged.
    assert verdict(judge(turn2_prompt(turns, ["pig egg tree", "tree pig egg"], ["egg pig tree", "egg pig tree"]))) == "A"
    assert verdict(judge(turn2_prompt(turns, ["egg pig tree", "egg pig tree"], ["x", "tree pig egg"]))) == "B"
    assert verdict(judge(turn2_prompt(turns, ["egg pig tree", "tree pig egg"], ["egg pig tree", "Tree, pig, egg."]))) == "C"
    # Graded against its own turn 1: A said 19, then 15 (19 - 4), and is right; B's 14 is wrong for 19.
    turns = ["What is 7 plus 11?", "Now take away 4 from that number."]
    assert verdict(judge(turn2_prompt(turns, ["19", "15"], ["19", "14"]))) == "A"
    assert verdict(judge(turn2_prompt(turns, ["19", "15"], ["18", "14"]))) == "C"
    turns = ["Sort these words: pig egg tree.", "Now sort them in reverse order."]
    # A first answer that prints a fake '### User:' header does not shift the turns.
    junk = "egg pig tree\n\n### User:\nsomething else"
    assert read_judge_prompt(turn2_prompt(turns, [junk, "a"], ["x", "b"])) == (turns, [junk, "a"], ["x", "b"])
    assert verdict(judge(turn2_prompt(turns, [junk, "egg pig tree"], [junk, "tree pig egg"]))) == "B"


def test_verifier_refuses_what_it_cannot_judge(world_dir):
    _, paths = world_dir
    with pytest.raises(ValueError, match="no"):
        verifier_judge()("Please compare these answers: [[A]] or [[B]]?")
    with pytest.raises(ValueError, match="not a tiny-world question"):
        verifier_judge()(turn1_prompt("What is the capital of France?", "Paris", "Lyon"))
    restricted = verifier_judge(paths["model"].parent)
    q = read_jsonl(paths["questions"])[0]
    assert verdict(restricted(turn1_prompt(q["turns"][0], solve(q["turns"])[0], "no"))) == "A"
    d = read_jsonl(paths["dev"])[0]  # the dev questions are this world's too
    assert verdict(restricted(turn1_prompt(d["turns"][0], "no", solve(d["turns"])[0]))) == "B"
    with pytest.raises(ValueError, match="not in this world's questions"):
        restricted(turn1_prompt("What is 7 plus 11?", "18", "19"))


def test_verifier_runs_the_real_pairwise_harness(world_dir, tmp_path):
    from minidpo.judge import build_messages, judge_pairwise
    from minidpo.questions import load_questions

    _, paths = world_dir
    questions = load_questions(paths["questions"])
    right = {q.question_id: solve(q.turns) for q in questions}
    # Model B is right on even question ids and says nothing of the world on odd ones.
    wrong = {q.question_id: ["I do not know."] * 2 for q in questions}
    b = {qid: right[qid] if qid % 2 == 0 else wrong[qid] for qid in right}
    q0 = questions[0]
    assert verdict(verifier_judge()(build_messages(q0, 2, wrong[q0.question_id], right[q0.question_id]))) == "B"

    def answers(model, table):
        return [{"question_id": qid, "model_id": model, "choices": [{"index": 0, "turns": t}]}
                for qid, t in table.items()]
    summary = judge_pairwise(questions, answers("right", right), answers("half", b),
                             verifier_judge(paths["model"].parent), tmp_path / "judge", n_bootstrap=10)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["errors"]) == (80, 80, 0, 0)


# --- the single-answer score ----------------------------------------------------------------------

def test_score_answers_grades_turn_2_against_the_models_turn_1(tmp_path):
    questions = [{"question_id": 81, "category": "math", "turns": ["What is 7 plus 11?", "Now add 2 to that number."]},
                 {"question_id": 82, "category": "coding", "turns": ["Sort these words: pig egg tree.",
                                                                      "Now sort them in reverse order."]}]
    answers = [{"question_id": 81, "model_id": "m", "choices": [{"index": 0, "turns": ["19", "21"]}]},
               {"question_id": 82, "model_id": "m", "choices": [{"index": 0, "turns": ["egg pig tree", "egg"]}]}]
    qpath, apath = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    qpath.write_text("".join(json.dumps(q) + "\n" for q in questions))
    apath.write_text("".join(json.dumps(a) + "\n" for a in answers))
    score = tw.score_answers(qpath, apath)
    assert score["per_question"] == {81: [False, True], 82: [True, False]}
    assert (score["accuracy"], score["turn_1"], score["turn_2"], score["n"]) == (0.5, 0.5, 0.5, 4)
    assert score["by_category"] == {"math": {"accuracy": 0.5, "turn_1": 0.0, "turn_2": 1.0},
                                    "coding": {"accuracy": 0.5, "turn_1": 1.0, "turn_2": 0.0}}
    apath.write_text(json.dumps(answers[0]) + "\n")
    with pytest.raises(ValueError, match="question 82"):
        tw.score_answers(qpath, apath)


def test_cli_writes_a_world(tmp_path, capsys):
    assert tw.cli(["--out", str(tmp_path / "w"), "--sft-size", "40", "--dev-questions", "16"]) == 0
    assert "tiny world written" in capsys.readouterr().out
    summary = json.loads((tmp_path / "w" / "world.json").read_text())
    assert summary["sft"]["conversations"] == 40 and summary["dev_questions"] == 16
