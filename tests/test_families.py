"""Llama and Qwen2 checkpoints in minidpo's one network, against transformers on random tiny configs:
logits in fp32 (max abs diff <= 1e-4), the round trip back into transformers, PEFT adapters both
ways, the config switches (Llama 3 RoPE scaling, biases, Qwen2's sliding-window keys) and prefix
sharing; and the tokenizers and chat templates of these families as transformers renders them."""
import importlib.resources
import json

import pytest
import torch
from conftest import make_hf_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import minidpo
from minidpo.lora import apply_lora, load_lora, lora_parameters, save_lora
from minidpo.model import MistralConfig, rope_inv_freq

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}  # with head_dim 16 some frequencies fall in each band
CONFIGS = {
    "llama_gqa": ("llama", {}),
    "llama_plain_heads": ("llama", dict(num_key_value_heads=4)),
    "llama3_rope": ("llama", dict(rope_parameters={**LLAMA3, "rope_theta": 5e5})),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_head_dim": ("llama", dict(head_dim=24, num_key_value_heads=1)),
    "qwen2_gqa": ("qwen2", {}),
    "qwen2_plain_heads": ("qwen2", dict(num_key_value_heads=4)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_window_off": ("qwen2", dict(use_sliding_window=False, sliding_window=5)),
    "qwen2_window_layer_1": ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen2_window_all": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
    "qwen2_window_unused": ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
}


def _tokens(B=3, T=17, V=128, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """(name, transformers model, its saved folder) for each config."""
    family, overrides = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf_model(family, folder, **overrides), folder


def test_logits_match_transformers(case):
    name, hf, folder = case
    model = minidpo.load_model(folder)
    assert model.config.model_type == name.split("_")[0].removesuffix("3")
    x = _tokens()
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"


def test_round_trip_into_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM

    name, hf, folder = case
    model = minidpo.load_model(folder)
    minidpo.save_model(model, tmp_path / "out", max_shard_size=40_000)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [type(hf).__name__]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert getattr(back.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    x = _tokens()
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max() <= 1e-4
        assert torch.equal(minidpo.load_model(tmp_path / "out")(x), model(x))


def test_kv_cache_and_padding_with_per_layer_windows(tmp_path):
    """Qwen2 with a window on layer 1 only: left padding and incremental decoding change nothing."""
    family, overrides = CONFIGS["qwen2_window_layer_1"]
    hf = make_hf_model(family, tmp_path, **overrides)
    model = minidpo.load_model(tmp_path)
    assert [model.config.layer_window(i) for i in range(2)] == [None, 5]
    ids = _tokens(B=2, T=14)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left-padded second row
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 14)
        steps = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache)]
        steps += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache) for t in range(8, 14)]
        ref = hf(ids[1:, 4:]).logits[0]
    inc = torch.cat(steps, 1)
    assert (full[0] - inc[0]).abs().max() <= 1e-5 and (full[1, 4:] - inc[1, 4:]).abs().max() <= 1e-5
    assert (full[1, 4:] - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama_biases", "qwen2_gqa"])
def test_peft_adapters_both_ways(name, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    family, overrides = CONFIGS[name]
    make_hf_model(family, tmp_path / "base", **overrides)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    x = _tokens()
    # minidpo -> PEFT
    model = apply_lora(minidpo.load_model(tmp_path / "base"), r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)
    save_lora(model, tmp_path / "ours")
    pm = PeftModel.from_pretrained(make_hf_model(family, **overrides), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (model(x) - pm(x).logits).abs().max() <= 1e-4
    # PEFT -> minidpo
    pm = get_peft_model(make_hf_model(family, **overrides),
                        LoraConfig(r=4, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    pm.save_pretrained(tmp_path / "theirs")
    model = load_lora(minidpo.load_model(tmp_path / "base"), tmp_path / "theirs").eval()
    with torch.no_grad():
        base = make_hf_model(family, **overrides)(x).logits
        ours = model(x)
        assert (ours - base).abs().max() > 0.05  # the adapter matters
        assert (ours - pm(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2_window_all", "qwen2_window_unused"])
def test_prefix_sharing_and_fused_head_unchanged(name, tmp_path):
    """The packed prompt + chosen + rejected row gives the unshared log-probs (fp32, 1e-5)."""
    from test_prefix import SHAPES, random_pairs

    from minidpo.data import collate
    from minidpo.prefix import packed_collate, packed_logps
    from minidpo.train import batch_logps

    family, overrides = CONFIGS[name]
    make_hf_model(family, tmp_path, **overrides)
    model = minidpo.load_model(tmp_path)
    pairs = random_pairs(0, SHAPES)
    with torch.no_grad():
        plain = batch_logps(model, collate(pairs, 0))
        packed = packed_logps(model, packed_collate(pairs, 0))
    assert (plain - packed).abs().max() <= 1e-5


def test_mixed_windows_refuse_a_ready_mask(tmp_path):
    family, overrides = CONFIGS["qwen2_window_layer_1"]
    make_hf_model(family, tmp_path, **overrides)
    model = minidpo.load_model(tmp_path)
    ids = _tokens(B=1, T=6)
    with pytest.raises(ValueError, match="different windows"):
        model(ids, torch.ones(1, 1, 6, 6, dtype=torch.bool), torch.arange(6)[None])


# ---------------------------------------------------------------------------------------------------
# config.json keys, read as transformers reads them

QWEN25_7B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "max_position_embeddings": 32768, "max_window_layers": 28, "rope_theta": 1e6,
             "sliding_window": 131072, "use_sliding_window": False, "tie_word_embeddings": False,
             "vocab_size": 152064, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("changes", [
    {}, dict(use_sliding_window=True), dict(use_sliding_window=True, max_window_layers=20),
    dict(use_sliding_window=True, max_window_layers=0, sliding_window=4096),
    dict(use_sliding_window=True, layer_types=["full_attention", "sliding_attention"] * 14),
    dict(use_sliding_window=False, layer_types=["full_attention"] * 28),
])
def test_qwen2_window_keys_as_transformers(changes):
    from transformers import Qwen2Config

    d = {**QWEN25_7B, **changes}
    ours, theirs = MistralConfig.from_dict(d), Qwen2Config(**d)
    assert ours.layer_types == theirs.layer_types
    assert [ours.layer_window(i) for i in range(28)] == [
        theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types]


def test_qwen2_defaults_when_keys_are_missing():
    from transformers import Qwen2Config

    ours, theirs = MistralConfig.from_dict({"architectures": ["Qwen2ForCausalLM"]}), Qwen2Config()
    for key in ("vocab_size", "intermediate_size", "num_key_value_heads", "rms_norm_eps", "sliding_window",
                "bos_token_id", "eos_token_id", "max_window_layers", "layer_types"):
        assert getattr(ours, key) == getattr(theirs, key), key


def test_llama31_config_rope_as_transformers():
    """Llama-3.1-8B-Instruct's rope keys (v4 `rope_scaling`) give transformers' inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
         "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
         "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    ours = MistralConfig.from_dict(d)
    assert ours.sliding_window is None and ours.rope_theta == 500000.0
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**d), "cpu")
    assert torch.equal(rope_inv_freq(ours), expected)
    assert not torch.equal(rope_inv_freq(MistralConfig.from_dict({**d, "rope_scaling": None})), expected)


@pytest.mark.parametrize("d, message", [
    ({"architectures": ["GPTNeoXForCausalLM"]}, "GPTNeoXForCausalLM.*not supported"),
    ({"model_type": "gemma"}, "gemma.*not supported"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "RoPE scaling"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
    ({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "low_freq_factor"),
    ({"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2,
      "layer_types": ["sliding_attention", "full_attention"]}, "no sliding window"),
    ({"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "layer_types": ["full_attention"]},
     "each of the 2 layers"),
])
def test_unsupported_configs_are_refused(d, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        MistralConfig.from_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config.json"):  # the file is named
        minidpo.load_model(tmp_path)


# ---------------------------------------------------------------------------------------------------
# tokenizers and chat templates of these families

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 12 plus 30?"}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "Sort: pear, apple."}],
    "two_turns": [{"role": "user", "content": "Count the letters in banana."},
                  {"role": "assistant", "content": "six letters"}, {"role": "user", "content": "And apple?"}],
}
# special tokens as the Llama 3 and Qwen2.5 vocabularies name them; ids follow the trained merges
FAMILY_TOKENS = {
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                             "<|end_header_id|>", "<|eot_id|>"], template="llama3_1.jinja",
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template="qwen2_5.jinja",
                  config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}


def _family_tokenizer_folder(folder, family):
    """A small byte-level BPE with the family's special tokens (Llama 3's post-processor adds
    <|begin_of_text|>, as its tokenizer.json does) and the family's real chat template (TRL ships
    byte-identical copies of the originals)."""
    from conftest import CORPUS

    spec = FAMILY_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=spec["specials"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if family == "llama3":
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    template = (importlib.resources.files("trl") / "chat_templates" / spec["template"]).read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps({**spec["config"], "chat_template": template}))
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILY_TOKENS))
def family_tokenizers(request, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    folder = _family_tokenizer_folder(tmp_path_factory.mktemp(request.param), request.param)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  **{k: v for k, v in config.items() if k.endswith("_token") and v})
    ref.chat_template = config["chat_template"]
    return request.param, minidpo.load_tokenizer(folder), ref


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_family_chat_templates_match_transformers(family_tokenizers, conversation, generation_prompt):
    family, tok, ref = family_tokenizers
    messages = CONVERSATIONS[conversation]
    text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    assert ids == expected["input_ids"]
    if family == "llama3":  # the template writes <|begin_of_text|> itself, once; headers are single ids
        assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        turns = [m for m in messages if m["role"] != "system"]  # the system block is always written
        assert ids.count(tok.token_to_id("<|start_header_id|>")) == 1 + len(turns) + generation_prompt
    else:  # Qwen's default system prompt when the conversation has none; no bos token at all
        assert ("You are Qwen, created by Alibaba Cloud." in text) == (messages[0]["role"] != "system")
        assert tok.bos_id is None


def test_family_end_of_turn_and_stop_ids(family_tokenizers):
    family, tok, _ = family_tokenizers
    eot = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}[family]
    assert tok.eot_id == tok.token_to_id(eot) and tok.token_to_id(eot) in tok.stop_ids
