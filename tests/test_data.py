"""minidpo.data: the three hub datasets' real row shapes, the generic formats, nested subsets, and
token ids checked against transformers' tokenizer + chat template on the same messages."""
import json
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from conftest import write_tokenizer_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minidpo import data
from minidpo.data import (CAPYBARA, IGNORE_INDEX, ORCA, ULTRAFEEDBACK, DroppedPair, Pair, batches, collate,
                          load_pairs, padding_share, subset, tokenize_pair, tokenize_pairs)
from minidpo.tokenizer import load_tokenizer

# ---------------------------------------------------------------------------------------------
# Tokenizers: the reference (transformers) and the one under test (minidpo.tokenizer)
# ---------------------------------------------------------------------------------------------


def hf_tokenizer(folder):
    """The reference: transformers' fast tokenizer with the folder's chat template."""
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    tok.chat_template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    return tok


@pytest.fixture(scope="module")
def ref(chatml_tokenizer_dir):
    return hf_tokenizer(chatml_tokenizer_dir)


@pytest.fixture(scope="module")
def tok(chatml_tokenizer_dir):
    return load_tokenizer(chatml_tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Rows in each dataset's real shape (fields and types as on the hub cards)
# ---------------------------------------------------------------------------------------------

def msg(role, content):
    return {"content": content, "role": role}  # the cards list `content` before `role`


def capybara_row(turns, chosen, rejected, over=None):
    """argilla/distilabel-capybara-dpo-7k-binarized: `chosen`/`rejected` are whole conversations."""
    history = []
    for q, a in turns[:-1]:
        history += [msg("user", q), msg("assistant", a)]
    history.append(msg("user", turns[-1][0]))
    row = {"source": "Airoboros",
           "conversation": [{"input": q, "output": a} for q, a in turns],
           "original_response": turns[-1][1], "generation_prompt": ["<|system|>\n</s>\n"],
           "raw_generation_responses": [rejected], "new_generations": [rejected],
           "prompt": turns[-1][0], "chosen": history + [msg("assistant", chosen)],
           "rejected": history + [msg("assistant", rejected)],
           "rating_chosen": 5, "rating_rejected": 3,
           "chosen_model": "gpt-4-1106-preview", "rejected_model": "teknium/OpenHermes-2.5-Mistral-7B"}
    row.update(over or {})
    return row


def orca_row(system, question, chosen, rejected):
    """Intel/orca_dpo_pairs (orca_rlhf.jsonl): four strings."""
    return {"system": system, "question": question, "chosen": chosen, "rejected": rejected}


def uf_row(instruction, chosen, rejected, rc=4.5, rr=2.25):
    """argilla/ultrafeedback-binarized-preferences: float64 average ratings."""
    return {"source": "evol_instruct", "instruction": instruction, "chosen_response": chosen,
            "rejected_response": rejected, "chosen_avg_rating": rc, "rejected_avg_rating": rr,
            "chosen_model": "gpt-4"}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


CAPY_ROWS = [
    capybara_row([("What is 12 plus 30?", "42.")], "The answer is 42.", "It is 43."),
    capybara_row([("Count the letters in banana.", "Six."), ("And in fig?", "Three.")],
                 "fig has three letters.", "fig has four letters."),
    # bad: the two conversations differ before the last reply
    capybara_row([("Sort: pear, fig.", "fig, pear")], "fig, pear", "pear, fig",
                 over={"rejected": [msg("user", "Sort: pear, apple."), msg("assistant", "apple, pear")]}),
    capybara_row([("Say hi.", "hi")], "Hi!", "Hi!"),  # bad: chosen == rejected
]
ORCA_ROWS = [
    orca_row("You are a helpful assistant. Answer briefly.", "What is 12 plus 30?", "42.", "30."),
    orca_row("", "Count the letters in banana.", "six letters.", "five"),  # no system message
    {"system": "", "chosen": "a", "rejected": "b"},                       # bad: no question
    orca_row("", "Sort these words: pear, apple.", "apple, pear", "apple, pear"),  # bad: identical
    orca_row("", "def add(a, b):", 7, "return a + b"),                     # bad: wrong type
]
UF_ROWS = [
    uf_row("What is 12 plus 30?", "The answer is 42.", "The answer is 41."),
    uf_row("Sort these words: pear, apple, fig.", "apple, fig, pear", "pear, fig", rc=3.0, rr=3.0),  # tie
    uf_row("Count the letters in banana.", "six", "   "),               # bad: empty reply
    uf_row("Answer briefly.", "Brief.", "Not brief at all.", rc=None),  # kept; rating unknown
]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Fake hub snapshots laid out as the real repos are, served by a patched snapshot_download."""
    write_parquet(tmp_path / CAPYBARA / "data" / "train-00000-of-00001.parquet", CAPY_ROWS)
    write_jsonl(tmp_path / ORCA / "orca_rlhf.jsonl", ORCA_ROWS)
    write_parquet(tmp_path / ULTRAFEEDBACK / "data" / "train-00000-of-00001.parquet", UF_ROWS)
    calls = []

    def snapshot_download(repo_id, *, repo_type, revision=None, allow_patterns=None):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        return str(tmp_path / repo_id)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def test_capybara_adapter(hub):
    pairs, report = load_pairs([CAPYBARA])
    assert hub == [(CAPYBARA, "dataset", ("*.parquet", "*.jsonl", "*.json"))]  # data files only
    assert (report.seen, report.used) == (4, 2)
    assert report.skipped == Counter({data.MISMATCH: 1, data.IDENTICAL: 1})
    # 1-based rows of the snapshot's file, as an editor counts them
    where = f"{CAPYBARA}/train-00000-of-00001.parquet"
    assert report.first == {data.MISMATCH: [f"{where}:3"], data.IDENTICAL: [f"{where}:4"]}
    multi = pairs[1]
    assert multi.prompt == [msg("user", "Count the letters in banana."), msg("assistant", "Six."),
                            msg("user", "And in fig?")]
    assert (multi.chosen, multi.rejected, multi.source, multi.row) == (
        "fig has three letters.", "fig has four letters.", CAPYBARA, 1)


def test_orca_adapter(hub):
    pairs, report = load_pairs(["orca"])  # the short name of Intel/orca_dpo_pairs
    assert (report.seen, report.used) == (5, 2)
    assert report.skipped == Counter({data.MISSING: 1, data.IDENTICAL: 1, data.WRONG_TYPE: 1})
    assert pairs[0].prompt == [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                               {"role": "user", "content": "What is 12 plus 30?"}]
    assert pairs[1].prompt == [{"role": "user", "content": "Count the letters in banana."}]  # empty system dropped
    assert (pairs[1].chosen, pairs[1].rejected, pairs[1].source) == ("six letters.", "five", ORCA)


@pytest.mark.parametrize("drop_ties", [False, True])
def test_ultrafeedback_adapter_and_ties(hub, drop_ties):
    pairs, report = load_pairs([ULTRAFEEDBACK], drop_ties=drop_ties)
    assert report.notes["equal ratings"] == 1 and report.notes["ratings missing"] == 1  # counted either way
    assert report.skipped[data.EMPTY_RESPONSE] == 1
    assert [p.row for p in pairs] == ([0, 3] if drop_ties else [0, 1, 3])
    assert report.skipped[data.TIE] == int(drop_ties)
    assert pairs[0].prompt == [{"role": "user", "content": "What is 12 plus 30?"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("The answer is 42.", "The answer is 41.")


def test_pooled_counts_add_up(hub, caplog):
    with caplog.at_level(logging.INFO, logger="minidpo.data"):
        pairs, report = load_pairs([CAPYBARA, ORCA, ULTRAFEEDBACK])
    assert report.seen == len(CAPY_ROWS) + len(ORCA_ROWS) + len(UF_ROWS)
    assert report.used == len(pairs) == sum(report.by_source.values()) == 2 + 2 + 3
    assert report.seen == report.used + sum(report.skipped.values())
    assert report.by_source == Counter(p.source for p in pairs) == Counter(
        {CAPYBARA: 2, ORCA: 2, ULTRAFEEDBACK: 3})
    line = report.summary()
    assert line.startswith("load: 13 in, 7 used, 6 not used (")
    capybara_file = f"{CAPYBARA}/train-00000-of-00001.parquet"
    assert f"chosen == rejected: 2 [{capybara_file}:4, {ORCA}/orca_rlhf.jsonl:4]" in line
    assert "equal ratings: 1" in line
    assert line in caplog.text  # the summary is logged


def test_strict_names_source_and_row(hub):
    with pytest.raises(ValueError, match=rf"{ORCA}/orca_rlhf.jsonl:3: missing field: question"):
        load_pairs([ORCA], strict=True)


def test_generic_formats_from_local_files(tmp_path):
    std = write_jsonl(tmp_path / "std.jsonl", [
        {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
        {"prompt": "Say hi.", "chosen": "", "rejected": "Go away."}])
    conv = tmp_path / "conv.json"
    conv.write_text(json.dumps([
        {"prompt": [msg("system", "Be brief."), msg("user", "Say hi.")],
         "chosen": [msg("assistant", "Hi!")], "rejected": [msg("assistant", "Hello there, friend.")]},
        {"prompt": [msg("user", "Say hi.")], "chosen": [msg("user", "Hi!")], "rejected": [msg("assistant", "x")]}]))
    implicit = write_parquet(tmp_path / "implicit.parquet", [
        {"chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],
         "rejected": [msg("user", "Say hi."), msg("assistant", "No.")]},
        {"chosen": [msg("user", "Say hi."), msg("assistant", "Hi!")],
         "rejected": [msg("user", "Say bye."), msg("assistant", "Bye.")]}])
    pairs, report = load_pairs([str(std), f"{conv}::conversational", f"{implicit}::implicit"])
    assert [(p.source, p.row) for p in pairs] == [(str(std), 0), (f"{conv}", 0), (str(implicit), 0)]
    assert pairs[0].prompt == [{"role": "user", "content": "Say hi."}]
    assert pairs[1].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ([{"role": "user", "content": "Say hi."}],
                                                                     "Hi!", "No.")
    assert report.skipped == Counter({data.EMPTY_RESPONSE: 1, data.BAD_ROLE: 1, data.MISMATCH: 1})
    auto, _ = load_pairs([conv, implicit])  # auto: prompt list -> conversational, no prompt -> implicit
    assert [(p.chosen, p.rejected) for p in auto] == [("Hi!", "Hello there, friend."), ("Hi!", "No.")]


def test_local_file_with_a_dataset_adapter_and_bad_json(tmp_path):
    path = tmp_path / "orca.jsonl"
    path.write_text(json.dumps(ORCA_ROWS[0]) + "\n{not json\n\n" + json.dumps(ORCA_ROWS[1]) + "\n")
    pairs, report = load_pairs(f"{path}::orca")
    assert [p.row for p in pairs] == [0, 2] and report.skipped == Counter({data.BAD_JSON: 1})
    assert report.first[data.BAD_JSON] == [f"{path}:2"]  # the file's second line, as editors count
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:4"]  # the blank line counts too


def test_folder_prefers_parquet_and_the_train_split(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(5)]
    write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:2])
    write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", rows[2:])
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", rows[:1])
    write_jsonl(tmp_path / "train.jsonl", rows)  # a second copy in another format is not read
    (tmp_path / "dataset_info.json").write_text("{}")
    pairs, report = load_pairs(str(tmp_path))
    assert [p.prompt[0]["content"] for p in pairs] == ["q0", "q1", "q2", "q3", "q4"]
    assert [p.row for p in pairs] == [0, 1, 2, 3, 4]  # counted across the shards
    test_pairs, _ = load_pairs(str(tmp_path), split="test")
    assert len(test_pairs) == 1


def test_bad_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown format 'alpaca'; known: auto, standard"):
        load_pairs("x.jsonl::alpaca")
    with pytest.raises(ValueError, match="no data sources"):
        load_pairs([])
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="'.*pairs.csv': .csv suffix; expected one of .parquet, .jsonl, .json"):
        load_pairs(csv)
    bad = tmp_path / "obj.json"
    bad.write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="obj.json: a .json data file must hold a list"):
        load_pairs(bad)


def test_hub_failure_names_the_source(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="'someone/prefs' is no local path.*OSError: no network"):
        load_pairs("someone/prefs")


def test_missing_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "a.parquet", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(ImportError, match="needs pyarrow: pip install pyarrow"):
        load_pairs(path)


# ---------------------------------------------------------------------------------------------
# Nested subsets
# ---------------------------------------------------------------------------------------------

def many_pairs(n):
    return [Pair([{"role": "user", "content": f"q{i}"}], "a", "b", f"s{i % 3}", i) for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 100, 1003])
def test_subsets_are_nested_and_deterministic(n):
    pairs = many_pairs(n)
    fractions = [0.2, 0.4, 0.6, 0.8, 1.0] if n >= 5 else [1.0]
    for seed in range(5):
        previous = set()
        for fraction in fractions:
            chosen, composition = subset(pairs, fraction, seed)
            rows = [p.row for p in chosen]
            assert len(rows) == round(fraction * n) and rows == sorted(rows)
            assert previous <= set(rows)  # nested in the next larger fraction
            assert composition == Counter(p.source for p in chosen)
            assert sum(composition.values()) == len(chosen)
            assert subset(pairs, fraction, seed) == (chosen, composition)  # deterministic
            previous = set(rows)
        assert [p.row for p in chosen] == list(range(n))  # 100% is everything, in order
    if n >= 100:
        assert subset(pairs, 0.2, 0)[0] != subset(pairs, 0.2, 1)[0]  # seeds differ


def test_subset_bad_fraction():
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            subset(many_pairs(10), fraction, 0)
    with pytest.raises(ValueError, match="selects none"):
        subset(many_pairs(3), 0.1, 0)


# ---------------------------------------------------------------------------------------------
# Tokenising against transformers
# ---------------------------------------------------------------------------------------------

PAIRS = [
    Pair([{"role": "user", "content": "What is 12 plus 30?"}], "The answer is 42.", "It is 30.", "t", 0),
    Pair([{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
          {"role": "user", "content": "Count the letters in banana."},
          {"role": "assistant", "content": "Six letters."},
          {"role": "user", "content": "Sort these words: pear, apple, fig."}],
         "Sorted: apple, fig, pear.", "pear, apple, fig", "t", 1),
    Pair([{"role": "user", "content": "def add(a, b):"}], "def add(a, b):\n    return a + b\n", "pass", "t", 2),
]


def reference_ids(ref, pair, reply):
    """(prompt ids, reply ids) from transformers: the prompt through the template, the reply as the
    text the template writes for the assistant turn, up to and including its `<|im_end|>`."""
    prompt = ref.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    reply_ids = ref.encode(reply + "<|im_end|>", add_special_tokens=False)
    full = ref.apply_chat_template(pair.prompt + [{"role": "assistant", "content": reply}],
                                   tokenize=True, return_dict=False)
    assert full[:len(prompt) + len(reply_ids)] == prompt + reply_ids  # ChatML tokenises as text concatenates
    assert ref.decode(full[len(prompt) + len(reply_ids):]) == "\n"   # the template's tail, not trained on
    return prompt, reply_ids


def test_tokenize_pair_matches_transformers(tok, ref):
    eot = ref.convert_tokens_to_ids("<|im_end|>")
    for pair in PAIRS:
        tp = tokenize_pair(pair, tok, max_length=512, max_prompt_length=256)
        prompt, chosen = reference_ids(ref, pair, pair.chosen)
        _, rejected = reference_ids(ref, pair, pair.rejected)
        assert tp.prompt_ids == prompt and tp.chosen_ids == chosen and tp.rejected_ids == rejected
        assert tp.chosen_ids[-1] == eot and tp.rejected_ids[-1] == eot
        assert ref.decode(tp.chosen_ids) == pair.chosen + "<|im_end|>"
        assert ref.decode(tp.prompt_ids).endswith("<|im_start|>assistant\n")
        assert (tp.source, tp.row, tp.prompt_length) == (pair.source, pair.row, len(prompt))


def test_collate_masks_token_by_token(tok, ref):
    tps, report = tokenize_pairs(PAIRS, tok, max_length=512)
    assert report.used == 3
    pad = tok.pad_id
    batch = collate(tps, pad)
    b = len(PAIRS)
    rows = [(tp.prompt_ids, tp.chosen_ids) for tp in tps] + [(tp.prompt_ids, tp.rejected_ids) for tp in tps]
    width = max(len(p) + len(r) for p, r in rows)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2 * b, width) and batch[key].dtype == torch.long
    assert batch["prompt_lengths"].tolist() == [tp.prompt_length for tp in tps]
    for i, (pair, (prompt, reply)) in enumerate(zip(PAIRS + PAIRS, rows)):
        text = pair.chosen if i < b else pair.rejected  # chosen rows first, then rejected rows
        full = ref.apply_chat_template(pair.prompt + [{"role": "assistant", "content": text}],
                                       tokenize=True, return_dict=False)
        n, m = len(prompt), len(reply)
        assert batch["input_ids"][i, :n + m].tolist() == full[:n + m]
        for t in range(width):
            is_reply = n <= t < n + m
            assert batch["labels"][i, t].item() == (full[t] if is_reply else IGNORE_INDEX)
            assert batch["attention_mask"][i, t].item() == int(t < n + m)
            if t >= n + m:
                assert batch["input_ids"][i, t].item() == pad  # right padding


def test_truncation_keeps_prompt_end_then_cuts_replies(tok, ref):
    pair = PAIRS[1]
    prompt, chosen = reference_ids(ref, pair, pair.chosen)
    _, rejected = reference_ids(ref, pair, pair.rejected)
    max_prompt = len(prompt) - 5
    max_length = max_prompt + 4  # room for 4 reply tokens
    assert len(chosen) > 4 and len(rejected) > 4
    notes = Counter()
    tp = tokenize_pair(pair, tok, max_length=max_length, max_prompt_length=max_prompt, notes=notes)
    assert tp.prompt_ids == prompt[-max_prompt:]  # cut from its start
    assert tp.chosen_ids == chosen[:4] and tp.rejected_ids == rejected[:4]  # cut from their end
    assert notes == Counter({"prompt truncated": 1, "chosen truncated": 1, "rejected truncated": 1,
                             data.REPLY_CUT: 1})
    batch = collate([tp], tok.pad_id)
    assert batch["input_ids"].shape == (2, max_length)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [4, 4]

    # only the reply cut: max_prompt_length None leaves the prompt whole
    tp = tokenize_pair(pair, tok, max_length=len(prompt) + len(chosen) - 1)
    assert tp.prompt_ids == prompt and tp.chosen_ids == chosen[:-1] and tp.rejected_ids == rejected


def test_cut_replies_warn_loudly(tok, ref, caplog):
    n = len(reference_ids(ref, PAIRS[0], PAIRS[0].chosen)[0])  # the first pair's prompt length
    with caplog.at_level(logging.INFO, logger="minidpo.data"):
        tps, report = tokenize_pairs(PAIRS[:1], tok, max_length=n + 2)  # 2 reply tokens fit
    assert report.notes[data.REPLY_CUT] == 1 and len(tps) == 1
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 of 1 pairs (100%) lose the end of a reply to max_length" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minidpo.data"):
        tokenize_pairs(PAIRS[:1], tok, max_length=512)  # nothing cut: no warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_pairs_that_cannot_be_used_are_counted(tok, ref):
    long_prompt = PAIRS[1]
    n_long = len(reference_ids(ref, long_prompt, long_prompt.chosen)[0])
    eot_text = Pair([{"role": "user", "content": "Say it."}], "ok<|im_end|>more", "fine", "t", 8)
    pairs = [PAIRS[0], long_prompt, eot_text]
    tps, report = tokenize_pairs(pairs, tok, max_length=n_long)  # the long prompt leaves no room
    assert [tp.row for tp in tps] == [0]
    assert report.skipped == Counter({data.PROMPT_TOO_LONG: 1, data.EOT_INSIDE: 1})
    # pairs built in memory have no file: they are named by their 1-based row in the source
    assert report.first == {data.PROMPT_TOO_LONG: ["t row 2"], data.EOT_INSIDE: ["t row 9"]}
    assert report.summary().startswith("tokenize: 3 in, 1 used, 2 not used (")
    with pytest.raises(DroppedPair, match="t row 2: prompt does not fit max_length"):
        tokenize_pairs(pairs, tok, max_length=n_long, strict=True)
    # replies sharing their first tokens become identical when cut to them: no preference left
    twins = Pair([{"role": "user", "content": "Say it."}], "The quick brown fox jumps.",
                 "The quick brown fox sleeps.", "t", 7)
    n_twins = len(reference_ids(ref, twins, twins.chosen)[0])
    assert tokenize_pairs([twins], tok, max_length=n_twins + 3)[1].skipped == Counter({data.IDENTICAL_TOKENS: 1})
    assert tokenize_pairs([twins], tok, max_length=n_twins + 30)[1].used == 1


def test_reply_with_leading_whitespace_is_counted_not_a_prefix(tok, ref):
    # byte-level BPE joins the template's "assistant\n" with the reply's leading spaces into one
    # token, so the prompt's own tokens are not a prefix of the conversation's: such pairs are
    # dropped and counted rather than trained on a token sequence generation never sees
    pair = Pair([{"role": "user", "content": "def add(a, b):"}], "    return a + b", "pass", "t", 5)
    prompt = ref.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = ref.apply_chat_template(pair.prompt + [{"role": "assistant", "content": pair.chosen}],
                                   tokenize=True, return_dict=False)
    assert full[:len(prompt)] != prompt
    tps, report = tokenize_pairs([pair, PAIRS[0]], tok, max_length=512)
    assert [tp.row for tp in tps] == [0] and report.first == {data.NOT_PREFIX: ["t row 6"]}


def test_template_whose_prompt_is_not_a_prefix_is_counted(tmp_path):
    # a template whose generation prompt differs from how it writes an assistant turn
    template = ("{% for m in messages %}<|im_start|>{{ 'bot' if m['role'] == 'assistant' else m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(write_tokenizer_folder(tmp_path / "odd", template=template))
    tps, report = tokenize_pairs(PAIRS, tok, max_length=512)
    assert not tps and report.skipped == Counter({data.NOT_PREFIX: 3})
    no_eot = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}assistant:\n{% endif %}")
    tok = load_tokenizer(write_tokenizer_folder(tmp_path / "plain", template=no_eot))
    _, report = tokenize_pairs(PAIRS[:1], tok, max_length=512)
    assert report.skipped == Counter({data.NO_EOT: 1})


def test_template_that_refuses_messages_is_counted(tmp_path):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system turns') }}{% endif %}"
                "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(write_tokenizer_folder(tmp_path / "nosys", template=template))
    tps, report = tokenize_pairs(PAIRS, tok, max_length=512)  # PAIRS[1] has a system turn
    assert [tp.row for tp in tps] == [0, 2] and report.first == {data.TEMPLATE_ERROR: ["t row 2"]}
    with pytest.raises(DroppedPair, match="t row 2: chat template refused the messages.*no system turns"):
        tokenize_pairs(PAIRS, tok, max_length=512, strict=True)


def test_collate_rejects_bad_input(tok):
    tp = tokenize_pair(PAIRS[0], tok, max_length=64)
    with pytest.raises(ValueError, match="no pairs"):
        collate([], 0)
    with pytest.raises(ValueError, match="pad_id is None"):
        collate([tp], None)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------

def fake_tokenized(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (n, 3), generator=g).tolist()
    return [data.TokenizedPair([1] * a, [2] * b, [3] * c, "s", i) for i, (a, b, c) in enumerate(lengths)]


def test_batches_cover_every_pair_once_and_grouping_cuts_padding(caplog):
    tps = fake_tokenized(1000)
    plain = batches(tps, 8, seed=3)
    with caplog.at_level(logging.INFO, logger="minidpo.data"):
        grouped = batches(tps, 8, seed=3, group_by_length=True, group_size=16)
    for order in (plain, grouped):
        assert sorted(i for b in order for i in b) == list(range(1000))
        assert [len(b) for b in order].count(8) == 125
    assert batches(tps, 8, seed=3, group_by_length=True, group_size=16) == grouped  # deterministic
    assert batches(tps, 8, seed=4) != plain
    share_plain, share_grouped = padding_share(tps, plain), padding_share(tps, grouped)
    assert 0 < share_grouped < share_plain / 2
    assert f"padding share {share_grouped:.3f} (grouped by length)" in caplog.text


def test_batches_drop_last_and_padding_share_by_hand():
    tps = fake_tokenized(10)
    assert [len(b) for b in batches(tps, 4, seed=0, drop_last=True)] == [4, 4]
    assert sum(len(b) for b in batches(tps, 4, seed=0)) == 10
    two = [data.TokenizedPair([1, 1], [2], [3, 3, 3], "s", 0)]
    assert padding_share(two, [[0]]) == pytest.approx(1 - (3 + 5) / (2 * 5))
    with pytest.raises(ValueError, match="batch_size"):
        batches(tps, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# Properties over random rows and texts
# ---------------------------------------------------------------------------------------------

words = st.lists(st.sampled_from(["a", "b z", "fox", "\n", " ", "é", "?", "<|im_end|>"]), max_size=5).map("".join)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]),
                                           "content": words}), max_size=3)
values = st.one_of(st.none(), words, st.integers(), st.floats(allow_nan=True), messages,
                   st.lists(st.integers(), max_size=2))


def maybe(good):
    """Mostly a value of the right shape, sometimes anything at all."""
    return st.integers(0, 4).flatmap(lambda i: values if i == 0 else good)  # one_of would flatten


def assistant(text):
    return [{"role": "assistant", "content": text}]


prompts = st.tuples(messages, words).map(lambda t: t[0] + [{"role": "user", "content": t[1]}])
conversations = st.tuples(prompts, prompts, words, words, st.booleans()).map(  # shared prefix, or not
    lambda t: (t[0] + assistant(t[2]), (t[0] if t[4] else t[1]) + assistant(t[3])))
ratings = st.sampled_from([1.0, 2.5, 4.0, None, float("nan")])
SHAPES = {
    "standard": {"prompt": words, "chosen": words, "rejected": words},
    "conversational": {"prompt": prompts, "chosen": words.map(assistant), "rejected": words.map(assistant)},
    "orca": {"system": words, "question": words, "chosen": words, "rejected": words},
    "ultrafeedback": {"instruction": words, "chosen_response": words, "rejected_response": words,
                      "chosen_avg_rating": ratings, "rejected_avg_rating": ratings},
}


def shaped(fields):
    """A row in one format's shape, each field possibly wrong, at most one field missing."""
    drop = st.sampled_from([None] * 2 * len(fields) + sorted(fields))
    return st.tuples(st.fixed_dictionaries({k: maybe(v) for k, v in fields.items()}), drop).map(
        lambda t: {k: v for k, v in t[0].items() if k != t[1]})


implicit_rows = st.tuples(conversations, st.sampled_from([None, None, None, "chosen"])).map(
    lambda t: {k: v for k, v in zip(("chosen", "rejected"), t[0]) if k != t[1]})
rows = st.one_of(*[shaped(f) for f in SHAPES.values()], implicit_rows,
                 st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "question"]), values),
                 st.lists(st.integers(), max_size=2), st.integers(), words)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, max_size=12), st.sampled_from(data.FORMATS), st.booleans())
