"""Failures an audit found, one test (or a few) per failure; each test fails on the code the
audit looked at and passes once the failure is fixed as its docstring says.

Most tests go through the ``cud`` command line: ``CliRunner`` for errors the commands catch
themselves, ``cud.cli.main`` in-process (with capsys) where what matters is the console script's
own handling of an error that escapes a command, and a real subprocess where the process
matters (signals, concurrency, the environment, what the model loader prints). Internals are
imported inside the tests that need them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from cud.cli import main
from cud.data import fictitious_authors
from cud.models import tiny_model
from conftest import invoke, one_line_error, save_model

QUICK = ["--steps", "2", "--n-edges", "10"]
#: a real ``cud`` process (the console script is ``cud.cli:main``)
CUD = [sys.executable, "-c", "from cud.cli import main; main()"]


# --- helpers -----------------------------------------------------------------------------------

def run_main(capsys, *args):
    """``cud ARGS`` through the console script's entry point, in this process.

    Returns (exit code, stdout, stderr); an exception escaping ``main`` (what a user sees as a
    traceback and exit 1) comes back as a string naming it instead of an exit code."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    except BaseException as e:  # noqa: BLE001 - escaped main(): a traceback for the user
        code = f"{type(e).__name__} escaped cud.cli.main ({e})"
    out, err = capsys.readouterr()
    return code, out, err


