"""The tiny world: determinism, sizes, held-out benchmark, verified pairs, tokenizer, model config,
the verifier judge, and that the data loader and the judge harness read what it writes."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from minidpo import tinyworld as tw
from minidpo.tinyworld import WorldConfig, check_answer, solve, verifier_judge

# Field names as listed in each dataset's `dataset_info.features` on its hub card (README.md):
# argilla/distilabel-capybara-dpo-7k-binarized, Intel/orca_dpo_pairs (card schema),
# argilla/ultrafeedback-binarized-preferences.
HUB_FIELDS = {
    "capybara": ["source", "conversation", "original_response", "generation_prompt",
                 "raw_generation_responses", "new_generations", "prompt", "chosen", "rejected",
                 "rating_chosen", "rating_rejected", "chosen_model", "rejected_model"],
    "orca": ["system", "question", "chosen", "rejected"],
    "ultrafeedback": ["source", "instruction", "chosen_response", "rejected_response",
                      "chosen_avg_rating", "rejected_avg_rating", "chosen_model"],
}
SETS = ("capybara", "orca", "ultrafeedback")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """The default world, written once."""
    directory = tmp_path_factory.mktemp("world")
    return directory, tw.write_world(directory, WorldConfig())


def user_turns(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


def pairs_of(name, row):
    """(user turns, chosen reply, rejected reply) of a row of dataset `name`."""
    if name == "capybara":
        return user_turns(row["chosen"]), row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    if name == "orca":
        return [row["question"]], row["chosen"], row["rejected"]
    return [row["instruction"]], row["chosen_response"], row["rejected_response"]


def all_conversations(paths):
    """Every message list in the written files (both replies of each pair)."""
    for name in SETS:
        for row in read_jsonl(paths[name]):
            turns, chosen, rejected = pairs_of(name, row)
            prefix = row["chosen"][:-1] if name == "capybara" else (
                [{"role": "system", "content": row["system"]}] if name == "orca" else [])
            if name != "capybara":
                prefix = prefix + [{"role": "user", "content": turns[0]}]
            for reply in (chosen, rejected):
                yield prefix + [{"role": "assistant", "content": reply}]
    for row in read_jsonl(paths["sft"]):
        yield row["messages"]
    for q in read_jsonl(paths["questions"]):
        yield [{"role": "user", "content": t} for t in q["turns"]]


# --- determinism and sizes -------------------------------------------------------------------------

def test_same_seed_writes_identical_files(world_dir, tmp_path):
    # In a fresh process with another hash seed: nothing may depend on set order or process state.
    first_dir, first = world_dir
    code = f"from minidpo import tinyworld as tw; tw.write_world({str(tmp_path / 'again')!r})"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parent.parent)
    files = sorted(p.relative_to(first_dir) for p in first_dir.rglob("*") if p.is_file())
    assert len(files) == 9
    for rel in files:
        assert (first_dir / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    other = tw.build_world(WorldConfig(seed=1, total_pairs=100, sft_size=50))
    assert other.questions != read_jsonl(first["questions"])
    assert other.preferences["orca"] != read_jsonl(first["orca"])[:len(other.preferences["orca"])]
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
    counts = {name: len(read_jsonl(paths[name])) for name in SETS}
    assert counts == tw.split_sizes(1500) == {"capybara": 135, "orca": 230, "ultrafeedback": 1135}
    summary = json.loads(paths["world"].read_text())
    assert summary["pairs"] == counts and summary["questions"] == 80
    assert summary["sft"]["conversations"] == len(read_jsonl(paths["sft"])) == WorldConfig().sft_size


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sft_error_rate"):
        WorldConfig(sft_error_rate=1.5)
    with pytest.raises(ValueError, match="total_pairs"):
        WorldConfig(total_pairs=0)
    with pytest.raises(ValueError, match="leaves a dataset empty"):
        WorldConfig(total_pairs=6)  # 6 * 7563 / 84041 = 0.54: largest remainders give capybara none
    with pytest.raises(ValueError, match="num_key_value_heads"):
        WorldConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        WorldConfig(vocab_size=100)


# --- the data files --------------------------------------------------------------------------------

def test_files_have_exactly_the_hub_fields(world_dir):
    _, paths = world_dir
    for name in SETS:
        for row in read_jsonl(paths[name]):
            assert list(row) == HUB_FIELDS[name], name
    for row in read_jsonl(paths["capybara"]):
        assert all(set(m) == {"content", "role"} for m in row["chosen"] + row["rejected"])
        assert all(set(turn) == {"input", "output"} for turn in row["conversation"])
        assert isinstance(row["rating_chosen"], int) and isinstance(row["rating_rejected"], int)
    for row in read_jsonl(paths["ultrafeedback"]):
        assert isinstance(row["chosen_avg_rating"], float) and row["chosen_avg_rating"] > row["rejected_avg_rating"]
    for row in read_jsonl(paths["sft"]):
        assert list(row) == ["messages"]


def test_chosen_is_correct_and_rejected_wrong_for_every_pair(world_dir):
    _, paths = world_dir
    for name in SETS:
        for row in read_jsonl(paths[name]):
            turns, chosen, rejected = pairs_of(name, row)
            assert check_answer(turns, len(turns), chosen), (name, turns, chosen)
            assert not check_answer(turns, len(turns), rejected), (name, turns, rejected)
            if name == "capybara":
                assert row["chosen"][:-1] == row["rejected"][:-1]
                assert len(turns) == 2 and check_answer(turns, 1, row["chosen"][1]["content"])
                assert row["conversation"][-1]["output"] == chosen


def test_sft_error_share_is_exact_and_only_the_last_reply_errs(world_dir):
    _, paths = world_dir
    rows = read_jsonl(paths["sft"])
    wrong, weak_wrong, weak_total = 0, 0, 0
    for row in rows:
        turns = user_turns(row["messages"])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert all(check_answer(turns, t + 1, replies[t]) for t in range(len(turns) - 1))
        bad = not check_answer(turns, len(turns), replies[-1])
        weak = tw.is_weak(turns)
        wrong += bad
        weak_total += weak
        weak_wrong += bad and weak
    config = WorldConfig()
    assert wrong == round(config.sft_error_rate * config.sft_size)
    assert weak_wrong == round(config.sft_error_focus * wrong)  # concentrated on weak inputs
    assert weak_wrong / weak_total > 0.5 > (wrong - weak_wrong) / (len(rows) - weak_total)
    assert sum(len(user_turns(r["messages"])) == 2 for r in rows) == round(config.sft_two_turn_share * len(rows))
    small = tw.make_sft(WorldConfig(sft_size=200, sft_error_rate=0.1), set())
    assert sum(not check_answer(user_turns(r["messages"]), len(user_turns(r["messages"])),
                                r["messages"][-1]["content"]) for r in small) == 20


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


def test_benchmark_is_held_out_from_every_training_file(world_dir):
    _, paths = world_dir
    benchmark = {q["turns"][0] for q in read_jsonl(paths["questions"])}
    conversations = []
    for name in SETS + ("sft",):
        for row in read_jsonl(paths[name]):
            conversations.append(user_turns(row["messages"]) if name == "sft" else pairs_of(name, row)[0])
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
    sample = read_jsonl(paths["capybara"])[0]["chosen"]
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
    # A first answer that prints a fake '### User:' header does not shift the turns.
    junk = "egg pig tree\n\n### User:\nsomething else"
    assert tw.parse_judge_prompt(turn2_prompt(turns, [junk, "a"], [junk, "b"])) == (turns, "a", "b")
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
    with pytest.raises(ValueError, match="not in this world's benchmark"):
        restricted(turn1_prompt("What is 7 plus 11?", "18", "19"))


def test_verifier_runs_the_real_pairwise_harness(world_dir, tmp_path):
    from minidpo.judge import build_messages, judge_pairwise
    from minidpo.questions import load_questions

    _, paths = world_dir
    questions = load_questions(paths["questions"])
    right = {q.question_id: solve(q.turns) for q in questions}
    # Model B is right on even question ids and wrong (the rejected-style reply) on odd ones.
    wrong = {q.question_id: tw.plausible_wrong(q.turns) for q in questions}
    b = {qid: right[qid] if qid % 2 == 0 else wrong[qid] for qid in right}
    q0 = questions[0]
    assert verdict(verifier_judge()(build_messages(q0, 2, wrong[q0.question_id], right[q0.question_id]))) == "B"

    def answers(model, table):
        return [{"question_id": qid, "model_id": model, "choices": [{"index": 0, "turns": t}]}
                for qid, t in table.items()]
    summary = judge_pairwise(questions, answers("right", right), answers("half", b),
                             verifier_judge(paths["model"].parent), tmp_path / "judge", n_bootstrap=10)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["errors"]) == (80, 80, 0, 0)


# --- the data loader reads the files through the hub adapters --------------------------------------

def test_data_loader_reads_the_three_files(world_dir):
    from minidpo.data import load_pairs, tokenize_pairs
    from minidpo.tokenizer import load_tokenizer

    _, paths = world_dir
    sources = [f"{paths[name]}::{name}" for name in SETS]
    pairs, report = load_pairs(sources, strict=True)
    assert len(pairs) == 1500 and report.used == 1500
    assert [sum(p.source == str(paths[n]) for p in pairs) for n in SETS] == [135, 230, 1135]
    orca = next(p for p in pairs if p.source == str(paths["orca"]))
    assert [m["role"] for m in orca.prompt] == ["system", "user"]
    tokenized, report = tokenize_pairs(pairs, load_tokenizer(paths["model"]), max_length=128, strict=True)
    assert len(tokenized) == 1500 and not report.notes


def test_cli_writes_a_world(tmp_path, capsys):
    assert tw.cli(["--out", str(tmp_path / "w"), "--total-pairs", "30", "--sft-size", "40"]) == 0
    assert "tiny world written" in capsys.readouterr().out
    summary = json.loads((tmp_path / "w" / "world.json").read_text())
    assert summary["pairs"] == tw.split_sizes(30) and summary["sft"] == {"conversations": 40, "wrong": 14}
