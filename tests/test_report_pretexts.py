"""The table with a pretext axis: scratch, reconstruction and masked runs, hand-computed figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lymphnode.evaluation.runs import (
    ReportError,
    arm_name,
    arm_pretext,
    collect_runs,
    order_arms,
    sweep_grid,
)
from lymphnode.evaluation.table import summarize
from lymphnode.evaluation.table_output import plot, to_markdown
from lymphnode.report import main

#: Known test F1s per (arm, size), folds 0, 1, 2 (seed 0).
F1 = {
    ("scratch", 40): [0.40, 0.50, 0.60],
    ("pretrained", 40): [0.45, 0.52, 0.68],
    ("pretrained-masked", 40): [0.60, 0.66, 0.75],
    ("scratch", 80): [0.60, 0.62, 0.70],
    ("pretrained", 80): [0.61, 0.66, 0.71],
    ("pretrained-masked", 80): [0.70, 0.71, 0.80],
}
_ABSENT = object()


def _write(root: Path, arm: str, size: int, fold: int, f1: float, *, seed: int = 0,
           pretext: object = _ABSENT, status: str = "completed") -> Path:  # fmt: skip
    """A fine-tuning run folder as lymphnode.train lays it out: <arm>/size<N>/fold<K>/seed<S>;
    ``pretext`` left out of results.json unless given (older files had no such key)."""
    run_dir = root / arm / f"size{size}" / f"fold{fold}" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    metrics = {"test/seg_precision": 0.5, "test/seg_recall": 0.8, "test/seg_f1": f1}
    result: dict = {
        "status": status,
        "init": "scratch" if arm == "scratch" else "pretrained",
        "labeled_size": size,
        "fold": fold,
        "seed": seed,
        "metrics": metrics if status == "completed" else {},
        "metrics_last": metrics,
        "error": None if status == "completed" else "RuntimeError: boom",
    }
    if pretext is not _ABSENT:
        result["pretext"] = pretext
    (run_dir / "results.json").write_text(json.dumps(result))
    return run_dir


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Scratch + reconstruction + masked, 2 sizes × 3 folds. Reconstruction at size 40 is in the
    old format (no pretext key), at size 80 says pretext=reconstruction; scratch says null."""
    root = tmp_path / "runs"
    for (arm, size), values in F1.items():
        for fold, f1 in enumerate(values):
            if arm == "scratch":
                pretext: object = None
            elif arm == "pretrained":
                pretext = _ABSENT if size == 40 else "reconstruction"
            else:
                pretext = "masked"
            _write(root, arm, size, fold, f1, pretext=pretext)
    return root


def _t_test_p(diffs: list[float]) -> float:
    """Two-sided paired t-test p for 3 differences, by hand: t = mean / (sd / √n) on 2 degrees of
    freedom, whose two-sided tail is 1 − |t| / √(t² + 2)."""
    d = np.asarray(diffs)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    return 1 - abs(t) / math.sqrt(t * t + 2)


