"""The console script's entry point: usage errors are one line naming the command, exit 2."""

from __future__ import annotations

import pytest

from cud.cli import main


@pytest.mark.parametrize("argv, message", [
    (["circuits", "--batch-size", "abc"], "cud circuits: Invalid value for '--batch-size'"),
    (["circuits", "--nope"], "cud circuits: No such option: --nope"),
    (["nosuch"], "No such command 'nosuch'"),
    (["circuits", "--model", "/nonexistent/model", "--data", "builtin:2"],
     "/nonexistent/model: no such model folder or file"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in " ".join(err.split())
    assert "Traceback" not in err and "╭" not in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "circuits" in capsys.readouterr().out
