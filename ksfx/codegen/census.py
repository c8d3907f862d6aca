"""Static check of a generated kernel: compile it for a GPU with no GPU, count what its SASS does.

``triton.compile`` builds sm_80/sm_90 code on a machine without a driver, and Triton's
wheel carries ``cuobjdump``. What a kernel will do on the GPU is then visible here:
registers and spills (local memory), shared memory, which unit does the products
(``HGMMA`` = wgmma, ``HMMA`` = mma.sync, ``FFMA`` = fp32 FMA) and how wide the global
loads and stores are (``LDG.E.128`` moves 16 bytes, ``LDG.E`` 4 or fewer; ``LDGSTS`` is
cp.async, ``UTMALDG`` TMA).

A launch specialises its arguments, and the census must reproduce that or it lies: an
int argument equal to 1 becomes a constexpr, ints divisible by 16 and PyTorch's
pointers (16-byte aligned) carry a divisibility-16 hint.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import torch

#: Triton's name for each element type of a pointer argument.
POINTER_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}
_OPCODE = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(?:\s+`?\(?0x([0-9a-f]+))?")
_WIDE = re.compile(r"\.(64|128)(\.|$)")


@dataclass(frozen=True)
class Census:
    """What one compiled kernel's SASS does; counts are static instructions, not executions."""

    registers: int
    local_bytes: int  # per-thread local memory (spill space) reported by ptxas
    shared_bytes: int
    ops: dict[str, int] = field(default_factory=dict)
    #: Local-memory instructions inside a loop (between a backward branch and its target).
    loop_spills: int = 0

    def count(self, *prefixes: str) -> int:
        return sum(n for op, n in self.ops.items() if op.startswith(prefixes))

    @property
    def spills(self) -> int:
        """Local-memory instructions: register spills (and stack arrays)."""
        return self.count("LDL", "STL")

    @property
    def global_loads(self) -> int:
        return sum(n for op, n in self.ops.items() if _is_global_load(op))

    @property
    def wide_loads(self) -> int:
        """Global loads moving 8 or 16 bytes a thread, or by TMA."""
        return sum(n for op, n in self.ops.items() if _is_global_load(op) and (_WIDE.search(op) or "TMA" in op))

    @property
    def global_stores(self) -> int:
        return self.count("STG", "UTMASTG")

    @property
    def wide_stores(self) -> int:
        stores = (op for op in self.ops if op.startswith(("STG", "UTMASTG")))
        return sum(self.ops[op] for op in stores if _WIDE.search(op) or "TMA" in op)

    @property
    def wide_load_fraction(self) -> float:
        return self.wide_loads / self.global_loads if self.global_loads else 1.0

    def summary(self) -> dict:
        return {
            "registers": self.registers,
            "spills": self.spills,
            "loop_spills": self.loop_spills,
            "local_bytes": self.local_bytes,
            "shared_bytes": self.shared_bytes,
            "hgmma": self.count("HGMMA"),
            "hmma": self.count("HMMA"),
            "ffma": self.count("FFMA"),
            "global_loads": self.global_loads,
            "wide_loads": self.wide_loads,
            "cp_async": self.count("LDGSTS"),
            "tma": self.count("UTMALDG"),
            "global_stores": self.global_stores,
            "wide_stores": self.wide_stores,
        }


def _is_global_load(op: str) -> bool:
    return (op.startswith("LDG") and not op.startswith("LDGDEPBAR")) or op.startswith("UTMALDG")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def specialise(fn, args: tuple, constexprs: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of a launch of ``fn`` with ``args`` (tensors and ints)."""
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{fn.__name__}: argument {name} = {value!r} is neither a tensor nor an int")
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name in fn.arg_names[len(args) :]:
        if name not in constants:
            raise ValueError(f"{fn.__name__}: no value for the constexpr {name}")
        signature[name] = "constexpr"
    return signature, constants, attrs


def compile_cubin(fn, args: tuple, constexprs: dict, num_warps: int, num_stages: int, capability: int) -> tuple:
    """``(cubin bytes, shared bytes)`` of ``fn`` compiled for ``sm_<capability>`` as a launch would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants, attrs = specialise(fn, args, constexprs)
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return compiled.asm["cubin"], compiled.metadata.shared


def census(cubin: bytes, shared_bytes: int) -> Census:
    """Registers, local memory and the opcode counts of a cubin (``cuobjdump``).

    ``shared_bytes`` comes from the compiler: Triton's shared memory is dynamic, which
    cuobjdump's static count does not see.
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = _run("cuobjdump", "-res-usage", handle.name)
        sass = _run("cuobjdump", "-sass", handle.name)
    registers = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    instructions = [m.groups() for line in sass.splitlines() if (m := _OPCODE.match(line))]
    return Census(
        registers=int(registers.group(1)) if registers else 0,
        local_bytes=int(local.group(1)) if local else 0,
        shared_bytes=shared_bytes,
        ops=dict(sorted(Counter(op for _, op, _ in instructions).items())),
        loop_spills=loop_spills(instructions),
    )


def loop_spills(instructions: list[tuple[str, str, str | None]]) -> int:
    """Local-memory instructions that run once per loop iteration.

    ``instructions`` are ``(address, opcode, branch target or None)`` in hex, in program
    order. A loop is the span from a backward branch's target to the branch. A register
    that ptxas parks in local memory across the main loop (one store before it, one load
    after) costs a program two instructions; a spill inside the loop costs them per trip.
    """
    loops = [
        (int(target, 16), int(address, 16))
        for address, op, target in instructions
        if op.startswith("BRA") and target is not None and int(target, 16) < int(address, 16)
    ]
    return sum(
        any(start <= int(address, 16) <= end for start, end in loops)
        for address, op, _ in instructions
        if op.startswith(("LDL", "STL"))
    )


def _run(tool: str, *args: str) -> str:
    result = subprocess.run([_tool(tool), *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stderr.strip()[:500]}")
    return result.stdout
