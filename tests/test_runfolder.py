"""The run folder: config.json's resume check, in particular against folders written by older versions."""
import dataclasses
import json

import pytest

from minidpo.config import TrainConfig
from minidpo.runfolder import prepare_out


def config(out, **kw):
    return TrainConfig(model="some/model", data=["pairs.jsonl"], out=str(out), **kw)


def test_old_config_json_without_newer_fields_resumes_with_their_defaults(tmp_path):
    prepare_out(config(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == dataclasses.asdict(config(tmp_path))
    # A folder written before `quantize` and `device_memory` existed: their defaults are what it ran with.
    for newer in ("quantize", "device_memory", "prefix_attention"):
        del saved[newer]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    prepare_out(config(tmp_path, resume=True))
    assert json.loads((tmp_path / "config.json").read_text())["quantize"] == ""


def test_missing_field_is_still_refused_when_the_new_run_sets_it_otherwise(tmp_path):
    prepare_out(config(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["prefix_attention"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"prefix_attention: 'sdpa' -> 'flex'"):
        prepare_out(config(tmp_path, resume=True, prefix_attention="flex"))
