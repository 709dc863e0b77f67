"""The kt-jax command line: help, one-line errors with exit code 2, and the info command."""

from __future__ import annotations

from kt_jax.cli import main


def test_help_and_version(capsys) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    assert main(["--version"]) == 0


def test_info_prints_layout(llama3_dir, capsys) -> None:
    assert main(["info", "--model", str(llama3_dir), "--mesh-data", "2", "--mesh-fsdp", "1", "--mesh-tensor", "4"]) == 0
    out = capsys.readouterr().out
    assert "kv 2" in out and "'rope_type': 'llama3'" in out
    assert "P('fsdp', 'tensor')" in out or "PartitionSpec('fsdp', 'tensor')" in out


def test_project_error_is_one_line(tmp_path, capsys) -> None:
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: not found" in err and "Traceback" not in err


def test_subcommand_help_lists_its_options(capsys) -> None:
    import pytest

    with pytest.raises(SystemExit) as done:
        main(["info", "--help"])
    assert done.value.code == 0
    assert "--model" in capsys.readouterr().out