def assert_reported_cleanly(code, out: str, err: str) -> None:
    """An error the code did not foresee: non-zero exit, no traceback, one ``error:`` line and
    at most one more line after it (where to look for details)."""
    text = out + err
    assert "Traceback" not in text, text[-4000:]
    assert isinstance(code, int) and code != 0, (code, text[-4000:])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    starts = [k for k, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, err[-4000:]
    assert len(lines) - starts[0] <= 2, err[-4000:]


def load_circuits(folder):
    from cud.circuits.store import load_circuits as load
    return load(folder)


def temporary_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def ids_of(table: pd.DataFrame) -> list[str]:
    """Sample ids of an outcomes table (a column, or the index)."""
    return list(table["id"] if "id" in table.columns else table.index)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def facts(n_authors: int = 4, per_author: int = 2, **fields) -> list[dict]:
    """Rows of a TOFU-style file: ids ``a<k>.f<j>`` (author before the '.'), with a perturbed and
    a paraphrased answer each; ``fields`` override fields of the first row."""
    rows = []
    for a in range(n_authors):
        for j in range(per_author):
            rows.append({"id": f"a{a}.f{j}", "question": f"What is fact {j} of author {a}?",
                         "answer": f"It is {10 * a + j}.",
                         "perturbed_answer": [f"It is {10 * a + j + 1}.",
                                              f"It is {10 * a + j + 2}."],
                         "paraphrased_answer": f"That would be {10 * a + j}."})
    rows[0].update(fields)
    return rows


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as ``model_dir``, other weights."""
    return save_model(tiny_model("llama", seed=1), tmp_path_factory.mktemp("other-model"))


# --- 1. errors nobody caught: two tracebacks and exit 1 ------------------------------------------

@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory) -> Path:
    """A model whose embedding matrix has 100 rows, with the tiny 261-token tokenizer."""
    from transformers import AutoModelForCausalLM

    from cud.models.tiny import tiny_config, tiny_tokenizer

    folder = tmp_path_factory.mktemp("small-vocab")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=100),
                                             attn_implementation="eager")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_1_unknown_error_tokenizer_larger_than_embeddings(small_vocab_dir, tmp_path, capsys):
    """Failure 1: token ids past the embedding matrix raise IndexError inside the command; the
    entry point's ``except click.Abort`` (typer 0.29's ``typer._click.exceptions`` has no
    ``Abort``) turns it into an AttributeError: two tracebacks and exit 1.
    Expected after the fix: one ``error:`` line (plus at most a line on where to look), no
    traceback, non-zero exit."""
    code, out, err = run_main(capsys, "circuits", "--model", small_vocab_dir, "--data",
                              "builtin:2", "--out", tmp_path / "out", *QUICK)
    assert_reported_cleanly(code, out, err)


@pytest.mark.parametrize("field", ["perturbed_answer", "paraphrased_answer"])
def test_1_unknown_error_number_instead_of_answer_text(field, model_dir, tmp_path, capsys):
    """Failure 1: ``perturbed_answer: 5`` / ``paraphrased_answer: 5`` (a number, not text or a
    list of texts) in unlearning data raises TypeError inside ``cud unlearn``: two tracebacks and
    exit 1. Expected after the fix: no traceback, non-zero exit, one ``error:`` line (ideally the
    data error naming file, line and field)."""
    data = write_jsonl(tmp_path / "u.jsonl", facts(**{field: 5}))
    code, out, err = run_main(capsys, "unlearn", "--model", model_dir, "--data", data,
                              "--method", "ga", "--max-steps", "1", "--batch-size", "4",
                              "--out", tmp_path / "u")
    assert_reported_cleanly(code, out, err)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into: chmod 555, or (as root, where chmod does not
    stop writes) the immutable attribute; skipped where neither works."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK) or os.geteuid() == 0:
        if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)],
                                                     capture_output=True).returncode == 0:
            immutable = True
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _unlearn(model_dir, out):
    return ["unlearn", "--model", model_dir, "--data", "builtin:8", "--method", "ga",
            "--max-steps", "1", "--batch-size", "4", "--out", out]


def _baselines(model_dir, out):
    return ["baselines", "--model", model_dir, "--data", "builtin:4", "--metrics", "loss",
            "--out", out]


@pytest.mark.parametrize("command", [_unlearn, _baselines], ids=["unlearn", "baselines"])
def test_1_read_only_out_folder(command, model_dir, read_only_dir, capsys):
    """Failure 1: ``--out`` on a read-only folder makes ``cud unlearn`` / ``cud baselines`` end
    in a PermissionError plus the entry point's AttributeError: two tracebacks, exit 1.
    Expected after the fix: one ``error:`` line, no traceback, non-zero exit."""
    code, out, err = run_main(capsys, *command(model_dir, read_only_dir))
    assert_reported_cleanly(code, out, err)


@pytest.mark.parametrize("command", [_unlearn, _baselines], ids=["unlearn", "baselines"])
def test_1_out_folder_under_a_file(command, model_dir, tmp_path, capsys):
    """Failure 1 (the same, deterministic as root too): ``--out`` below a regular file cannot
    be created (NotADirectoryError), which escapes as two tracebacks and exit 1.
    Expected after the fix: one ``error:`` line, no traceback, non-zero exit."""
    (tmp_path / "a-file").write_text("x")
    code, out, err = run_main(capsys, *command(model_dir, tmp_path / "a-file" / "out"))
    assert_reported_cleanly(code, out, err)


def test_1_full_disk_in_circuits_reported_without_temporary_files(model_dir, tmp_path,
                                                                  monkeypatch, capsys):
    """Failure 1: the disk filling up during ``cud circuits`` (simulated: every fsync of, and
    rename into, a file of the output folder fails with ENOSPC) ends in two tracebacks, exit 1,
    and leaves ``.<name>.tmp<pid>`` files in the folder.
    Expected after the fix: one ``error:`` line, no traceback, non-zero exit, and no temporary
    file left in the output folder."""
    out = tmp_path / "out"
    real_fsync, real_replace = os.fsync, os.replace

    def inside(path) -> bool:
        try:
            return Path(path).resolve().is_relative_to(out.resolve())
        except (OSError, ValueError):
            return True

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = out
        if inside(path):
            full(path)
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        if inside(dst):
            full(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    code, stdout, err = run_main(capsys, "circuits", "--model", model_dir, "--data",
                                 "builtin:2", "--out", out, *QUICK)
    monkeypatch.undo()
    assert_reported_cleanly(code, stdout, err)
    if out.exists():
        assert temporary_files(out) == []


def test_1_ctrl_c_prints_interrupted_and_exits_130(model_dir, tmp_path):
    """Failure 1: Ctrl-C (SIGINT) in a running ``cud circuits`` exits 130 without a word (typer
    turns KeyboardInterrupt into a silent Exit(130); ``cud``'s own "interrupted" is never
    printed).
    Expected after the fix: "interrupted" on standard error, exit 130, no traceback, no
    temporary file left in the output folder."""
    out = tmp_path / "out"
    # a suite started in the background by a non-interactive shell inherits SIGINT ignored, and
    # so would the child (Python then installs no KeyboardInterrupt): give it the default, as a
    # terminal's Ctrl-C finds it
    proc = subprocess.Popen(CUD + ["circuits", "--model", str(model_dir), "--data", "builtin:40",
                                   "--out", str(out), "--batch-size", "1", *QUICK],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(out.glob("shards/rows-*.parquet")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no batch committed in 300 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err[-4000:]
    assert proc.returncode == 130, (proc.returncode, err[-4000:])
    assert "interrupted" in err, err[-4000:]
    assert temporary_files(out) == []


# --- 2. two runs into one folder at the same time ----------------------------------------------

#: fsync made slow (1 s) so the window between checking and writing the manifest is wide enough
#: for two processes started together to both fall into it, as on a slow or networked disk
SLOW_FSYNC = ("import os, time\n_fsync = os.fsync\n"
              "def _slow(fd):\n    time.sleep(1.0)\n    _fsync(fd)\n"
              "os.fsync = _slow\nfrom cud.cli import main\nmain()")


def test_2_concurrent_runs_with_other_settings_into_one_folder(model_dir, tmp_path):
    """Failure 2: two ``cud circuits`` runs with different ``--n-edges`` started together into
    the same ``--out`` both pass the manifest check before either writes it (no lock in
    ``CircuitStore.open``): both exit 0 and the folder mixes them (the manifest of one, the
    circuits of the other).
    Expected after the fix: one run refuses with a one-line error (exit 2), and every stored
    circuit has the manifest's number of edges."""
    out = tmp_path / "out"

    def start(n_edges: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", SLOW_FSYNC, "circuits", "--model", str(model_dir), "--data",
             "builtin:4", "--out", str(out), "--steps", "2", "--n-edges", str(n_edges),
             "--no-faithfulness"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = {n: start(n) for n in (10, 12)}
    results = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        results[n] = (p.returncode, stdout, stderr)
    codes = sorted(code for code, _, _ in results.values())
    assert codes == [0, 2], [(n, code, err[-1500:]) for n, (code, _, err) in results.items()]
    (winner,) = [n for n, (code, _, _) in results.items() if code == 0]
    refused = next(err for code, _, err in results.values() if code == 2)
    lines = refused.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), refused[-3000:]
    cs = load_circuits(out)  # only the run that went on wrote into the folder
    assert (cs.circuits.sum(1) == winner).all(), (winner, cs.circuits.sum(1))
    recorded = values_of(json.loads((out / "manifest.json").read_text()), "n_edges")
    assert winner in recorded and ({10, 12} - {winner}).isdisjoint(recorded), recorded


