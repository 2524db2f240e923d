import numpy as np
import pytest

import kvcl
from kvcl.dtypes import KV_DTYPES, kv_dtype
from kvcl.table import format_table, human_bytes


def test_table_of_kv_dtypes():
    assert list(KV_DTYPES) == ["fp32", "fp16", "int8", "fp8_e4m3", "fp8_e5m2", "int4"]
    assert [d.code for d in KV_DTYPES.values()] == [0, 1, 2, 3, 4, 5]
    assert kv_dtype("INT8").bytes_per_elem == 1 and kv_dtype("int8").has_scale
    assert kv_dtype("fp16").storage == np.uint16
    # one row of K: head_dim elements plus a float32 scale for int8
    assert kv_dtype("int8").row_bytes(128) == 132
    assert kv_dtype("fp32").row_bytes(128) == 512


def test_unknown_dtype_lists_the_valid_names():
    with pytest.raises(kvcl.InvalidArgument, match="dtype: expected one of fp32, fp16, int8, fp8_e4m3, fp8_e5m2, int4, got 'bf16'"):
        kv_dtype("bf16")


def test_format_table_alignment():
    text = format_table(["name", "n"], [("a", 1), ("bbb", 100)])
    assert text.splitlines() == ["name    n", "----  ---", "a       1", "bbb   100"]
    assert human_bytes(1536) == "1.5 KiB"


def test_int4_has_one_int8_mode():
    int4, int8 = kv_dtype("int4"), kv_dtype("int8")
    int4.check_int8_mode(0)
    int8.check_int8_mode(1)                       # ferrum's convention exists for int8
    with pytest.raises(kvcl.InvalidArgument, match=r"^int8_mode: int4 has one scale convention \(0\), got 1"):
        int4.check_int8_mode(1)
    assert int4.row_elems(128) == 64 and int4.row_bytes(128) == 68
