"""Per-device launch plans: what a launcher picks on a given chip, read from a file committed
per device (`kernels/plans/<arch>.json`), as vLLM keeps its fused-MoE configs.

An attention plan says, for one attention op (OPS) at one head dim and a range of query tokens,
the query-tile rows, the keys scored at once and (CUDA) num_warps / num_stages. A row plan says,
for one row op (ROW_OPS: the norms and silu_and_mul) at one row width and a range of rows, the
elements a program's tile holds, the programs per core and (CUDA) num_warps. `benchmarks/tune.py`
writes the files on the device: it times every candidate the compile check passes (no spills,
Ascend's UB within 192 KB) at the released shapes and keeps the fastest per bucket. A device
without a file, or a shape no entry covers, takes the Target's own defaults (kernels/target.py).
Nothing is tuned at serving time.

File format:

    {"arch": "sm_90", "device": "NVIDIA H100 80GB HBM3", "source": "benchmarks/tune.py ...",
     "plans": {"varlen": [{"head_dim": 80, "max_tokens": 64, "query_rows": 64, "key_tile": 64,
                           "num_warps": 4, "num_stages": 2}, ...],
               "paged_prefill": [...], "paged_decode": [...],
               "rms_norm": [{"width": 3584, "max_tokens": 16, "tile_elements": 4096,
                             "programs_per_core": 4, "num_warps": 4}, ...], ...}}

An op's entries for one size (an attention op's head dim, a row op's width: the norm's hidden
size, silu_and_mul's N) are buckets by `max_tokens`, the op's tokens (varlen: the longest
sequence; paged prefill: the step's tokens T; paged decode: the batch B; row ops: the rows): a
launch takes the entry with the smallest max_tokens >= its tokens, or the largest one past the
last bucket.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

PLAN_DIR = Path(__file__).parent / "plans"
OPS = ("varlen", "paged_prefill", "paged_decode")  # attention ops (AttentionPlan)
ROW_OPS = ("rms_norm", "add_rms_norm", "layer_norm", "silu_and_mul")  # row ops (RowPlan)
TILE_SIZES = (16, 32, 64, 128)  # query_rows and key_tile: powers of two tl.dot takes (>= 16)
ROW_TILES = (1024, 2048, 4096, 8192, 16384)  # tile_elements of a row plan
PROGRAMS_PER_CORE = (1, 2, 4, 8, 16)
WARPS = (1, 2, 4, 8, 16)
STAGES = (1, 2, 3, 4, 5)
SIZE_KEY = {**dict.fromkeys(OPS, "head_dim"), **dict.fromkeys(ROW_OPS, "width")}  # an entry's size in the file


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """One attention launch's tiles: query_rows (rows of the query tile: queries x padded heads of
    a GQA group), key_tile (keys scored at once; a larger cache block is walked in pieces) and,
    on CUDA, num_warps / num_stages (None: the Target's rule, Target.attention_options)."""

    query_rows: int
    key_tile: int
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("query_rows", self.query_rows, TILE_SIZES),
                                     ("key_tile", self.key_tile, TILE_SIZES),
                                     ("num_warps", self.num_warps, (None, *WARPS)),
                                     ("num_stages", self.num_stages, (None, *STAGES))):
            if value not in allowed:
                raise ValueError(f"attention plan {name}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One row-op launch: tile_elements (a program's tile: narrow rows are stacked up to it,
    target.rows_per_tile), programs_per_core (persistent programs per vector core / SM) and, on
    CUDA, num_warps (None: Target.row_warps' rule)."""

    tile_elements: int
    programs_per_core: int
    num_warps: int | None = None

    def __post_init__(self) -> None:
        for name, value, allowed in (("tile_elements", self.tile_elements, ROW_TILES),
                                     ("programs_per_core", self.programs_per_core, PROGRAMS_PER_CORE),
                                     ("num_warps", self.num_warps, (None, *WARPS))):
            if value not in allowed:
                raise ValueError(f"row plan {name}={value!r} is not one of {allowed}")


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """A plan for one op at one size (an attention op's head dim, a row op's row width), for
    launches of up to max_tokens tokens (query tokens, or rows)."""

    op: str
    size: int
    max_tokens: int
    plan: AttentionPlan | RowPlan


@dataclasses.dataclass(frozen=True)
class PlanTable:
    """The plans of one device (empty: every launch takes the Target's defaults)."""

    entries: tuple[PlanEntry, ...] = ()
    source: str = ""  # the file it was read from ("" when built in code)

    def lookup(self, op: str, size: int, tokens: int) -> PlanEntry | None:
        """The entry for a launch of `op` at `size` (head dim or row width) over `tokens` tokens
        (query tokens or rows), or None."""
        mine = [e for e in self.entries if e.op == op and e.size == size]
        if not mine:
            return None
        return next((e for e in mine if e.max_tokens >= tokens), mine[-1])

    def to_json(self, arch: str, device: str, source: str) -> dict:
        """The file format above."""
        plans: dict[str, list[dict]] = {}
        for e in self.entries:
            fields = {k: v for k, v in dataclasses.asdict(e.plan).items() if v is not None}
            plans.setdefault(e.op, []).append({SIZE_KEY[e.op]: e.size, "max_tokens": e.max_tokens, **fields})
        return {"arch": arch, "device": device, "source": source, "plans": plans}


def parse_plans(data: dict, source: str) -> PlanTable:
    """A PlanTable from the file format above; a ValueError naming `source` and the entry for
    anything else (unknown op or key, a value outside TILE_SIZES / ROW_TILES / PROGRAMS_PER_CORE /
    WARPS / STAGES, two entries for one bucket)."""
    entries = []
    for op, rows in (data.get("plans") or {}).items():
        if op not in SIZE_KEY:
            raise ValueError(f"{source}: unknown op {op!r} (known: {', '.join(SIZE_KEY)})")
        kind = AttentionPlan if op in OPS else RowPlan
        fields = [f.name for f in dataclasses.fields(kind)]
        for i, row in enumerate(rows):
            where = f"{source}: plans.{op}[{i}]"
            unknown = set(row) - {SIZE_KEY[op], "max_tokens", *fields}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            try:
                plan = kind(**{name: row[name] for name in fields if name in row})
                entry = PlanEntry(op, int(row[SIZE_KEY[op]]), int(row["max_tokens"]), plan)
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{where}: {e}") from None
            entries.append(entry)
    entries.sort(key=lambda e: (e.op, e.size, e.max_tokens))
    for a, b in zip(entries, entries[1:], strict=False):
        if (a.op, a.size, a.max_tokens) == (b.op, b.size, b.max_tokens):
            size = SIZE_KEY[a.op].replace("_", " ")
            raise ValueError(f"{source}: two {a.op} plans for {size} {a.size} up to {a.max_tokens} tokens")
    return PlanTable(tuple(entries), source)


@functools.cache
def committed_plans(arch: str) -> PlanTable:
    """The plans committed for `arch` (kernels/plans/<arch>.json), or an empty table."""
    path = PLAN_DIR / f"{arch}.json"
    if not path.is_file():
        return PlanTable()
    data = json.loads(path.read_text())
    if data.get("arch") != arch:
        raise ValueError(f"{path}: its arch is {data.get('arch')!r}, not {arch!r}")
    return parse_plans(data, str(path))
