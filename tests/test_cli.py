"""Every script's --help: the docstring, then every setting with its default and its comment, grouped as in
the script's settings block, exit status 0 (configurator.help_text; prepare.py's argparse prints the same
docstring).

    python -m pytest -q tests/test_cli.py
"""
import os
import re
import subprocess
import sys

import pytest

from configurator import help_text, settings_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["train.py", "sample.py", "finetune.py", "export.py", "prepare.py", "ablate.py"])
def test_help_prints_the_docstring_and_exits_0(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith(f"usage: {script} [-h]")
    assert f"    python {script} " in proc.stdout  # the docstring's commands
    if script != "prepare.py":
        assert re.search(r"^  --out_dir=\S+ +\S", proc.stdout, re.M)  # a setting, its default, its comment


@pytest.mark.parametrize("script", ["train", "sample", "finetune", "export", "ablate"])
def test_help_lists_every_setting_with_its_default_and_a_comment(script):
    module = __import__(script)
    defaults = settings_of(vars(module))
    text = help_text(module.__file__, defaults)
    listed = re.findall(r"^  --(\w+)=(.*?)(?:  +(\S.*))?$", text, re.M)
    assert [key for key, _, _ in listed] == [k for k in defaults], "every setting once, in the file's order"
    for key, shown, comment in listed:
        value = defaults[key]
        assert shown == (value if isinstance(value, str) and value else repr(value)), key
        following = text.split(f"  --{key}={shown}", 1)[1].split("\n")
        assert comment or following[1].startswith(" " * 34), f"{script}.{key} has no comment"


def test_help_groups_follow_the_settings_block(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text('"""A tool.\n\n    python tool.py --a=2\n"""\n'
                      "# --- settings ---\n# inputs\na = 1  # how many\nb = 'x'  # a long comment\n"
                      "#           that goes on here\n# outputs\nc = [1, 2]\n# ---\nd = 5\n")
    text = help_text(str(script), {"a": 1, "b": "x", "c": [1, 2], "d": 5})
    assert "A tool.\n\n    python tool.py --a=2\n\ninputs:\n  --a=1" in text
    assert re.search(r"--b=x +a long comment that goes on here\n\noutputs:\n  --c=\[1, 2\]\n\nother:\n  --d=5", text)
