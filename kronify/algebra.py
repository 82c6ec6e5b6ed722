"""Fixed hypercomplex algebras for the A factors (PHM with a known multiplication rule).

With A = algebra_matrices(name), W = Σ_t A_t ⊗ F_t acts on n channel blocks exactly as the
algebra's product: for "complex", W·[x_re; x_im] = (F_0 + i·F_1)(x_re + i·x_im) split back into
[re; im] blocks; for "quaternion", W·[x_r; x_i; x_j; x_k] is the Hamilton product
(F_0 + F_1 i + F_2 j + F_3 k) ⊗ (x_r + x_i i + x_j j + x_k k).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALGEBRAS", "algebra_matrices", "resolve_algebra"]

LEARNED = "learned"

# name -> (n, A as nested lists). A[t][a][b]: coefficient of F_t in output block a from input block b.
_TABLES: dict[str, list[list[list[int]]]] = {
    "complex": [
        [[1, 0], [0, 1]],  # real part F_0
        [[0, -1], [1, 0]],  # imaginary part F_1: re -= F_1 x_im, im += F_1 x_re
    ],
    "quaternion": [
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],  # F_0 (real)
        [[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, -1], [0, 0, 1, 0]],  # F_1 (i)
        [[0, 0, -1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, -1, 0, 0]],  # F_2 (j)
        [[0, 0, 0, -1], [0, 0, -1, 0], [0, 1, 0, 0], [1, 0, 0, 0]],  # F_3 (k)
    ],
}

#: algebra name -> n (its number of terms is also n).
ALGEBRAS: dict[str, int] = {name: len(table) for name, table in _TABLES.items()}


def check_n(n: int) -> None:
    """Raise a ValueError unless n is an integer >= 2 (the one check of n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got n={n!r}")


def resolve_algebra(algebra: str, n: int, terms: int | None) -> int:
    """Validate (algebra, n, terms) and return the number of terms (default n)."""
    check_n(n)
    if algebra == LEARNED:
        terms = n if terms is None else terms
        if isinstance(terms, bool) or not isinstance(terms, int) or not 1 <= terms <= n * n:
            raise ValueError(f"terms must be an integer in 1..n²={n * n} for n={n}, got terms={terms!r}")
        return terms
    if algebra not in ALGEBRAS:
        raise ValueError(f"unknown algebra {algebra!r}; choose 'learned' or one of {sorted(ALGEBRAS)}")
    need = ALGEBRAS[algebra]
    if n != need:
        raise ValueError(f"algebra {algebra!r} requires n={need}, got n={n}")
    if terms is not None and terms != need:
        raise ValueError(f"algebra {algebra!r} has exactly {need} terms, got terms={terms}")
    return need


def algebra_matrices(name: str, *, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """The fixed A tensor (terms = n, n, n) of a named algebra ("complex" or "quaternion")."""
    if name not in _TABLES:
        raise ValueError(f"unknown algebra {name!r}; choose one of {sorted(_TABLES)}")
    return torch.tensor(_TABLES[name], dtype=dtype or torch.get_default_dtype(), device=device)