def test_property_every_row_used_or_counted(row_list, fmt, drop_ties):
    with tempfile.TemporaryDirectory() as folder:
        path = write_jsonl(Path(folder) / "rows.jsonl", row_list)
        pairs, report = load_pairs(f"{path}::{fmt}", drop_ties=drop_ties)
        assert report.seen == len(row_list) == report.used + sum(report.skipped.values())
        assert len(pairs) == report.used == sum(report.by_source.values())
        assert sum(len(v) for v in report.first.values()) <= 5 * len(report.skipped)
        for p in pairs:
            assert p.prompt and p.prompt[-1]["role"] == "user" and p.chosen != p.rejected
            assert p.chosen.strip() and p.rejected.strip()
            assert all(m["role"] in data.ROLES for m in p.prompt)
        try:
            strict_pairs, _ = load_pairs(f"{path}::{fmt}", drop_ties=drop_ties, strict=True)
        except ValueError as e:
            assert report.skipped and str(e).startswith(report.first[next(iter(report.first))][0] + ":")
        else:
            assert strict_pairs == pairs and not report.skipped


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, words, words), min_size=1, max_size=6),
       st.integers(2, 80), st.one_of(st.none(), st.integers(1, 60)))
def test_property_tokenize_uses_or_counts_every_pair(tok, specs, max_length, max_prompt):
    pairs = [Pair(m + [{"role": "user", "content": "q"}], c + "x", r + "y", "s", i)
             for i, (m, c, r) in enumerate(specs) if all(x["role"] in data.ROLES for x in m)]
    tps, report = tokenize_pairs(pairs, tok, max_length=max_length, max_prompt_length=max_prompt)
    assert report.seen == len(pairs) == report.used + sum(report.skipped.values()) == len(tps) + sum(
        report.skipped.values())
    for tp in tps:
        room = max_length - tp.prompt_length
        assert max_prompt is None or tp.prompt_length <= max_prompt
        for ids in (tp.chosen_ids, tp.rejected_ids):
            assert 1 <= len(ids) <= room
            assert ids[-1] == tok.eot_id or len(ids) == room  # closed by end-of-turn unless cut
            assert tok.eot_id not in ids[:-1]
    if tps:
        batch = collate(tps, tok.pad_id)
        scored = batch["labels"] != IGNORE_INDEX
        assert torch.equal(batch["labels"][scored], batch["input_ids"][scored])
        assert (batch["attention_mask"].sum(1) <= max_length).all()
        assert scored.sum().item() == sum(len(tp.chosen_ids) + len(tp.rejected_ids) for tp in tps)


def test_sft_format_reads_demonstrations(tmp_path, chatml_tokenizer_dir):
    from minidpo.tokenizer import load_tokenizer

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 plus 3?"},
                          {"role": "assistant", "content": "5"}]},
            {"messages": [{"role": "user", "content": "hi"}]},  # no reply: counted, not used
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = load_pairs([f"{path}::sft"])
    assert [(p.prompt[-1]["content"], p.chosen) for p in pairs] == [("2 plus 3?", "5")]
    assert report.skipped == {"bad role": 1, "empty response": 1}
    tok = load_tokenizer(chatml_tokenizer_dir)
    (tp,), _ = tokenize_pairs(pairs, tok, max_length=64)
    full = tok.apply_chat_template(pairs[0].prompt + [{"role": "assistant", "content": "5"}], tokenize=True)
    assert tp.prompt_ids + tp.chosen_ids == full[:len(tp.prompt_ids) + len(tp.chosen_ids)]
    assert tp.chosen_ids[-1] == tok.eot_id