def values_of(tree, key: str) -> list:
    """Every value of ``key`` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + \
            [x for v in tree.values() for x in values_of(v, key)]
    if isinstance(tree, list):
        return [x for v in tree for x in values_of(v, key)]
    return []


# --- 3. results lost through ids ---------------------------------------------------------------

def _circuits(model_dir, data, out, *extra):
    return invoke("circuits", "--model", model_dir, "--data", data, "--out", out, *QUICK,
                  "--no-faithfulness", *extra)


@pytest.mark.parametrize("ids", [["a/b", "a_b", "a b"], ["x" * 120 + "1", "x" * 120 + "2"]],
                         ids=["unsafe-characters", "same-first-120-characters"])
def test_3_export_json_file_names_are_injective(ids, model_dir, tmp_path):
    """Failure 3: ``--export-json`` names files ``_safe_name(id)`` (unsafe characters made '_',
    cut at 120 characters), so ids ``a/b``, ``a_b`` and ``a b`` (or two ids that share their
    first 120 characters) are written to one file and all but one circuit is lost, exit 0.
    Expected after the fix: one file per id, or such ids refused with a one-line error."""
    rows = [{"id": i, "question": f"What is item {k}?", "answer": f"It is {k}."}
            for k, i in enumerate(ids)]
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    result = _circuits(model_dir, data, tmp_path / "out", "--export-json")
    if result.exit_code == 0:
        files = list((tmp_path / "out" / "json").glob("*.json"))
        assert len(files) == len(ids), sorted(f.name for f in files)
    else:
        one_line_error(result)


def test_3_shard_keys_are_unambiguous(model_dir, tmp_path):
    """Failure 3: a shard's key hashes its ids joined by "\\x1f", so the batch [a, b] and the
    batch ["a\\x1fb"] share a key; the second overwrites the first and the run exits 0 keeping
    1 of its 3 samples.
    Expected after the fix: every sample kept (3 circuits, 3 rows in samples.parquet)."""
    rows = [{"id": "a", "question": "Who?", "answer": "Me."},
            {"id": "b", "question": "Why?", "answer": "So."},
            {"id": "a\x1fb", "question": "What is the longest question of them all, really?",
             "answer": "This."}]  # sorted by length: batches [a, b] and [a\x1fb]
    data = write_jsonl(tmp_path / "ids.jsonl", rows)
    result = _circuits(model_dir, data, tmp_path / "out", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert sorted(load_circuits(tmp_path / "out").ids) == sorted(r["id"] for r in rows)
    assert len(pd.read_parquet(tmp_path / "out" / "samples.parquet")) == 3


# --- 4. unlearning reruns mix runs -------------------------------------------------------------

def test_4_unlearn_rerun_with_another_forget_set_is_refused(model_dir, tmp_path):
    """Failure 4: ``cud unlearn`` rerun into the same folder with other settings (another forget
    set, one method instead of two) exits 0 and leaves a mixed folder: ``before`` and ``ga``
    from the new forget set, ``npo`` from the old one, a stale agreement table.
    Expected after the fix: the rerun is refused with a one-line error (exit 2), like
    ``cud circuits`` refuses other settings, and the folder keeps the first run's tables."""
    out = tmp_path / "u"
    common = ["--model", model_dir, "--max-steps", "1", "--batch-size", "4", "--out", out]
    first = invoke("unlearn", "--data", "builtin:16", "--method", "ga,npo", *common)
    assert first.exit_code == 0, first.output
    before = pd.read_parquet(out / "before.parquet")
    second = invoke("unlearn", "--data", "builtin:12", "--method", "ga", *common)
    one_line_error(second)
    assert pd.read_parquet(out / "before.parquet").equals(before)
    for method in ("ga", "npo"):
        outcomes = pd.read_parquet(out / method / "outcomes.parquet")
        assert sorted(ids_of(outcomes)) == sorted(ids_of(before)), method


