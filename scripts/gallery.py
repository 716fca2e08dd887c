"""Regenerate docs/gallery: a picture of every library pattern at its example size.

    .venv/bin/python scripts/gallery.py

Each picture is what `maskc show NAME --lq N --set ... --png PATH` draws
(allowed pairs dark), one panel per distinct head pattern; data-dependent
patterns use the random tensors `maskc show` uses (seed 0).  Also writes
docs/gallery/README.md with the table the main README links to.
"""

from __future__ import annotations

from pathlib import Path

from maskc import cli, patterns

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "gallery"
# Enough heads to show per-head patterns; at most 4 panels per picture.
HEADS = {"s2_attention": 4, "sparse_fixed": 2, "bigbird": 2}
# Smaller grids than the examples, so that a picture shows the 2-D structure.
GRIDS = {
    (("h", 56), ("w", 56)): {"lq": 196, "h": 14, "w": 14},
    (("h", 64), ("w", 64)): {"lq": 256, "h": 16, "w": 16},
    (("t", 16), ("h", 16), ("w", 16)): {"lq": 512, "t": 8, "h": 8, "w": 8},
}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = ["| pattern | picture | example | source |", "|---|---|---|---|"]
    for name, entry in sorted(patterns.entries().items()):
        example = dict(entry.example)
        smaller = GRIDS.get(tuple((k, v) for k, v in example.items() if k != "lq"))
        png = OUT / f"{name}.png"
        for sizes in ([smaller] if smaller else []) + [example]:  # the smaller grid when the pattern fits it
            sizes = dict(sizes)
            lq = sizes.pop("lq", 1024)
            args = ["show", name, "--lq", str(lq), "--heads", str(HEADS.get(name, 1)), "--width", "48"]
            for key, value in sizes.items():
                args += ["--set", f"{key}={value}"]
            if cli.main([*args, "--png", str(png)]) == 0:
                example = {**sizes}
                break
        else:
            raise SystemExit(f"could not draw {name}")
        sizes = ", ".join(f"{k}={v}" for k, v in example.items())
        first = entry.doc.splitlines()[0].rstrip(".:;,").replace("|", "/") if entry.doc else ""
        rows.append(f"| `{name}` | ![{name}]({png.name}) | lq={lq}{', ' + sizes if sizes else ''} | {first}. |")
    (OUT / "README.md").write_text(
        "# Pattern gallery\n\nRegenerate with `.venv/bin/python scripts/gallery.py`.\n\n" + "\n".join(rows) + "\n"
    )
    print(f"wrote {len(rows) - 2} pictures to {OUT}")


if __name__ == "__main__":
    main()