def test_arms_are_scratch_reconstruction_then_masked(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    assert report.arms == ["scratch", "pretrained", "pretrained-masked"]
    assert report.pretexts == ["reconstruction", "masked"]
    assert report.comparisons == [
        ("pretrained", "scratch"),
        ("pretrained-masked", "scratch"),
        ("pretrained-masked", "pretrained"),
    ]
    assert report.missing == [] and report.failed == []
    assert report.n_runs == 18


def test_old_results_without_pretext_count_as_reconstruction(sweep: Path) -> None:
    runs = {r.name: r for r in collect_runs([sweep])}
    old = runs["pretrained/size40/fold0/seed0"]
    assert old.pretext == "reconstruction" and old.arm == "pretrained"
    assert runs["pretrained/size80/fold0/seed0"].arm == "pretrained"
    assert runs["pretrained-masked/size80/fold0/seed0"].arm == "pretrained-masked"
    assert runs["scratch/size80/fold0/seed0"].pretext is None
    # the old-format runs sit in the reconstruction cell with the new-format ones' size apart
    report = summarize(runs.values())
    assert report.cells[(40, "pretrained", "f1")].n == 3


def test_means_and_sds_per_size_and_arm_match_hand_computed(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    masked40 = report.cells[(40, "pretrained-masked", "f1")]
    assert masked40.mean == pytest.approx(0.67)  # (.60 + .66 + .75) / 3
    assert masked40.std == pytest.approx(math.sqrt(0.0057))  # (.07² + .01² + .08²) / 2
    for (arm, size), values in F1.items():
        cell = report.cells[(size, arm, "f1")]
        assert cell.n == 3
        assert cell.mean == pytest.approx(np.mean(values))
        assert cell.std == pytest.approx(np.std(values, ddof=1))
        assert report.cells[(size, arm, "precision")].mean == pytest.approx(0.5)


def test_paired_differences_to_scratch_and_to_reconstruction(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    # masked − scratch at 40: .20, .16, .15 → mean .17, sd √((.03² + .01² + .02²) / 2)
    pair = report.paired[(40, "pretrained-masked", "scratch", "f1")]
    assert pair.mean == pytest.approx(0.17) and pair.n == 3
    assert pair.std == pytest.approx(math.sqrt(0.0007))
    assert pair.p_value == pytest.approx(_t_test_p([0.20, 0.16, 0.15]))
    # masked − reconstruction at 40: .15, .14, .07 → mean .12
    pair = report.paired[(40, "pretrained-masked", "pretrained", "f1")]
    assert pair.mean == pytest.approx(0.12)
    assert pair.std == pytest.approx(math.sqrt(0.0019))
    for size in (40, 80):
        for arm, reference in report.comparisons:
            diffs = [a - b for a, b in zip(F1[(arm, size)], F1[(reference, size)])]
            pair = report.paired[(size, arm, reference, "f1")]
            assert pair.mean == pytest.approx(np.mean(diffs))
            assert pair.p_value == pytest.approx(_t_test_p(diffs))
            ref = stats.ttest_rel(F1[(arm, size)], F1[(reference, size)]).pvalue
            assert pair.p_value == pytest.approx(ref)
    # reconstruction vs masked is not compared the other way round, scratch to nothing
    assert (40, "pretrained", "pretrained-masked", "f1") not in report.paired
    assert not any(key[1] == "scratch" for key in report.paired)


def test_markdown_has_the_masked_columns_and_differences(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    lines = to_markdown(report).splitlines()
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    row40 = [c.strip() for c in next(x for x in lines if x.startswith("| 40 |")).strip("|").split("|")]  # fmt: skip
    cell = dict(zip(header, row40))
    assert cell["Without pretraining: F1 (%)"] == "50.0 ± 10.0 (n=3)"
    # .45 .52 .68: mean .55, sd √((.10² + .03² + .13²) / 2) = .118
    assert cell["With reconstruction pretraining: F1 (%)"] == "55.0 ± 11.8 (n=3)"
    assert cell["With masked pretraining: F1 (%)"] == "67.0 ± 7.5 (n=3)"
    p = _t_test_p([0.20, 0.16, 0.15])
    assert cell["Δ F1 masked − scratch (paired t-test)"] == f"+17.0 (p={p:.3f}, n=3)"
    p = _t_test_p([0.15, 0.14, 0.07])
    assert cell["Δ F1 masked − reconstruction (paired t-test)"] == f"+12.0 (p={p:.3f}, n=3)"
    p = _t_test_p([0.05, 0.02, 0.08])
    assert cell["Δ F1 reconstruction − scratch (paired t-test)"] == f"+5.0 (p={p:.3f}, n=3)"
    assert header.index("With masked pretraining: Precision (%)") == 7  # after the paper's arms
    assert len(header) == 1 + 3 * 3 + 3


def test_csv_rows_per_arm_and_per_comparison(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out), "--paper"]) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    f1 = {(r["labeled_size"], r["init"]): r for r in rows if r["metric"] == "f1"}
    assert float(f1[("80", "pretrained-masked")]["mean"]) == pytest.approx(
        np.mean([0.7, 0.71, 0.8])
    )
    assert f1[("80", "pretrained-masked")]["pretext"] == "masked"
    assert f1[("80", "pretrained")]["pretext"] == "reconstruction"
    assert f1[("80", "scratch")]["pretext"] == ""
    assert {init for _, init in f1} == {
        "scratch", "pretrained", "pretrained-masked",
        "pretrained-scratch", "masked-scratch", "masked-reconstruction",
    }  # fmt: skip
    diff = f1[("80", "masked-reconstruction")]
    expected = [0.09, 0.05, 0.09]  # .70 − .61, .71 − .66, .80 − .71
    assert float(diff["mean"]) == pytest.approx(np.mean(expected), abs=1e-6)
    assert float(diff["p_value"]) == pytest.approx(_t_test_p(expected), rel=1e-5)
    assert diff["pretext"] == "masked"
    assert float(f1[("40", "pretrained-scratch")]["mean"]) == pytest.approx(0.05, abs=1e-6)
    # --paper still compares the paper's two arms
    text = (out / "table.md").read_text()
    assert "Paper scratch F1 (%) | Paper pretrained F1 (%) |" in text.splitlines()[0]


def test_plot_has_one_line_per_arm(sweep: Path, tmp_path: Path) -> None:
    report = summarize(collect_runs([sweep]))
    path = tmp_path / "f1.png"
    fig = plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    f1_axes = fig.axes[0]
    lines = {c.get_label(): c.lines[0] for c in f1_axes.containers}
    assert list(lines) == [
        "without pretraining",
        "with reconstruction pretraining",
        "with masked pretraining",
    ]
    masked = lines["with masked pretraining"]
    assert list(masked.get_xdata()) == [40, 80]
    assert list(masked.get_ydata()) == pytest.approx([67.0, 100 * np.mean([0.7, 0.71, 0.8])])
    # the error bars are the sample sd: the masked bar at 40 spans 67 ± 100·√.0057
    segments = f1_axes.containers[2].lines[2][0].get_segments()
    assert segments[0][:, 1] == pytest.approx([67 - 100 * math.sqrt(0.0057), 67 + 100 * math.sqrt(0.0057)])  # fmt: skip


def test_a_missing_masked_run_is_listed_once_and_scratch_is_not_duplicated(
    sweep: Path,
) -> None:
    (sweep / "pretrained-masked" / "size80" / "fold2" / "seed0" / "results.json").unlink()
    report = summarize(collect_runs([sweep]))
    assert [r.name for r in report.missing] == ["pretrained-masked/size80/fold2/seed0"]
    assert report.cells[(80, "pretrained-masked", "f1")].n == 2
    assert report.paired[(80, "pretrained-masked", "scratch", "f1")].n == 2


MULTIRUN = """\
hydra:
  sweeper:
    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper
    max_batch_size: null
    params:
      data.labeled_size: 40,80,120,200
      data.fold: range(0,3)
      init: pretrained,scratch
  overrides:
    hydra:
    - hydra.mode=MULTIRUN
    task:
    - +experiment=table
    - pretext=reconstruction,masked
    - data.labeled_size=40,80
    - ~callbacks.lr_monitor
stage: finetune
init: pretrained
seed: 0
run_name: ${run_arm:${init},${pretext.name}}/size${data.labeled_size}/fold${data.fold}/seed${seed}
data:
  labeled_size: 40
  fold: 0
pretext:
  name: reconstruction
"""


def test_sweep_grid_has_the_pretext_axis_and_scratch_once(tmp_path: Path) -> None:
    path = tmp_path / "multirun.yaml"
    path.write_text(MULTIRUN)
    grid = sweep_grid(path)
    # the command line's sizes replace the experiment's; 3 arms × 2 sizes × 3 folds × 1 seed
    assert len(grid) == 18 and len(set(grid)) == 18
    assert [g for g in grid if g[1] == 80 and g[2] == 2] == [
        ("scratch", 80, 2, 0),
        ("pretrained", 80, 2, 0),
        ("pretrained-masked", 80, 2, 0),
    ]


def test_the_sweep_definition_names_runs_no_folder_holds(sweep: Path) -> None:
    (sweep / "multirun.yaml").write_text(MULTIRUN.replace("fold: range(0,3)", "fold: range(0,4)"))
    report = summarize(collect_runs([sweep]))
    assert sorted(r.name for r in report.missing) == sorted(
        f"{arm}/size{size}/fold3/seed0"
        for arm in ("scratch", "pretrained", "pretrained-masked")
        for size in (40, 80)
    )
    assert all("defined by the sweep" in r.error for r in report.missing)
    assert "Missing runs (6, not averaged):" in to_markdown(report)


def test_a_pretraining_or_other_sweeper_defines_no_grid(tmp_path: Path) -> None:
    path = tmp_path / "multirun.yaml"
    path.write_text(MULTIRUN.replace("stage: finetune", "stage: pretrain"))
    assert sweep_grid(path) == []
    path.write_text(MULTIRUN.replace("basic_sweeper.BasicSweeper", "optuna.OptunaSweeper"))
    assert sweep_grid(path) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("hydra: [1, 2\n", r"multirun.yaml is not readable YAML"),
        ("- a\n- b\n", r"multirun.yaml holds a list, expected a mapping"),
        (MULTIRUN.replace("init: pretrained,scratch", "init: pretrained,,"), "do not parse"),
    ],
)
def test_an_unreadable_sweep_definition_is_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "multirun.yaml"
    path.write_text(text)
    with pytest.raises(ReportError, match=match):
        sweep_grid(path)


