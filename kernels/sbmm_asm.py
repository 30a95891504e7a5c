"""PTX that expands one packed 2:4 word into dense half-precision values, and a numpy emulator of it.

One `qweight` word holds the kept codes of 4 (4-bit) or 8 (2-bit) groups of 4 dense columns; its meta
nibbles say where the two kept values of each group sit. Per group the program
  1. gathers the group's two codes into the low bits of the two 16-bit lanes (one `prmt`),
  2. turns them into half2 numbers with the magic-exponent trick (`lop3` then `sub`, `mul` on half2),
  3. places the two values at their dense positions with two `prmt` byte shuffles whose selectors come
     from a byte lookup table, itself read with `prmt` (4 groups per lookup).
That is about 2.4 instructions per dense value, against ~6 for the same steps in plain Triton, which
is what lets a decode-shaped SBMM stay memory bound (docs/kernels.md has the numbers).

Outputs are numbered by bit-reversed dense column so that `sbmm._interleave` (a tree of `tl.join`)
puts them back in column order. The program is built once as a list of instructions: `render_ptx`
prints it for `tl.inline_asm_elementwise`, `emulate` runs it on numpy arrays for the CPU tests.
"""

from dataclasses import dataclass

import numpy as np

MAGIC = {"f16": 0x6400, "bf16": 0x4300}  # 1024.0 / 128.0: a code OR-ed into the mantissa reads as MAGIC + code
MAGIC_VALUE = {"f16": 1024.0, "bf16": 128.0}
PATTERNS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]  # kept columns (i0, i1) of a 2:4 group
META_XNOR_LUT = 0x82  # lop3(m, m >> 1, 0x77777777, 0x82): nibble i0 | i1 << 2 -> index 1..6, bit 3 clear


def meta_index(nibble: int) -> int:
    """LUT index the program derives from a canonical meta nibble (i0 | i1 << 2)."""
    m, mh = nibble, nibble >> 1
    return ~(m ^ mh) & 0x7


def _selector_byte(source: str) -> int:
    """prmt selector byte for one 16-bit output lane: v0 = bytes 0-1, v1 = bytes 2-3, zero = bytes 4-5."""
    half = {"v0": 0, "v1": 1, "zero": 2}[source]
    return (2 * half) | ((2 * half + 1) << 4)


def lookup_tables() -> dict[str, tuple[int, int]]:
    """Four 8-byte tables (as two b32 words each) from LUT index to selector byte for dense lane 0..3."""
    tables = {name: [_selector_byte("zero")] * 8 for name in ("l01", "h01", "l23", "h23")}
    for i0, i1 in PATTERNS:
        idx = meta_index(i0 | (i1 << 2))
        lanes = ["zero"] * 4
        lanes[i0], lanes[i1] = "v0", "v1"
        for name, lane in zip(("l01", "h01", "l23", "h23"), lanes):
            tables[name][idx] = _selector_byte(lane)
    as_words = {}
    for name, t in tables.items():
        as_words[name] = (int.from_bytes(bytes(t[:4]), "little"), int.from_bytes(bytes(t[4:]), "little"))
    return as_words


@dataclass(frozen=True, slots=True)
class Op:
    """One PTX instruction: `kind` in shr, lop3, prmt, hsub, hmul, mov, unpack; operands are names or ints."""

    kind: str
    dst: str | tuple[str, str]
    args: tuple = ()


def bitrev(i: int, width: int) -> int:
    """Reverse the low `width` bits of i."""
    return int(format(i, f"0{width}b")[::-1], 2)


