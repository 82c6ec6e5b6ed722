"""Statistics for tables over seeds and test volumes: mean ± std over seeds, and a paired Kronecker-vs-dense test.

Both questions a reader asks of a dense-vs-Kronecker table are answered with scipy.stats:

- *How much do seeds move a row?* :func:`summarize_seeds` gives mean ± sample std (ddof = 1) of a row's
  metric over training seeds (std is ``None`` for one seed: it is undefined, not zero).
- *Is the Kronecker row really different from its dense row?* :func:`paired_comparison` pairs the two rows'
  per-volume metrics over the SAME test volumes (keyed by volume name; differing keys are an error) and
  reports the mean difference (Kronecker minus dense), a t-based 95 % CI (``scipy.stats.t``), a percentile
  bootstrap CI (``scipy.stats.bootstrap``, fixed seed), a Wilcoxon signed-rank p-value
  (``scipy.stats.wilcoxon``) and a plain verdict.

With several seeds, each volume's metric is first averaged over the seeds (:func:`average_over_seeds`) and
the averages are paired: the test volumes are the units of the comparison (seeds are repeated measurements
of the same volume, not independent samples), and averaging removes most of the seed noise from each pair.

The verdict calls a difference "distinguishable from zero" only when the t-interval excludes 0 AND the
Wilcoxon p-value is below ``alpha``, so that it does not rest on normality alone; when the two disagree it
says so. Few volumes limit what can be shown: with n pairs (no ties, no zeros) the smallest two-sided
Wilcoxon p-value is 2 / 2**n, so n <= 5 can never reach p < 0.05; :attr:`PairedComparison.notes` says so.

The volume-paired test treats the seed-averaged models as fixed: it asks whether the two rows differ on these
volumes, not whether another set of seeds would give the same sign. :func:`compare_over_seeds` asks that: Welch's
t-test of the rows' per-seed test means (``scipy.stats.ttest_ind``, unequal variances), i.e. whether the
difference is larger than the seed-to-seed spread (a weak test with 3 seeds a row).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedComparison", "SeedComparison", "SeedSummary", "average_over_seeds", "compare_over_seeds",
           "paired_comparison", "summarize_seeds"]

PerVolume = Mapping[str, float]


@dataclass(frozen=True)
class SeedSummary:
    """A row's metric over seeds: mean and sample standard deviation (``None`` with one seed)."""

    mean: float
    std: float | None
    n: int

    def format(self, digits: int = 2) -> str:
        """``"31.20 ± 0.15"``, or ``"31.20 (1 seed)"`` when the spread is unknown."""
        if self.std is None:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass(frozen=True)
class PairedComparison:
    """Kronecker minus dense over the same test volumes (see the module docstring for the method)."""

    n: int  # number of paired volumes
    mean_difference: float  # mean of (Kronecker - dense) over the volumes
    t_ci: tuple[float, float] | None  # None with fewer than 2 volumes
    bootstrap_ci: tuple[float, float] | None  # None with fewer than 2 volumes
    wilcoxon_p: float  # two-sided; 1.0 when every difference is zero
    alpha: float
    distinguishable: bool
    verdict: str
    notes: tuple[str, ...]

    def format(self, digits: int = 2, unit: str = "") -> str:
        """One line for a table, e.g. ``"+0.12 dB (95 % t-CI -0.05 to +0.30, Wilcoxon p = 0.31): not ..."``."""
        unit = f" {unit}" if unit else ""
        ci = "" if self.t_ci is None else (
            f"{100 * (1 - self.alpha):g} % t-CI {self.t_ci[0]:+.{digits}f} to {self.t_ci[1]:+.{digits}f}, ")
        return (f"{self.mean_difference:+.{digits}f}{unit} ({ci}Wilcoxon p = {self.wilcoxon_p:.3g}, "
                f"n = {self.n}): {self.verdict}")

    def as_dict(self) -> dict:
        """JSON-ready numbers (tuples become lists)."""
        out = asdict(self)
        for key in ("t_ci", "bootstrap_ci", "notes"):
            out[key] = None if out[key] is None else list(out[key])
        return out


