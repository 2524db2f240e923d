"""The validation helper: every refusal names the argument, the expected and the actual."""

import numpy as np
import pytest

from kvcl.errors import DtypeError, KvclError, NonFiniteError, OutOfRangeError, ShapeError
from kvcl.validate import check_array, check_float, check_int


def test_shape_mismatch_names_argument_expected_and_actual():
    with pytest.raises(ShapeError, match=r"keys: expected shape \(3, \*, 4\), got \(3, 2, 5\)"):
        check_array("keys", np.zeros((3, 2, 5), np.float32), shape=(3, None, 4))


def test_ndim_mismatch():
    with pytest.raises(ShapeError, match=r"queries: expected shape \(\*, \*\), got \(4,\)"):
        check_array("queries", np.zeros(4, np.float32), shape=(None, None))


def test_dtype_mismatch():
    with pytest.raises(DtypeError, match="values: expected dtype float32, got float64"):
        check_array("values", np.zeros(3), dtype=np.float32)


def test_kind_mismatch_is_a_type_error():
    with pytest.raises(TypeError, match="keys: expected a numpy array or a pyopencl.array.Array, got list"):
        check_array("keys", [1.0, 2.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_reports_first_index(bad):
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"keys: expected finite values, got .* at index \(1, 2\)"):
        check_array("keys", x, finite=True)


def test_accepts_good_array_without_copy():
    x = np.zeros((2, 3), np.float32)
    assert check_array("x", x, shape=(2, 3), dtype=np.float32, finite=True) is x


def test_check_int_bounds_and_kind():
    assert check_int("layer", np.int64(1), low=0, high=2) == 1
    with pytest.raises(OutOfRangeError, match="layer: expected < 2, got 2"):
        check_int("layer", 2, low=0, high=2)
    with pytest.raises(OutOfRangeError, match="layer: expected >= 0, got -1"):
        check_int("layer", -1, low=0)
    with pytest.raises(DtypeError, match="layer: expected an int, got float"):
        check_int("layer", 1.0)
    with pytest.raises(DtypeError):
        check_int("flag", True)


def test_check_float():
    assert check_float("eps", 1e-6) == 1e-6
    with pytest.raises(NonFiniteError):
        check_float("eps", float("nan"))


def test_errors_subclass_builtins_and_kvcl_error():
    for cls, builtin in [(ShapeError, ValueError), (DtypeError, TypeError), (OutOfRangeError, IndexError)]:
        assert issubclass(cls, builtin) and issubclass(cls, KvclError)