def test_orphan_run_dir_of_a_pretext_is_missing_in_its_arm(sweep: Path) -> None:
    orphan = sweep / "pretrained-masked" / "size40" / "fold7" / "seed0"
    (orphan / ".hydra").mkdir(parents=True)
    (orphan / ".hydra" / "config.yaml").write_text("seed: 0\npretext:\n  name: masked\n")
    (orphan / ".hydra" / "overrides.yaml").write_text(
        "- init=pretrained\n- data.labeled_size=40\n- data.fold=7\n"
    )
    runs = {r.name: r for r in collect_runs([sweep])}
    run = runs["pretrained-masked/size40/fold7/seed0"]
    assert (run.status, run.arm, run.seed) == ("missing", "pretrained-masked", 0)


def test_a_pretext_that_names_no_arm_is_a_failed_run(tmp_path: Path) -> None:
    _write(tmp_path, "pretrained", 40, 0, 0.5, pretext=3)
    _write(tmp_path, "scratch", 40, 0, 0.5, pretext="masked")  # scratch ignores the field
    runs = {r.name: r for r in collect_runs([tmp_path])}
    bad = runs["pretrained/size40/fold0/seed0"]
    assert bad.status == "failed" and bad.metrics == {}
    assert "pretext=3 is not a pretext name" in bad.error and "results.json" in bad.error
    assert runs["scratch/size40/fold0/seed0"].arm == "scratch"


