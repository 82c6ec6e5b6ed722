"""The MRI compression study's rows (benchmarks/compress/mri.py) measure what `make demo` runs."""

from __future__ import annotations

from dataclasses import replace

from benchmarks.compress.mri import DEMO_ROW, MATCHED_ROW, cost_rows, matched_rows, study_rows
from kronify.mri.experiments.table1 import COMPRESSED_SETTINGS


def test_the_cost_study_measures_make_demos_compressed_rows():
    # table1 distils for a fraction of the dense run's steps; the study row fixes the steps of the same fraction
    steps = 1600
    row = cost_rows(steps)[DEMO_ROW]
    demo = replace(COMPRESSED_SETTINGS, steps=max(1, round(COMPRESSED_SETTINGS.fraction * steps)))
    assert replace(row, fraction=demo.fraction) == demo


def test_study_rows_are_distinct_and_valid():
    for rows in (study_rows(1000), cost_rows(1000), matched_rows(1000, 0.5447)):
        for settings in rows.values():
            settings.check()
        assert len({repr(s) for s in rows.values()}) == len(rows)  # no two rows run the same settings
        assert len(set(rows.values())) == len(rows)  # no two labels run the same settings
    assert matched_rows(1000, 0.54472)[MATCHED_ROW].budget == 0.5447