def build_program(bits: int, asym: bool) -> tuple[list[Op], int]:
    """Instruction list expanding one word; inputs q, m, s, z; returns (ops, dense values per word)."""
    if bits not in (2, 4):
        raise ValueError(f"the SBMM kernel supports bits 2 and 4, got {bits}")
    groups = 32 // bits // 2
    dense = 4 * groups
    ops: list[Op] = [Op("mov", "zero", (0,))]
    tables = lookup_tables()
    for name, (lo, hi) in tables.items():
        ops += [Op("mov", f"t{name}a", (lo,)), Op("mov", f"t{name}b", (hi,))]
    # Shifted copies put each group's second code at the bottom of a byte: (q, q>>4) or (q, q>>2, q>>4, q>>6).
    shifts = [0, 4] if bits == 4 else [0, 2, 4, 6]
    src = {0: "q"}
    for sh in shifts[1:]:
        src[sh] = f"q{sh}"
        ops.append(Op("shr", f"q{sh}", ("q", sh)))
    ops += [Op("shr", "mh", ("m", 1)), Op("lop3", "mi", ("m", "mh", 0x77777777, META_XNOR_LUT))]
    for half in range(groups // 4):  # a lookup covers the 4 nibbles in the low 16 bits of its selector
        sel = "mi"
        if half:
            sel = f"mi{half}"
            ops.append(Op("shr", sel, ("mi", 16 * half)))
        for name in ("l01", "h01", "l23", "h23"):
            ops.append(Op("prmt", f"{name}_{half}", (f"t{name}a", f"t{name}b", sel)))
    code_mask = ((1 << bits) - 1) * 0x00010001
    for g in range(groups):
        if bits == 4:
            byte, lo_src, hi_src = g, src[0], src[4]
        else:
            byte = g // 2
            lo_src, hi_src = (src[0], src[2]) if g % 2 == 0 else (src[4], src[6])
        ops.append(Op("prmt", "c", (lo_src, hi_src, byte | ((4 + byte) << 8))))
        ops.append(Op("lop3", "c", ("c", code_mask, "magic2", 0xEA)))  # (c & mask) | magic
        ops.append(Op("hsub", "c", ("c", "z")))  # MAGIC + q - (MAGIC + z) = q - z, exact
        if asym:
            ops.append(Op("hsub", "c", ("c", "zq")))
        ops.append(Op("hmul", "v", ("c", "s")))
        half, j = divmod(g, 4)
        for pair in ("01", "23"):
            ops.append(Op("prmt", "sel", (f"l{pair}_{half}", f"h{pair}_{half}", j | ((4 + j) << 4))))
            ops.append(Op("prmt", "d", ("v", "zero", "sel")))
            col = 4 * g + (0 if pair == "01" else 2)
            width = dense.bit_length() - 1
            ops.append(Op("unpack", (f"o{bitrev(col, width)}", f"o{bitrev(col + 1, width)}"), ("d",)))
    return ops, dense


def build_dense2_program() -> tuple[list[Op], int]:
    """Instruction list expanding one dense2 word (kernels/layout.py: 16 symmetric 2-bit codes, pair j =
    columns 2j, 2j + 1 at bits 2j and 16 + 2j) into 16 values; inputs q, s, z (m is unused). Per pair: a shift,
    `lop3` (mask | magic), `sub`, `mul`: 31 instructions for 16 values, no placement."""
    ops: list[Op] = []
    for j in range(8):
        src = "q"
        if j:
            src = f"q{2 * j}"
            ops.append(Op("shr", src, ("q", 2 * j)))
        ops.append(Op("lop3", "c", (src, 0x00030003, "magic2", 0xEA)))  # (c & mask) | magic
        ops.append(Op("hsub", "c", ("c", "z")))  # MAGIC + q - (MAGIC + 2) = q - 2, exact
        ops.append(Op("hmul", "v", ("c", "s")))
        ops.append(Op("unpack", (f"o{bitrev(2 * j, 4)}", f"o{bitrev(2 * j + 1, 4)}"), ("v",)))
    return ops, 16


MANTISSA_BITS = {"f16": 10, "bf16": 7}
EXPONENT_BIAS = {"f16": 15, "bf16": 127}


def _pow2_bits(exponent: int, dtype: str) -> int:
    """16-bit pattern of 2**exponent in `dtype` (a normal number)."""
    return (exponent + EXPONENT_BIAS[dtype]) << MANTISSA_BITS[dtype]


def build_dense2_raw_program(dtype: str) -> tuple[list[Op], int]:
    """Instruction list expanding one dense2 word into its 16 unscaled values q - 2 (the kernel multiplies the
    accumulator by the scale instead: per-row scales once at the end, one-group-per-K-tile scales per tile).

    No shift per pair: the code of pair j sits at bit 2j of its 16-bit lane, so OR-ing it into the mantissa
    of 2**(M - 2j) (M mantissa bits) reads as 2**(M - 2j) + q exactly, and one `sub` of 2**(M - 2j) + 2 leaves
    q - 2. Pairs whose bits run past the mantissa come from a copy shifted by M rounded down to even. f16:
    1 shift + 8 (`lop3`, `sub`) = 17 instructions for 16 values; bf16: 2 shifts, 18 (build_dense2_program,
    which also scales: 31)."""
    mant = MANTISSA_BITS[dtype]
    step = mant - mant % 2  # a shift that keeps codes at even bits
    ops: list[Op] = []
    for j in range(8):
        base = (2 * j // step) * step  # bit where this pair's source copy starts
        src = "q" if base == 0 else f"q{base}"
        if base and not any(op.dst == src for op in ops):
            ops.append(Op("shr", src, ("q", base)))
        pos = 2 * j - base
        magic = _pow2_bits(mant - pos, dtype)
        ops.append(Op("mov", f"k{j}", ((magic | 2 << pos) * 0x00010001,)))  # 2**(M - pos) + 2
        ops.append(Op("mov", f"g{j}", (magic * 0x00010001,)))
        ops.append(Op("lop3", "c", (src, (3 << pos) * 0x00010001, f"g{j}", 0xEA)))  # (c & mask) | magic
        ops.append(Op("hsub", "c", ("c", f"k{j}")))  # 2**(M - pos) + q - (2**(M - pos) + 2) = q - 2, exact
        ops.append(Op("unpack", (f"o{bitrev(2 * j, 4)}", f"o{bitrev(2 * j + 1, 4)}"), ("c",)))
    return ops, 16


def render_ptx(ops: list[Op], dense: int, dtype: str, asym: bool) -> tuple[str, str]:
    """PTX text and constraint string for tl.inline_asm_elementwise (outputs o0.., inputs q, m, s, z[, zq])."""
    inputs = ["q", "m", "s", "z"] + (["zq"] if asym else [])
    operand = {f"o{i}": f"${i}" for i in range(dense)}
    operand.update({name: f"${dense + i}" for i, name in enumerate(inputs)})
    regs = sorted({op.dst for op in ops if isinstance(op.dst, str)} | {"magic2"})
    lines = ["{", ".reg .b32 " + ", ".join(f"%{r}" for r in regs) + ";"]
    lines.append(f"mov.b32 %magic2, {MAGIC[dtype] * 0x00010001};")

    def val(a):
        if isinstance(a, int):
            return str(a & 0xFFFFFFFF)
        return operand.get(a, f"%{a}")

    for op in ops:
        a = [val(x) for x in op.args]
        if op.kind == "mov":
            lines.append(f"mov.b32 %{op.dst}, {a[0]};")
        elif op.kind == "shr":
            lines.append(f"shr.u32 %{op.dst}, {a[0]}, {a[1]};")
        elif op.kind == "lop3":
            lines.append(f"lop3.b32 %{op.dst}, {a[0]}, {a[1]}, {a[2]}, {a[3]};")
        elif op.kind == "prmt":
            lines.append(f"prmt.b32 %{op.dst}, {a[0]}, {a[1]}, {a[2]};")
        elif op.kind in ("hsub", "hmul"):
            name = "sub" if op.kind == "hsub" else "mul"
            suffix = "f16x2" if dtype == "f16" else "bf16x2"
            lines.append(f"{name}.rn.{suffix} %{op.dst}, {a[0]}, {a[1]};")
        elif op.kind == "unpack":
            lo, hi = op.dst
            lines.append(f"mov.b32 {{{operand[lo]}, {operand[hi]}}}, {a[0]};")
        else:
            raise AssertionError(op.kind)
    lines.append("}")
    constraints = ",".join(["=h"] * dense + ["r"] * len(inputs))
    return "\n".join(lines), constraints


# ---------------------------------------------------------------- numpy emulator (CPU tests)


def _lop3(a, b, c, lut):
    out = np.zeros_like(a)
    for idx in range(8):
        if (lut >> idx) & 1:
            ta = a if idx & 4 else ~a
            tb = b if idx & 2 else ~b
            tc = c if idx & 1 else ~c
            out |= ta & tb & tc
    return out


def _prmt(a, b, c):
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
        byte = (src >> (8 * (sel & 7)).astype(np.uint64)) & np.uint64(0xFF)
        sign = np.where((byte & np.uint64(0x80)) != 0, np.uint64(0xFF), np.uint64(0))
        byte = np.where((sel & 8) != 0, sign, byte).astype(np.uint32)
        out |= byte << np.uint32(8 * i)
    return out


def _to_lanes(x, dtype):
    lo, hi = (x & np.uint32(0xFFFF)).astype(np.uint16), (x >> np.uint32(16)).astype(np.uint16)
    if dtype == "f16":
        return lo.view(np.float16).astype(np.float32), hi.view(np.float16).astype(np.float32)
    return (lo.astype(np.uint32) << 16).view(np.float32), (hi.astype(np.uint32) << 16).view(np.float32)


def _from_lanes(lo, hi, dtype):
    def one(v):
        if dtype == "f16":
            return v.astype(np.float16).view(np.uint16).astype(np.uint32)
        u = v.astype(np.float32).view(np.uint32)
        return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) & np.uint32(0xFFFF)

    return one(lo) | (one(hi) << np.uint32(16))


def emulate(ops: list[Op], dense: int, dtype: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run the program on uint32 arrays q, m, s, z[, zq] (same shape); returns uint16 bits [..., dense]."""
    regs = {k: v.astype(np.uint32) for k, v in inputs.items()}
    regs["magic2"] = np.full_like(regs["q"], MAGIC[dtype] * 0x00010001)
    out = np.zeros(regs["q"].shape + (dense,), dtype=np.uint16)

    def val(a):
        return np.full_like(regs["q"], a & 0xFFFFFFFF) if isinstance(a, int) else regs[a]

    for op in ops:
        a = [val(x) for x in op.args]
        if op.kind == "mov":
            regs[op.dst] = a[0]
        elif op.kind == "shr":
            regs[op.dst] = a[0] >> a[1]
        elif op.kind == "lop3":
            regs[op.dst] = _lop3(a[0], a[1], a[2], op.args[3])
        elif op.kind == "prmt":
            regs[op.dst] = _prmt(a[0], a[1], a[2])
        elif op.kind in ("hsub", "hmul"):
            (x0, x1), (y0, y1) = _to_lanes(a[0], dtype), _to_lanes(a[1], dtype)
            f = np.subtract if op.kind == "hsub" else np.multiply
            regs[op.dst] = _from_lanes(f(x0, y0), f(x1, y1), dtype)
        elif op.kind == "unpack":
            lo, hi = (int(o[1:]) for o in op.dst)
            out[..., lo] = (a[0] & np.uint32(0xFFFF)).astype(np.uint16)
            out[..., hi] = (a[0] >> np.uint32(16)).astype(np.uint16)
    return out
