"""The tiny world's base and preference sets (minidpo.tinybase) on a small world built once: the
pairs come from the base's own replies as the verifier grades them, each set has its own make-up,
the report measures the base, and every stage is keyed by the config's digest."""
import json
import os
from pathlib import Path

import pytest

from minidpo import tinybase, tinyworld
from minidpo.tinyworld import WorldConfig, check_answer

# Small enough to build in well under a minute on 2 cores: a 0.2M model, a few SFT steps (so
# the base is wrong often, and pairs are found at once).
SMALL = WorldConfig(sft_size=96, sft_epochs=1, total_pairs=60, dev_questions=16, benchmark_questions=16,
                    hidden_size=64, intermediate_size=128, num_hidden_layers=2)
HUB_FIELDS = {  # each dataset's `dataset_info.features` on its hub card
    "capybara": ["source", "conversation", "original_response", "generation_prompt",
                 "raw_generation_responses", "new_generations", "prompt", "chosen", "rejected",
                 "rating_chosen", "rating_rejected", "chosen_model", "rejected_model"],
    "orca": ["system", "question", "chosen", "rejected"],
    "ultrafeedback": ["source", "instruction", "chosen_response", "rejected_response",
                      "chosen_avg_rating", "rejected_avg_rating", "chosen_model"],
}


