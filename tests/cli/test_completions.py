"""Shell completions in completions/ are generated from the CLI and must not go stale."""

import subprocess
from pathlib import Path

import pytest

from teal_cli.cli.completions import SHELLS, command_tree, generate

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("shell", SHELLS)
def test_checked_in_completions_are_current(shell):
    checked_in = (REPO / "completions" / f"teal.{shell}").read_text()
    assert checked_in == generate(shell), f"completions/teal.{shell} is stale: run `teal completions {shell} > completions/teal.{shell}`"


def test_completions_cover_every_command_and_option():
    tree = command_tree()
    assert {"tokenize", "detokenize", "cluster"} <= set(tree)
    script = generate("bash")
    for name, opts in tree.items():
        assert name in script
        for names, _, _ in opts:
            for opt in names:
                assert opt in script


def test_bash_script_completes_subcommands_and_options():
    script = generate("bash")
    probe = script + '\nCOMP_WORDS=(teal tok); COMP_CWORD=1; _teal; echo "${COMPREPLY[@]}"\n' \
        + 'COMP_WORDS=(teal cluster --pat); COMP_CWORD=2; _teal; echo "${COMPREPLY[@]}"\n' \
        + 'COMP_WORDS=(teal tokenize --device c); COMP_CWORD=3; _teal; echo "${COMPREPLY[@]}"\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["tokenize", "--patch-size", "cpu cuda"]
