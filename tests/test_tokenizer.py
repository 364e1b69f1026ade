"""Tokenizers and chat templates, proven against sentencepiece and transformers on real files.

The SentencePiece model is Mistral-7B v0.1's own `tokenizer.model`, shipped inside the
`mistral-common` package as `mistral_common/data/tokenizer.model.v1` (installed with --no-deps by the
Makefile). Nothing is downloaded: hub tests run in a subprocess with HF_HUB_OFFLINE=1.
"""
import copy
import importlib.resources
import io
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece

from conftest import CHATML_TEMPLATE, write_tokenizer_folder
from minidpo import spm
from minidpo.tokenizer import CHATML, MISTRAL, TEMPLATES, compile_template, load_tokenizer

CORPUS_FILE = Path(__file__).parent / "data" / "tokenizer_corpus.txt"
SPACE = "\u2581"

# Lines whose ids differ from sentencepiece's, with the reason (must stay under 0.1% of all lines).
KNOWN_DIFFERENCES = {
    "<unk> <pad> [INST] [/INST] <<SYS>> look like specials":
        "'<unk>' written in the text is matched as the unknown token (id 0), as transformers matches "
        "special tokens in text; sentencepiece spells it out ('▁<', 'unk', '>'). With "
        "split_special_tokens=True the ids are identical (test_corpus_ids_match_sentencepiece).",
}
# Lines that do not decode back to themselves, with the reason.
KNOWN_NON_ROUND_TRIPS = {
    "\u2581 literal lower one eighth block at the start":
        "U+2581 is SentencePiece's own space symbol: encoding maps ' ' and '▁' to the same pieces, "
        "so both decode to ' ' (sentencepiece's decode gives the same text).",
    "pieces\u2581with\u2581visible\u2581space\u2581marks": "as above, U+2581 in the text",
}
SPECIAL_TEXTS = ("<unk>", "<s>", "</s>")

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 12 plus 30?"}],
    "system_one_turn": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "Sort these words: pear, apple, fig."}],
    "answered": [
        {"role": "user", "content": "Count the letters in banana."},
        {"role": "assistant", "content": "Six letters."}],
    "several_turns": [
        {"role": "user", "content": "def add(a, b):\n    return a + b\nWhat does this do?"},
        {"role": "assistant", "content": "It adds two numbers."},
        {"role": "user", "content": "  And with strings?  "},
        {"role": "assistant", "content": "It concatenates them: 'ab' 🙂"},
        {"role": "user", "content": "日本語で説明してください。"}],
    "system_several_turns": [
        {"role": "system", "content": "You are terse.\nNever apologise."},
        {"role": "user", "content": "The quick brown fox?"},
        {"role": "assistant", "content": "Jumps over the lazy dog."},
        {"role": "user", "content": "Why?\n\nExplain."}],
}

# A multi-line template in the style of the Hub's (zephyr-like): its layout only renders right with
# trim_blocks/lstrip_blocks, and it uses loop controls and raise_exception.
MULTILINE_TEMPLATE = textwrap.dedent("""\
    {% for message in messages %}
        {% if message['role'] not in ['system', 'user', 'assistant'] %}
            {{ raise_exception('unknown role ' + message['role']) }}
        {% endif %}
        {% if message['content'] == '' %}
            {% continue %}
        {% endif %}
        <|{{ message['role'] }}|>
    {{ message['content'] }}{{ eos_token }}
    {% endfor %}
    {% if add_generation_prompt %}
    <|assistant|>
    {% endif %}
    """)


# ---------------------------------------------------------------------------------------------------
# fixtures

def _corpus_file_lines():
    # newline="": some lines hold a bare "\r", which universal-newline reading would split
    with open(CORPUS_FILE, encoding="utf-8", newline="") as f:
        return f.read().split("\n")[:-1]