def test_4_unlearning_folder_of_another_model_is_refused(tmp_path):
    """Failure 4: the unlearning stage of ``cud run`` (``unlearn_to_folder``) reuses
    ``before.parquet`` whenever the forget ids match, and a method's outcomes whenever the
    model *name* matches, even after the model's weights changed: a second model's run returns
    the first model's outcomes.
    Expected after the fix: a settings hash with the model fingerprint; a folder of another
    model is refused with a CudError, and its tables are left as they were."""
    from cud.errors import CudError
    from cud.unlearning.folder import UnlearningSettings, unlearn_to_folder

    samples = fictitious_authors(8, seed=0)
    forget, retain = samples[:4], samples[4:]
    settings = UnlearningSettings(methods=("ga",), max_steps=1, batch_size=2, utility=False)
    out = tmp_path / "u"
    unlearn_to_folder(tiny_model("llama", seed=0), forget, retain, out, settings)
    before = pd.read_parquet(out / "before.parquet")
    with pytest.raises(CudError):
        unlearn_to_folder(tiny_model("llama", seed=1), forget, retain, out, settings)
    assert pd.read_parquet(out / "before.parquet").equals(before)


# --- 5. config.json that does not describe the weights ------------------------------------------

def _edit_config(model_dir: Path, target: Path, **changes) -> Path:
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize("layers", [3, 1])
def test_5_config_with_other_number_of_layers_is_refused(layers, model_dir, tmp_path):
    """Failure 5: a folder whose config.json says 3 (or 1) layers while its weights hold 2 loads
    with exit 0: the missing layer is randomly initialised (or the extra one dropped), after
    a loader report of many lines.
    Expected after the fix: refused, exit 2, standard error one line naming the layers."""
    model = _edit_config(model_dir, tmp_path / "model", num_hidden_layers=layers)
    proc = subprocess.run(CUD + ["circuits", "--model", str(model), "--data", "builtin:2",
                                 "--out", str(tmp_path / "out"), *QUICK],
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    assert "layer" in lines[0].lower(), lines[0]


def test_5_config_with_other_shapes_is_named_a_mismatch(model_dir, tmp_path):
    """Failure 5: a config.json whose intermediate_size disagrees with the weights' shapes is
    reported after ten lines of loader output as "cannot load the weights ... the file may be
    truncated or damaged".
    Expected after the fix: standard error one line, exit 2, naming a shape/size mismatch and
    not calling the file truncated or damaged."""
    model = _edit_config(model_dir, tmp_path / "model", intermediate_size=48)
    proc = subprocess.run(CUD + ["circuits", "--model", str(model), "--data", "builtin:2",
                                 "--out", str(tmp_path / "out"), *QUICK],
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-3000:]
    assert "truncated or damaged" not in lines[0], lines[0]
    assert re.search(r"shape|size|mismatch", lines[0], re.I), lines[0]


# --- 6. anchors of other circuits --------------------------------------------------------------

@pytest.fixture(scope="module")
def anchor_folders(model_dir, other_model_dir, tmp_path_factory):
    """Circuits of builtin:6 made four ways, and anchors from the first."""
    root = tmp_path_factory.mktemp("anchors")
    ways = {"base": (model_dir, []), "other_model": (other_model_dir, []),
            "other_seed": (model_dir, ["--seed", "1"]),
            "other_selection": (model_dir, ["--selection", "topn"])}
    for name, (model, extra) in ways.items():
        result = _circuits(model, "builtin:6", root / name, *extra)
        assert result.exit_code == 0, result.output
    ids = load_circuits(root / "base").ids
    result = invoke("anchors", "--circuits", root / "base", "--easy-ids", ",".join(ids[:2]),
                    "--hard-ids", ",".join(ids[2:4]), "--out", root / "anchors")
    assert result.exit_code == 0, result.output
    same = invoke("score", "--circuits", root / "base", "--anchors", root / "anchors",
                  "--out", root / "scores")
    assert same.exit_code == 0, same.output  # the anchors' own circuits are scored
    return root


@pytest.mark.parametrize("other, needle", [("other_model", "model"), ("other_seed", "seed"),
                                           ("other_selection", "selection")])
def test_6_score_refuses_anchors_of_other_circuits(other, needle, anchor_folders, tmp_path):
    """Failure 6: ``cud score`` with anchors made from circuits of another model (same graph),
    another corruption seed or another selection exits 0: ``check_compatible`` compares only
    the graph and method, steps, metric, baseline.
    Expected after the fix: refused, exit 2, one line naming what differs (the model
    fingerprint, the seed, the selection)."""
    result = invoke("score", "--circuits", anchor_folders / other, "--anchors",
                    anchor_folders / "anchors", "--out", tmp_path / "s")
    one_line_error(result, needle)


# --- 7. slow tokenizers: an empty question mask ------------------------------------------------

@pytest.fixture(scope="module")
def slow_tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny llama with ByT5's tokenizer: a slow (pure Python, ``is_fast`` False) byte-level
    tokenizer that needs no vocabulary file."""
    from transformers import AutoModelForCausalLM, ByT5Tokenizer

    from cud.models.tiny import tiny_config

    tok = ByT5Tokenizer(extra_ids=0)
    assert not tok.is_fast
    folder = tmp_path_factory.mktemp("slow-tokenizer")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok)),
                                             attn_implementation="eager")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_7_slow_tokenizer_question_mask(slow_tokenizer_dir):
    """Failure 7: without offsets (a slow tokenizer) ``encode_sample`` sets the question mask
    all False, so the ``corrupt`` baseline replaces nothing.
    Expected after the fix: the question's tokens are marked (ByT5: one token per byte of the
    question), or the tokenizer is refused with a CudError."""
    from cud.data import encode_samples
    from cud.errors import CudError
    from cud.models import load_model

    lm = load_model(str(slow_tokenizer_dir), device="cpu")
    assert not lm.tokenizer.is_fast
    samples = fictitious_authors(3, seed=0)
    try:
        encoded = encode_samples(lm.tokenizer, samples)
    except CudError:
        return  # a clear refusal is a fix too
    for sample, enc in zip(samples, encoded):
        assert sum(enc.question_mask) == len(sample.question.encode()), sample.id
        assert not any(q and a for q, a in zip(enc.question_mask, enc.answer_mask))


def test_7_slow_tokenizer_circuits_are_not_all_zero(slow_tokenizer_dir, tmp_path):
    """Failure 7: ``cud circuits`` with a slow tokenizer exits 0 although the corrupt baseline
    equals the clean input: every edge score is 0 and the greedy circuits are arbitrary.
    Expected after the fix: either scores that are not all zero for every sample, or a
    one-line refusal (exit 2)."""
    result = _circuits(slow_tokenizer_dir, "builtin:3", tmp_path / "out")
    if result.exit_code == 0:
        cs = load_circuits(tmp_path / "out")
        assert (cs.edge_scores.abs().sum(1) > 0).all(), cs.edge_scores.abs().sum(1)
    else:
        one_line_error(result)


# --- 8. the hub client asked the network ---------------------------------------------------------

SITECUSTOMIZE = '''
import os, socket, sys
_log = os.environ["CUD_TEST_NET_LOG"]
_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")

def _record(kind, what):
    with open(_log, "a") as f:
        f.write(json_line(kind, what))

def json_line(kind, what):
    import json
    return json.dumps({"kind": kind, "what": what}) + "\\n"

def _getaddrinfo(host, *args, **kwargs):
    _record("getaddrinfo", str(host))
    raise socket.gaierror(socket.EAI_NONAME, "name lookups are blocked by the test")

socket.getaddrinfo = _getaddrinfo

class _WatchHub:
    def find_spec(self, name, path=None, target=None):
        if name == "huggingface_hub":
            _record("import huggingface_hub", {k: os.environ.get(k) for k in _SWITCHES})
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, _WatchHub())
'''


def test_8_cli_sets_the_hub_offline_before_importing_it(tmp_path):
    """Failure 8: with HF_HUB_OFFLINE unset, ``cud circuits --model someone/not-cached`` makes the
    hub client resolve huggingface.co (a DNS query) despite ``local_files_only``.
    Expected after the fix: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and HF_DATASETS_OFFLINE are set
    before huggingface_hub is imported, and no name lookup happens. (A sitecustomize on
    PYTHONPATH records the switches at that import and every socket.getaddrinfo call.)"""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(CUD_TEST_NET_LOG=str(log), HF_HOME=str(tmp_path / "hf-home"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                        env.get("PYTHONPATH")])))
    proc = subprocess.run(CUD + ["circuits", "--model", "someone/not-cached", "--data",
                                 "builtin:2", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=600)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for e in events:
        if e["kind"] == "import huggingface_hub":
            assert all(v not in (None, "", "0") for v in e["what"].values()), events
    assert [e for e in events if e["kind"] == "getaddrinfo"] == [], events
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])  # "not found locally"


# --- 9. smaller ones ---------------------------------------------------------------------------

def test_9_threshold_nan_is_refused(model_dir, tmp_path):
    """Failure 9: ``--selection threshold --threshold nan`` exits 0 with every circuit empty.
    Expected after the fix: refused, exit 2, one line naming --threshold."""
    result = invoke("circuits", "--model", model_dir, "--data", "builtin:2", "--out",
                    tmp_path / "out", "--steps", "2", "--selection", "threshold",
                    "--threshold", "nan")
    one_line_error(result, "--threshold")


def test_9_empty_out_is_refused(model_dir, tmp_path, monkeypatch):
    """Failure 9: ``--out ""`` writes the circuits folder into the current folder.
    Expected after the fix: refused, exit 2, one line naming --out; nothing written."""
    monkeypatch.chdir(tmp_path)
    result = invoke("circuits", "--model", model_dir, "--data", "builtin:2", "--out", "",
                    *QUICK)
    one_line_error(result, "--out")
    assert not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "shards").exists()


def test_9_csv_with_a_duplicated_column_is_refused(model_dir, tmp_path):
    """Failure 9: a CSV whose header has ``answer`` twice keeps the last column silently.
    Expected after the fix: refused, exit 2, one line naming the file and the column."""
    data = tmp_path / "dup.csv"
    data.write_text("question,answer,answer\nWhat is x?,first,second\n")
    result = _circuits(model_dir, data, tmp_path / "out")
    one_line_error(result, "dup.csv", "answer")


def test_9_perturbed_answers_that_are_numbers_are_refused(model_dir, tmp_path):
    """Failure 9: ``perturbed_answer: [1, 2, 3]`` (numbers, not texts) in unlearning data gives
    every such sample a NaN truth ratio and ``cud unlearn`` exits 0.
    Expected after the fix: refused, exit 2, one line naming the file, line and field."""
    rows = [dict(r, perturbed_answer=[1, 2, 3]) for r in facts()]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    result = invoke("unlearn", "--model", model_dir, "--data", data, "--method", "ga",
                    "--max-steps", "1", "--batch-size", "4", "--out", tmp_path / "u")
    one_line_error(result, "p.jsonl:1", "perturbed_answer")


def test_9_duplicate_anchor_ids_are_refused(model_dir, tmp_path):
    """Failure 9: ``cud anchors --easy-ids a,a`` stores the anchor twice (and so weights it
    twice in the average).
    Expected after the fix: refused, exit 2, one line naming the duplicated id."""
    assert _circuits(model_dir, "builtin:4", tmp_path / "c").exit_code == 0
    ids = load_circuits(tmp_path / "c").ids
    result = invoke("anchors", "--circuits", tmp_path / "c", "--easy-ids", f"{ids[0]},{ids[0]}",
                    "--hard-ids", ids[1], "--out", tmp_path / "a")
    one_line_error(result, ids[0])
    assert not (tmp_path / "a" / "anchors.json").exists()


def test_9_resume_with_another_batch_size_is_refused(model_dir, tmp_path):
    """Failure 9: resuming ``cud circuits`` with another ``--batch-size`` is accepted silently,
    although the README says the batch size is part of the result (it changes float rounding).
    Expected after the fix: refused, exit 2, one line naming the batch size; the stored
    results stay."""
    out = tmp_path / "out"
    assert _circuits(model_dir, "builtin:4", out, "--batch-size", "2").exit_code == 0
    before = load_circuits(out)
    result = _circuits(model_dir, "builtin:6", out, "--batch-size", "4")
    line = one_line_error(result)
    assert "batch size" in line.lower().replace("-", " ").replace("_", " "), line
    after = load_circuits(out)
    assert after.ids == before.ids and torch.equal(after.edge_scores, before.edge_scores)
