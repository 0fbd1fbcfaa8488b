"""benchmarks/step_ratio.py runs end to end on a tiny model (the timings themselves are not checked)."""

from __future__ import annotations

import json

import pytest
import step_ratio


def test_step_ratio_writes_its_table(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert step_ratio.main(["--preset", "tiny", "--batch", "4", "--rounds", "2", "--models", "reference,fast-cl",
                            "--malloc", "default", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["malloc"] == "default"
    assert set(res["median_ms"]) == {"reference", "fast-cl"} and res["ratio_to_reference"]["reference"] == 1.0
    assert "| fast-cl |" in capsys.readouterr().out


def test_unknown_model_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        step_ratio.main(["--models", "reference,nope"])
    assert e.value.code == 2 and "unknown ['nope']" in capsys.readouterr().err