def _mistral_model_path() -> Path:
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    return Path(str(path))


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(_mistral_model_path()))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """Mistral-7B v0.1 as its hub folder ships it: tokenizer.model plus a config, no tokenizer.json."""
    folder = tmp_path_factory.mktemp("mistral_spm")
    shutil.copy(_mistral_model_path(), folder / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "legacy": True, "chat_template": MISTRAL}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def openhermes_dir(tmp_path_factory):
    """A folder shaped like teknium/OpenHermes-2.5-Mistral-7B's: SentencePiece model + ChatML tokens."""
    folder = tmp_path_factory.mktemp("openhermes")
    shutil.copy(_mistral_model_path(), folder / "tokenizer.model")
    (folder / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|im_end|>",
              "unk_token": "<unk>", "pad_token": None, "legacy": True, "chat_template": CHATML,
              "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    return folder


@pytest.fixture(scope="module")
def mistral_tok(mistral_dir):
    return load_tokenizer(mistral_dir)


@pytest.fixture(scope="module")
def openhermes_tok(openhermes_dir):
    return load_tokenizer(openhermes_dir)


@pytest.fixture(scope="module")
def openhermes_ref(openhermes_dir):
    return _transformers_sentencepiece(openhermes_dir, CHATML)


@pytest.fixture(scope="module")
def corpus_lines():
    """The hand-written corpus, plus generated lines and multi-line chunks (fixed seed)."""
    lines = _corpus_file_lines()
    clean = [s for s in lines if s not in KNOWN_DIFFERENCES and s not in KNOWN_NON_ROUND_TRIPS]
    rng = random.Random(1234)
    words = [w for w in " ".join(clean).split(" ") if w and not any(t in w for t in SPECIAL_TEXTS)]
    generated = [_random_line(rng, words) for _ in range(2000)]
    chunks = ["\n".join(clean[i:i + 4]) for i in range(0, len(clean), 3)]
    return lines + generated + chunks


def _random_line(rng, words):
    """Words joined by runs of spaces, tabs and newlines, with random code points mixed in."""
    gaps = [" ", " ", " ", "  ", "   ", "\t", "\t\t", "\n", " \n", "\n\n", "\r\n", " " * 8, " " * 15,
            " " * 16, " " * 17, " " * 33]
    parts = [" " * rng.choice([0, 0, 0, 1, 2, 5])]
    for _ in range(rng.randint(1, 12)):
        parts += [rng.choice(words), rng.choice(gaps)]
    if rng.random() < 0.3:
        blocks = [(0x21, 0x7E), (0xA1, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF),
                  (0x20000, 0x2A6DF)]
        parts += [chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.2:
        parts.append(str(rng.randint(0, 10 ** rng.randint(1, 15))))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# SentencePiece: parsing and conversion

def test_parsed_model_matches_sentencepiece(sp):
    model = spm.read_sentencepiece(_mistral_model_path())
    assert len(model.pieces) == sp.get_piece_size() == 32000
    assert (model.model_type, model.byte_fallback, model.normalizer_name) == (2, True, "identity")
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == \
        (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert model.add_dummy_prefix and not model.remove_extra_whitespaces and model.escape_whitespaces
    for i, piece in enumerate(model.pieces):
        assert piece.piece == sp.id_to_piece(i)
        assert piece.score == sp.get_score(i)
        assert (piece.type == spm.CONTROL) == sp.is_control(i)
        assert (piece.type == spm.BYTE) == sp.is_byte(i)
        assert (piece.type == spm.UNKNOWN) == sp.is_unknown(i)


def test_hello_world(mistral_tok, sp):
    # [1, 22557, 1526] is what Mistral-7B's tokenizer gives (sentencepiece agrees, checked live)
    assert mistral_tok.encode("Hello world") == sp.encode("Hello world", add_bos=True) == [1, 22557, 1526]
    assert mistral_tok.encode("Hello world", add_special_tokens=False) == [22557, 1526]
    assert (mistral_tok.bos_id, mistral_tok.eos_id, mistral_tok.vocab_size) == (1, 2, 32000)


def test_corpus_ids_match_sentencepiece(mistral_tok, sp, corpus_lines):
    assert len(corpus_lines) > 2000
    literal = [s for s in corpus_lines
               if mistral_tok.encode(s, split_special_tokens=True) != sp.encode(s, add_bos=True)]
    assert literal == [], _mismatch_report(mistral_tok, sp, literal)
    differ = [s for s in corpus_lines if mistral_tok.encode(s) != sp.encode(s, add_bos=True)]
    assert sorted(differ) == sorted(KNOWN_DIFFERENCES), _mismatch_report(mistral_tok, sp, differ)
    assert len(differ) / len(corpus_lines) < 0.001


def _mismatch_report(tok, sp, lines):
    rows = []
    for s in lines[:5]:
        ours = [tok.id_to_token(i) for i in tok.encode(s)]
        theirs = sp.encode(s, add_bos=True, out_type=str)
        rows.append(f"{s!r}\n  minidpo:       {ours}\n  sentencepiece: {theirs}")
    return f"{len(lines)} lines differ:\n" + "\n".join(rows)


def test_corpus_decodes_back(mistral_tok, sp, corpus_lines):
    broken = []
    for s in corpus_lines:
        ids = mistral_tok.encode(s, split_special_tokens=True)
        text = mistral_tok.decode(ids[1:])
        assert text == mistral_tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)
        if text != s:
            broken.append(s)
    assert sorted(broken) == sorted(KNOWN_NON_ROUND_TRIPS)
    assert mistral_tok.decode(mistral_tok.encode("Hello world")) == "<s> Hello world"


def _train_sentencepiece(lines, **options) -> bytes:
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=1200, character_coverage=0.98,
        byte_fallback=True, minloglevel=2, num_threads=1, **{"model_type": "bpe", **options})
    return buffer.getvalue()


def test_nfkc_model_with_whitespace_removal_matches_sentencepiece(corpus_lines):
    # sentencepiece's defaults (nmt_nfkc charsmap, remove_extra_whitespaces) exercise the normalizer
    # paths Mistral's identity model does not
    lines = _corpus_file_lines()
    data = _train_sentencepiece(lines * 2)
    reference = sentencepiece.SentencePieceProcessor(model_proto=data)
    model = spm.parse_model_proto(data)
    assert model.normalizer_name == "nmt_nfkc" and model.precompiled_charsmap
    assert model.remove_extra_whitespaces
    tok = spm.to_tokenizers(model)
    tok.encode_special_tokens = True
    for s in corpus_lines[:800]:
        ids = tok.encode(s).ids
        assert ids == reference.encode(s, add_bos=True), s
        assert tok.decode(ids) == reference.decode(ids), s


def test_unsupported_sentencepiece_models_are_refused():
    lines = _corpus_file_lines() * 2
    unigram = spm.parse_model_proto(_train_sentencepiece(lines, model_type="unigram"))
    with pytest.raises(ValueError, match="only BPE.*'unigram'"):
        spm.to_tokenizers(unigram)
    user_defined = spm.parse_model_proto(_train_sentencepiece(lines, user_defined_symbols=["<tool>"]))
    with pytest.raises(ValueError, match="user-defined pieces.*'<tool>'"):
        spm.to_tokenizers(user_defined)


def test_corrupt_model_file_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff\xff\x0f")
    with pytest.raises(ValueError, match=r"tokenizer\.model: cannot read as a SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text('{"not": "protobuf"}')
    with pytest.raises(ValueError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------
# an OpenHermes-shaped folder: tokenizer.model + added_tokens.json + ChatML

def _transformers_sentencepiece(folder, template):
    """transformers' own SentencePiece tokenizer as the reference: legacy and adding <s> in tokenizer(text),
    as OpenHermes' config says."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    ref = SentencePieceBackend(vocab_file=str(folder / "tokenizer.model"), legacy=True, bos_token="<s>",
                               eos_token="</s>", unk_token="<unk>", special_tokens_pattern="bos")
    ref.add_tokens(["<|im_end|>", "<|im_start|>"], special_tokens=True)
    assert ref.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [32000, 32001]
    ref.chat_template = template
    return ref


def _sentencepiece_by_span(sp, text, added):
    """SentencePiece on each span between added tokens, as the slow Llama tokenizer did."""
    ids, rest = [], text
    while rest:
        hits = [(rest.find(t), t) for t in added if t in rest]
        at, token = min(hits) if hits else (len(rest), None)
        ids += sp.encode(rest[:at]) if at else []
        if token is None:
            break
        ids.append(added[token])
        rest = rest[at + len(token):]
    return ids


def test_openhermes_folder_special_ids(openhermes_tok):
    tok = openhermes_tok
    assert tok.vocab_size == 32002
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.eot_id) == (1, 32000, 0, 32000)
    assert tok.pad_id == tok.unk_id == 0  # no pad token in the folder: unk, documented
    assert tok.stop_ids == (32000,)
    assert tok.token_to_id("<|im_start|>") == 32001
    assert tok.template_name == "model" and tok.chat_template == CHATML
    assert tok.encode("Hello world") == [1, 22557, 1526]


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_openhermes_chat_ids_match_transformers(openhermes_tok, openhermes_ref, sp, conversation,
                                                generation_prompt):
    tok, ref = openhermes_tok, openhermes_ref
    messages = CONVERSATIONS[conversation]
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    # The BOS rule: ChatML writes no <s>, OpenHermes' config adds it, so minidpo starts with <s> as
    # transformers' tokenizer(text) (FastChat's generation) does; its apply_chat_template(tokenize=True)
    # (TRL's tokenisation of conversations) leaves it out.
    assert ids == ref(text)["input_ids"]
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == [1] + expected["input_ids"]
    added = {"<|im_end|>": 32000, "<|im_start|>": 32001, "<s>": 1, "</s>": 2, "<unk>": 0}
    assert ids == [1] + _sentencepiece_by_span(sp, text, added)
    assert ids.count(32000) == len(messages)  # every turn closed by one <|im_end|>


def test_bos_rule_is_the_same_in_training_and_generation(openhermes_tok, template_folders):
    """OpenHermes (ChatML writes no <s>, add_bos_token: true): training prompts and the prompts
    generation decodes from start with one <s>, replies hold none; a folder without add_bos gets none."""
    from minidpo.data import Pair, tokenize_pairs

    messages = [{"role": "user", "content": "What is 12 plus 30?"}]
    for tok, bos in ((openhermes_tok, 1), (load_tokenizer(template_folders["chatml"]), 0)):
        [pair], _ = tokenize_pairs([Pair(messages, "42.", "41.", "test", 0)], tok, max_length=64)
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)  # chat_reply's
        assert pair.prompt_ids == prompt and prompt.count(tok.bos_id) == bos and (prompt[0] == tok.bos_id) == bos
        assert tok.bos_id not in pair.chosen_ids + pair.rejected_ids


def test_openhermes_plain_text_matches_transformers(openhermes_tok, openhermes_ref, corpus_lines):
    tok, ref = openhermes_tok, openhermes_ref
    for s in corpus_lines[::7] + ["<|im_start|>user\n  spaced <|im_end|>\n", "a<|im_end|>b</s><s>"]:
        assert tok.encode(s, add_special_tokens=False) == ref.encode(s, add_special_tokens=False), s


# ---------------------------------------------------------------------------------------------------
# chat templates against transformers' apply_chat_template

def _fast_reference(folder: Path):
    """transformers' tokenizer on the same tokenizer.json (PreTrainedTokenizerFast, not AutoTokenizer,
    which probes mistral-common and needs tiktoken)."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **specials)
    ref.chat_template = config["chat_template"]
    return ref


def _bpe_folder(path, template, **config_changes):
    folder = write_tokenizer_folder(path, template=template)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def template_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    return {
        "chatml": _bpe_folder(root / "chatml", CHATML_TEMPLATE),
        # Mistral-instruct style: eos "</s>" closes each answer
        "mistral": _bpe_folder(root / "mistral", MISTRAL, eos_token="</s>", pad_token=None),
        "multiline": _bpe_folder(root / "multiline", MULTILINE_TEMPLATE, eos_token="</s>"),
    }


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", ["chatml", "mistral", "multiline"])
def test_chat_template_matches_transformers(template_folders, template, conversation, generation_prompt):
    folder = template_folders[template]
    tok, ref = load_tokenizer(folder), _fast_reference(folder)
    messages = CONVERSATIONS[conversation]
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == expected["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_mistral_template_on_sentencepiece_matches_transformers(mistral_dir, mistral_tok, conversation):
    ref = _transformers_sentencepiece(mistral_dir, MISTRAL)
    messages = CONVERSATIONS[conversation]
    text = mistral_tok.apply_chat_template(messages)
    assert text == ref.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<s>[INST] ")
    assert text.count("[/INST]") == sum(m["role"] == "user" for m in messages)
    ids = mistral_tok.apply_chat_template(messages, tokenize=True)
    assert ids == ref.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == sum(m["role"] == "assistant" for m in messages)


def test_mistral_template_layout():
    # written out from Mistral's documented format "<s>[INST] Instruction [/INST] Model answer</s>[INST] ..."
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]
    rendered = compile_template(MISTRAL, "mistral").render(messages=messages, bos_token="<s>",
                                                          eos_token="</s>", add_generation_prompt=True)
    assert rendered == "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]"


def test_end_of_turn_and_stop_ids(template_folders, mistral_tok):
    chatml = load_tokenizer(template_folders["chatml"])
    assert chatml.eot_id == chatml.token_to_id("<|im_end|>") == chatml.eos_id
    mistral = load_tokenizer(template_folders["mistral"])
    assert mistral.eot_id == mistral.eos_id == mistral.token_to_id("</s>")
    assert mistral.pad_id == mistral.unk_id  # pad_token null in the folder: falls back to unk
    mistral.set_template("chatml")
    assert mistral.template_name == "chatml" and mistral.chat_template == CHATML
    assert mistral.eot_id == mistral.token_to_id("<|im_end|>")
    assert mistral.stop_ids == (mistral.eos_id, mistral.eot_id) and len(set(mistral.stop_ids)) == 2
    assert mistral_tok.stop_ids == (2,)


def test_pinned_template(template_folders):
    tok = load_tokenizer(template_folders["chatml"], template="mistral")
    assert tok.template_name == "mistral"
    text = tok.apply_chat_template(CONVERSATIONS["answered"])
    assert text == "<s>[INST] Count the letters in banana. [/INST]Six letters.<|im_end|>"
    assert set(TEMPLATES) == {"chatml", "mistral"}


def test_template_from_chat_template_jinja(tmp_path, template_folders):
    folder = _bpe_folder(tmp_path / "jinja", None)
    (folder / "chat_template.jinja").write_text(MULTILINE_TEMPLATE)
    tok = load_tokenizer(folder)
    assert tok.template_name == "model" and tok.chat_template == MULTILINE_TEMPLATE


def test_split_special_tokens(template_folders):
    tok = load_tokenizer(template_folders["chatml"])
    assert tok.encode("a<|im_end|>", add_special_tokens=False)[-1] == tok.eot_id
    assert tok.eot_id not in tok.encode("a<|im_end|>", add_special_tokens=False, split_special_tokens=True)
    assert tok.eot_id in tok.encode("a<|im_end|>", add_special_tokens=False)  # the switch is restored


def test_add_bos_token_follows_config_like_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast

    folder = _bpe_folder(tmp_path / "bos", CHATML_TEMPLATE, add_bos_token=True, add_eos_token=True)
    tok = load_tokenizer(folder)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                  eos_token="<|im_end|>", add_bos_token=True, add_eos_token=True)
    for text in ["What is 12 plus 30?", "", "  spaced  "]:
        assert tok.encode(text) == ref.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.encode("hi")[0] == tok.bos_id and tok.encode("hi")[-1] == tok.eos_id


# ---------------------------------------------------------------------------------------------------
# bad input

def test_unknown_template_name_lists_known(template_folders):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*chatml, mistral"):
        load_tokenizer(template_folders["chatml"], template="vicuna")
    tok = load_tokenizer(template_folders["chatml"])
    with pytest.raises(ValueError, match="known templates: chatml, mistral"):
        tok.set_template("llama-3")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}, {"content": "no role"}], "message 1 has no 'role'"),
    ([{"role": "user"}], "message 0 has no 'content'"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a string"),
    (["just text"], "message 0 must be a dict"),
    ("hello", "messages must be a list"),
])
def test_malformed_messages(template_folders, messages, match):
    tok = load_tokenizer(template_folders["chatml"])
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_template_exception_is_surfaced(template_folders, tmp_path):
    mistral = load_tokenizer(template_folders["mistral"])
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        mistral.apply_chat_template(two_users)
    multiline = load_tokenizer(template_folders["multiline"])
    with pytest.raises(ValueError, match="unknown role tool"):
        multiline.apply_chat_template([{"role": "tool", "content": "x"}])
    folder = _bpe_folder(tmp_path / "broken", "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_tokenizer(folder)


def test_template_is_sandboxed(tmp_path):
    folder = _bpe_folder(tmp_path / "evil", "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    tok = load_tokenizer(folder)
    with pytest.raises(ValueError, match="failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "tokenizer.json" in str(info.value) and "tokenizer.model" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_tokenizer(tmp_path / "missing" / "deeper")


def test_missing_template_falls_back_to_chatml(tmp_path):
    folder = _bpe_folder(tmp_path / "plain", None)
    with pytest.warns(UserWarning, match="no chat template.*'chatml'"):
        tok = load_tokenizer(folder)
    assert tok.template_name == "chatml" and tok.eot_id == tok.token_to_id("<|im_end|>")


def test_chatml_on_vocab_without_its_tokens_warns(mistral_tok):
    tok = copy.copy(mistral_tok)  # set_template changes only the copy's template attributes
    with pytest.warns(UserWarning, match="not tokens of this vocabulary"):
        tok.set_template("chatml")
    assert tok.eot_id == tok.eos_id and tok.template_name == "chatml"
    assert mistral_tok.template_name == "model"


def test_added_token_id_gap_is_refused(tmp_path):
    shutil.copy(_mistral_model_path(), tmp_path / "tokenizer.model")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32005}))
    with pytest.raises(ValueError, match=r"'<\|im_end\|>' has id 32005, but the next free id is 32000"):
        load_tokenizer(tmp_path)


