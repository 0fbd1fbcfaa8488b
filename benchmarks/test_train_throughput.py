"""train_throughput.py says when torch.compile was asked for CUDA graphs but skipped them for some graphs: a
"CUDA graphs" row that ran without them would otherwise look like a measurement of them."""

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import train_throughput as tt  # noqa: E402

HINT = "V1125 perf_hints] skipping cudagraphs due to cpu device (arg2_1). Found from : "


def _fake_run(stderr_for_graphs: str):
    envs = []

    def run(cmd, env, **kw):
        envs.append(env)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        rows = [{"split": "train", "step": s, "images_per_s": 100.0 * s} for s in (1, 2, 3)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        graphs = "reduce-overhead" in cmd
        return subprocess.CompletedProcess(cmd, 0, "", stderr_for_graphs if graphs else HINT)

    return run, envs


def test_cuda_graph_skips_are_reported_for_graph_settings_only(monkeypatch, capsys):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    run, envs = _fake_run(f"warming up\n{HINT}\n{HINT}\n")
    monkeypatch.setattr(tt.subprocess, "run", run)
    assert tt.main(["--device", "cuda", "--only", "3,4", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    graphs, compiled = tt.CUDA_SETTINGS[3][0], tt.CUDA_SETTINGS[2][0]
    assert f"{graphs}: torch.compile skipped CUDA graphs for some graphs: due to cpu device (arg2_1)\n" in out
    assert f"{compiled}: torch.compile skipped" not in out  # not asked for graphs: its stderr is not read
    assert [e.get("TORCH_LOGS") for e in envs] == [None, "perf_hints"]
    assert f"| {graphs} | 250.0 |" in out  # the median of the rows after the first


def test_no_note_when_the_graphs_ran(monkeypatch, capsys):
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    run, envs = _fake_run("warming up\n")
    monkeypatch.setattr(tt.subprocess, "run", run)
    assert tt.main(["--device", "cuda", "--only", "4", "--steps", "3"]) == 0
    assert "skipped CUDA graphs" not in capsys.readouterr().out
    assert envs[0]["TORCH_LOGS"] == "recompiles,perf_hints"  # the user's logs are kept


def test_a_failed_setting_is_reported_and_the_others_still_run(monkeypatch, capsys, tmp_path):
    run, _ = _fake_run("")

    def flaky(cmd, env, **kw):
        if "--compile" in cmd:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nRuntimeError: inductor broke")
        return run(cmd, env, **kw)

    monkeypatch.setattr(tt.subprocess, "run", flaky)
    table = tmp_path / "t.json"
    assert tt.main(["--device", "cuda", "--only", "3,5,6", "--steps", "3", "--json", str(table)]) == 1
    out = capsys.readouterr().out
    compiled, fused = tt.CUDA_SETTINGS[2][0], tt.CUDA_SETTINGS[4][0]
    assert f"| {compiled} | failed | - |" in out and "RuntimeError: inductor broke" in out
    assert f"| {fused} | 250.0 | - |" in out  # measured, though the first setting (the base) failed
    assert json.loads(table.read_text())[compiled] is None


def test_a_hung_setting_times_out_and_the_table_is_written_as_it_goes(monkeypatch, capsys, tmp_path):
    run, _ = _fake_run("")
    table = tmp_path / "t.json"

    def hangs(cmd, env, timeout=None, **kw):
        if "--compile" in cmd:  # the second setting: the first one's figure is on disk already
            assert timeout == 5 and json.loads(table.read_text())[tt.CUDA_SETTINGS[4][0]] == 250.0
            raise subprocess.TimeoutExpired(cmd, timeout)
        return run(cmd, env, **kw)

    monkeypatch.setattr(tt.subprocess, "run", hangs)
    assert tt.main(["--device", "cuda", "--only", "5,3", "--steps", "3", "--timeout", "5", "--json", str(table)]) == 1
    assert "did not finish in --timeout 5" in capsys.readouterr().out
    assert json.loads(table.read_text()) == {tt.CUDA_SETTINGS[4][0]: 250.0, tt.CUDA_SETTINGS[2][0]: None}
