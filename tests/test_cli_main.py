"""The CLI shell: exit statuses users and scripts rely on."""

import subprocess
import sys

from cli.main import main


def test_version_and_help_exit_zero(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["--help"]) == 0


def test_usage_error_is_nonzero():
    assert main(["no-such-command"]) == 2


def test_input_error_prints_one_paragraph_and_exits_2(tmp_path, capsys):
    missing = tmp_path / "absent.star"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "absent.star" in err and "Traceback" not in err


def test_console_script_propagates_the_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cli.main", "inspect", str(tmp_path / "x.unknown")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert ".unknown" in proc.stderr
