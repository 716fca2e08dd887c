"""What a compiled kernel's steady-state loop costs, read from its SASS.

Registers and spill bytes say whether a kernel fits; they do not say how much
work each key block costs.  This module disassembles a kernel's cubin with the
`nvdisasm` that ships with Triton's NVIDIA backend, finds its loops from the
branches back to earlier labels, and counts the instructions of the innermost
loops that run matrix multiplies (the loops over key or query blocks).  No GPU
is needed: the cubin comes from an ahead-of-time compile (codegen/aot.py).

API:

* `analyse(compiled) -> KernelReport` for Triton's compiled kernel
  (`triton.compile(...)`'s result, or what `aot.compile_kernel` returns):
  registers, local (spill) stack bytes, shared memory, the whole kernel's
  `Counts` and its `mma_loops()` in address order.
* `analyse_cubin(cubin, name="", shared_bytes=0)` the same from cubin bytes.
* `parse(text) -> list[Instruction]` reads `nvdisasm` text; `loops(instructions)`
  lists every loop (`Loop`: first and last instruction address, the label
  branched back to, its `Counts`, its own `depth`); `mma_loops(instructions)`
  keeps the innermost loops holding an MMA.
* `Counts` tallies: `total` (NOPs excluded), `mma` (HGMMA / HMMA / IMMA
  instructions), `ex2` (`MUFU.EX2`), `ldg` / `stg`, `lds` / `sts` / `ldsm`,
  `ldgsts` (cp.async), `tma` (UTMALDG and the other bulk-copy instructions),
  `fmul`, `fadd`, `ffma`, `fsel`, `fmnmx`, `isetp`, `integer` (integer ALU:
  IMAD, IADD3, LEA, LOP3, SHF, ...), `spill` (LDL / STL), and `opcodes` (every
  opcode's count); `mma_share` is `mma / total`.

In maskc's kernels the static loop over the two kinds of runs is unrolled, so
the full-block loop comes first in the code and the partial-block loop second:
`mma_loops()[0]` and `[1]` (ptxas keeps the source order of these loops).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_LABEL = re.compile(r"^(\.L[\w$.]+):\s*$")
_TARGET = re.compile(r"`\((\.L[\w$.]+)\)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")

MMA = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA")
TMA = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UBLKCP", "UTMAREDG", "UBLKRED", "UBLKPF")
_INT = ("IMAD", "IADD3", "IADD", "VIADD", "VIADDMNMX", "LEA", "LOP3", "LOP", "SHF", "SHL", "SHR", "IMNMX", "VIMNMX",
        "IABS", "ISCADD", "PRMT", "SEL", "BMSK", "POPC", "FLO", "BREV", "IMUL")  # fmt: skip
INTEGER = frozenset(_INT) | {"U" + op for op in _INT}  # and their uniform-datapath forms (UIADD3, ULEA, ...)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. MUFU.EX2, HGMMA.64x64x16.F32
    text: str  # the instruction without its address and predicate
    target: str | None = None  # the label a branch jumps to
    labels: tuple[str, ...] = ()  # the labels naming this instruction's address

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Counts:
    total: int = 0
    mma: int = 0
    ex2: int = 0
    ldg: int = 0
    stg: int = 0
    lds: int = 0
    sts: int = 0
    ldsm: int = 0
    ldgsts: int = 0
    tma: int = 0
    fmul: int = 0
    fadd: int = 0
    ffma: int = 0
    fsel: int = 0
    fmnmx: int = 0
    isetp: int = 0
    integer: int = 0
    spill: int = 0
    opcodes: dict[str, int] = field(default_factory=dict)

    @property
    def mma_share(self) -> float:
        return self.mma / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "opcodes"}
        return {**out, "mma_share": round(self.mma_share, 4), "opcodes": dict(self.opcodes)}


@dataclass(frozen=True)
class Loop:
    label: str
    first: int  # address of the loop's first instruction (the label)
    last: int  # address of the branch back
    counts: Counts
    depth: int  # how many other loops enclose it

    def as_dict(self) -> dict:
        return {"label": self.label, "first": self.first, "last": self.last, "depth": self.depth,
                **self.counts.as_dict()}  # fmt: skip


@dataclass
class KernelReport:
    name: str
    registers: int
    stack_bytes: int  # local memory per thread: spills (and any local arrays)
    shared_bytes: int
    counts: Counts  # the whole kernel
    loops: list[Loop]  # every loop, in address order

    def mma_loops(self) -> list[Loop]:
        return _innermost_mma(self.loops)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "registers": self.registers,
            "stack_bytes": self.stack_bytes,
            "shared_bytes": self.shared_bytes,
            "kernel": self.counts.as_dict(),
            "mma_loops": [loop.as_dict() for loop in self.mma_loops()],
        }


def tool(name: str) -> Path:
    """A binary of Triton's NVIDIA backend (nvdisasm, cuobjdump, ptxas)."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def disassemble(cubin: bytes) -> str:
    """`nvdisasm -c` of a cubin: the code sections, labels and branch targets named."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([str(tool("nvdisasm")), "-c", str(path)], capture_output=True, text=True, check=True)
    return done.stdout


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the cubin's kernel, from `cuobjdump -res-usage`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run(
            [str(tool("cuobjdump")), "-res-usage", str(path)], capture_output=True, text=True, check=True
        )
    regs = re.search(r"REG:(\d+)", done.stdout)
    stack = re.search(r"STACK:(\d+)", done.stdout)
    return int(regs.group(1)) if regs else 0, int(stack.group(1)) if stack else 0


def parse(text: str) -> list[Instruction]:
    """The instructions of `nvdisasm` output, labels attached to the instruction they name."""
    out: list[Instruction] = []
    pending: list[str] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _LINE.match(line)
        if not m:
            continue
        address, body = int(m.group(1), 16), _PREDICATE.sub("", m.group(2).strip())
        target = _TARGET.search(body)
        opcode = body.split()[0] if body else ""
        out.append(Instruction(address, opcode, body, target.group(1) if target else None, tuple(pending)))
        pending = []
    return out


def count(instructions: list[Instruction]) -> Counts:
    c = Counts()
    opcodes: Counter[str] = Counter()
    for ins in instructions:
        base, op = ins.base, ins.opcode
        if base == "NOP" or not base:
            continue
        opcodes[op] += 1
        c.total += 1
        if base in MMA:
            c.mma += 1
        elif op.startswith("MUFU.EX2"):
            c.ex2 += 1
        elif base == "LDG":
            c.ldg += 1
        elif base == "STG":
            c.stg += 1
        elif base == "LDS":
            c.lds += 1
        elif base == "STS":
            c.sts += 1
        elif base in ("LDSM", "STSM"):
            c.ldsm += 1
        elif base == "LDGSTS":
            c.ldgsts += 1
        elif base in TMA:
            c.tma += 1
        elif base == "FMUL":
            c.fmul += 1
        elif base == "FADD":
            c.fadd += 1
        elif base == "FFMA":
            c.ffma += 1
        elif base == "FSEL":
            c.fsel += 1
        elif base == "FMNMX":
            c.fmnmx += 1
        elif base == "ISETP":
            c.isetp += 1
        elif base in INTEGER:
            c.integer += 1
        elif base in ("LDL", "STL"):
            c.spill += 1
    c.opcodes = dict(opcodes.most_common())
    return c


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every loop: a branch back to an earlier (or its own) label closes one.  Several
    branches back to one label make one loop, up to the last of them."""
    labels = {name: ins.address for ins in instructions for name in ins.labels}
    ends: dict[str, int] = {}
    for ins in instructions:
        back = ins.base in ("BRA", "JMP") and ins.target in labels and labels[ins.target] <= ins.address
        if back:
            ends[ins.target] = max(ends.get(ins.target, 0), ins.address)
    spans = sorted((labels[name], end, name) for name, end in ends.items())
    out = []
    for first, last, name in spans:
        body = [ins for ins in instructions if first <= ins.address <= last]
        depth = sum(1 for f, l, n in spans if n != name and f <= first and last <= l)
        out.append(Loop(name, first, last, count(body), depth))
    return out


def _innermost_mma(all_loops: list[Loop]) -> list[Loop]:
    with_mma = [lp for lp in all_loops if lp.counts.mma]
    return [
        lp for lp in with_mma if not any(o is not lp and lp.first <= o.first and o.last <= lp.last for o in with_mma)
    ]


def mma_loops(instructions: list[Instruction]) -> list[Loop]:
    """The innermost loops that hold a matrix multiply, in address order."""
    return _innermost_mma(loops(instructions))


def analyse_cubin(cubin: bytes, name: str = "", shared_bytes: int = 0) -> KernelReport:
    instructions = parse(disassemble(cubin))
    registers, stack = resource_usage(cubin)
    return KernelReport(name, registers, stack, shared_bytes, count(instructions), loops(instructions))


def analyse(compiled) -> KernelReport:
    """The report of one of Triton's compiled kernels (its `asm["cubin"]` and metadata)."""
    meta = compiled.metadata
    return analyse_cubin(compiled.asm["cubin"], getattr(meta, "name", ""), int(getattr(meta, "shared", 0)))
