"""The command line's one error path: any LcpnError, from any command, is a usage-style sentence with exit code 2."""

import click
import pytest
from click.testing import CliRunner

from lcpn.cli import _Group, main
from lcpn.errors import LcpnError


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["prepare", "{tmp}/nope"], "the folder '{tmp}/nope' does not exist."),
        (
            ["train", "--data", "{tmp}"],
            "'{tmp}' is not a prepared split (no hierarchy.json); run `lcpn prepare` first.",
        ),  # noqa: E501
        (["predict", "{tmp}/x.png", "--models", "{tmp}"], "'{tmp}' is not an lcpn model folder (no hierarchy.json)."),
        (["evaluate", "--csv", "{tmp}/labels.csv", "--levels", "a"], "the CSV file '{tmp}/labels.csv' does not exist."),
        (["summary", "--models", "{tmp}/nope"], "the model folder '{tmp}/nope' does not exist."),
    ],
)
def test_every_command_prints_an_lcpn_error_as_a_sentence(tmp_path, command, says):
    (tmp_path / "x.png").write_bytes(b"")
    result = run(*(part.format(tmp=tmp_path) for part in command))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Usage: main {command[0]} ")
    assert result.stderr.endswith(f"\nError: {says.format(tmp=tmp_path)}\n")


def test_the_sentence_gets_one_full_stop_and_other_errors_keep_their_traceback():
    @click.group(cls=_Group)
    def group():
        pass

    @group.command()
    @click.argument("what")
    def fail(what):
        raise {"lcpn": LcpnError("a problem"), "stop": LcpnError("stopped."), "bug": KeyError("x")}[what]

    runner = CliRunner()
    assert runner.invoke(group, ["fail", "lcpn"]).stderr.endswith("Error: a problem.\n")
    assert runner.invoke(group, ["fail", "stop"]).stderr.endswith("Error: stopped.\n")
    bug = runner.invoke(group, ["fail", "bug"])
    assert bug.exit_code == 1 and isinstance(bug.exception, KeyError)
