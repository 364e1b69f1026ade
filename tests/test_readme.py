"""The README's tour runs as pasted: extracted from README.md and executed in a fresh folder."""
import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tour_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## A tour in a dozen lines", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_tour_runs_offline(tmp_path, monkeypatch, capsys, one_thread):
    script = tmp_path / "tour.py"
    script.write_text(tour_snippet())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    assert "loss 0.6931" in capsys.readouterr().out  # the DPO loss at the first step is ln 2
    assert {p.name for p in (tmp_path / "tour-adapter").iterdir()} == {"adapter_config.json",
                                                                        "adapter_model.safetensors"}
