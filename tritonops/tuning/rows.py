"""The one row-tiling rule: tiles of BLOCK_R rows x BLOCK_N columns for the row-wise
reductions (softmax, layer_norm, rms_norm) and the linear epilogue's backward; the heuristic,
the search-space values and rules they share, and the rows x columns shapes they are tuned on."""

import triton

from autotune import Config

ONE_PASS_MAX = {2: 65536, 4: 16384, 8: 8192}  # longest row a tile of the Space holds whole, by itemsize
# Longest row the heuristic holds whole, by itemsize. Compiled for sm90 (Triton 3.6 and 3.9), the
# forwards hold 32768 2-byte columns over 32 warps in 48-63 registers without spilling; at 65536
# columns the fp32 row alone is the 64 registers a thread of 1024 has, and every forward spills.
# (A column count that is not a multiple of 16 loses the 128-bit loads and masks element by
# element: there the norm forwards spill 56-224 B, log_softmax's backward 168-184 B; softmax's
# forward does not.)
WHOLE_ROW_FWD = {2: 32768, 4: 16384, 8: 8192}
# Longest row softmax's and the norms' backward defaults hold whole: with two fp32 tiles alive
# across a row reduction (y and dy; x and dy, plus the weight / bias column sums) they spill at
# 32768 2-byte columns on sm90 (softmax 56-88 B, the norms 1.2-2.2 KB), so they loop beyond 16384.
# log_softmax's backward compiles cleanly at 32768 and takes WHOLE_ROW_FWD.
WHOLE_ROW_BWD = {2: 16384, 4: 16384, 8: 8192}
STRIDED_TILE_MAX = {2: 16384, 4: 16384, 8: 8192}  # elements of a tile of strided rows, by itemsize
# row_tile_config relies on it: a strided tile is never longer than a row the defaults hold whole
assert all(STRIDED_TILE_MAX[k] <= min(WHOLE_ROW_FWD[k], WHOLE_ROW_BWD[k]) for k in STRIDED_TILE_MAX)
LOOP_BLOCK_N = 4096  # chunk of a longer row, swept twice (online softmax)
SHORT_ROW_TILE = 4096  # elements a program aims at when rows are short: several rows per program
STRIDED_ROWS = 32  # rows per program when the reduced dim is not the unit-stride one


def row_tile_config(n_cols: int, n_rows: int, itemsize: int, strided: bool,
                    whole_row_max: dict[int, int]) -> Config:
    """BLOCK_R x BLOCK_N tile for a row-wise reduction (softmax, norms).

    - Unit-stride rows: BLOCK_N = next_pow2(N) (at least 16) while the row fits in one
      tile (whole_row_max[itemsize]: WHOLE_ROW_FWD's 32K 2-byte elements, 16K 4-byte, 8K
      float64; WHOLE_ROW_BWD for the backwards that spill beyond 16K); longer rows loop
      over LOOP_BLOCK_N chunks. Short rows are stacked, BLOCK_R = SHORT_ROW_TILE // BLOCK_N
      (never past next_pow2(n_rows)), so each program moves enough bytes.
    - Strided rows (the reduced dim is not unit-stride, e.g. softmax over dim 1 of
      (B, C, L)): BLOCK_R = 32 neighbouring rows, which are contiguous in memory, so the
      loads coalesce; BLOCK_N fills the rest of STRIDED_TILE_MAX, looping beyond it.
    Warps grow with the tile (row_num_warps); 2 stages only where there is a loop.
    """
    whole_max = whole_row_max[itemsize]
    rows_cap = triton.next_power_of_2(max(n_rows, 1))
    if strided:
        block_r = min(STRIDED_ROWS, rows_cap)
        block_n = min(max(16, triton.next_power_of_2(n_cols)), STRIDED_TILE_MAX[itemsize] // block_r)
    elif n_cols <= whole_max:
        block_n = max(16, triton.next_power_of_2(n_cols))
        block_r = max(1, min(SHORT_ROW_TILE // block_n, rows_cap))
    else:
        block_n, block_r = LOOP_BLOCK_N, 1
    looped = n_cols > block_n
    return Config({"BLOCK_R": block_r, "BLOCK_N": block_n},
                  num_warps=row_num_warps(block_r * block_n), num_stages=2 if looped else 1)


def row_num_warps(tile: int) -> int:
    """Warps for a row-reduction tile of `tile` elements: 4, 8 from 2048, 16 from 8192,
    32 from 32768 (as Liger)."""
    return 4 if tile < 2048 else 8 if tile < 8192 else 16 if tile < 32768 else 32


def epilogue_tile_config(n_rows: int, n_cols: int) -> Config:
    """BLOCK_R x BLOCK_N tile of the linear epilogue's backward (dz = dy * act'(z), and the
    bias gradient's per-program column sums), over a 2-D grid of tiles.

    Not row_tile_config's whole-row tile: the bias gradient is reduced in two stages through
    a (cdiv(R, BLOCK_R), N) buffer of column sums, so tiles are tall (up to 64 rows) to keep
    that buffer small, and narrow (up to 128 columns) so the grid still has many programs.
    """
    block_r = min(64, max(16, triton.next_power_of_2(n_rows)))
    block_n = min(128, max(16, triton.next_power_of_2(n_cols)))
    return Config({"BLOCK_R": block_r, "BLOCK_N": block_n}, num_warps=4, num_stages=1)


def row_tile_rules():
    """Constraints every row-reduction space shares, for a tile of BLOCK_R x BLOCK_N."""

    def fits(config: Config, problem: dict) -> bool:
        """A tile the kernel holds in registers: at most 64 fp32 (32 fp64) accumulator
        values a thread, BLOCK_N within ONE_PASS_MAX (64K 2-byte elements over 32 warps,
        16K 4-byte, 8K float64)."""
        itemsize = problem.get("itemsize", 4)
        tile = config["BLOCK_R"] * config["BLOCK_N"]
        acc_bytes = 8 if itemsize == 8 else 4
        return (16 <= config["BLOCK_N"] <= ONE_PASS_MAX[itemsize]
                and tile * acc_bytes <= 256 * 32 * config.num_warps)

    def useful(config: Config, problem: dict) -> bool:
        """No block past the rows there are; no warp without a row element (small tiles
        may still take 4 warps); pipeline stages only where BLOCK_N loops over a row."""
        tile = config["BLOCK_R"] * config["BLOCK_N"]
        if "ROWS" in problem and config["BLOCK_R"] > triton.next_power_of_2(max(problem["ROWS"], 1)):
            return False
        if 32 * config.num_warps > max(128, tile):
            return False
        looped = "N" in problem and problem["N"] > config["BLOCK_N"]
        return looped or config.num_stages == 1

    return [fits, useful]


ROW_BLOCKS = [1, 2, 4, 8, 16, 32, 64]
COL_BLOCKS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
ROW_WARPS = [1, 2, 4, 8, 16, 32]
ROW_STAGES = [1, 2, 3]


# largest first: under a time cap (`--op-seconds`) the problems that take the most GPU time are tuned first
LLM_ROWS_COLS = [(4096, n) for n in (65536, 32768, 16384, 8192, 4096, 2048, 1024)]
TUNE_DTYPES = ("float16", "bfloat16", "float32", "float64")  # what `autotune tune` accepts for row ops
