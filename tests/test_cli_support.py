"""The one error path of every `safevlm` sub-command: one line on stderr, exit code 2."""

from safevlm_hf.cli import main as cli_main
from safevlm_hf.cli_support import EXIT_BAD_INPUT, fail


def test_fail_prints_one_line_naming_the_command_and_returns_2(capsys):
    assert fail("train", "data.jsonl, line 3: bad row\n  (details from a library)\n") == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "safevlm train: error: data.jsonl, line 3: bad row (details from a library)\n"


def test_every_command_reports_bad_input_the_same_way(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    for argv in (
        ["convert", "--model", missing, "--out", str(tmp_path / "out")],
        ["train", "--stage", "1", "--model", missing, "--data", missing, "--out", str(tmp_path / "out")],
        ["eval", "--model", missing, "--bench", f"xstest:{missing}.csv", "--out", str(tmp_path / "out")],
        ["icet", "--model", missing, "--prompts", missing, "--out", str(tmp_path / "out")],
        ["push", "--model", missing, "--repo-id", "acme/x"],
        ["judge-check", "--refusal-set", missing],
    ):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"safevlm {argv[0]}: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
