"""Triton kernels of the kNN entropy: tiled selection, exact pair distances, pair-gradient scatter.

Shapes follow pec_kernels.knn.backends: x (G, n, D) and candidates (Gc, m, D) with Gc = G or 1 (a bank
shared by all groups, addressed with a group stride of 0); every last dimension is contiguous.
Row offsets are computed in int64 so that G·n·D beyond 2³¹ elements is addressed correctly.
Optional per-row inputs (knn_entropy's `valid` mask and the cosine metric): a candidate mask (G|1, m)
bool (HAS_VALID: masked candidates are never chosen ahead of a valid one) and row multipliers (HAS_SCALE:
x (G, n) and candidates (G|1, m) float32, applied as the rows are loaded, so the normalised rows are
never written to memory); both laid out like the squared norms.
"""
import triton
import triton.language as tl

_INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)
_INF_BITS = tl.constexpr(0x7F800000)  # float32 +inf as int32 bits
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def row_sq_norm_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, num_rows, n, dim, stride_shift_g,
                       HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """out[r] = ‖s_r·x_r − shift_g‖² in float32 for the rows r of a contiguous (G, n, D) x (g = r // n),
    computed in registers: no (G, n, D) temporary. shift (Gs, 1, D) float32, group stride 0 when shared;
    s_r = scale[r] with HAS_SCALE, else 1."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if HAS_SCALE:
        row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
    for d0 in range(0, dim, BLOCK_D):
        mask = row_ok[:, None] & (d0 + dims < dim)[None, :]
        v = tl.load(x_ptr + rows[:, None] * dim + d0 + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            v = v * row_scale[:, None]
        if HAS_SHIFT:
            shift = tl.load(shift_ptr + (rows // n)[:, None] * stride_shift_g + d0 + dims[None, :], mask=mask,
                            other=0.0)
            v = v - shift
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + rows, acc, mask=row_ok)


@triton.jit
def _scaled(t, row_scale, HAS_SCALE: tl.constexpr):
    """The tile t (rows, D block) with row r multiplied by row_scale[r] in float32, back in t's dtype
    (the tl.dot operand type); t itself without HAS_SCALE."""
    if HAS_SCALE:
        t = (t.to(tl.float32) * row_scale[:, None]).to(t.dtype)
    return t


@triton.jit
def _squared_distances(x_base, c_base, x_sq, x_scale, c_sq_base, c_scale_base, c_valid_base, shift_base, rows,
                       row_ok, start, m, dim, stride_cn,
                       SELF: tl.constexpr, UPCAST: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                       HAS_VALID: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 d² = ‖x‖² + ‖c‖² − 2·x·c against candidates start + [0, BLOCK_N);
    +inf where the candidate is out of range, masked (HAS_VALID), is the row itself (SELF), or the row
    is out of range. With HAS_SHIFT (float32 inputs), x and c are centred by the group's shift as they
    are loaded, so that the expanded form loses less precision far from the origin (no centred copy in
    memory); with HAS_SCALE they are scaled by their rows' multipliers first (x_scale: this program's)."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < m
    dims = tl.arange(0, BLOCK_D)
    c_rows = c_base + cols.to(tl.int64)[:, None] * stride_cn
    if HAS_SCALE:
        c_scale = tl.load(c_scale_base + cols, mask=col_ok, other=0.0)
    else:
        c_scale = x_scale
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d_ok = d0 + dims < dim
        a = tl.load(x_base + d0 + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(c_rows + d0 + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        a = _scaled(a, x_scale, HAS_SCALE)
        b = _scaled(b, c_scale, HAS_SCALE)
        if HAS_SHIFT:  # beyond D the shift loads as 0, so padded columns stay 0
            shift = tl.load(shift_base + d0 + dims, mask=d_ok, other=0.0)
            a = a - shift[None, :]
            b = b - shift[None, :]
        dot = tl.dot(a, tl.trans(b), dot, input_precision=INPUT_PRECISION)
    return _finish(dot, x_sq, c_sq_base, c_valid_base, rows, row_ok, cols, col_ok, SELF, HAS_VALID)


@triton.jit
def _squared_distances_resident(a_tile, c_base, x_sq, c_sq_base, c_scale_base, c_valid_base, rows, row_ok, start,
                                m, dim, stride_cn, SELF: tl.constexpr, UPCAST: tl.constexpr,
                                HAS_SCALE: tl.constexpr, HAS_VALID: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                                BLOCK_N: tl.constexpr, RESIDENT_D: tl.constexpr):
    """_squared_distances with the query tile already on chip (and scaled): a_tile (BLOCK_M, RESIDENT_D),
    loaded once per program, so each candidate tile costs one load of its own rows and one tl.dot over
    all of D."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < m
    dims = tl.arange(0, RESIDENT_D)
    b = tl.load(c_base + cols.to(tl.int64)[:, None] * stride_cn + dims[None, :],
                mask=col_ok[:, None] & (dims < dim)[None, :], other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
    if HAS_SCALE:
        b = _scaled(b, tl.load(c_scale_base + cols, mask=col_ok, other=0.0), HAS_SCALE)
    dot = tl.dot(a_tile, tl.trans(b), input_precision=INPUT_PRECISION)
    return _finish(dot, x_sq, c_sq_base, c_valid_base, rows, row_ok, cols, col_ok, SELF, HAS_VALID)


@triton.jit
def _finish(dot, x_sq, c_sq_base, c_valid_base, rows, row_ok, cols, col_ok, SELF: tl.constexpr,
            HAS_VALID: tl.constexpr):
    """d² = ‖x‖² + ‖c‖² − 2·x·c from the tile's dot products, +inf where excluded (see _squared_distances)."""
    c_sq = tl.load(c_sq_base + cols, mask=col_ok, other=0.0)
    sq = x_sq[:, None] + c_sq[None, :] - 2.0 * dot
    # Round-off can make d² negative (this also turns -0.0 into +0.0); capping at the largest float
    # keeps an overflowed d² apart from the +inf that marks excluded candidates.
    sq = tl.where(sq > 0.0, tl.minimum(sq, _FLOAT32_MAX), 0.0)
    excluded = (~col_ok)[None, :] | (~row_ok)[:, None]
    if HAS_VALID:
        excluded = excluded | (tl.load(c_valid_base + cols, mask=col_ok, other=0) == 0)[None, :]
    if SELF:
        excluded = excluded | (rows[:, None] == cols[None, :])
    return tl.where(excluded, float("inf"), sq)


@triton.jit
def _keys(sq, start, BLOCK_N: tl.constexpr):
    """Packed int64 keys (float bits of d² << 32 | column): d² ≥ 0 orders like its bits, so a smaller
    key is a nearer candidate, and equal distances order by column."""
    cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
    return (sq.to(tl.int32, bitcast=True).to(tl.int64) << 32) | cols[None, :]


@triton.jit
def knn_select_kernel(
    x_ptr, c_ptr, x_sq_ptr, c_sq_ptr, shift_ptr, x_scale_ptr, c_scale_ptr, c_valid_ptr, out_ptr,
    n, m, dim,
    stride_xg, stride_xn, stride_cg, stride_cn, stride_sqg, stride_csqg, stride_shift_g,
    K: tl.constexpr, KP: tl.constexpr, SELF: tl.constexpr, UPCAST: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_VALID: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT_D: tl.constexpr,
):
    """Per program: BLOCK_M query rows of one group (program_id(0) = group · row-blocks + row-block,
    flattened because grid axes 1 and 2 stop at 65535); writes the packed keys (see _keys) of the rows'
    K nearest candidates to out (G, n, K), in no particular order: the caller sorts them.

    Each row keeps its best K keys in KP ≥ K slots (KP a power of 2); the KP − K padding slots hold
    negative keys, so they are never the worst, and empty slots hold distinct +inf keys whose columns
    0..K-1 are in range (K ≤ m): a row with fewer than K candidates (masked ones excluded, or non-finite
    distances) keeps some of them, and its caller discards it. Most
    candidates are rejected by one float compare against the row's worst kept d²; survivors are
    inserted one per row and iteration, nearest first, each replacing the row's worst key. No sort
    network: tl.sort/tl.topk cost far more than these few reductions, on GPUs and in the interpreter.

    RESIDENT_D > 0 (16-bit inputs with D <= RESIDENT_D <= 512, no shift): the program's query tile is
    loaded once and kept on chip across all candidate tiles; otherwise D is streamed in BLOCK_D blocks
    for every candidate tile.
    """
    row_blocks = tl.cdiv(n, BLOCK_M)
    group = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    slots = tl.arange(0, KP)
    x_base = x_ptr + group * stride_xg + rows.to(tl.int64)[:, None] * stride_xn
    c_base = c_ptr + group * stride_cg
    c_sq_base = c_sq_ptr + group * stride_csqg
    c_scale_base = c_scale_ptr + group * stride_csqg
    c_valid_base = c_valid_ptr + group * stride_csqg
    shift_base = shift_ptr + group * stride_shift_g
    x_sq = tl.load(x_sq_ptr + group * stride_sqg + rows, mask=row_ok, other=0.0)
    x_scale = x_sq
    if HAS_SCALE:
        x_scale = tl.load(x_scale_ptr + group * stride_sqg + rows, mask=row_ok, other=0.0)

    empty = (tl.full((KP,), _INF_BITS, tl.int64) << 32) | slots.to(tl.int64)
    best = tl.where(slots < K, empty, -1 - slots.to(tl.int64))
    best = tl.broadcast_to(best[None, :], (BLOCK_M, KP))
    worst = tl.max(best, axis=1)
    if RESIDENT_D > 0:
        res_dims = tl.arange(0, RESIDENT_D)
        a_tile = tl.load(x_base + res_dims[None, :], mask=row_ok[:, None] & (res_dims < dim)[None, :], other=0.0)
        if UPCAST:
            a_tile = a_tile.to(tl.float32)
        a_tile = _scaled(a_tile, x_scale, HAS_SCALE)

    for start in range(0, m, BLOCK_N):
        if RESIDENT_D > 0:
            sq = _squared_distances_resident(a_tile, c_base, x_sq, c_sq_base, c_scale_base, c_valid_base, rows,
                                             row_ok, start, m, dim, stride_cn, SELF, UPCAST, HAS_SCALE, HAS_VALID,
                                             INPUT_PRECISION, BLOCK_N, RESIDENT_D)
        else:
            sq = _squared_distances(x_base, c_base, x_sq, x_scale, c_sq_base, c_scale_base, c_valid_base,
                                    shift_base, rows, row_ok, start, m, dim, stride_cn, SELF, UPCAST, HAS_SHIFT,
                                    HAS_SCALE, HAS_VALID, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        # The worst kept d² is a strict threshold: a candidate at an equal d² has a larger column than
        # every kept one, since columns are visited in increasing order and inserted nearest first.
        threshold = (worst >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        passing = sq < threshold[:, None]
        num_passing = tl.sum(passing.to(tl.int32))
        if num_passing > 0:
            keys = _keys(sq, start, BLOCK_N)
            while num_passing > 0:
                nearest = tl.min(tl.where(passing, keys, _INT64_MAX), axis=1)
                take = nearest < worst
                best = tl.where((best == worst[:, None]) & take[:, None], nearest[:, None], best)
                worst = tl.max(best, axis=1)
                passing = passing & (keys > nearest[:, None]) & (keys < worst[:, None])
                num_passing = tl.sum(passing.to(tl.int32))

    # Only a real slot is ever the worst, so the padding never moves from slots K..KP-1.
    out = out_ptr + (group * n + rows.to(tl.int64))[:, None] * K + slots[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slots < K)[None, :])


@triton.jit
def pair_distance_kernel(
    x_ptr, c_ptr, idx_ptr, x_scale_ptr, c_scale_ptr, out_ptr,
    n, dim, num_pairs,
    stride_xg, stride_xn, stride_cg, stride_cn, stride_c_scale_g,
    K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[p] = ‖s_i·x_i − s_j·c_j‖ in float32 for the flattened pairs p = (g, i, slot), j = idx[p]
    (s = 1 without HAS_SCALE)."""
    pairs = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pairs < num_pairs
    group = pairs // (n * K)
    row = (pairs // K) % n
    col = tl.load(idx_ptr + pairs, mask=ok, other=0)
    x_rows = x_ptr + group * stride_xg + row * stride_xn
    c_rows = c_ptr + group * stride_cg + col * stride_cn
    if HAS_SCALE:
        a_scale = tl.load(x_scale_ptr + pairs // K, mask=ok, other=0.0)
        b_scale = tl.load(c_scale_ptr + group * stride_c_scale_g + col, mask=ok, other=0.0)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        mask = ok[:, None] & (d0 + dims < dim)[None, :]
        a = tl.load(x_rows[:, None] + d0 + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(c_rows[:, None] + d0 + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            a = a * a_scale[:, None]
            b = b * b_scale[:, None]
        diff = a - b
        acc += tl.sum(diff * diff, axis=1)
    tl.store(out_ptr + pairs, tl.sqrt(acc), mask=ok)


@triton.jit
def pair_grad_kernel(
    x_ptr, c_ptr, idx_ptr, coef_ptr, x_scale_ptr, c_scale_ptr, grad_x_ptr, grad_c_ptr,
    n, dim,
    stride_xg, stride_xn, stride_cg, stride_cn, stride_grad_cg, stride_c_scale_g,
    K: tl.constexpr, SELF: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For BLOCK_R rows (program_id(0) = group · row-blocks + row-block) × BLOCK_D features
    (program_id(1)) of one group: grad_x_i += Σ_j coef_ij (x_i − c_j) and
    grad_c_j −= coef_ij (x_i − c_j) with float32 atomics (pairs with coef 0 are skipped); with
    HAS_SCALE, x_i and c_j are the rows times their multipliers (the gradients are in the scaled rows).

    grad_x / grad_c are contiguous float32 with the shapes of x / the candidates (stride_grad_cg is 0
    for a shared bank, like stride_cg). In self mode they are
    the same buffer, zero-filled, and the row side is atomic too; otherwise each program owns its
    rows' slice of grad_x and stores it.
    """
    row_blocks = tl.cdiv(n, BLOCK_R)
    group = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dims < dim
    tile_ok = row_ok[:, None] & d_ok[None, :]
    pair_rows = group * n + rows.to(tl.int64)
    x_tile = tl.load(x_ptr + group * stride_xg + rows.to(tl.int64)[:, None] * stride_xn + dims[None, :],
                     mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x_tile = x_tile * tl.load(x_scale_ptr + pair_rows, mask=row_ok, other=0.0)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    c_group = c_ptr + group * stride_cg
    grad_c_group = grad_c_ptr + group * stride_grad_cg
    for slot in range(K):
        col = tl.load(idx_ptr + pair_rows * K + slot, mask=row_ok, other=0)
        weight = tl.load(coef_ptr + pair_rows * K + slot, mask=row_ok, other=0.0)
        mask = tile_ok & (weight != 0.0)[:, None]
        c_tile = tl.load(c_group + col[:, None] * stride_cn + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            c_tile = c_tile * tl.load(c_scale_ptr + group * stride_c_scale_g + col, mask=row_ok, other=0.0)[:, None]
        contrib = weight[:, None] * (x_tile - c_tile)
        acc += contrib
        tl.atomic_add(grad_c_group + col[:, None] * dim + dims[None, :], -contrib, mask=mask)
    grad_rows = grad_x_ptr + pair_rows[:, None] * dim + dims[None, :]
    if SELF:
        tl.atomic_add(grad_rows, acc, mask=tile_ok)
    else:
        tl.store(grad_rows, acc, mask=tile_ok)
