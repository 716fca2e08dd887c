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

_BRANCHES = ("BRA", "JMP", "BRX", "JMX")
_ENDS = ("EXIT", "RET", "KILL")
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
    predicated: bool = False  # guarded by a predicate other than PT (a branch may fall through)

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
    addresses: frozenset[int] = frozenset()  # of its instructions

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
        address, raw = int(m.group(1), 16), m.group(2).strip()
        guard = _PREDICATE.match(raw)
        predicated = bool(guard) and guard.group(0).strip() not in ("@PT", "@UPT")
        body = _PREDICATE.sub("", raw)
        target = _TARGET.search(body)
        opcode = body.split()[0] if body else ""
        target_label = target.group(1) if target else None
        out.append(Instruction(address, opcode, body, target_label, tuple(pending), predicated))
        pending = []
    return out


# The Counts field each base opcode adds to (MUFU.EX2 is told apart by its modifier).
_FIELD = {
    **dict.fromkeys(MMA, "mma"),
    **dict.fromkeys(TMA, "tma"),
    **dict.fromkeys(INTEGER, "integer"),
    **dict.fromkeys(("LDSM", "STSM"), "ldsm"),
    **dict.fromkeys(("LDL", "STL"), "spill"),
    **{
        op: op.lower()
        for op in ("LDG", "STG", "LDS", "STS", "LDGSTS", "FMUL", "FADD", "FFMA", "FSEL", "FMNMX", "ISETP")
    },
}


def count(instructions: list[Instruction]) -> Counts:
    c = Counts()
    opcodes: Counter[str] = Counter()
    for ins in instructions:
        base, op = ins.base, ins.opcode
        if base == "NOP" or not base:
            continue
        opcodes[op] += 1
        c.total += 1
        name = "ex2" if op.startswith("MUFU.EX2") else _FIELD.get(base)
        if name is not None:
            setattr(c, name, getattr(c, name) + 1)
    c.opcodes = dict(opcodes.most_common())
    return c


def _blocks(instructions: list[Instruction]) -> tuple[list[list[int]], list[set[int]]]:
    """Basic blocks (indices of instructions) and each block's successors."""
    n = len(instructions)
    at_label = {name: i for i, ins in enumerate(instructions) for name in ins.labels}
    leaders = {0} | set(at_label.values())
    for i, ins in enumerate(instructions):
        if (ins.base in _BRANCHES or ins.base in _ENDS) and i + 1 < n:
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [list(range(a, b)) for a, b in zip(starts, [*starts[1:], n], strict=True)]
    block_of = {i: k for k, block in enumerate(blocks) for i in block}
    succ: list[set[int]] = []
    for k, block in enumerate(blocks):
        last = instructions[block[-1]]
        out: set[int] = set()
        jumps = last.base in _BRANCHES and last.target in at_label
        if jumps:
            out.add(block_of[at_label[last.target]])
        ends = (last.base in _BRANCHES and (jumps or last.target is None)) or last.base in _ENDS
        if (not ends or last.predicated) and k + 1 < len(blocks):
            out.add(k + 1)  # falls through
        succ.append(out)
    return blocks, succ


def _dominators(succ: list[set[int]]) -> list[set[int]]:
    n = len(succ)
    pred: list[set[int]] = [set() for _ in range(n)]
    for k, out in enumerate(succ):
        for t in out:
            pred[t].add(k)
    every = set(range(n))
    dom = [{0}] + [set(every) for _ in range(n - 1)]
    changed = True
    while changed:
        changed = False
        for k in range(1, n):
            new = ({k} | set.intersection(*(dom[p] for p in pred[k]))) if pred[k] else {k}
            if new != dom[k]:
                dom[k], changed = new, True
    return dom


def loops(instructions: list[Instruction]) -> list[Loop]:
    """Every natural loop of the control flow: a branch to a block that dominates it closes
    one (branches back from out-of-line code, such as the retry paths Triton places after
    the kernel's end, do not).  Loops sharing a header are one loop.  The counts of a loop
    in the kernel's main code leave out what lies past its last EXIT (those out-of-line
    retry paths: cold, though part of the loop's control flow)."""
    if not instructions:
        return []
    blocks, succ = _blocks(instructions)
    dom = _dominators(succ)
    pred: list[set[int]] = [set() for _ in blocks]
    for k, out in enumerate(succ):
        for t in out:
            pred[t].add(k)
    bodies: dict[int, set[int]] = {}
    for k, out in enumerate(succ):
        for head in out:
            if head in dom[k]:  # a back edge k -> head
                body, stack = bodies.setdefault(head, {head}), [k]
                while stack:
                    b = stack.pop()
                    if b not in body:
                        body.add(b)
                        stack.extend(pred[b])
    exits = [ins.address for ins in instructions if ins.base == "EXIT" and not ins.predicated]
    end = exits[-1] if exits else instructions[-1].address
    out_loops = []
    for head, body in sorted(bodies.items()):
        members = [instructions[i] for b in sorted(body) for i in blocks[b]]
        if instructions[blocks[head][0]].address <= end:  # out-of-line paths (a wait's retry) run rarely
            members = [m for m in members if m.address <= end]
        depth = sum(1 for h, other in bodies.items() if h != head and body < other)
        first = instructions[blocks[head][0]]
        label = first.labels[0] if first.labels else f"{first.address:#x}"
        addresses = frozenset(m.address for m in members)
        out_loops.append(Loop(label, first.address, max(addresses), count(members), depth, addresses))
    return out_loops


def _innermost_mma(all_loops: list[Loop]) -> list[Loop]:
    """The loops holding an MMA that hold no deeper loop holding one."""
    with_mma = [lp for lp in all_loops if lp.counts.mma]
    return [lp for lp in with_mma if not any(o.addresses < lp.addresses for o in with_mma)]


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
