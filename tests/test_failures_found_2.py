"""Failures of the second round of hostile inputs (issue 25): results mixed, lost or
overwritten. One test (or a few) per numbered failure of the issue; each fails on the code the
issue was filed against and passes once the failure is fixed as its docstring says.

Concurrency goes through real processes: a process holding a folder's lock (an ``flock`` on
``<folder>/.lock``, the protocol of :mod:`cud.folders`), and ``cud`` processes that wait for one
go signal so they start together.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import invoke, one_line_error

QUICK = ["--steps", "2", "--n-edges", "10", "--no-faithfulness"]
#: a small study of 10 samples for `cud validate`
STUDY = ["--k", "1", "--pool", "0.5", "--n-boot", "20", "--no-predictor", "--no-variants",
         "--no-ladder", "--sizes", "10"]
SRC = str(Path(__file__).resolve().parent.parent / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: holds the lock of the folder argv[1] until killed; says "held" once it holds it
HOLDER = ("import fcntl, os, sys, time\n"
          "os.makedirs(sys.argv[1], exist_ok=True)\n"
          "f = open(os.path.join(sys.argv[1], '.lock'), 'a')\n"
          "fcntl.flock(f, fcntl.LOCK_EX)\n"
          "print('held', flush=True)\n"
          "time.sleep(600)\n")

#: a ``cud`` process that imports cud, then waits for the file argv[1] before it runs
AT_GO = ("import os, sys, time\n"
         "from cud.cli import main\n"
         "go = sys.argv[1]\n"
         "while not os.path.exists(go):\n"
         "    time.sleep(0.005)\n"
         "main(sys.argv[2:])\n")


# --- helpers -----------------------------------------------------------------------------------

def refused(result, *needles: str) -> str:
    """A refusal of a command that draws progress bars first: exit 2, no traceback, and one
    ``error: ...`` line, the last, holding every needle."""
    out = result.output.strip()
    assert "Traceback" not in out, out
    assert result.exit_code == 2, (result.exit_code, out[-3000:], result.exception)
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and out.splitlines()[-1].startswith("error: "), out[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, out)
    return errors[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


class Holder:
    """A real process holding the lock of ``folder`` until :meth:`kill`."""

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def kill(self) -> None:  # SIGKILL: the holder never gets to release anything itself
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()
        return False


def together(go: Path, *commands: list) -> list[tuple[int, str, str]]:
    """Start one ``cud`` process per command, let them all go at once, wait for each:
    (exit code, stdout, stderr) in order."""
    procs = [subprocess.Popen([sys.executable, "-c", AT_GO, str(go), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for args in commands]
    go.write_text("go")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append((p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def stages(model_dir, tmp_path_factory) -> Path:
    """Circuits, unlearning outcomes and anchors of builtin:16 (8 forget samples)."""
    root = tmp_path_factory.mktemp("stages")
    result = invoke("unlearn", "--model", model_dir, "--data", "builtin:16", "--method",
                    "ga,npo", "--max-steps", "2", "--batch-size", "4", "--no-utility", "--out",
                    root / "unlearning")
    assert result.exit_code == 0, result.output
    forget = forget_rows(root / "unlearning")
    write_jsonl(root / "forget.jsonl", forget)
    result = invoke("circuits", "--model", model_dir, "--data", root / "forget.jsonl", *QUICK,
                    "--out", root / "circuits")
    assert result.exit_code == 0, result.output
    ids = [r["id"] for r in forget]
    result = invoke("anchors", "--circuits", root / "circuits", "--easy-ids", ",".join(ids[:2]),
                    "--hard-ids", ",".join(ids[2:4]), "--out", root / "anchors")
    assert result.exit_code == 0, result.output
    return root


def forget_rows(unlearning: Path) -> list[dict]:
    """The forget samples of an unlearning folder of builtin:16, as rows of a data file."""
    from cud.data.prepare import load_samples
    before = pd.read_parquet(unlearning / "before.parquet")
    ids = set(before["id"] if "id" in before.columns else before.index)
    return [{"id": s.id, "question": s.question, "answer": s.answer}
            for s in load_samples("builtin:16") if s.id in ids]


# --- 1. two runs into one folder at once: every stage folder takes a lock ----------------------

def _commands(model: Path, stages: Path, out: Path) -> dict[str, list]:
    """Each stage's command writing into ``out``."""
    return {
        "unlearn": ["unlearn", "--model", model, "--data", "builtin:16", "--method", "ga",
                    "--max-steps", "1", "--batch-size", "4", "--no-utility", "--out", out],
        "baselines": ["baselines", "--model", model, "--data", stages / "forget.jsonl",
                      "--metrics", "loss", "--out", out],
        "pilot": ["pilot", "--model", model, "--data", "builtin:16", "--method", "ga",
                  "--max-steps", "2", "--batch-size", "4", "--fractions", "0.5", "--out", out],
        "validate": ["validate", "--circuits", stages / "circuits", "--outcomes",
                     stages / "unlearning", *STUDY, "--out", out],
        "anchors": ["anchors", "--circuits", stages / "circuits", "--outcomes",
                    stages / "unlearning", "--k", "1", "--out", out],
        "score": ["score", "--circuits", stages / "circuits", "--anchors", stages / "anchors",
                  "--out", out],
        "analyze": ["analyze", "--circuits", stages / "circuits", "--outcomes",
                    stages / "unlearning", "--out", out],
        "report": ["report", "--circuits", stages / "circuits", "--outcomes",
                   stages / "unlearning", "--out", out],
    }


