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
