"""The committed TOFU study tables (results/tofu-forget10) and the script that renders them for
notes/tofu.md: every figure it prints is the CSV's, read back, not recomputed."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "tofu-forget10"
SCRIPT = ROOT / "scripts" / "tofu_tables.py"


def _render(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not (RESULTS / "heldout.csv").is_file(), reason="no committed results")
def test_tables_show_the_committed_figures():
    done = _render(RESULTS)
    assert done.returncode == 0, done.stderr
    held = pd.read_csv(RESULTS / "heldout.csv")
    held = held[held["outcome"] == "nll_after"]
    lines = {line.split("|")[1].strip(): line for line in done.stdout.splitlines()
             if line.startswith("| ") and "|" in line[2:]}
    for metric in ("cud_paper", "cud", "selected", "loss", "random"):
        row = held[held["metric"] == metric].iloc[0]
        assert f"{row['spearman']:+.2f} ± {row['spearman_sd']:.2f}" in lines[metric]
    paired = pd.read_csv(RESULTS / "paired.csv").iloc[0]
    assert f"{paired['diff']:+.3f}" in done.stdout
    assert "Variants chosen" in done.stdout


def test_a_folder_without_tables_is_refused(tmp_path):
    done = _render(tmp_path)
    assert done.returncode == 2
    assert str(tmp_path) in done.stderr and "heldout.csv" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not (RESULTS / "per_sample.parquet").is_file(), reason="no committed results")
def test_rescore_reproduces_the_study_on_its_own_method(tmp_path):
    """scripts/rescore.py scores another method's outcomes with a committed study's pools; fed
    the study's own method again, its mean rho over pools is the study's, metric for metric."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("rescore", ROOT / "scripts" / "rescore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    own = pd.read_parquet(RESULTS / "outcomes_graddiff.parquet")
    held, paired = module.rescore(RESULTS, {"again": own})
    study = pd.read_csv(RESULTS / "heldout.csv").set_index(["metric", "method", "outcome"])
    for row in held.itertuples():
        expected = study.loc[(row.metric, "graddiff", row.outcome), "spearman"]
        assert row.spearman == pytest.approx(expected, abs=1e-9), row.metric
        assert row.spearman_lo < row.spearman < row.spearman_hi
    committed = pd.read_csv(RESULTS / "paired.csv").set_index(["metric", "outcome"])
    for row in paired.itertuples():  # other resamples than the study's: close, not equal
        was = committed.loc[(row.metric, row.outcome)]
        assert row.diff == pytest.approx(was["diff"], abs=0.02)
        assert row.diff_lo == pytest.approx(was["diff_lo"], abs=0.03)
        assert row.p == pytest.approx(was["p"], abs=0.1)