@pytest.mark.parametrize("command", ["unlearn", "baselines", "pilot", "validate", "anchors",
                                     "score", "analyze", "report"])
def test_1_a_folder_another_process_writes_is_refused(command, model_dir, stages, tmp_path):
    """Failure 1: only the circuits stage locks its folder; a second ``cud unlearn`` (or any
    other stage's command) into a folder another run is writing goes on, and the two mix or
    overwrite each other's results.
    Expected after the fix: while another process holds the folder's lock, the command is
    refused at once in one line (exit 2) naming the folder and the other run, and writes
    nothing into it."""
    out = tmp_path / "out"
    with Holder(out):
        before = digest(out)
        result = invoke(*_commands(model_dir, stages, out)[command])
        one_line_error(result, str(out), "another cud run")
        assert digest(out) == before


def test_1_cud_run_into_a_folder_another_run_writes_is_refused(model_dir, tmp_path):
    """Failure 1: two identical ``cud run --out D`` at once both finish with exit 0, and the
    folder differs from a single run's (the trajectories of both runs appended in one file).
    Expected after the fix: the second is refused in one line (exit 2) naming the folder."""
    out = tmp_path / "run"
    with Holder(out):
        result = invoke("run", "--model", model_dir, "--data", "builtin:16", "--out", out)
        one_line_error(result, str(out), "another cud run")
        assert not (out / "run.json").exists() and not (out / "circuits").exists()


def test_1_a_killed_holder_leaves_no_stale_lock(model_dir, stages, tmp_path):
    """Failure 1's lock must not outlive its process: a run killed (SIGKILL) while it holds a
    folder leaves the ``.lock`` file behind, and the next run goes on."""
    out = tmp_path / "out"
    holder = Holder(out)
    one_line_error(invoke(*_commands(model_dir, stages, out)["score"]), "another cud run")
    holder.kill()
    result = invoke(*_commands(model_dir, stages, out)["score"])
    assert result.exit_code == 0, result.output
    assert (out / "scores.parquet").exists()


def test_1_two_unlearn_runs_started_together_do_not_mix(model_dir, tmp_path):
    """Failure 1: ``cud unlearn --max-steps 40`` and ``--max-steps 41`` started at once into
    the same ``--out`` both exit 0 and leave the outcomes of both mixed in the folder.
    Expected after the fix: one finishes (exit 0), the other is refused in one line (exit 2),
    and the folder holds the finisher's results only."""
    out = tmp_path / "u"

    def unlearn(steps: int) -> list:
        return ["unlearn", "--model", model_dir, "--data", "builtin:16", "--method", "ga",
                "--max-steps", steps, "--batch-size", "4", "--no-utility", "--eval-every", 1,
                "--out", out]

    results = together(tmp_path / "go", unlearn(6), unlearn(7))
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-1500:]) for code, _, err in results]
    refused = next(err for code, _, err in results if code == 2)
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), refused[-3000:]
    winner = 6 if results[0][0] == 0 else 7
    stored = json.loads((out / "ga" / "settings.json").read_text())
    assert stored["request"]["train"]["max_steps"] == winner
    trajectory = pd.read_csv(out / "ga" / "trajectory.csv")  # one run's steps, each once
    assert not trajectory.duplicated(subset=[c for c in ("step", "id")
                                             if c in trajectory.columns]).any()


# --- 2. a refused rerun of cud run changes nothing -----------------------------------------------

def _run_config(path: Path, model: Path, out: Path, data: str) -> Path:
    path.write_text(f'preset = "quick"\nmodel = "{model}"\nout = "{out}"\ndata = "{data}"\n'
                    f'[finetune]\nenabled = false\n[pilots]\nenabled = false\n'
                    f'[baselines]\nenabled = false\n[report]\nenabled = false\n'
                    f'[study]\nk = 1\npools = 1\nn_boot = 20\nn_perm = 20\n'
                    f'variants = false\nladder = false\n')
    return path


