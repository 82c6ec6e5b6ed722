"""Rows trained with several seeds (kronify.mri.experiments.study, table1/data_efficiency --seeds): the aggregation over seeds
and the paired Kronecker-vs-dense rows checked against numpy/scipy on the runs' own files, the single-seed layout
unchanged, and runs deterministic per seed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from kronify.mri.experiments.figures import errorbar_figure
from kronify.mri.experiments.study import per_volume_values, row_over_seeds, seed_list, seed_run_dir

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _recipes_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "recipes"))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def volumes(run_dir: Path, metric: str) -> dict[str, float]:
    """{volume: metric} straight from the run's per_volume.csv (the fastmri protocol scores volumes)."""
    return {r["fname"]: float(r[metric]) for r in read_csv(run_dir / "per_volume.csv")}


@pytest.fixture(scope="module")
def seeds_table(demo_root, tmp_path_factory):
    """table1 --tiny with the paper's U-Net rows only, 2 seeds, 4x."""
    out = tmp_path_factory.mktemp("seeds") / "t1"
    argv = ["--tiny", "--models", "unet_ddpm", "--seeds", "2", "--max-steps", "3", "--data-path", str(demo_root),
            "--accelerations", "4", "--out", str(out), "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(REPO / "recipes"))
        import table1

        assert table1.main(argv) == 0
    return out


def test_table1_seeds_rows_are_mean_and_std_over_the_seed_runs(seeds_table):
    out = seeds_table
    data = json.loads((out / "table1.json").read_text())
    assert data["seeds"] == [0, 1]
    assert [r["model"] for r in data["rows"]] == ["Zero-filled", "U-Net", "Kronecker U-Net"]  # --models subset
    for row in data["rows"][1:]:
        runs = [out / "runs" / "4x" / row["zoo_model"] / f"seed{s}" for s in (0, 1)]
        metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
        assert {m["model"] for m in metrics} == {row["zoo_model"]}
        assert row["std_over"] == "seeds" and row["seeds"]["seeds"] == [0, 1]
        for metric in ("ssim", "psnr", "nmse", "phase_error"):
            values = [m[f"{metric}_mean"] for m in metrics]
            assert row[metric]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert row[metric]["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9, abs=1e-15)
        psnr = row["psnr"]
        assert row["display"]["PSNR (std)"] == f"{psnr['mean']:.2f} ± {psnr['std']:.2f}"
    assert data["rows"][0]["std_over"] == "volumes" and data["rows"][0]["seeds"] is None
    md = (out / "table1.md").read_text()
    assert "PSNR (± std over seeds)" in md and "trained with 2 seeds (0, 1" in md


def test_table1_kronecker_row_is_paired_with_its_dense_row_over_the_test_volumes(seeds_table):
    out = seeds_table
    data = json.loads((out / "table1.json").read_text())
    dense, kron = data["rows"][1], data["rows"][2]
    assert dense["paired"] is None and kron["dense_row"] == "U-Net"
    for metric in ("psnr", "ssim"):
        # reference: each volume averaged over the two seeds with numpy, then Kronecker minus dense
        avg = {}
        for row in (kron, dense):
            seeds = [volumes(out / "runs" / "4x" / row["zoo_model"] / f"seed{s}", metric) for s in (0, 1)]
            avg[row["model"]] = {v: np.mean([s[v] for s in seeds]) for v in seeds[0]}
        names = sorted(avg["U-Net"])
        diff = np.array([avg["Kronecker U-Net"][v] - avg["U-Net"][v] for v in names])
        paired = kron["paired"][metric]
        assert paired["n"] == len(names) >= 2
        assert paired["mean_difference"] == pytest.approx(diff.mean(), abs=1e-12)
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        assert paired["t_ci"] == pytest.approx([diff.mean() - half, diff.mean() + half], abs=1e-12)
        if np.count_nonzero(diff):
            assert paired["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diff).pvalue)
    # over seeds: Welch's test of the two rows' per-seed means, against scipy on the runs' metrics.json
    per_seed = {row["zoo_model"]: [json.loads((out / "runs" / "4x" / row["zoo_model"] / f"seed{s}" / "metrics.json")
                                              .read_text())["psnr_mean"] for s in (0, 1)] for row in (kron, dense)}
    welch = stats.ttest_ind(per_seed[kron["zoo_model"]], per_seed[dense["zoo_model"]], equal_var=False)
    assert kron["seed_level"]["psnr"]["p_value"] == pytest.approx(welch.pvalue)
    assert kron["seed_level"]["psnr"]["mean_difference"] == pytest.approx(
        np.mean(per_seed[kron["zoo_model"]]) - np.mean(per_seed[dense["zoo_model"]]))
    rows = read_csv(out / "table1.csv")
    kron_csv = next(r for r in rows if r["Model"] == "Kronecker U-Net")
    assert float(kron_csv["PSNR seed-level Welch p"]) == pytest.approx(welch.pvalue, rel=1e-2)
    assert kron_csv["Seeds"] == "2" and kron_csv["Std over"] == "seeds"
    assert float(kron_csv["PSNR diff vs dense"]) == pytest.approx(kron["paired"]["psnr"]["mean_difference"], abs=0.006)
    assert kron_csv["PSNR distinguishable"] in ("yes", "no") and next(r for r in rows if r["Model"] == "U-Net")[
        "PSNR diff vs dense"] == ""
    md = (out / "table1.md").read_text()
    assert "## Kronecker minus dense, paired over the test volumes (4x, 2 seeds)" in md
    assert "| Kronecker U-Net | U-Net |" in md and "Over seeds: PSNR (Welch)" in md


def test_runs_are_deterministic_per_seed_and_one_seed_keeps_the_layout(seeds_table, demo_root, tmp_path):
    """A one-seed table writes runs/<acc>x/<model>/ as before; its seed-0 runs equal the seed-0 runs of the
    two-seed table exactly, and seed 1 differs from seed 0."""
    import table1

    out = tmp_path / "one"
    assert table1.main(["--tiny", "--models", "unet_ddpm", "--max-steps", "3", "--data-path", str(demo_root),
                        "--accelerations", "4", "--out", str(out), "--no-progress"]) == 0
    for model in ("unet_ddpm_tiny", "kron_unet_ddpm_tiny"):
        single = out / "runs" / "4x" / model
        assert (single / "metrics.json").is_file() and not (single / "seed0").exists()
        seed0 = seeds_table / "runs" / "4x" / model / "seed0"
        seed1 = seeds_table / "runs" / "4x" / model / "seed1"
        assert read_csv(single / "per_slice.csv") == read_csv(seed0 / "per_slice.csv")
        assert read_csv(seed1 / "per_slice.csv") != read_csv(seed0 / "per_slice.csv")
    data = json.loads((out / "table1.json").read_text())
    kron = data["rows"][2]
    assert kron["std_over"] == "volumes" and kron["paired"]["psnr"]["n"] >= 2  # one seed: still paired over volumes
    assert kron["display"]["PSNR (std)"] == f"{kron['psnr']['mean']:.2f} ({kron['psnr']['std']:.2f})"
    assert "paired over the test volumes (4x, 1 seed)" in (out / "table1.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--models", "unet_ddpm,resnet"], "--models takes model families"),
    (["--models", ","], "--models takes model families"),
    (["--seeds", "0"], "--seeds must be >= 1"),
])
def test_table1_bad_seed_and_model_flags(demo_root, tmp_path, capsys, argv, message):
    import table1

    with pytest.raises(SystemExit) as exc:
        table1.main(["--tiny", "--data-path", str(demo_root), "--out", str(tmp_path / "x"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # rejected before any data or run is written


def test_data_efficiency_seeds(demo_root, tmp_path):
    import data_efficiency

    out = tmp_path / "de"
    assert data_efficiency.main(["--data-path", str(demo_root), "--preset", "tiny", "--max-steps", "2", "--out",
                                 str(out), "--no-progress", "--family", "unet_ddpm", "--fractions", "0.5", "1",
                                 "--seeds", "2"]) == 0
    data = json.loads((out / "data_efficiency.json").read_text())
    assert data["seeds"] == [0, 1] and data["fractions"] == [0.5, 1.0]
    runs = [r for r in data["rows"] if "model" in r]
    assert [(r["fraction"], r["model"]) for r in runs] == [
        (0.5, "unet_ddpm_tiny"), (0.5, "kron_unet_ddpm_tiny"), (1.0, "unet_ddpm_tiny"), (1.0, "kron_unet_ddpm_tiny")]
    for r in runs:
        values = [json.loads((out / "runs" / f"{r['fraction']:g}" / r["model"] / f"seed{s}" / "metrics.json")
                             .read_text())["psnr_mean"] for s in (0, 1)]
        assert r["over_seeds"]["psnr"]["mean"] == pytest.approx(np.mean(values))
        assert r["over_seeds"]["psnr"]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    paired = [r for r in data["rows"] if "paired" in r]
    assert [p["fraction"] for p in paired] == [0.5, 1.0] and all(p["paired"]["psnr"]["n"] >= 2 for p in paired)
    assert all(p["seed_level"]["psnr"]["n_kron"] == 2 for p in paired)
    md = (out / "data_efficiency.md").read_text()
    assert "## Kronecker minus dense, paired over the test volumes" in md and "Seeds: 0, 1" in md
    assert (out / "psnr_vs_fraction.png").stat().st_size > 1000 and (out / "curves.png").is_file()


# ---------------------------------------------------------------------------------------- kronify.mri.experiments.study


def fake_run(path: Path, model: str, psnr: float, per_volume: dict[str, float], over: str = "volumes") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps({"model": model, "psnr_mean": psnr, "ssim_mean": psnr / 100,
                                                   "metrics_over": over, "train_seconds": 1.0}))
    rows = [{"fname": v, "psnr": p, "ssim": p / 100} for v, p in per_volume.items()]
    name = "per_slice.csv" if over == "slices" else "per_volume.csv"
    with open(path / name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["fname", "psnr", "ssim"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(10, 40, allow_nan=False), min_size=1, max_size=5), st.integers(0, 100))
def test_row_over_seeds_matches_numpy(tmp_path_factory, values, first):
    root = tmp_path_factory.mktemp("row")
    seeds = seed_list(first, len(values))
    assert seeds == list(range(first, first + len(values)))
    dirs = [fake_run(seed_run_dir(root, s, len(seeds)), "m", v, {"a": v}) for s, v in zip(seeds, values)]
    assert dirs[0] == (root if len(values) == 1 else root / f"seed{first}")
    row = row_over_seeds(dirs, seeds)
    assert row.summaries["psnr"].mean == pytest.approx(np.mean(values))
    if len(values) == 1:
        assert row.summaries["psnr"].std is None
    else:
        assert row.summaries["psnr"].std == pytest.approx(np.std(values, ddof=1), abs=1e-9)
    assert "lpips" not in row.summaries  # absent from the runs: not summarised


def test_per_volume_values_follow_the_run_scope(tmp_path):
    by_volume = fake_run(tmp_path / "v", "m", 30.0, {"a": 30.0, "b": 31.0})
    assert per_volume_values(by_volume, "psnr") == {"a": 30.0, "b": 31.0}
    # the paper protocol scores slices: a volume's value is the mean of its slices
    by_slice = tmp_path / "s"
    fake_run(by_slice, "m", 30.0, {}, over="slices")
    with open(by_slice / "per_slice.csv", "w", newline="") as f:
        f.write("fname,psnr\na,30\na,32\nb,29\n")
    assert per_volume_values(by_slice, "psnr") == {"a": 31.0, "b": 29.0}
    with pytest.raises(ValueError, match="no 'lpips' column"):
        per_volume_values(by_volume, "lpips")


def test_row_over_seeds_rejects_mixed_or_missing_runs(tmp_path):
    a = fake_run(tmp_path / "a", "unet", 30.0, {"v": 30.0})
    b = fake_run(tmp_path / "b", "kron_unet", 31.0, {"v": 31.0})
    with pytest.raises(ValueError, match="same model"):
        row_over_seeds([a, b], [0, 1])
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        row_over_seeds([a, tmp_path / "missing"], [0, 1])
    with pytest.raises(ValueError, match="one run folder per seed"):
        row_over_seeds([a], [0, 1])
    with pytest.raises(ValueError, match="number of seeds must be >= 1"):
        seed_list(0, 0)


def test_errorbar_figure(tmp_path):
    path = tmp_path / "f.png"
    errorbar_figure(path, {"unet": {"dense": ([0.1, 1.0], [25.0, 27.0], [0.3, 0.2]),
                                    "Kronecker": ([0.1, 1.0], [25.5, 26.5], [None, None])}},
                    xlabel="fraction", ylabel="PSNR", xticks=[0.1, 1.0], xscale="log",
                    references={"unet": {"zero-filled": 22.0}})
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="differ in length"):
        errorbar_figure(tmp_path / "g.png", {"p": {"x": ([1, 2], [1.0], [None])}}, xlabel="x", ylabel="y")


# ------------------------------------------------------------------------------------ seed-level Welch test
# Wikipedia, "Welch's t-test", example 2 (two samples of 15 with unequal variances): t = -2.46,
# p = 0.021 (df printed as 24.99)
WELCH_A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
WELCH_A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]


