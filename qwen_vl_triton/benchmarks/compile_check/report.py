"""Results of the compile check: one row per compiled kernel variant per target, the launches
that produced it, and the verdict (what fails the check)."""

from __future__ import annotations

import dataclasses


def programs_per_sm(registers: int, warps: int, shared: int, shared_per_sm: int, registers_per_sm: int = 65536,
                    threads_per_sm: int = 2048, max_blocks: int = 32) -> int:
    """Resident programs (CTAs) per SM by the CUDA occupancy rules: registers allocated per warp in
    units of 256, at most `threads_per_sm` threads and `max_blocks` blocks, and shared memory per SM
    with 1 KB reserved per block. The limits default to sm_80 / sm_90's."""
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (registers_per_sm // regs_per_warp) // warps
    by_threads = threads_per_sm // (32 * warps)
    by_shared = shared_per_sm // (shared + 1024) if shared else max_blocks
    return min(by_regs, by_threads, by_shared, max_blocks)


@dataclasses.dataclass
class KernelResources:
    """What one compiled kernel needs of the chip. NVIDIA fields are None on Ascend and the other
    way round."""

    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    limit_shared: int | None = None
    warps: int | None = None
    stages: int | None = None
    programs_per_core: int | None = None
    ub_bytes: int | None = None
    limit_ub: int | None = None
    cube: bool | None = None

    def problems(self) -> list[str]:
        """Why this kernel does not fit (empty when it does)."""
        out = []
        if self.spill_stores:
            out.append(f"{self.spill_stores} bytes spill stores")
        if self.shared is not None and self.shared > self.limit_shared:
            out.append(f"shared memory {self.shared} B > {self.limit_shared} B")
        if self.ub_bytes is not None and self.ub_bytes > self.limit_ub:
            out.append(f"UB {self.ub_bytes / 1024:.1f} KB > {self.limit_ub / 1024:.0f} KB")
        return out


@dataclasses.dataclass
class Variant:
    """One compiled kernel (one specialisation) and the launches that compiled or reused it."""

    kernel: str
    constexprs: str
    dtype: str
    resources: KernelResources | None = None
    error: str | None = None
    launches: int = 0
    example: str = ""

    def problems(self) -> list[str]:
        if self.error:
            return [self.error]
        return self.resources.problems() if self.resources else ["no resource report"]


@dataclasses.dataclass
class TargetReport:
    target: str
    backend: str
    variants: list[Variant]
    launches: int
    seconds: float

    def failures(self) -> list[Variant]:
        return [v for v in self.variants if v.problems()]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TargetReport:
        variants = [Variant(**{**v, "resources": KernelResources(**v["resources"]) if v["resources"] else None})
                    for v in d["variants"]]
        return cls(**{**d, "variants": variants})

    def markdown(self) -> str:
        """The standing resource table of this target."""
        lines = [f"# Compile check: {self.target}", "",
                 f"{self.launches} launches of the released checkpoints' shapes compiled through the real "
                 f"launchers into {len(self.variants)} kernel variants in {self.seconds:.0f} s; "
                 f"{len(self.failures())} failing. Written by `make compile-check`.", ""]
        if self.backend == "cuda":
            lines += ["| kernel | constexprs | dtype | launches | registers | spill stores/loads B | stack B | "
                      "shared B | warps | stages | programs/SM | verdict |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| kernel | constexprs | dtype | launches | UB KB (of 192) | cores | verdict |",
                      "|---|---|---|---|---|---|---|"]
        for v in sorted(self.variants, key=lambda v: (v.kernel, v.constexprs, v.dtype)):
            verdict = "; ".join(v.problems()) or "fits"
            r = v.resources or KernelResources()
            head = f"| {v.kernel} | {v.constexprs} | {v.dtype} | {v.launches} (e.g. {v.example}) |"
            if self.backend == "cuda":
                lines.append(f"{head} {_n(r.registers)} | {_n(r.spill_stores)}/{_n(r.spill_loads)} | {_n(r.stack)} | "
                             f"{_n(r.shared)} | {_n(r.warps)} | {_n(r.stages)} | {_n(r.programs_per_core)} | "
                             f"{verdict} |")
            else:
                ub = f"{r.ub_bytes / 1024:.1f}" if r.ub_bytes is not None else "-"
                cores = "-" if r.cube is None else "cube + vector" if r.cube else "vector"
                lines.append(f"{head} {ub} | {cores} | {verdict} |")
        return "\n".join(lines) + "\n"

    def summary(self) -> str:
        """One line per target for the console."""
        fails = self.failures()
        line = (f"{self.target}: {self.launches} launches, {len(self.variants)} kernel variants, "
                f"{len(fails)} failing ({self.seconds:.0f} s)")
        if self.backend == "cuda" and self.variants:
            worst = max((v.resources.registers or 0) for v in self.variants if v.resources) if any(
                v.resources for v in self.variants) else 0
            line += f"; most registers {worst}"
        elif self.variants:
            worst = max(((v.resources.ub_bytes or 0) for v in self.variants if v.resources), default=0)
            line += f"; most UB {worst / 1024:.1f} KB of 192"
        return line


def _n(x: int | None) -> str:
    return "-" if x is None else str(x)
