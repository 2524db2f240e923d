"""Model files the bridge reads and writes (kvcl.onnx.modelio, ``kvcl onnx rewrite``).

* external data: an export whose weights live in a data file rewrites into ``OUT`` +
  ``OUT.data`` (aligned, streamed) and generates the same tokens as the one-file export; a model
  padded past 2 GiB with a weight on disk rewrites and generates in bounded memory;
* writes are atomic: a failure mid-write leaves the old output as it was and no temporary file;
* bad paths (missing folder, a folder, empty, OUT == IN, OUT's data file == IN's) are refused in
  one line with exit 2 before anything is written;
* the CLI's token-id flags: ``-5,2`` and ``1,,2`` are refused naming the flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge_fixtures import fixture_path, require_onnx

require_onnx()

ROUTE = "llama_torchscript"
PROMPT = [[5, 17, 33]]


def _external_copy(folder: Path, name: str = "model.onnx", data: str = "model.onnx.data") -> Path:
    """The fixture saved with its weights in a data file (as exports above 2 GiB are)."""
    import onnx
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(onnx.load(str(fixture_path(ROUTE))), str(path), save_as_external_data=True,
              location=data, size_threshold=1024)
    return path


def _tokens(model, n=6) -> np.ndarray:
    from kvcl.onnx import Generator
    gen = Generator(model, device="pocl")
    try:
        return gen.generate(PROMPT, n).tokens
    finally:
        gen.close()


def _external_tensors(path: Path):
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return [t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_external_data_rewrites_into_a_data_file_beside_the_output(tmp_path, capsys, onnx_device):
    import onnx

    from kvcl.cli import main
    src = _external_copy(tmp_path / "in")
    out = tmp_path / "out" / "rw.onnx"
    out.parent.mkdir()
    assert main(["onnx", "rewrite", str(src), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"{out} + {out}.data: 2 layers rewritten" in said
    assert sorted(p.name for p in out.parent.iterdir()) == ["rw.onnx", "rw.onnx.data"]   # no temp files
    tensors = _external_tensors(out)
    assert tensors, "the rewritten model keeps its weights external"
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "rw.onnx.data" and int(info["offset"]) % 4096 == 0, info
    # the weights are the original ones, tensor for tensor
    rewritten = onnx.load(str(out))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(fixture_path(ROUTE))).graph.initializer}
    for t in rewritten.graph.initializer:
        if t.name in original:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), original[t.name])
    # and it generates what the one-file export does, as does the external export rewritten in memory
    want = _tokens(fixture_path(ROUTE))
    np.testing.assert_array_equal(_tokens(out), want)
    np.testing.assert_array_equal(_tokens(src), want)


def test_a_missing_data_file_is_named(tmp_path):
    from kvcl.errors import InvalidArgument
    from kvcl.onnx import rewrite
    src = _external_copy(tmp_path)
    (tmp_path / "model.onnx.data").rename(tmp_path / "elsewhere.data")
    with pytest.raises(InvalidArgument, match=r"model: the external data file 'model.onnx.data' of tensor"):
        rewrite(src)


def _padded_model(path: Path, pad_bytes: int) -> None:
    """The fixture with a float weight of ``pad_bytes`` on disk (a sparse hole: no disk used),
    read by a Gather whose index the input computes (so no optimiser folds it away) and added to
    the logits as zeros: past 2 GiB, the model can only exist with external data."""
    import onnx
    from onnx import TensorProto, helper
    m = onnx.load(str(fixture_path(ROUTE)))
    g = m.graph
    vocab = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    rows = -(-pad_bytes // (4 * vocab))
    producer = next(n for n in g.node if "logits" in n.output)
    producer.output[list(producer.output).index("logits")] = "logits_unpadded"
    g.initializer.append(helper.make_tensor("pad_zero", TensorProto.INT64, [], [0]))
    g.node.extend([helper.make_node("ReduceMin", ["input_ids"], ["pad_min"], keepdims=1),
                   helper.make_node("Mul", ["pad_min", "pad_zero"], ["pad_row"]),
                   helper.make_node("Gather", ["pad", "pad_row"], ["pad_rows"], axis=0),
                   helper.make_node("Add", ["logits_unpadded", "pad_rows"], ["logits"])])
    onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    m = onnx.load(str(path), load_external_data=False)
    data = path.with_name(path.name + ".data")
    offset = -(-data.stat().st_size // 4096) * 4096
    with open(data, "r+b") as f:
        f.truncate(offset + rows * vocab * 4)
    t = onnx.TensorProto(name="pad", data_type=TensorProto.FLOAT, dims=[rows, vocab],
                         data_location=TensorProto.EXTERNAL)
    for k, v in (("location", data.name), ("offset", offset), ("length", rows * vocab * 4)):
        e = t.external_data.add()
        e.key, e.value = k, str(v)
    m.graph.initializer.append(t)
    onnx.save(m, str(path))


def _peak_rss_mib(args: list[str]) -> tuple[int, float, str]:
    """Run ``args`` in a fresh parent; (exit code, the child's peak resident memory, stdout)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
             "print(p.stdout + p.stderr)")
    res = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=600)
    rc, rss = res.stdout.split("\n", 1)[0].split()
    return int(rc), float(rss), res.stdout.split("\n", 1)[1]


