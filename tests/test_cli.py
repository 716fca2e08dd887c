"""The `maskc` command line: check, show, patterns, --version."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import maskc
from maskc import cli


def picture_rows(out: str) -> list[str]:
    """The rows of every ASCII panel: lines between '|' borders."""
    return [line[1:-1] for line in out.splitlines() if len(line) >= 2 and line[0] == "|" and line[-1] == "|"]


def hand_rows(lq, lk, pred):
    off = lk - lq
    return ["".join("#" if pred(i + off, j) else " " for j in range(lk)) for i in range(lq)]


# ---------------------------------------------------------------- check


def test_check_ok(tmp_path, capsys):
    path = tmp_path / "good.mask"
    path.write_text("pattern a() = causal\npattern b(w = 2) on grid(h, w2) = window(w)\n")
    assert cli.main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert str(path) in captured.out
    assert "ok" in captured.out
    assert "2 patterns" in captured.out
    assert captured.err == ""


def test_check_error_has_caret(tmp_path, capsys):
    path = tmp_path / "bad.mask"
    bad_line = "pattern b() = causal & window(-1)"
    path.write_text("pattern a() = causal\n" + bad_line + "\n")
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2:" in err
    lines = err.splitlines()
    quoted = next(i for i, line in enumerate(lines) if line.endswith(bad_line))
    caret_line = lines[quoted + 1]
    start = lines[quoted].index(bad_line)
    # the caret sits under the offending argument "-1"
    assert caret_line.index("^") == start + bad_line.index("-1")
    assert set(caret_line.strip()) == {"^"}
    assert "Traceback" not in err


def test_check_syntax_error(tmp_path, capsys):
    path = tmp_path / "syntax.mask"
    path.write_text("causal &\n")
    assert cli.main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1:" in err
    assert "^" in err


def test_check_several_files_and_missing_file(tmp_path, capsys):
    good = tmp_path / "good.mask"
    good.write_text("causal & window(3)\n")
    bad = tmp_path / "bad.mask"
    bad.write_text("window(1) | nosuchthing(2)\n")
    assert cli.main(["check", str(good)]) == 0
    assert cli.main(["check", str(good), str(bad)]) == 1
    captured = capsys.readouterr()
    assert "nosuchthing" in captured.err
    assert cli.main(["check", str(tmp_path / "absent.mask")]) == 1
    assert "absent.mask" in capsys.readouterr().err


# ---------------------------------------------------------------- show


def test_show_small_picture(capsys):
    assert cli.main(["show", "causal & window(3) | sink(2)", "--lq", "12"]) == 0
    out = capsys.readouterr().out
    assert "causal & window(3) | sink(2)" in out
    assert picture_rows(out) == hand_rows(12, 12, lambda q, k: (k <= q and q - k <= 3) or k < 2)
    assert "downsampled" not in out


def test_show_rectangular(capsys):
    assert cli.main(["show", "causal", "--lq", "3", "--lk", "6"]) == 0
    out = capsys.readouterr().out
    assert picture_rows(out) == ["####  ", "##### ", "######"]


def test_show_downsampled(capsys):
    assert cli.main(["show", "causal", "--lq", "256"]) == 0
    out = capsys.readouterr().out
    assert "downsampled" in out
    assert "4 x 4" in out  # 256 positions on 64 characters
    rows = picture_rows(out)
    assert len(rows) == 64 and all(len(r) == 64 for r in rows)
    # a 4 x 4 cell on the diagonal holds 10 of 16 causal pairs: "half or more"
    for i, row in enumerate(rows):
        assert row == "#" * i + "o" + " " * (63 - i)


def test_show_width_option(capsys):
    assert cli.main(["show", "window(1)", "--lq", "40", "--width", "10"]) == 0
    rows = picture_rows(capsys.readouterr().out)
    assert len(rows) == 10 and all(len(r) == 10 for r in rows)


def test_show_grid_sizes_and_params(capsys):
    assert cli.main(["show", "natten2d", "--lq", "16", "--set", "h=4", "--set", "w=4", "--set", "k=3"]) == 0
    out = capsys.readouterr().out
    # the parameter that was set is shown, not only the definition's default (k = 7)
    assert "k = 3" in out
    rows = picture_rows(out)

    def axis(a, b):
        start = min(max(a - 1, 0), 1)
        return start <= b < start + 3

    assert rows == hand_rows(16, 16, lambda q, k: axis(q // 4, k // 4) and axis(q % 4, k % 4))


def test_show_per_head(capsys):
    assert cli.main(["show", "heads { 0 .. 1: causal; 1 .. 3: all }", "--lq", "3", "--heads", "3"]) == 0
    out = capsys.readouterr().out
    assert "heads 0:" in out
    assert "heads 1-2:" in out
    assert picture_rows(out) == ["#  ", "## ", "###", "###", "###", "###"]


def test_show_png(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "mask.png"
    assert cli.main(["show", "causal", "--lq", "8", "--png", str(png)]) == 0
    assert str(png) in capsys.readouterr().out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = Image.open(png)
    img.load()
    assert img.format == "PNG"
    w, h = img.size
    assert w == h and w >= 8
    gray = img.convert("L")
    # allowed pairs are dark: the bottom-left corner is allowed, the top-right is not
    assert gray.getpixel((1, h - 2)) < 64
    assert gray.getpixel((w - 2, 1)) > 192


def test_show_png_integer_scale_equals_the_mask(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    png = tmp_path / "natten.png"
    args = ["show", "natten2d", "--lq", "196", "--set", "h=14", "--set", "w=14", "--set", "k=5", "--png", str(png)]
    assert cli.main(args) == 0
    assert "each position 2 x 2 px" in capsys.readouterr().out
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (392, 392)  # 2 pixels a position, not 490 / 196 = 2.5
    mask = maskc.compile("natten2d", k=5).mask(196, h=14, w=14)[0].numpy()  # head 0
    want = np.where(mask, 0, 255).astype(np.uint8).repeat(2, axis=0).repeat(2, axis=1)
    assert np.array_equal(pixels, want)


def test_show_png_downsamples_by_an_integer(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    png = tmp_path / "causal.png"
    assert cli.main(["show", "causal", "--lq", "2100", "--png", str(png)]) == 0
    assert "each pixel is 3 x 3 positions" in capsys.readouterr().out
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (700, 700)  # 2100 positions, 3 a pixel
    # below the diagonal all allowed (black), above none (white), on it 6 of 9 pairs (grey)
    assert pixels[5, 2] == 0 and pixels[2, 5] == 255 and 0 < pixels[4, 4] < 255


def test_show_schedule_png_colours_and_legend(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from maskc import picture

    png = tmp_path / "schedule.png"
    assert cli.main(["show", "causal", "--lq", "256", "--schedule", "--png", str(png)]) == 0
    assert "full dark blue, partial orange, empty white" in capsys.readouterr().out
    pixels = np.asarray(Image.open(png).convert("RGB"))
    sched = maskc.compile("causal").schedule(256, block_q=64, block_k=64)
    layout = picture.write_schedule_png(sched, str(tmp_path / "again.png"))
    assert pixels.shape[:2] == layout.size[::-1]
    (x0, y0), s = layout.origins[0], layout.scale
    assert s == 128  # 4 x 4 blocks, an integer scale

    def block(row: int, col: int) -> tuple[int, ...]:
        colours = {
            tuple(c)
            for c in pixels[y0 + row * s : y0 + (row + 1) * s, x0 + col * s : x0 + (col + 1) * s].reshape(-1, 3)
        }
        assert len(colours) == 1, colours  # one flat colour per block
        return colours.pop()

    full, partial, empty = (picture.STATE_COLOURS[i] for i in (2, 1, 0))
    assert len({full, partial, empty}) == 3
    for row in range(4):
        for col in range(4):
            assert block(row, col) == (full if col < row else partial if col == row else empty)
    # The legend below the panel shows the three colours and its text (dark pixels).
    legend = pixels[y0 + 4 * s + 1 :].reshape(-1, 3)
    found = {tuple(c) for c in legend}
    assert {full, partial, empty} <= found
    assert (legend.sum(axis=1) < 150).sum() > 200  # the words "full", "partial", "blocks of 64 x 64 tokens", ...


def test_schedule_png_downsamples_many_blocks(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from maskc import picture

    # 2050 x 2050 blocks: 3 blocks a pixel; partial wins over full, full over empty
    states = torch.zeros(1, 2050, 2050, dtype=torch.int8)
    states[0, :3, :3] = 2
    states[0, 1, 4] = 1
    states[0, 3:6, 3:6] = 2
    sched = SimpleNamespace(
        to_dense=lambda: states,
        head_group=[0],
        block_q=16,
        block_k=16,
        layout="rowmajor",
        visited_blocks=lambda: 19,
        efficiency=lambda: 1.0,
    )
    layout = picture.write_schedule_png(sched, str(tmp_path / "big.png"))
    assert layout.cell == 3 and layout.scale == 1
    pixels = np.asarray(Image.open(tmp_path / "big.png").convert("RGB"))
    x0, y0 = layout.origins[0]
    full, partial, empty = (picture.STATE_COLOURS[i] for i in (2, 1, 0))
    assert tuple(pixels[y0, x0]) == full
    assert tuple(pixels[y0, x0 + 1]) == partial
    assert tuple(pixels[y0 + 1, x0 + 1]) == full
    assert tuple(pixels[y0 + 2, x0 + 2]) == empty


def test_show_bad_spec(capsys):
    assert cli.main(["show", "window(-1)", "--lq", "4"]) == 1
    err = capsys.readouterr().err
    assert "^" in err and ">= 0" in err
    assert cli.main(["show", "natten2d", "--lq", "16", "--set", "h=5"]) == 1
    assert capsys.readouterr().err


def test_show_bad_set_value():
    with pytest.raises(SystemExit) as e:
        cli.main(["show", "causal", "--lq", "4", "--set", "w=abc"])
    assert e.value.code != 0


def test_show_dynamic_pattern_uses_random_tensors(capsys):
    spec = "pattern p(ids: tensor) = segments(ids) & causal"
    assert cli.main(["show", spec, "--lq", "8"]) == 0
    out = capsys.readouterr().out
    assert "seed" in out
    rows = picture_rows(out)
    assert len(rows) == 8
    # whatever the random documents, the picture is causal with a full diagonal
    for i, row in enumerate(rows):
        assert row[i] == "#" and row[i + 1 :].strip() == ""


# ---------------------------------------------------------------- patterns and version


def test_patterns_lists_the_library(capsys):
    assert cli.main(["patterns"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    from maskc import patterns

    names = patterns.names()
    assert {"mistral", "natten2d", "longformer", "streaming"} <= set(names)
    for name in names:
        assert any(line.startswith(name + "(") for line in lines), name
    mistral = next(line for line in lines if line.startswith("mistral("))
    assert "w = 4096" in mistral
    natten = next(line for line in lines if line.startswith("natten2d("))
    assert "on grid(h, w)" in natten


def test_version_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "maskc", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"maskc {maskc.__version__}"


# ---------------------------------------------------------------- compile


def compile_parser_choices() -> list[str]:
    """The --emit choices `maskc compile` offers."""
    sub = next(a for a in cli.build_parser()._subparsers._group_actions if a.dest == "command")
    emit = next(a for a in sub.choices["compile"]._actions if a.dest == "emit")
    return list(emit.choices)


def normal_text(program, lq, heads=1, **sizes) -> list[str]:
    """What `--emit normal` should print: each head group's normal form."""
    from maskc.codegen.irtext import pattern_text

    return [pattern_text(form) for _, form in program.normal_form(lq, heads=heads, **sizes)]


