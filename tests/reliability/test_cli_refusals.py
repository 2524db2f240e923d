"""The command line refuses bad input with exit code 2 and one line naming the problem, never a
traceback."""

from pathlib import Path

import pytest

from kvcl.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "onnx" / "llama_dynamo18.onnx"


@pytest.mark.parametrize("argv,names", [
    (["bench", "--quick", "--device", "no-such-device"], "device 'no-such-device'"),
    (["demo", "--device", "no-such-device"], "device 'no-such-device'"),
    (["generate", "/nonexistent/model.onnx", "--prompt-ids", "1,2"], "no such file"),
    (["onnx", "rewrite", "/nonexistent/model.onnx", "/tmp/kvcl-out.onnx"], "no such file"),
    (["generate", str(FIXTURE), "--prompt-ids", "1,999"], "token ids must be in [0, 128)"),
    (["generate", str(FIXTURE), "--prompt-ids", "-5,2"], "--prompt-ids: token ids are >= 0, got -5"),
    (["generate", str(FIXTURE), "--prompt-ids", "1,,2"], "--prompt-ids: an empty token id in '1,,2'"),
    (["generate", str(FIXTURE), "--prompt-ids", "1", "--stop", "-3"], "--stop: token ids are >= 0, got -3"),
    (["onnx", "rewrite", str(FIXTURE), "{tmp}/no/such/out.onnx"], "output: the folder '{tmp}/no/such' of"),
    (["onnx", "rewrite", str(FIXTURE), "{tmp}"], "output: expected a file name, got the folder '{tmp}'"),
    (["onnx", "rewrite", str(FIXTURE), ""], "output: expected a file name, got an empty string"),
    (["onnx", "rewrite", "{tmp}/in.onnx", "{tmp}/in.onnx"], "output: '{tmp}/in.onnx' is the input model"),
])
def test_cli_refusal_is_one_clear_line(argv, names, capsys, figures, tmp_path):
    argv = [a.format(tmp=tmp_path) for a in argv]
    names = names.format(tmp=tmp_path)
    (tmp_path / "in.onnx").write_bytes(FIXTURE.read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    if "generate" in argv or "onnx" in argv:
        pytest.importorskip("onnxruntime_extensions", reason="the onnx extra is not installed")
    figures["cases"]["cli"] += 1
    figures["entry_points"].add("kvcl " + argv[0])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert names in err and err.strip().splitlines()[-1].startswith("kvcl: ")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before   # nothing written
    figures["raised_clear_error"] += 1