def test_2_refused_rerun_of_cud_run_changes_no_file(model_dir, tmp_path):
    """Failure 2: a rerun of ``cud run`` into a finished folder with other data
    (``builtin:20``, was ``builtin:16``) is refused at the unlearning stage, but only after it
    rewrote ``retain.csv``, ``forget.csv`` and ``run.json`` (the new configuration, the earlier
    sittings dropped) and added the new samples' circuits.
    Expected after the fix: refused in one line (exit 2) before any stage writes: every file
    of the folder is byte for byte what the first run left."""
    out = tmp_path / "run"
    first = invoke("run", "--config", _run_config(tmp_path / "a.toml", model_dir, out,
                                                   "builtin:16"))
    assert first.exit_code == 0, first.output
    before = digest(out)
    again = invoke("run", "--config", _run_config(tmp_path / "b.toml", model_dir, out,
                                                   "builtin:20"))
    refused(again, "unlearning", "use another --out")
    assert digest(out) == before


# --- 3. an --out that holds an input -------------------------------------------------------------

@pytest.mark.parametrize("command, option", [
    (lambda s: ["validate", "--circuits", s / "circuits", "--outcomes", s / "unlearning",
                *STUDY, "--out", s / "unlearning"], "--outcomes"),
    (lambda s: ["score", "--circuits", s / "circuits", "--anchors", s / "anchors",
                "--out", s / "circuits"], "--circuits"),
    (lambda s: ["report", "--circuits", s / "circuits", "--outcomes", s / "unlearning",
                "--out", s / "unlearning"], "--outcomes"),
    (lambda s: ["validate", "--circuits", s / "circuits", "--outcomes", s / "unlearning",
                *STUDY, "--anchors", s / "anchors", "--out", s], "--anchors"),
], ids=["validate-into-its-outcomes", "score-into-its-circuits", "report-into-its-outcomes",
        "validate-over-its-anchors"])
def test_3_out_holding_an_input_is_refused(command, option, stages, tmp_path):
    """Failure 3: ``cud validate --outcomes U --out U`` overwrites files it reads
    (``agreement_nll_delta.csv``); any command's ``--out`` may be (or hold) one of its inputs.
    Expected after the fix: an ``--out`` that is an input, or would write over one (validate
    writes ``anchors/`` inside its ``--out``), is refused in one line (exit 2) naming the
    input's option, and no file of the inputs changes."""
    import shutil
    copy = tmp_path / "stages"
    for name in ("circuits", "unlearning", "anchors"):
        shutil.copytree(stages / name, copy / name)
    before = digest(copy)
    one_line_error(invoke(*command(copy)), option, "holds the input")
    assert digest(copy) == before


