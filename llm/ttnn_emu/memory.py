"""Memory configs, shard specs, core grids and the per-core L1 budget (reference 0.2)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .types import TILE_SIZE, DataType, Layout, storage_bytes, tile_bytes

# Wormhole L1 per Tensix core: 1464 KiB = 0x16E000 bytes ("1.5MB per Tensix Core" in
# docs.tenstorrent.com/aibs/wormhole/specifications.html; the exact end of L1, 0x16E000, is the
# address tenstorrent/tt-exalens riscv-src/edge_mem_test.cc probes as "past L1" on Wormhole).
WORMHOLE_L1_BYTES_PER_CORE = 0x16E000


class TensorMemoryLayout(enum.Enum):
    """ttnn.TensorMemoryLayout."""

    INTERLEAVED = 0
    HEIGHT_SHARDED = 2
    WIDTH_SHARDED = 3
    BLOCK_SHARDED = 4
    ND_SHARDED = 5


class BufferType(enum.Enum):
    """ttnn.BufferType."""

    DRAM = 0
    L1 = 1
    SYSTEM_MEMORY = 2
    L1_SMALL = 3
    TRACE = 4


class ShardOrientation(enum.Enum):
    """ttnn.ShardOrientation."""

    ROW_MAJOR = 0
    COL_MAJOR = 1


class ShardStrategy(enum.Enum):
    """ttnn.ShardStrategy for create_sharded_memory_config."""

    HEIGHT = 0
    WIDTH = 1
    BLOCK = 2


@dataclass(frozen=True)
class CoreCoord:
    """ttnn.CoreCoord(x, y): positional-only, as in ttnn 0.81.1."""

    x: int
    y: int

    def __init__(self, x, y, /):
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)


@dataclass(frozen=True)
class CoreRange:
    """ttnn.CoreRange(start, end), both corners inclusive."""

    start: CoreCoord
    end: CoreCoord

    def __post_init__(self):
        if self.end.x < self.start.x or self.end.y < self.start.y:
            raise RuntimeError(f"Invalid core range {self.start}..{self.end}")

    def grid_size(self) -> CoreCoord:
        """Extent (x, y) of the range."""
        return CoreCoord(self.end.x - self.start.x + 1, self.end.y - self.start.y + 1)

    def num_cores(self) -> int:
        """Number of cores in the range."""
        g = self.grid_size()
        return g.x * g.y

    def cores(self) -> list[CoreCoord]:
        """Cores in row-major order (y outer, x inner)."""
        return [
            CoreCoord(x, y)
            for y in range(self.start.y, self.end.y + 1)
            for x in range(self.start.x, self.end.x + 1)
        ]


class CoreRangeSet:
    """ttnn.CoreRangeSet({ranges}); ranges must not overlap."""

    def __init__(self, core_ranges):
        self._ranges = tuple(sorted(core_ranges, key=lambda r: (r.start.y, r.start.x)))
        seen: set[CoreCoord] = set()
        for r in self._ranges:
            for c in r.cores():
                if c in seen:
                    raise RuntimeError(f"CoreRangeSet ranges overlap at {c}")
                seen.add(c)

    def ranges(self) -> tuple[CoreRange, ...]:
        """The ranges of the set."""
        return self._ranges

    def num_cores(self) -> int:
        """Total number of cores."""
        return sum(r.num_cores() for r in self._ranges)

    def bounding_box(self) -> CoreRange:
        """Smallest range holding every core."""
        xs = [r.start.x for r in self._ranges] + [r.end.x for r in self._ranges]
        ys = [r.start.y for r in self._ranges] + [r.end.y for r in self._ranges]
        return CoreRange(CoreCoord(min(xs), min(ys)), CoreCoord(max(xs), max(ys)))

    def cores(self, orientation: ShardOrientation = ShardOrientation.ROW_MAJOR) -> list[CoreCoord]:
        """All cores, row-major (or column-major) over the bounding box order."""
        allc = {c for r in self._ranges for c in r.cores()}
        if orientation == ShardOrientation.ROW_MAJOR:
            return sorted(allc, key=lambda c: (c.y, c.x))
        return sorted(allc, key=lambda c: (c.x, c.y))

    def __eq__(self, other):
        return isinstance(other, CoreRangeSet) and set(self._ranges) == set(other._ranges)

    def __hash__(self):
        return hash(frozenset(self._ranges))

    def __repr__(self):
        return f"CoreRangeSet({list(self._ranges)})"


@dataclass(frozen=True, kw_only=True)
class CoreGrid:
    """ttnn.CoreGrid(x=, y=): keyword-only, as in ttnn 0.81.1."""

    x: int
    y: int

    @property
    def num_cores(self) -> int:
        """x * y."""
        return self.x * self.y


def grid_to_corerangeset(grid: CoreGrid) -> CoreRangeSet:
    """The rectangle (0,0)..(x-1,y-1) as a CoreRangeSet."""
    return CoreRangeSet({CoreRange(CoreCoord(0, 0), CoreCoord(grid.x - 1, grid.y - 1))})


def num_cores_to_corerangeset(target_num_cores, grid_size, row_wise: bool = False) -> CoreRangeSet:
    """ttnn.num_cores_to_corerangeset: the first n cores of a grid, row- or column-wise."""
    gx, gy = (grid_size.x, grid_size.y)
    if target_num_cores > gx * gy or target_num_cores < 1:
        raise RuntimeError(f"Cannot take {target_num_cores} cores from a {gx}x{gy} grid")
    ranges = set()
    if row_wise:
        full, rem = divmod(target_num_cores, gx)
        if full:
            ranges.add(CoreRange(CoreCoord(0, 0), CoreCoord(gx - 1, full - 1)))
        if rem:
            ranges.add(CoreRange(CoreCoord(0, full), CoreCoord(rem - 1, full)))
    else:
        full, rem = divmod(target_num_cores, gy)
        if full:
            ranges.add(CoreRange(CoreCoord(0, 0), CoreCoord(full - 1, gy - 1)))
        if rem:
            ranges.add(CoreRange(CoreCoord(full, 0), CoreCoord(full, rem - 1)))
    return CoreRangeSet(ranges)


@dataclass(frozen=True)
class ShardSpec:
    """ttnn.ShardSpec(grid, shard_shape, shard_orientation), all required as in ttnn 0.81.1."""

    grid: CoreRangeSet
    shape: tuple
    orientation: ShardOrientation = ShardOrientation.ROW_MAJOR

    def __init__(self, grid, shard_shape, shard_orientation):
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "shape", tuple(int(s) for s in shard_shape))
        object.__setattr__(self, "orientation", shard_orientation)
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise RuntimeError(f"Shard shape must be 2 positive ints, got {shard_shape}")

    def num_cores(self) -> int:
        """Cores in the shard grid."""
        return self.grid.num_cores()


@dataclass(frozen=True)
class MemoryConfig:
    """ttnn.MemoryConfig(memory_layout, buffer_type, shard_spec)."""

    memory_layout: TensorMemoryLayout = TensorMemoryLayout.INTERLEAVED
    buffer_type: BufferType = BufferType.DRAM
    shard_spec: ShardSpec | None = field(default=None)

    def is_sharded(self) -> bool:
        """True for height/width/block sharding."""
        return self.memory_layout != TensorMemoryLayout.INTERLEAVED


DRAM_MEMORY_CONFIG = MemoryConfig(TensorMemoryLayout.INTERLEAVED, BufferType.DRAM)
L1_MEMORY_CONFIG = MemoryConfig(TensorMemoryLayout.INTERLEAVED, BufferType.L1)
L1_HEIGHT_SHARDED_MEMORY_CONFIG = MemoryConfig(TensorMemoryLayout.HEIGHT_SHARDED, BufferType.L1)
L1_WIDTH_SHARDED_MEMORY_CONFIG = MemoryConfig(TensorMemoryLayout.WIDTH_SHARDED, BufferType.L1)
L1_BLOCK_SHARDED_MEMORY_CONFIG = MemoryConfig(TensorMemoryLayout.BLOCK_SHARDED, BufferType.L1)

_STRATEGY_LAYOUT = {
    ShardStrategy.HEIGHT: TensorMemoryLayout.HEIGHT_SHARDED,
    ShardStrategy.WIDTH: TensorMemoryLayout.WIDTH_SHARDED,
    ShardStrategy.BLOCK: TensorMemoryLayout.BLOCK_SHARDED,
}


def create_sharded_memory_config(
    shape,
    core_grid,
    strategy: ShardStrategy,
    orientation: ShardOrientation | None = None,
    use_height_and_width_as_shard_shape: bool = False,
) -> MemoryConfig:
    """ttnn.create_sharded_memory_config (reference 0.2): an L1 sharded config for `shape`."""
    orientation = orientation or ShardOrientation.ROW_MAJOR
    if isinstance(core_grid, CoreRangeSet):
        if not use_height_and_width_as_shard_shape:
            raise RuntimeError(
                "CoreRangeSet core_grid requires use_height_and_width_as_shard_shape=True"
            )
        grid_set = core_grid
        box = core_grid.bounding_box().grid_size()
        grid = CoreGrid(x=box.x, y=box.y)
    else:
        grid = core_grid
        grid_set = grid_to_corerangeset(core_grid)
    shape = tuple(shape)
    if use_height_and_width_as_shard_shape:
        shard = (shape[-2], shape[-1])
    else:
        height = math.prod(shape[:-1])  # tensor viewed as [prod(batch)*H, W]
        width = shape[-1]
        ncores = grid_set.num_cores()
        if strategy == ShardStrategy.HEIGHT:
            if height % ncores:
                raise RuntimeError("Invalid sharding core_grid")
            shard = (height // ncores, width)
        elif strategy == ShardStrategy.WIDTH:
            if width % ncores:
                raise RuntimeError("Invalid sharding core_grid")
            shard = (height, width // ncores)
        else:
            rows, cols = (grid.y, grid.x)
            if orientation == ShardOrientation.COL_MAJOR:
                rows, cols = cols, rows
            if height % rows or width % cols:
                raise RuntimeError("Invalid sharding core_grid")
            shard = (height // rows, width // cols)
    spec = ShardSpec(grid_set, shard, orientation)
    return MemoryConfig(_STRATEGY_LAYOUT[strategy], BufferType.L1, spec)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def shard_grid_extent(spec: ShardSpec) -> tuple[int, int]:
    """(shard rows, shard cols) available on a block-sharded grid, honouring orientation."""
    box = spec.grid.bounding_box().grid_size()
    if spec.orientation == ShardOrientation.ROW_MAJOR:
        return box.y, box.x
    return box.x, box.y


def _worker_grid_cores(worker_cores) -> list[CoreCoord]:
    """The cores of the compute grid: a CoreCoord grid size, or a core count laid out on the
    8-column Wormhole grid (MeshDevice.compute_with_storage_grid_size is 8x8)."""
    if isinstance(worker_cores, (CoreCoord, CoreGrid)):
        gx, gy = worker_cores.x, worker_cores.y
        return [CoreCoord(x, y) for y in range(gy) for x in range(gx)]
    cols = min(int(worker_cores), 8)
    return [CoreCoord(i % cols, i // cols) for i in range(int(worker_cores))]


def validate_and_place(
    padded_shape, dtype: DataType, layout: Layout, memory_config: MemoryConfig, worker_cores
) -> dict:
    """Check that `memory_config` is legal for the tensor; return {core: bytes} of L1 it takes.

    DRAM buffers return {}. L1-interleaved buffers take ceil(pages / n_cores) * page_size on
    every core of the compute grid (`worker_cores`: a core count or a grid size); pages are
    tiles (TILE) or rows (ROW_MAJOR), dealt round-robin over the cores. Sharded L1 buffers
    take one shard on each core of their grid; both land in the same per-core ledger. Raises
    RuntimeError for shard specs that are missing, not tile aligned, or that do not cover the
    tensor with the grid they name.
    """
    padded_shape = tuple(padded_shape)
    if not memory_config.is_sharded():
        if memory_config.buffer_type == BufferType.L1:
            if layout == Layout.TILE:
                page_bytes = tile_bytes(dtype)
                pages = math.prod(padded_shape) // (TILE_SIZE * TILE_SIZE)
            else:
                page_bytes = storage_bytes(padded_shape[-1] if padded_shape else 1, dtype)
                pages = math.prod(padded_shape[:-1]) if len(padded_shape) > 1 else 1
            cores = _worker_grid_cores(worker_cores)
            per_core = _ceil_div(pages, len(cores)) * page_bytes
            return {c: per_core for c in cores}
        return {}
    spec = memory_config.shard_spec
    if spec is None:
        raise RuntimeError(
            f"Sharded memory config {memory_config.memory_layout.name} needs a shard_spec here"
        )
    if memory_config.memory_layout == TensorMemoryLayout.ND_SHARDED:
        raise RuntimeError("ttnn_emu: ND_SHARDED memory layout is not supported by the emulator")
    rows = math.prod(padded_shape[:-1]) if len(padded_shape) > 1 else 1
    width = padded_shape[-1]
    sh, sw = spec.shape
    if layout == Layout.TILE and (sh % TILE_SIZE or sw % TILE_SIZE):
        raise RuntimeError(f"Shard shape {spec.shape} must be a multiple of the 32x32 tile")
    ncores = spec.num_cores()
    ml = memory_config.memory_layout
    if ml == TensorMemoryLayout.HEIGHT_SHARDED:
        if sw != width:
            raise RuntimeError(f"Height sharding: shard width {sw} must equal tensor width {width}")
        if _ceil_div(rows, sh) > ncores:
            raise RuntimeError(
                f"Height sharding: {rows} rows need {_ceil_div(rows, sh)} shards of {sh} rows,"
                f" more than the {ncores} cores of the shard grid"
            )
    elif ml == TensorMemoryLayout.WIDTH_SHARDED:
        if sh != rows:
            raise RuntimeError(f"Width sharding: shard height {sh} must equal tensor height {rows}")
        if _ceil_div(width, sw) > ncores:
            raise RuntimeError(
                f"Width sharding: width {width} needs {_ceil_div(width, sw)} shards of {sw},"
                f" more than the {ncores} cores of the shard grid"
            )
    else:
        if len(spec.grid.ranges()) != 1:
            raise RuntimeError("Block sharding needs a single rectangular core range")
        grid_rows, grid_cols = shard_grid_extent(spec)
        if _ceil_div(rows, sh) > grid_rows or _ceil_div(width, sw) > grid_cols:
            raise RuntimeError(
                f"Block sharding: shard {spec.shape} on a {grid_rows}x{grid_cols} grid does not"
                f" cover tensor [{rows}, {width}]"
            )
    if memory_config.buffer_type != BufferType.L1:
        return {}
    shard_bytes = storage_bytes(sh * sw, dtype)
    return {c: shard_bytes for c in spec.grid.cores(spec.orientation)}
