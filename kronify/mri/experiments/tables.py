"""Formatting shared by the result tables (Table 1, data efficiency): cells, markdown tables, the metric columns
(generated from :data:`kronify.mri.metrics.TABLE_METRICS`) and the Kronecker-minus-dense paired comparison's
cells, markdown table and explanation; the protocol and U-Net notes under Table 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kronify.mri.experiments.statistics import PairedComparison, SeedComparison, SeedSummary
from kronify.mri.metrics import TABLE_METRICS

__all__ = ["PAIRED_COLUMNS", "PAIRED_HEADER", "duration", "markdown_table", "mean_std", "metric_columns",
           "paired_cells", "paired_csv_cells", "paired_note", "plus_minus", "interval", "protocol_note", "unet_rows_note"]


def mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """``mean (std)``, ``mean`` without a std, ``n/a`` without a mean."""
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ({std:.{digits}f})" if std is not None else f"{mean:.{digits}f}"


def plus_minus(summary: SeedSummary | None, digits: int) -> str:
    """mean ± std over seeds (n/a when the metric is missing)."""
    return "n/a" if summary is None else f"{summary.mean:.{digits}f} ± {summary.std:.{digits}f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def interval(ci: tuple[float, float] | None, digits: int, missing: str = "-") -> str:
    return missing if ci is None else f"{ci[0]:+.{digits}f} to {ci[1]:+.{digits}f}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table with padded columns, one line per row."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]


def metric_columns(suffix: str = " (std)") -> list[str]:
    """The metric columns of a result table, in :data:`~kronify.mri.metrics.TABLE_METRICS` order."""
    return [f"{label}{suffix}" for label, _ in TABLE_METRICS.values()]


# --- Kronecker minus dense, paired over the test volumes -----------------------------------------------------------
#: The comparison's columns in a markdown table (after the columns that name the rows).
PAIRED_HEADER = ["Test volumes", "PSNR diff (dB)", "95 % t-CI", "95 % bootstrap CI", "Wilcoxon p", "SSIM diff",
                 "SSIM 95 % t-CI", "SSIM Wilcoxon p", "PSNR difference", "Over seeds: PSNR (Welch)"]


def paired_cells(paired: Mapping[str, PairedComparison], seed_level: Mapping[str, SeedComparison] | None = None
                 ) -> list[str]:
    """One row's :data:`PAIRED_HEADER` cells (the last one only with ``seed_level``)."""
    p, s = paired["psnr"], paired["ssim"]
    cells = [str(p.n), f"{p.mean_difference:+.2f}", interval(p.t_ci, 2), interval(p.bootstrap_ci, 2),
             f"{p.wilcoxon_p:.3g}", f"{s.mean_difference:+.3f}", interval(s.t_ci, 3), f"{s.wilcoxon_p:.3g}", p.verdict]
    return cells + ([seed_level["psnr"].format(2)] if seed_level else [])


def paired_csv_cells(paired: Mapping[str, PairedComparison] | None,
                     seed_level: Mapping[str, SeedComparison] | None = None) -> dict[str, str]:
    """The paired comparison's CSV cells (empty for rows without one)."""
    cells = {}
    for metric, digits in (("psnr", 2), ("ssim", 3)):
        c = (paired or {}).get(metric)
        w = (seed_level or {}).get(metric)
        name = metric.upper()
        cells.update({f"{name} diff vs dense": "" if c is None else f"{c.mean_difference:+.{digits}f}",
                      f"{name} diff 95% t-CI": "" if c is None else interval(c.t_ci, digits, ""),
                      f"{name} diff 95% bootstrap CI": "" if c is None else interval(c.bootstrap_ci, digits, ""),
                      f"{name} Wilcoxon p": "" if c is None else f"{c.wilcoxon_p:.3g}",
                      f"{name} distinguishable": "" if c is None else ("yes" if c.distinguishable else "no"),
                      f"{name} seed-level Welch p": "" if w is None or w.p_value is None else f"{w.p_value:.3g}"})
    return cells


PAIRED_COLUMNS = list(paired_csv_cells(None))


def paired_note(n_seeds: int, seed_level: bool) -> str:
    """What the paired comparison's numbers are (below its table)."""
    return ("Differences are Kronecker minus dense on the same test volumes (positive favours Kronecker); "
            + ("each volume's metric is first averaged over the seeds, then the volumes are paired. "
               if n_seeds > 1 else "one seed per row. ")
            + "t-CI: Student t on the per-volume differences; bootstrap: percentile, 9,999 resamples; Wilcoxon: "
            "two-sided signed-rank (scipy.stats). A difference is called distinguishable from zero only when the "
            "t-CI excludes 0 and Wilcoxon p < 0.05."
            + (" The volume-paired test treats the seed-averaged models as fixed; 'Over seeds' asks whether the "
               "difference is larger than the seed-to-seed spread: Welch's t-test of the rows' per-seed test "
               "means (scipy.stats.ttest_ind), with few seeds a weak test." if seed_level else ""))


def unet_rows_note(labels: set[str]) -> str:
    """What the table's U-Net rows are (the paper's DDPM-style U-Net, fastMRI's, or both)."""
    ddpm = "U-Net" in labels or "Kronecker U-Net" in labels
    fastmri = any(label.startswith(("U-Net (fastMRI)", "Kronecker U-Net (fastMRI")) for label in labels)
    parts = (["`U-Net`/`Kronecker U-Net` are the paper's DDPM-style U-Net (zoo `unet_ddpm`, Kronecker version as the "
              "official PHUNet)"] if ddpm else []) + (["`U-Net (fastMRI)` rows are fastMRI's U-Net"] if fastmri else [])
    if fastmri and not ddpm:
        parts.append("the paper's DDPM-style U-Net rows run with `--models unet_ddpm`")
    return "- U-Net rows: " + "; ".join(parts) + "." if parts else "- U-Net rows: none in this table."


def protocol_note(protocol) -> str:
    """One line naming the protocol and what it fixes."""
    if protocol.name == "paper":
        return ("- Protocol `paper` (the official HyperKron code): PD volumes; each slice's complex crop normalised by "
                "its max magnitude; k-space = its FFT; ONE fixed RandomMaskFunc mask (seed 0) over the crop's columns "
                "for training and testing (saved as mask_*.npy); SwinMR trained on 192x192 patches (paper preset); "
                "SSIM/PSNR per slice with data range = that slice's target max, mean (std) over slices. The paper's "
                "published numbers use this protocol.")
    return ("- Protocol `fastmri` (fastMRI's transforms): PD volumes; masks over the raw k-space width, then the "
            "centre crop of the inverse FFT; random masks in training, seeded per file for validation/test; "
            "fastMRI volume SSIM/PSNR/NMSE with data range = the evaluated target volume's max, mean (std) over "
            "volumes (phase error and LPIPS: per-volume means of slice values).")
