"""Broken checkpoints fail loudly, naming what is wrong; hub ids never fetch pickles."""
import json
import struct

import pytest
import torch
from conftest import make_hf_mistral
from safetensors.torch import load_file, save_file

import minidpo


@pytest.fixture
def folder(tmp_path):
    make_hf_mistral(tmp_path)
    return tmp_path


def _edit(folder, fn):
    state = load_file(folder / "model.safetensors")
    fn(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(folder):
    _edit(folder, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        minidpo.load_model(folder)


def test_unexpected_tensor_is_named(folder):
    _edit(folder, lambda s: s.__setitem__("model.layers.9.extra", torch.ones(2)))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.9.extra'\]"):
        minidpo.load_model(folder)


def test_misshapen_tensor_is_named(folder):
    _edit(folder, lambda s: s.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(ValueError, match=r"model.norm.weight: file \(65,\) vs model \(64,\)"):
        minidpo.load_model(folder)


def test_truncated_file_is_named(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors is truncated"):
        minidpo.load_model(folder)


def test_corrupt_header_is_named(folder):
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{" * n
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        minidpo.load_model(folder)


def test_missing_shard_is_named(tmp_path):
    make_hf_mistral(tmp_path, max_shard_size="40KB")
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        minidpo.load_model(tmp_path)


def test_no_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        minidpo.load_model(folder)


def test_pickle_only_folder_is_refused(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        minidpo.load_model(folder)


def test_offline_repo_id_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(FileNotFoundError, match="offline"):
        minidpo.load_model("someone/not-cached-model")


def test_hub_download_allows_no_pickles(monkeypatch, tmp_path):
    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        seen.update(repo=repo_id, patterns=allow_patterns)
        make_hf_mistral(tmp_path)
        return str(tmp_path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = minidpo.load_model("owner/model")
    assert seen["repo"] == "owner/model" and isinstance(model, minidpo.Mistral)
    assert not any(p.endswith(".bin") or p in ("*", "*.*") for p in seen["patterns"])
    assert "*.safetensors" in seen["patterns"]


def test_saved_config_round_trips(tmp_path):
    make_hf_mistral(tmp_path / "a", sliding_window=3, rope_theta=1e6)
    model = minidpo.load_model(tmp_path / "a", dtype=torch.bfloat16)
    minidpo.save_model(model, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["sliding_window"] == 3
    again = minidpo.load_model(tmp_path / "b")
    assert again.model.norm.weight.dtype == torch.bfloat16
    assert again.config.rope_theta == 1e6