def read_jsonl(path):
    return [json.loads(line) for line in Path(str(path).split("::")[0]).read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tinybase")
    return directory, tinybase.prepare(directory, SMALL, log=lambda m: None)


def conversation(name, row):
    """(user turns, the replies before the judged one, chosen, rejected) of a row of set `name`."""
    if name == "capybara":
        users = [m["content"] for m in row["chosen"] if m["role"] == "user"]
        context = [m["content"] for m in row["chosen"][:-1] if m["role"] == "assistant"]
        return users, context, row["chosen"][-1]["content"], row["rejected"][-1]["content"]
    if name == "orca":
        return [row["question"]], [], row["chosen"], row["rejected"]
    return [row["instruction"]], [], row["chosen_response"], row["rejected_response"]


def test_prepare_returns_the_contract(built):
    directory, paths = built
    assert paths["digest"] == tinybase.digest(SMALL) and paths["base"].name == "base"
    assert (paths["base"] / "config.json").is_file() and (paths["base"] / "model.safetensors").is_file()
    assert len(read_jsonl(paths["benchmark"])) == 16 and len(read_jsonl(paths["dev"])) == 16
    assert json.loads((directory / "report.json").read_text()) == json.loads(paths["report"].read_text())
    judge = tinyworld.verifier_judge(paths["world"])  # knows both question files
    assert judge.judge_name == "tinyworld-verifier"


def test_pair_sizes_fields_and_loader(built):
    from minidpo.data import load_pairs, tokenize_pairs
    from minidpo.tokenizer import load_tokenizer

    _, paths = built
    sizes = tinyworld.split_sizes(SMALL.total_pairs)
    for name in tinybase.SETS:
        rows = read_jsonl(paths[name])
        assert len(rows) == sizes[name]
        assert all(list(row) == HUB_FIELDS[name] for row in rows)
    pairs, report = load_pairs([paths[n] for n in tinybase.SETS], strict=True)
    assert len(pairs) == SMALL.total_pairs == report.used
    tokenized, report = tokenize_pairs(pairs, load_tokenizer(paths["base"]), max_length=128, strict=True)
    assert len(tokenized) == SMALL.total_pairs and not report.notes


def test_a_and_b_pairs_contrast_a_right_reply_with_the_bases_wrong_one(built):
    """A: the follow-up, in the context of the base's own turn 1, graded against it; B: one turn
    under a system prompt. chosen right, rejected wrong, every rejected reply the base's own."""
    _, paths = built
    composition = json.loads((paths["base"].parent / "pairs" / "composition.json").read_text())
    for name in ("capybara", "orca"):
        for row in read_jsonl(paths[name]):
            users, context, chosen, rejected = conversation(name, row)
            assert len(users) == (2 if name == "capybara" else 1)
            assert check_answer(users, len(users), chosen, context), (name, users, context, chosen)
            assert not check_answer(users, len(users), rejected, context), (name, users, rejected)
        assert composition[name]["kind"] == {"clean": composition[name]["pairs"]}
        assert composition[name]["rejected_from"] == {"base": composition[name]["pairs"]}
    assert {row["system"] for row in read_jsonl(paths["orca"])} <= set(tinyworld.SYSTEM_PROMPTS)
    capybara = read_jsonl(paths["capybara"])
    assert all(r["chosen"][:-1] == r["rejected"][:-1] for r in capybara)
    assert all(r["rating_chosen"] in (4, 5) and r["rating_rejected"] in (1, 2, 3) for r in capybara)
    # The context is what the base said, right or wrong: at this size it is often wrong.
    assert any(not check_answer(conversation("capybara", r)[0], 1, conversation("capybara", r)[1][0])
               for r in capybara)


def test_c_pairs_carry_label_noise_and_near_ties(built):
    _, paths = built
    rows = read_jsonl(paths["ultrafeedback"])
    kinds = {"clean": 0, "swapped": 0, "near-tie": 0}
    for row in rows:
        users, _, chosen, rejected = conversation("ultrafeedback", row)
        good, bad = check_answer(users, 1, chosen), check_answer(users, 1, rejected)
        kind = "clean" if good and not bad else "swapped" if bad and not good else "near-tie"
        kinds[kind] += 1
        if kind == "near-tie":
            assert row["chosen_avg_rating"] - row["rejected_avg_rating"] == 0.25
        else:
            assert row["chosen_avg_rating"] > row["rejected_avg_rating"] + 0.5
    composition = json.loads((paths["base"].parent / "pairs" / "composition.json").read_text())
    assert composition["ultrafeedback"]["kind"] == {k: v for k, v in kinds.items() if v}
    n, p = len(rows), SMALL.label_noise
    assert abs(kinds["swapped"] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, kinds
    # A near-tie needs two different wrong replies; where the base has one, the pair stays clean.
    p = SMALL.near_ties
    assert 0 < kinds["near-tie"] and kinds["near-tie"] / n < p + 4 * (p * (1 - p) / n) ** 0.5, kinds


def test_report_measures_the_base_on_the_dev_questions(built):
    _, paths = built
    report = json.loads(paths["report"].read_text())
    dev = report["base_on_dev"]
    assert dev["n"] == 2 * SMALL.dev_questions and set(dev["by_category"]) == set(tinyworld.CATEGORIES)
    assert 0 <= dev["turn_1"] <= 1 and 0 <= dev["turn_2"] <= 1
    mistakes = report["base_mistakes_on_dev"]
    wrong = dev["n"] - mistakes.get("right_weak", 0) - mistakes.get("right_other", 0)
    assert mistakes.get("wrong", 0) == wrong >= mistakes.get("wrong_systematic", 0)
    assert round(dev["accuracy"] * dev["n"]) == dev["n"] - wrong
    for name in tinybase.SETS:
        held = report["held_out_reward_accuracy"][name]
        assert held["pairs"] >= 20 and 0 <= held["chosen_preferred"] <= 1
    assert tinybase.summary_lines(report)[0].startswith(f"base on {dev['n']} dev question-turns")


def test_rerun_reuses_and_a_killed_stage_is_redone(built):
    directory, paths = built
    root = paths["base"].parent
    stamps = {p: p.stat().st_mtime_ns for p in (paths["base"] / "model.safetensors", paths["report"])}
    assert tinybase.prepare(directory, SMALL, log=lambda m: None) == paths
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # A build killed while sampling pairs leaves pairs.tmp and no pairs/: only that stage (and the
    # report that reads it) is redone, from the same base.
    os.replace(root / "pairs", root / "pairs.tmp")
    paths["report"].unlink()
    logged = []
    tinybase.prepare(directory, SMALL, log=logged.append)
    assert (paths["base"] / "model.safetensors").stat().st_mtime_ns == stamps[paths["base"] / "model.safetensors"]
    assert any("sampling" in m for m in logged) and not any("SFT" in m for m in logged)
    assert (root / "pairs").is_dir() and not (root / "pairs.tmp").exists()


def test_every_config_field_changes_the_digest():
    import dataclasses

    for f in dataclasses.fields(WorldConfig):
        value = getattr(SMALL, f.name)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            changed = value + (8 if f.name.endswith("questions") else 2)
        else:
            changed = value / 2
        try:
            config = dataclasses.replace(SMALL, **{f.name: changed})
        except ValueError:
            continue
        assert tinybase.digest(config) != tinybase.digest(SMALL), f.name
