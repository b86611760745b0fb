"""Folding θ's adjustment into A gives exactly the unfolded LoRA branch."""

from __future__ import annotations

import numpy as np
import pytest

from coalora.runtime.adapter import fold


def test_folded_adapter_equals_unfolded_form() -> None:
    rng = np.random.default_rng(0)
    r, k, n, s = 4, 24, 16, 0.5
    a = {"m": rng.standard_normal((r, k)).astype(np.float32)}
    b = {"m": rng.standard_normal((n, r)).astype(np.float32)}
    u = rng.standard_normal((1, r, r)).astype(np.float32) * 0.1
    x = rng.standard_normal((3, k)).astype(np.float32)
    a_f, b_f = fold(["m"], u, a, b, s)["m"]
    unfolded = s * x @ (b["m"] @ (np.eye(r, dtype=np.float32) + u[0]) @ a["m"]).T
    np.testing.assert_allclose(x @ a_f.T @ b_f.T, unfolded, rtol=1e-5, atol=1e-5)


def test_fold_checks_the_count() -> None:
    with pytest.raises(ValueError, match="2 matrices"):
        fold(["a", "b"], np.zeros((1, 2, 2), np.float32), {}, {}, 1.0)