def test_arm_names_round_trip_and_order_is_stable() -> None:
    assert arm_name("scratch", "masked") == "scratch"
    assert arm_name("pretrained", None) == arm_name("pretrained", "reconstruction") == "pretrained"
    assert arm_name("pretrained", "stain") == "pretrained-stain"
    for arm in ("scratch", "pretrained", "pretrained-stain"):
        pretext = arm_pretext(arm)
        assert arm_name("scratch" if pretext is None else "pretrained", pretext) == arm
    shuffled = ["pretrained-stain", "pretrained-contrastive", "pretrained", "pretrained-masked"]
    expected = ["scratch", "pretrained", "pretrained-contrastive", "pretrained-masked",
                "pretrained-stain"]  # fmt: skip
    assert order_arms([*shuffled, "scratch"]) == expected
    assert order_arms(reversed([*shuffled, "scratch"])) == expected


def test_a_sweep_without_reconstruction_has_no_empty_reconstruction_columns(tmp_path: Path) -> None:
    """scratch + masked only (e.g. `pretext=masked model.top_skip=true` into its own root): no
    "with reconstruction" arm, and masked is compared with scratch alone."""
    root = tmp_path / "runs"
    for (arm, size), values in F1.items():
        if arm != "pretrained":
            for fold, f1 in enumerate(values):
                _write(root, arm, size, fold, f1, pretext=None if arm == "scratch" else "masked")
    report = summarize(collect_runs([root]))
    assert report.arms == ["scratch", "pretrained-masked"]
    assert report.comparisons == [("pretrained-masked", "scratch")]
    table = to_markdown(report)
    assert "reconstruction" not in table.splitlines()[0]
    # with reconstruction runs present the paper's arm stays
    _write(root, "pretrained", 40, 0, 0.5, pretext="reconstruction")
    assert summarize(collect_runs([root])).arms == ["scratch", "pretrained", "pretrained-masked"]