def test_a_model_past_2_gib_rewrites_and_generates_in_bounded_memory(tmp_path):
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    _padded_model(src, int(2.2e9))
    assert src.with_name("model.onnx.data").stat().st_size > 2 ** 31
    out = tmp_path / "out.onnx"
    kvcl = [sys.executable, "-m", "kvcl.cli"]
    rc, rss, said = _peak_rss_mib([*kvcl, "onnx", "rewrite", str(src), str(out)])
    assert rc == 0, said
    print(f"rewrite of a {src.with_name('model.onnx.data').stat().st_size / 2**30:.2f} GiB model: peak {rss:.0f} MiB")
    assert rss < 1024, f"the rewrite held {rss:.0f} MiB: the weights were loaded"
    assert out.with_name("out.onnx.data").stat().st_size == src.with_name("model.onnx.data").stat().st_size
    rc, rss, said = _peak_rss_mib([*kvcl, "generate", str(out), "--prompt-ids", "5,17,33",
                                   "--max-new-tokens", "6", "--json", "--quiet", "--device", "pocl"])
    assert rc == 0, said
    print(f"generate: peak {rss:.0f} MiB")
    assert rss < 1024, f"generation held {rss:.0f} MiB"
    # the zeros added to the logits change nothing: the tokens of the unpadded export
    np.testing.assert_array_equal(json.loads(said.splitlines()[0])["tokens"], _tokens(fixture_path(ROUTE)))


def test_a_failed_write_keeps_the_old_output(tmp_path, monkeypatch):
    from kvcl.onnx import modelio, rewrite
    src = _external_copy(tmp_path / "in")
    out = tmp_path / "rw.onnx"
    out.write_bytes(b"the previous model")
    model = rewrite(src)

    def broken(location, offset, length, f):
        f.write(b"\1" * 100)
        raise OSError(28, "No space left on device", str(f.name))
    monkeypatch.setattr(modelio, "_copy", broken)
    with pytest.raises(OSError, match="No space left"):
        modelio.save_model(model, out)
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "rw.onnx"]   # no data file, no temp file
    # the model in memory still names its original data file: it can be saved after all
    monkeypatch.undo()
    mode = out.stat().st_mode
    assert modelio.save_model(model, out) == [out, tmp_path / "rw.onnx.data"]
    assert out.stat().st_mode == mode   # a replaced file keeps its mode (not the temp file's 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "rw.onnx.data").stat().st_mode & 0o777 == 0o666 & ~mask   # a new one, open()'s


def test_a_one_file_model_stays_one_file(tmp_path):
    from kvcl.onnx import modelio, rewrite
    out = tmp_path / "rw.onnx"
    assert modelio.save_model(rewrite(fixture_path(ROUTE)), out) == [out]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rw.onnx"] and not _external_tensors(out)


@pytest.mark.parametrize("case, message", [
    ("missing", "output: the folder '{tmp}/no/such' of '{tmp}/no/such/out.onnx' does not exist"),
    ("folder", "output: expected a file name, got the folder '{tmp}'"),
    ("empty", "output: expected a file name, got an empty string"),
    ("file_as_folder", "output: '{tmp}/in/model.onnx' in '{tmp}/in/model.onnx/out.onnx' is a file, not a folder"),
    ("input", "output: '{tmp}/in/model.onnx' is the input model; write the result somewhere else"),
    ("input_data", "output: '{tmp}/in/w.onnx' would write its weights to '{tmp}/in/w.onnx.data', a data file "
                   "the input model reads"),
])
def test_rewrite_path_errors_are_one_line_and_write_nothing(tmp_path, capsys, case, message):
    from kvcl.cli import main
    src = _external_copy(tmp_path / "in")
    if case == "input_data":   # the input's weights are in w.onnx.data: OUT w.onnx would replace them
        src = _external_copy(tmp_path / "in", "x.onnx", "w.onnx.data")
    out = {"missing": tmp_path / "no" / "such" / "out.onnx", "folder": tmp_path, "empty": "",
           "file_as_folder": tmp_path / "in" / "model.onnx" / "out.onnx",
           "input": tmp_path / "in" / "model.onnx", "input_data": tmp_path / "in" / "w.onnx"}[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["onnx", "rewrite", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvcl: " + message.format(tmp=tmp_path)), err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "-5,2"], "--prompt-ids: token ids are >= 0, got -5 in '-5,2'"),
    (["--prompt-ids", "1,,2"], "--prompt-ids: an empty token id in '1,,2'"),
    (["--prompt-ids", "1,2,"], "--prompt-ids: an empty token id in '1,2,'"),
    (["--prompt-ids", "1,x"], "--prompt-ids: expected comma-separated integers, got 'x' in '1,x'"),
    (["--prompt-ids", "1", "--stop", "-1"], "--stop: token ids are >= 0, got -1 in '-1'"),
    (["--prompt-ids", "1", "--stop", "2,,3"], "--stop: an empty token id in '2,,3'"),
])
def test_token_id_flags_are_strict(capsys, argv, message):
    from kvcl.cli import main
    assert main(["generate", str(fixture_path(ROUTE)), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcl: " + message) and err.count("\n") == 1, err


def test_token_ids_with_spaces_and_batches_still_parse():
    from kvcl.onnx.cli import _prompts, id_flags_with_negative_values
    assert _prompts(["1, 2 ,3", "4;5 6"]) == [[1, 2, 3], [4], [5, 6]]
    assert id_flags_with_negative_values(["generate", "m", "--prompt-ids", "-5,2", "--max-new-tokens", "3"]) == \
        ["generate", "m", "--prompt-ids=-5,2", "--max-new-tokens", "3"]
