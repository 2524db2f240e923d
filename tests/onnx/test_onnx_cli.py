"""kvcl.onnx.cli: ``kvcl onnx rewrite`` / ``kvcl generate`` through ``kvcl.cli.main``."""

from __future__ import annotations

import argparse
import json

from bridge_fixtures import fixture_path, require_onnx

require_onnx()


def test_add_commands_registers_onnx_and_generate():
    from kvcl.onnx.cli import add_commands
    parser = argparse.ArgumentParser(prog="kvcl")
    add_commands(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["onnx", "rewrite", "in.onnx", "out.onnx", "--kv-dtype", "int8"])
    assert (a.input, a.output, a.kv_dtype) == ("in.onnx", "out.onnx", "int8") and callable(a.func)
    g = parser.parse_args(["generate", "m.onnx", "--prompt-ids", "1,2,3", "--prompt-ids", "4;5,6",
                           "--max-new-tokens", "5", "--kv-dtype", "fp8_e4m3"])
    assert g.max_new_tokens == 5 and g.kv_dtype == "fp8_e4m3" and callable(g.func)
    assert parser.parse_args(["onnx", "generate", "m.onnx", "--prompt-ids", "1"]).func is g.func


def test_rewrite_then_generate(tmp_path, capsys, onnx_device):
    from kvcl.cli import main
    out = tmp_path / "rw.onnx"
    assert main(["onnx", "rewrite", str(fixture_path("llama_torchscript")), str(out)]) == 0
    assert "2 layers rewritten" in capsys.readouterr().out
    rc = main(["generate", str(out), "--prompt-ids", "5,17,33", "--prompt-ids", "9;100,4",
               "--max-new-tokens", "4", "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["prompt_lengths"] == [3, 1, 2] and len(res["tokens"]) == 3 and len(res["tokens"][0]) == 4


def test_cli_errors(tmp_path, capsys):
    from kvcl.cli import main
    out = tmp_path / "rw.onnx"
    main(["onnx", "rewrite", str(fixture_path("llama_torchscript")), str(out)])
    assert main(["onnx", "rewrite", str(out), str(tmp_path / "again.onnx")]) == 2
    assert "already rewritten" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
