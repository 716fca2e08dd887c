"""`maskc fuzz` and `maskc.testing.fuzz`: passes on correct programs, finds a planted bug."""

from __future__ import annotations

import time

from maskc.runtime import prepare
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
    # ...and passes once the bug is gone (prepared schedules are cached across programs: drop the buggy ones).
    monkeypatch.setattr(Prepared, "block_mask", real)
    prepare.clear_cache()
    assert testing.replay(maskc.compile(spec), case, ("cpu",)).ok


def test_fuzz_cli_reports_success(capsys):
    assert cli.main(["fuzz", "block(8) | window(1)", "--examples", "4", "--backend", "triton"]) == 0
    assert "all checks passed" in capsys.readouterr().out


def _recording(monkeypatch) -> list[testing.Case]:
    """Replace the checks by a recorder: what the strategy draws, without running kernels."""
    cases: list[testing.Case] = []
    monkeypatch.setattr(testing, "check_case", lambda program, case, backends: cases.append(case))
    return cases


def test_fuzz_draws_lengths_across_the_window(monkeypatch, capsys):
    cases = _recording(monkeypatch)
    assert cli.main(["fuzz", "mistral", "--set", "w=64"]) == 0
    keys = [c.lk for c in cases]
    # the window's edge: 64 keys, the query included; beyond, the first keys drop out
    assert {63, 64, 65} <= set(keys)
    assert sum(lk > 65 for lk in keys) >= 3 and max(keys) >= 2 * 64 + 1
    # every case stays small enough for the Triton interpreter (the default backends)
    budget = testing.Budget(interpreted=True)
    assert all(budget.fits(c.lq, c.lk, c.heads, c.batch) for c in cases)
    assert "drawn around 64" in capsys.readouterr().out


def test_fuzz_grid_sizes_small_unless_set(monkeypatch):
    cases = _recording(monkeypatch)
    report = testing.fuzz(maskc.compile("natten2d"), examples=30)
    assert report.ok and len(cases) == 30
    # around the 7 x 7 window, not the library example's 56 x 56 (minutes a case under the interpreter)
    sizes = [dict(c.sizes) for c in cases]
    assert {7, 8} <= {s["h"] for s in sizes} and max(s["h"] * s["w"] for s in sizes) < 56 * 56
    assert all(testing.Budget(interpreted=True).fits(c.lq, c.lk, c.heads, c.batch) for c in cases)
    cases.clear()
    assert cli.main(["fuzz", "natten2d", "--set", "k=3", "--set", "h=5", "--set", "w=6", "--examples", "5"]) == 0
    assert cases and all(dict(c.sizes) == {"h": 5, "w": 6} and c.lk == 30 for c in cases)


def test_fuzz_time_budget_stops_early(monkeypatch, capsys):
    monkeypatch.setattr(testing, "check_case", lambda program, case, backends: time.sleep(0.3))
    assert cli.main(["fuzz", "causal", "--backend", "cpu", "--time-budget", "1"]) == 0
    captured = capsys.readouterr()
    assert "stopped early" in captured.out and "time budget of 1 s spent" in captured.out
    ran = int(captured.out.split(": ", 1)[1].split(" cases")[0])
    assert 1 <= ran <= 5
    # a progress line per case, on stderr
    assert sum(line.startswith("  case ") for line in captured.err.splitlines()) == ran


def test_fuzz_time_budget_keeps_a_failure_found(monkeypatch):
    def fails_when_long(program, case, backends):
        time.sleep(0.1)
        if case.lk > 10:
            raise testing.FuzzError(case, "cpu forward", "planted")

    monkeypatch.setattr(testing, "check_case", fails_when_long)
    # the second case fails; shrinking it takes some 30 cases, 3 s: the budget cuts it short
    report = testing.fuzz(maskc.compile("causal"), backends=("cpu",), time_budget=1.5)
    assert not report.ok and report.failure.case.lk > 10
    assert "shrinking cut short" in report.stopped
    assert "--case" in report.command and "failing case" in str(report)
    assert report.seconds < 3
