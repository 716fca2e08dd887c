"""codegen/sass.py reads nvdisasm text: loops from branches back, the innermost loops with an MMA, counts.

The text below is shaped like `nvdisasm -c` output of a kernel with an outer loop over runs
holding an inner loop over blocks (with a small non-MMA loop inside it), then a second
loop, a forward branch that closes no loop, and after the kernel's EXIT an out-of-line retry
path (as Triton emits for waits) that jumps back into the first loop: not a loop of its own.
"""

from __future__ import annotations

from maskc.codegen import sass

TEXT = """
//--------------------- .text.attn_fwd            --------------------------
attn_fwd:
.text.attn_fwd:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/               @P0 BRA `(.L_x_9) ;
.L_x_1:
        /*0020*/                   IMAD R2, R3, 0x40, RZ ;
.L_x_0:
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   STS.128 [R5], R4 ;
        /*0050*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*0060*/                   FFMA R6, R24, R7, -R8 ;
        /*0070*/                   MUFU.EX2 R6, R6 ;
.L_x_2:
        /*0080*/                   IADD3 R9, R9, 0x1, RZ ;
        /*0090*/              @!P1 BRA `(.L_x_2) ;
        /*00a0*/                   FSEL R10, R6, -INF , P2 ;
        /*00b0*/                   ISETP.GE.AND P0, PT, R9, R11, PT ;
        /*00b8*/              @!P4 BRA `(.L_x_8) ;
.L_x_7:
        /*00c0*/                   NOP ;
        /*00d0*/               @P0 BRA `(.L_x_0) ;
        /*00e0*/               @P3 BRA `(.L_x_1) ;
.L_x_3:
        /*00f0*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0100*/                   HMMA.16816.F32 R24, R4, R8, R24 ;
        /*0110*/                   HMMA.16816.F32 R28, R4, R10, R28 ;
        /*0120*/                   LDSM.16.M88.4 R4, [R3] ;
        /*0130*/               @P0 BRA `(.L_x_3) ;
.L_x_9:
        /*0140*/                   EXIT ;
.L_x_8:
        /*0150*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P4, [R3+URZ], R4 ;
        /*0160*/              @!P4 BRA `(.L_x_8) ;
        /*0170*/                   BRA `(.L_x_7) ;
.L_x_10:
        /*0180*/                   BRA `(.L_x_10);
"""


def test_loops_and_counts_from_disassembly():
    instructions = sass.parse(TEXT)
    assert [i.opcode for i in instructions[:3]] == ["LDC", "BRA", "IMAD"]
    assert instructions[2].labels == (".L_x_1",)
    found = {lp.label: lp for lp in sass.loops(instructions)}
    # no loop from the forward branch to .L_x_9, nor from the retry path back to .L_x_7;
    # the retry path's own spin and the trap after the end are loops (without an MMA)
    assert set(found) == {".L_x_0", ".L_x_1", ".L_x_2", ".L_x_3", ".L_x_8", ".L_x_10"}
    assert (found[".L_x_0"].first, found[".L_x_0"].last, found[".L_x_0"].depth) == (0x30, 0xD0, 1)
    assert found[".L_x_2"].depth == 2 and found[".L_x_1"].depth == 0
    inner = sass.mma_loops(instructions)
    assert [lp.label for lp in inner] == [".L_x_0", ".L_x_3"]  # innermost loops holding an MMA
    c = inner[0].counts
    # LDG STS HGMMA FFMA MUFU IADD3 BRA FSEL ISETP BRA BRA: eleven, the NOP not counted
    assert (c.total, c.mma, c.ex2, c.ldg, c.sts, c.ffma, c.fsel, c.isetp, c.integer) == (11, 1, 1, 1, 1, 1, 1, 1, 1)
    assert c.opcodes["BRA"] == 3 and abs(c.mma_share - 1 / 11) < 1e-12
    c = inner[1].counts
    assert (c.total, c.mma, c.ldgsts, c.ldsm, c.ldg) == (5, 2, 1, 1, 0)