def assert_triton_source(out: str, normal: str) -> None:
    """A generated Triton kernel file for the given normal form."""
    import ast

    assert "import triton" in out
    assert "@triton.jit" in out
    assert "def allowed(qpos, kpos" in out
    assert "# normal form:\n#     " + normal.replace("\n", "\n#     ") in out
    ast.parse(out)  # Python source, as Triton needs it


SPEC_FILE = """\
# two patterns, one on a grid
pattern local(w = 3) = causal & window(w, 0)
pattern box(r = 1) on grid(h, w) = window(r) & keys(0 .. lk)
"""


def test_compile_emit_choices_are_all_tested():
    # The tests below check "normal" and "triton"; a new choice needs its own test.
    assert sorted(compile_parser_choices()) == ["normal", "triton"]


def test_compile_emit_normal_library_pattern(capsys):
    assert cli.main(["compile", "mistral", "--lq", "64", "--set", "w=8"]) == 0
    out = capsys.readouterr().out
    assert out == "-7 <= k - q <= 0\n"
    assert out.splitlines() == normal_text(maskc.compile("mistral", w=8), 64)
    # --emit normal is the default
    assert cli.main(["compile", "mistral", "--lq", "64", "--set", "w=8", "--emit", "normal"]) == 0
    assert capsys.readouterr().out == out


