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


PER_METHOD = RESULTS / "per-method"


@pytest.mark.skipif(not PER_METHOD.is_dir(), reason="no committed per-method studies")
def test_per_method_studies_read_as_one_table():
    """One study per method, rendered side by side: each column is that method's own study,
    each paired row its own test, and the variants say which study chose them."""
    folders = sorted(PER_METHOD.iterdir())
    done = _render(*folders, "--outcome", "nll_delta")
    assert done.returncode == 0, done.stderr
    table = done.stdout.split("### Paired")[0]          # the held-out section only
    lines = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()
             if line.startswith("| ") and "|" in line[2:]}
    header = lines["metric"]
    for k, folder in enumerate(folders):
        assert header[k].strip().startswith(folder.name)
        held = pd.read_csv(folder / "heldout.csv")
        row = held[(held["metric"] == "cud") & (held["outcome"] == "nll_delta")].iloc[0]
        assert lines["cud"][k].strip().startswith(f"{row['spearman']:+.2f} ± ")
        paired = pd.read_csv(folder / "paired.csv")
        first = paired[paired["outcome"] == "nll_delta"].iloc[0]
        assert f"{first['diff']:+.3f} [{first['diff_lo']:+.3f}" in done.stdout
    auroc = _render(*folders, "--stat", "auroc")
    assert auroc.returncode == 0 and "Held-out auroc (nll_after)" in auroc.stdout
    assert "| variant chosen | study | pools |" in done.stdout