def test_3_inputs_in_other_folders_under_out_are_fine(stages, tmp_path):
    """The README's ``cud validate --circuits cud-out/circuits --outcomes cud-out/unlearning
    ... --out cud-out`` writes beside its inputs, never into them: still accepted, and the
    inputs are left as they were."""
    import shutil
    for name in ("circuits", "unlearning"):
        shutil.copytree(stages / name, tmp_path / name)
    before = (digest(tmp_path / "circuits"), digest(tmp_path / "unlearning"))
    result = invoke("validate", "--circuits", tmp_path / "circuits", "--outcomes",
                    tmp_path / "unlearning", *STUDY, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (digest(tmp_path / "circuits"), digest(tmp_path / "unlearning")) == before
    assert (tmp_path / "study.json").exists() and (tmp_path / "anchors").is_dir()


# --- 4. a circuits folder holds the samples asked, and only those are scored ---------------------

def test_4_circuits_folder_holds_the_last_runs_samples(model_dir, tmp_path):
    """Failure 4: ``cud circuits`` on ``builtin:6``, then on ``builtin:3`` into the same
    ``--out``, then ``cud anchors`` and ``cud score`` on that folder: six samples are scored
    though the last run asked for three.
    Expected after the fix: the folder holds the last run's samples (``ids.json``; the run
    says so when circuits of other samples stay in it), and ``cud score`` scores those three."""
    from cud.circuits.store import load_circuits
    out = tmp_path / "c"
    for data in ("builtin:6", "builtin:3"):
        result = invoke("circuits", "--model", model_dir, "--data", data, *QUICK, "--out", out)
        assert result.exit_code == 0, result.output
    ids = load_circuits(out).ids
    assert len(ids) == 3
    assert "holds the circuits of these 3 samples" in " ".join(result.output.split())
    result = invoke("anchors", "--circuits", out, "--easy-ids", ids[0], "--hard-ids", ids[1],
                    "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    result = invoke("score", "--circuits", out, "--anchors", tmp_path / "a", "--out",
                    tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert sorted(pd.read_parquet(tmp_path / "s" / "scores.parquet")["id"]) == sorted(ids)
    # asked again, the six come back, the three first (none recomputed)
    result = invoke("circuits", "--model", model_dir, "--data", "builtin:6", *QUICK, "--out", out)
    assert result.exit_code == 0 and "6 already done" in " ".join(result.output.split())
    assert len(load_circuits(out).ids) == 6


# --- 5. validate compares the texts of circuits and outcomes -------------------------------------

def test_5_validate_refuses_circuits_of_other_texts(model_dir, stages, tmp_path):
    """Failure 5: ``cud validate`` accepts circuits of other texts under the same ids as the
    outcomes (answers changed), and judges CUD against the outcomes of other samples.
    Expected after the fix: refused in one line (exit 2) saying how many samples differ and
    one example id, as ``cud unlearn`` refuses another forget set; ``cud anchors --outcomes``
    the same; circuits of the same texts still validate."""
    rows = [json.loads(line) for line in (stages / "forget.jsonl").read_text().splitlines()]
    for row in rows[:2]:
        row["answer"] = row["answer"] + " Or so they say."
    write_jsonl(tmp_path / "changed.jsonl", rows)
    result = invoke("circuits", "--model", model_dir, "--data", tmp_path / "changed.jsonl",
                    *QUICK, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    common = ["--outcomes", stages / "unlearning", *STUDY]
    line = one_line_error(invoke("validate", "--circuits", tmp_path / "c", *common, "--out",
                                 tmp_path / "v"), "2 of the samples")
    assert rows[0]["id"] in line or rows[1]["id"] in line, line
    assert not (tmp_path / "v" / "study.json").exists()
    one_line_error(invoke("anchors", "--circuits", tmp_path / "c", "--outcomes",
                          stages / "unlearning", "--k", "1", "--out", tmp_path / "a"),
                   "2 of the samples")
    same = invoke("validate", "--circuits", stages / "circuits", *common, "--out", tmp_path / "w")
    assert same.exit_code == 0, same.output


# --- 15. two baselines runs at once: refused by the lock, unique temporary names ----------------

def test_15_two_baselines_runs_at_once_end_in_one_table(model_dir, stages, tmp_path):
    """Failure 15: two ``cud baselines`` into one folder at once ended with one refused only
    because both wrote the same temporary file name (``.baselines.parquet.tmp<pid>``-style
    names, a race), not because of a lock.
    Expected after the fix: no run fails on a file of the other. Whether the two overlap
    depends on the machine's timing: if they do, the later one is refused in one line (exit 2)
    by the folder's lock; if one ends before the other takes the lock, the other finds the
    finished folder and exits 0. Either way at least one finishes, and the folder holds one
    complete table. (A held lock refusing ``cud baselines`` every time is test 1's.)"""
    out = tmp_path / "b"
    command = ["baselines", "--model", model_dir, "--data", stages / "forget.jsonl",
               "--metrics", "loss,grad_norm", "--out", out]
    results = together(tmp_path / "go", command, command)
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), [(code, err[-1500:]) for code, _, err in results]
    for code, _, err in results:
        assert "Traceback" not in err, err
        if code == 2:
            err = err.strip()
            assert len(err.splitlines()) == 1 and "another cud run" in err, err
    n = len((stages / "forget.jsonl").read_text().splitlines())
    table = pd.read_parquet(out / "baselines.parquet")
    assert len(table) == n and table.notna().all().all(), table
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_15_a_temporary_name_in_use_does_not_break_a_write(tmp_path):
    """Failure 15: atomic writes use a temporary name made of the target's name and the
    process id, so two writers of one process (or a leftover of an earlier process with the
    same id) collide on it.
    Expected after the fix: unique temporary names (``tempfile`` in the target's folder): a
    name already taken does not matter, and no temporary file is left behind."""
    from cud.prices import record_price
    from cud.tables import save_table
    for name in ("t.parquet", "t.csv", "prices.json"):  # the names an old writer would take
        (tmp_path / f".{name}.tmp{os.getpid()}").mkdir()
    save_table(pd.DataFrame({"x": [1, 2]}, index=pd.Index(["a", "b"], name="id")),
               tmp_path / "t")
    record_price(tmp_path, "loss", 1.0, 2)
    assert pd.read_parquet(tmp_path / "t.parquet")["x"].tolist() == [1, 2]
    assert json.loads((tmp_path / "prices.json").read_text())["loss"]["samples"] == 2
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_file() and ".tmp" in p.name)
    assert left == [], left