def test_compile_emit_normal_grid_pattern_and_sizes(capsys):
    assert cli.main(["compile", "natten2d", "--lq", "64", "--set", "h=8", "--set", "w=8", "--set", "k=3"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == normal_text(maskc.compile("natten2d", k=3), 64, h=8, w=8)
    assert out.count("neighborhood") == 2  # one per axis


def test_compile_emit_normal_spec_file(tmp_path, capsys):
    path = tmp_path / "two.mask"
    path.write_text(SPEC_FILE)
    assert cli.main(["compile", str(path), "--pattern", "local", "--lq", "32", "--set", "w=5"]) == 0
    assert capsys.readouterr().out == "-5 <= k - q <= 0\n"
    args = ["compile", str(path), "--pattern", "box", "--lq", "12", "--lk", "24", "--set", "h=4", "--set", "w=6"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    expected = normal_text(maskc.compile(str(path), pattern="box"), 12, lk=24, h=4, w=6)
    assert out.splitlines() == expected


def test_compile_emit_normal_per_head_groups(capsys):
    spec = "heads { 0 .. 2: causal; 2 .. 4: window(1) }"
    assert cli.main(["compile", spec, "--lq", "16", "--heads", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["# heads 0-1", "k - q <= 0", "# heads 2-3", "-1 <= k - q <= 1"]


def test_compile_emit_triton_library_pattern(capsys):
    assert cli.main(["compile", "mistral", "--lq", "64", "--set", "w=8", "--emit", "triton"]) == 0
    out = capsys.readouterr().out
    assert_triton_source(out, "-7 <= k - q <= 0")
    assert "# pattern: pattern mistral(w = 4096) = causal & ~causal(-w)" in out


def test_compile_emit_triton_spec_file(tmp_path, capsys):
    path = tmp_path / "two.mask"
    path.write_text(SPEC_FILE)
    args = ["compile", str(path), "--pattern", "local", "--lq", "32", "--emit", "triton", "--head-dim", "128"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert_triton_source(out, "-3 <= k - q <= 0")
    assert "# pattern: pattern local(w = 3) = causal & window(w, 0)" in out


def test_compile_emit_triton_per_head_groups_and_modifiers(capsys):
    spec = "heads { 0 .. 1: causal; 1 .. 2: all } with alibi, softcap(20.0)"
    assert cli.main(["compile", spec, "--lq", "16", "--heads", "2", "--emit", "triton"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# heads 0\n")
    files = out.split("# heads 1\n")
    assert len(files) == 2
    assert_triton_source(files[0].removeprefix("# heads 0\n"), "k - q <= 0")
    assert_triton_source(files[1], "all")
    assert all("# modifiers: " in f and "softcap" in f for f in files)


def test_compile_emit_triton_clustered_pattern(capsys):
    # `cluster` runs gathered into cluster order: its own kernel file
    import ast

    args = ["compile", "routing_causal", "--lq", "64", "--set", "n=2", "--set", "w=32", "--emit", "triton"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "# execution: gathered into cluster order" in out
    assert "@triton.jit" in out
    ast.parse(out)


@pytest.mark.parametrize("emit", ["normal", "triton"])
def test_compile_bad_spec_file_is_located(tmp_path, capsys, emit):
    path = tmp_path / "bad.mask"
    bad_line = "pattern b(w = 2) = causal & window(w, -1)"
    path.write_text("pattern a = causal\n" + bad_line + "\n")
    assert cli.main(["compile", str(path), "--pattern", "b", "--lq", "8", "--emit", emit]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert f"{path}:2:" in err and ">= 0" in err
    lines = err.splitlines()
    quoted = next(i for i, line in enumerate(lines) if line.endswith(bad_line))
    caret = lines[quoted + 1]
    assert caret.index("^") == lines[quoted].index(bad_line) + bad_line.index("-1")
    assert "Traceback" not in err


def test_compile_bad_spec_text_and_bad_sizes(capsys):
    # a syntax error in spec text
    assert cli.main(["compile", "causal & (window(3)", "--lq", "8", "--emit", "triton"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "<spec>:1:" in captured.err and "^" in captured.err
    # an error found when the sizes are known: the grid does not hold the keys
    assert cli.main(["compile", "natten2d", "--lq", "64", "--set", "h=5", "--set", "w=8"]) == 1
    err = capsys.readouterr().err
    assert "patterns/natten.mask:" in err and "holds 40 positions" in err and "^" in err


def test_compile_bad_spec_exit_status_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "maskc", "compile", "causal & windw(3)", "--lq", "8"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert "<spec>:1:10: unknown pattern 'windw'; did you mean 'window'?" in result.stderr
    assert "^^^^^" in result.stderr
    assert "Traceback" not in result.stderr
