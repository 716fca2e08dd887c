"""`maskc fuzz` and `maskc.testing.fuzz`: passes on correct programs, finds a planted bug."""

from __future__ import annotations

from maskc.runtime.prepare import Prepared

import maskc
from maskc import cli, testing


def test_fuzz_passes_on_correct_programs():
    for spec in ["causal & window(6) | sink(2)", "natten2d"]:
        params = {"k": 3} if spec == "natten2d" else {}
        # Small grids only (no library example hints): the interpreter is slow.
        report = testing.fuzz(maskc.compile(spec, **params), examples=4, backends=("triton",), max_len=48, hints={})
        assert report.ok, str(report)
        assert report.backends == ("triton",)


def test_fuzz_finds_a_planted_bug_and_prints_a_reproducing_command(monkeypatch, capsys):
    real = Prepared.block_mask

    def forgets_the_diagonal(self, group, rows, cols):  # the CPU kernel's predicate is wrong
        qp, _, kp, _ = self.block_positions(rows, cols)
        return real(self, group, rows, cols) & (qp[:, :, None] != kp[:, None, :])

    monkeypatch.setattr(Prepared, "block_mask", forgets_the_diagonal)
    spec = "causal & window(4)"
    report = testing.fuzz(maskc.compile(spec), examples=20, backends=("cpu",), max_len=48)
    assert not report.ok
    assert report.failure.check.startswith("cpu")
    assert "--case" in report.command and "window(4)" in report.command
    # The printed command replays the failure...
    case = report.command.split("--case ")[1].split(" --backend")[0].strip("'")
    assert cli.main(["fuzz", spec, "--case", case, "--backend", "cpu"]) == 1
    assert "FAILED" in capsys.readouterr().out
    # ...and passes once the bug is gone.
    monkeypatch.setattr(Prepared, "block_mask", real)
    assert testing.replay(maskc.compile(spec), case, ("cpu",)).ok


def test_fuzz_cli_reports_success(capsys):
    assert cli.main(["fuzz", "block(8) | window(1)", "--examples", "4", "--backend", "triton"]) == 0
    assert "all checks passed" in capsys.readouterr().out
