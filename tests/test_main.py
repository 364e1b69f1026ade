"""`python -m minidpo`: the command list a newcomer meets first."""
from minidpo.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, what) in COMMANDS.items():
        assert f"  {name}" in out and what in out


def test_unknown_or_missing_command_is_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "commands:" in err
    assert main([]) == 2 and "commands:" in capsys.readouterr().err