def test_special_token_missing_from_vocab(tmp_path):
    folder = _bpe_folder(tmp_path / "nosuch", CHATML_TEMPLATE, eos_token="<|eot_id|>", add_eos_token=False)
    with pytest.raises(ValueError, match="eos_token '<\\|eot_id\\|>' is not in the vocabulary"):
        load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------------
# hub repo ids, offline

HUB_SCRIPT = """
import sys
from minidpo.tokenizer import load_tokenizer
tok = load_tokenizer("someone/tiny-chatml")
print("IDS", tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True))
try:
    load_tokenizer("teknium/OpenHermes-2.5-Mistral-7B")
except FileNotFoundError as e:
    print("ERROR", e)
"""


def test_hub_repo_offline(tmp_path, template_folders):
    # a hub cache holding one repo's snapshot, as huggingface_hub lays it out
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-chatml"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(template_folders["chatml"], repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    expected = load_tokenizer(template_folders["chatml"]).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True)
    assert f"IDS {expected}" in result.stdout
    error = result.stdout.split("ERROR", 1)[1]
    assert "'teknium/OpenHermes-2.5-Mistral-7B' is not a local folder" in error
    assert "HF_HUB_OFFLINE=1" in error and "not in the local cache" in error


def test_added_tokens_from_tokenizer_config(tmp_path, sp):
    # transformers 4.3x+ writes added tokens under tokenizer_config.json's added_tokens_decoder, with
    # the base pieces listed too; "special": false keeps <|im_start|> in decode(skip_special_tokens=True)
    shutil.copy(_mistral_model_path(), tmp_path / "tokenizer.model")
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    decoder = {"0": {"content": "<unk>", "special": True, **entry},
               "1": {"content": "<s>", "special": True, **entry},
               "2": {"content": "</s>", "special": True, **entry},
               "32000": {"content": "<|im_end|>", "special": True, **entry},
               "32001": {"content": "<|im_start|>", "special": False, **entry}}
    config = {"added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": {"content": "<|im_end|>"},
              "unk_token": "<unk>", "chat_template": CHATML}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.eos_id, tok.eot_id) == (32002, 32000, 32000)
    assert tok.token_to_id("<|im_start|>") == 32001
    ids = tok.apply_chat_template(CONVERSATIONS["answered"], tokenize=True)
    assert ids[0] == tok.bos_id  # add_bos_token defaults to true for SentencePiece, as in transformers
    assert ids[1:] == _sentencepiece_by_span(sp, tok.apply_chat_template(CONVERSATIONS["answered"]),
                                         {"<|im_end|>": 32000, "<|im_start|>": 32001})
    text = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" in text and "<|im_end|>" not in text
    bad = {**decoder, "1": {"content": "<bos>", "special": True, **entry}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": bad}))
    with pytest.raises(ValueError, match="'<bos>' has id 1, but that id holds '<s>' in tokenizer.model"):
        load_tokenizer(tmp_path)
