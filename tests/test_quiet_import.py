"""Importing the package, or running its command, prints nothing that a user cannot act on."""

import logging
import subprocess
import sys

from peft_balanced._compat import HUB_KERNEL_LOGGERS


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_a_plain_import_prints_nothing():
    result = run_python("import os; os.environ.pop('HF_HUB_OFFLINE', None); import peft_balanced")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_command_help_prints_only_the_help():
    result = run_python("import sys; sys.argv = ['peft-balanced', '--help']; import peft_balanced.cli as c; c.main()")
    assert "usage" in result.stdout
    assert result.stderr == ""


def test_a_plain_import_prints_nothing_with_the_hub_offline_too():
    code = "import os; os.environ['HF_HUB_OFFLINE'] = '1'; import peft_balanced"
    result = run_python(code)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_quiet_import_leaves_no_filter_on_the_loggers():
    import peft_balanced  # noqa: F401

    assert all(logging.getLogger(name).filters == [] for name in HUB_KERNEL_LOGGERS)
