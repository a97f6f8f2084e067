"""benchmarks/tf32_error.py backs the documented f32 decision: its roundings and its float64
formulas must stay right."""
import importlib.util
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "tf32_error.py"
_spec = importlib.util.spec_from_file_location("tf32_error", _PATH)
tf32_error = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tf32_error)


def test_roundings():
    one = np.float32(1.0)
    ulp_tf32, ulp_bf16 = np.float32(2.0**-10), np.float32(2.0**-7)
    x = np.array([1 + 2.0**-11, 1 + 2.0**-12, -(1 + 2.0**-11), 1 + 3 * 2.0**-12], np.float32)
    # TF32 keeps 10 mantissa bits, ties away from zero (cvt.rna)
    np.testing.assert_array_equal(tf32_error.round_tf32(x),
                                  [one + ulp_tf32, one, -(one + ulp_tf32), one + ulp_tf32])
    y = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-9], np.float32)
    # bf16 keeps 7, ties to even
    np.testing.assert_array_equal(tf32_error.round_bf16(y),
                                  [one, one + 2 * ulp_bf16, one])


def test_formulas_match_reference():
    tf32_error.check_formulas(np.random.default_rng(1))