def _finite(values: PerVolume, what: str) -> dict[str, float]:
    """``values`` as plain floats; an error naming the first non-finite entry."""
    out = {str(k): float(v) for k, v in values.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: volume {bad[0]!r} has a non-finite value {out[bad[0]]}")
    return out


def summarize_seeds(values: Sequence[float]) -> SeedSummary:
    """Mean and sample std (ddof = 1) of one row's metric over seeds; std is ``None`` for a single seed."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"summarize_seeds needs a non-empty list of numbers, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError(f"summarize_seeds got a non-finite value: {values!r}")
    std = float(np.std(data, ddof=1)) if data.size > 1 else None
    return SeedSummary(float(data.mean()), std, int(data.size))


def average_over_seeds(per_seed: Sequence[PerVolume]) -> dict[str, float]:
    """Each volume's metric averaged over seeds; every seed must have scored the same volumes."""
    if isinstance(per_seed, Mapping) or len(per_seed) == 0:
        raise ValueError("average_over_seeds needs a non-empty list with one {volume: value} mapping per seed")
    seeds = [_finite(values, f"seed {i}") for i, values in enumerate(per_seed)]
    names = set(seeds[0])
    for i, values in enumerate(seeds[1:], start=1):
        if set(values) != names:
            raise ValueError(f"seed {i} scored other volumes than seed 0: "
                             f"{_key_difference(seeds[0], values, 'seed 0', f'seed {i}')}")
    return {name: float(np.mean([values[name] for values in seeds])) for name in sorted(names)}


def _key_difference(a: PerVolume, b: PerVolume, name_a: str, name_b: str) -> str:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    return f"only in {name_a}: {only_a[:5]}, only in {name_b}: {only_b[:5]}"


def _per_volume(values: PerVolume | Sequence[PerVolume], what: str) -> dict[str, float]:
    if isinstance(values, Mapping):
        return _finite(values, what)
    try:
        return average_over_seeds(values)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from err


def _bootstrap_ci(diff: np.ndarray, confidence: float, n_resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (scipy.stats.bootstrap, fixed seed)."""
    if np.all(diff == diff[0]):  # every resample has the same mean
        return float(diff[0]), float(diff[0])
    generator = np.random.default_rng(seed)
    # scipy >= 1.15 names the generator ``rng``; older versions ``random_state``
    key = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    result = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                             method="percentile", vectorized=True, **{key: generator})
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_comparison(
    kron: PerVolume | Sequence[PerVolume],
    dense: PerVolume | Sequence[PerVolume],
    *,
    alpha: float = 0.05,
    n_resamples: int = 9999,
    seed: int = 0,
) -> PairedComparison:
    """Paired comparison of a Kronecker row with its dense row over the same test volumes.

    ``kron`` and ``dense`` are ``{volume name: metric}``, or a list of such mappings, one per seed (then each
    volume is averaged over seeds before pairing). Differences are Kronecker minus dense, so for PSNR/SSIM a
    positive difference favours the Kronecker model (for NMSE a negative one does). The CIs are at
    ``1 - alpha`` confidence; the bootstrap uses ``n_resamples`` resamples drawn from ``seed``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k, d = _per_volume(kron, "kron"), _per_volume(dense, "dense")
    if set(k) != set(d):
        raise ValueError("kron and dense must be scored on the same test volumes; "
                         + _key_difference(k, d, "kron", "dense"))
    if not k:
        raise ValueError("paired_comparison got no volumes")
    names = sorted(k)
    diff = np.array([k[name] - d[name] for name in names])
    n, mean = diff.size, float(diff.mean())
    notes: list[str] = []

    t_ci = boot_ci = None
    if n >= 2:
        half = stats.t.ppf(1 - alpha / 2, df=n - 1) * diff.std(ddof=1) / math.sqrt(n)
        t_ci = (mean - float(half), mean + float(half))
        boot_ci = _bootstrap_ci(diff, 1 - alpha, n_resamples, seed)
    else:
        notes.append("one volume: no confidence interval")

    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        wilcoxon_p = 1.0
        notes.append("every difference is exactly zero")
    else:
        wilcoxon_p = float(stats.wilcoxon(diff, zero_method="wilcox").pvalue)
        if nonzero < n:
            notes.append(f"Wilcoxon drops the {n - nonzero} zero difference(s)")
        smallest = 2.0 / 2**nonzero
        if smallest >= alpha:
            notes.append(f"with {nonzero} non-zero differences the Wilcoxon test cannot reach p < {alpha:g} "
                         f"(smallest possible p = {smallest:.4g}); more test volumes are needed")

    t_excludes = t_ci is not None and (t_ci[0] > 0 or t_ci[1] < 0)
    w_rejects = wilcoxon_p < alpha
    distinguishable = t_excludes and w_rejects
    level = f"at alpha {alpha:g}"
    if distinguishable:
        verdict = f"distinguishable from zero {level}"
    elif t_excludes != w_rejects:
        which = "the t-interval excludes 0 but" if t_excludes else "the t-interval includes 0 but"
        verdict = (f"not clearly distinguishable from zero {level}: {which} the Wilcoxon p = {wilcoxon_p:.3g}")
    else:
        verdict = f"not distinguishable from zero {level}"
    return PairedComparison(n, mean, t_ci, boot_ci, wilcoxon_p, alpha, distinguishable, verdict, tuple(notes))


@dataclass(frozen=True)
class SeedComparison:
    """Kronecker minus dense over seeds: Welch's t-test of the two rows' per-seed test means."""

    n_kron: int
    n_dense: int
    mean_difference: float  # mean of the Kronecker seeds' means minus mean of the dense seeds' means
    ci: tuple[float, float] | None  # Welch t-CI at 1 - alpha; None with fewer than 2 seeds in a row
    p_value: float | None  # two-sided; None with fewer than 2 seeds in a row
    alpha: float

    @property
    def distinguishable(self) -> bool:
        """Whether the difference exceeds the seed-to-seed spread at ``alpha``."""
        return self.p_value is not None and self.p_value < self.alpha

    def format(self, digits: int = 2, unit: str = "") -> str:
        """``"+0.27 dB (Welch 95 % CI -0.4 to +0.9, p = 0.3, 3 vs 3 seeds)"``."""
        unit = f" {unit}" if unit else ""
        if self.p_value is None:
            return f"{self.mean_difference:+.{digits}f}{unit} (one seed: no seed-level test)"
        return (f"{self.mean_difference:+.{digits}f}{unit} (Welch {100 * (1 - self.alpha):g} % CI "
                f"{self.ci[0]:+.{digits}f} to {self.ci[1]:+.{digits}f}, p = {self.p_value:.3g}, "
                f"{self.n_kron} vs {self.n_dense} seeds)")

    def as_dict(self) -> dict:
        """JSON-ready numbers."""
        out = asdict(self)
        out["ci"] = None if self.ci is None else list(self.ci)
        out["distinguishable"] = self.distinguishable
        return out


def compare_over_seeds(kron: Sequence[float], dense: Sequence[float], *, alpha: float = 0.05) -> SeedComparison:
    """Welch's t-test (``scipy.stats.ttest_ind``, ``equal_var=False``) of the Kronecker row's per-seed test
    means against the dense row's: is the difference larger than what reseeding moves a row by?"""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    k, d = summarize_seeds(kron), summarize_seeds(dense)  # validates both lists
    diff = k.mean - d.mean
    if k.n < 2 or d.n < 2:
        return SeedComparison(k.n, d.n, diff, None, None, alpha)
    if k.std == 0 and d.std == 0:  # no spread at all: the t statistic is undefined
        return SeedComparison(k.n, d.n, diff, (diff, diff), 1.0 if diff == 0 else 0.0, alpha)
    result = stats.ttest_ind(np.asarray(kron, float), np.asarray(dense, float), equal_var=False)
    low, high = result.confidence_interval(1 - alpha)
    return SeedComparison(k.n, d.n, diff, (float(low), float(high)), float(result.pvalue), alpha)