def test_compare_over_seeds_against_a_published_welch_example():
    from kronify.mri.experiments.statistics import compare_over_seeds

    c = compare_over_seeds(WELCH_A1, WELCH_A2)
    assert c.p_value == pytest.approx(0.021, abs=0.001) and c.distinguishable
    assert c.mean_difference == pytest.approx(np.mean(WELCH_A1) - np.mean(WELCH_A2))
    # the CI from the Welch-Satterthwaite formula written out with numpy
    v1, v2 = np.var(WELCH_A1, ddof=1) / 15, np.var(WELCH_A2, ddof=1) / 15
    df = (v1 + v2) ** 2 / (v1**2 / 14 + v2**2 / 14)
    assert df == pytest.approx(24.99, abs=0.01)
    half = stats.t.ppf(0.975, df) * np.sqrt(v1 + v2)
    assert c.ci == pytest.approx((c.mean_difference - half, c.mean_difference + half))
    assert "Welch 95 % CI" in c.format() and c.as_dict()["distinguishable"] is True


def test_compare_over_seeds_edge_cases():
    from kronify.mri.experiments.statistics import compare_over_seeds

    one = compare_over_seeds([30.0], [29.0, 29.5])
    assert one.p_value is None and one.ci is None and not one.distinguishable and "one seed" in one.format()
    same = compare_over_seeds([30.0, 30.0], [30.0, 30.0])
    assert same.p_value == 1.0 and not same.distinguishable
    with pytest.raises(ValueError, match="non-finite"):
        compare_over_seeds([30.0, float("nan")], [29.0, 29.5])
