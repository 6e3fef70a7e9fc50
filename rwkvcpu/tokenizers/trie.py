"""Numba kernels of the byte trie behind the RWKV World tokenizer.

Encoding is greedy longest match from left to right, exactly what the
reference ``TRIE_TOKENIZER.encodeBytes`` does: from the current position walk
down the trie as far as the input allows, emit the deepest token seen,
continue after it.

The trie is built in two steps. First as compressed rows, from the tokens
sorted bytewise: the children of node ``u`` are the edges
``child_start[u] .. child_start[u + 1]``, in byte order. Then it is laid out
as a double array (Aoe, 1989), which the encoder walks with one addition and
one comparison per byte: the cell of node ``s``'s child along byte ``b`` is
``c = base[s] + b``, and it is that child only if ``check[c] == s``.

The encoder reads one flat int32 array, ``table``, so a call unboxes one
array (each costs about 45 ns, a tenth of encoding a short string):

    table[LEVEL2 + b0 * 256 + b1]    cell after the two bytes b0 b1, or -1 (one
                                     load instead of two dependent steps)
    table[CELLS + 3 * s + BASE]      base of cell s (0 for a leaf)
    table[CELLS + 3 * s + CHECK]     parent cell of s; ROOT_CHECK for the root
                                     (cell 0), FREE for an unused cell
    table[CELLS + 3 * s + TOKEN]     id of the token spelled by the path to s, or -1

and 256 free cells after the last used one, so ``base + b`` never leaves the table.
"""

from numba import njit

LEVEL2 = 0
CELLS = 256 * 256
BASE, CHECK, TOKEN = 0, 1, 2
FREE, ROOT_CHECK = -1, -2


@njit(cache=True)
def _common_prefix(blob, start, end, prev_start, prev_end):
    """Length of the common prefix of blob[start:end] and blob[prev_start:prev_end]."""
    n = 0
    while n < end - start and n < prev_end - prev_start and blob[start + n] == blob[prev_start + n]:
        n += 1
    return n


@njit(cache=True)
def count_trie_nodes(blob, offsets):
    """Number of trie nodes (root included) for tokens sorted bytewise.

    Each token adds one node per byte past its longest common prefix with the
    previous token in sorted order.

    Args:
        blob: (total,) uint8, the sorted tokens' bytes back to back.
        offsets: (n + 1,) int64, token k is blob[offsets[k]:offsets[k+1]].
    """
    nodes = 1
    for k in range(offsets.shape[0] - 1):
        lcp = _common_prefix(blob, offsets[k], offsets[k + 1], offsets[k - 1] if k else 0, offsets[k] if k else 0)
        nodes += offsets[k + 1] - offsets[k] - lcp
    return nodes


@njit(cache=True)
def build_trie_edges(blob, offsets, ids, path, edge_parent, edge_byte, node_token):
    """Create the trie of tokens sorted bytewise; write its edges in creation order.

    Node k + 1 is created by edge k (parent edge_parent[k], byte edge_byte[k]).
    Because tokens arrive sorted, each node's children are created in
    increasing byte order; a stable sort of the edges by parent yields the
    compressed rows.

    Args:
        blob: (total,) uint8, sorted tokens back to back.
        offsets: (n + 1,) int64, token k is blob[offsets[k]:offsets[k+1]].
        ids: (n,) int32, token id of each sorted token.
        path: (longest token + 1,) int32, scratch: path[d] is the node reached
            after the first d bytes of the previous token.
        edge_parent: (nodes - 1,) int32, written.
        edge_byte: (nodes - 1,) uint8, written.
        node_token: (nodes,) int32, written: token id ending at each node, or -1.
    """
    path[0] = 0
    node_token[:] = -1
    n_nodes = 1
    for k in range(offsets.shape[0] - 1):
        start, end = offsets[k], offsets[k + 1]
        lcp = _common_prefix(blob, start, end, offsets[k - 1] if k else 0, offsets[k] if k else 0)
        for d in range(lcp, end - start):
            edge_parent[n_nodes - 1] = path[d]
            edge_byte[n_nodes - 1] = blob[start + d]
            path[d + 1] = n_nodes
            n_nodes += 1
        node_token[path[end - start]] = ids[k]


@njit(cache=True)
def build_double_array(child_start, child_byte, child_node, node_token, cells, cell_of, queue):
    """Lay a trie given as compressed rows out as a double array (first fit, breadth first).

    Each node's children get the lowest base whose cells ``base + b`` (b
    their bytes) are all free; breadth-first order packs the cells densely
    (the World vocabulary's 116,079 nodes fill the first 116,079 cells).

    Args:
        child_start: (nodes + 1,) int64, child_byte: (edges,) uint8,
            child_node: (edges,) int32: the trie's rows (node 0 the root).
        node_token: (nodes,) int32, token id ending at each node, or -1.
        cells: (capacity, 3) int32, written: BASE, CHECK, TOKEN of each cell
            (see the module docstring).
        cell_of: (nodes,) int64, scratch: the cell given to each node.
        queue: (nodes,) int64, scratch: the breadth-first queue.

    Returns:
        the number of cells used, or -1 if `capacity` is too small (cells
        must keep 256 free cells past the last used one).
    """
    capacity = cells.shape[0]
    cells[:, BASE] = 0
    cells[:, CHECK] = FREE
    cells[:, TOKEN] = -1
    cells[0, CHECK] = ROOT_CHECK
    cells[0, TOKEN] = node_token[0]
    cell_of[0] = 0
    queue[0] = 0
    head, tail = 0, 1
    first_free = 1
    used = 1
    while head < tail:
        u = queue[head]
        head += 1
        lo, hi = child_start[u], child_start[u + 1]
        if lo == hi:
            continue
        while cells[first_free, CHECK] != FREE:
            first_free += 1
        # try each free cell f for the first child: base = f - (its byte)
        f = first_free
        while True:
            base = f - child_byte[lo]
            if base + 256 >= capacity:
                return -1
            fits = base >= 1
            for e in range(lo, hi):
                if not fits:
                    break
                fits = cells[base + child_byte[e], CHECK] == FREE
            if fits:
                break
            f += 1
            while cells[f, CHECK] != FREE:
                f += 1
        s = cell_of[u]
        cells[s, BASE] = base
        for e in range(lo, hi):
            c = base + child_byte[e]
            v = child_node[e]
            cells[c, CHECK] = s
            cells[c, TOKEN] = node_token[v]
            cell_of[v] = c
            used = max(used, c + 1)
            queue[tail] = v
            tail += 1
    return used


@njit(cache=True)
def fill_level2(cells, level2):
    """The cell after each pair of first bytes, or -1.

    Args:
        cells: (n, 3) int32, the double array.
        level2: (65536,) int32, written: cell after bytes b0, b1 at b0 * 256 + b1.
    """
    level2[:] = -1
    base0 = cells[0, BASE]
    for b0 in range(256):
        c0 = base0 + b0
        if cells[c0, CHECK] != 0:
            continue
        for b1 in range(256):
            c1 = cells[c0, BASE] + b1
            if cells[c0, BASE] > 0 and cells[c1, CHECK] == c0:
                level2[b0 * 256 + b1] = c1


@njit(cache=True)
def encode_greedy(src, table):
    """Greedy longest-match tokenization of a byte string.

    The one kernel here that allocates: it returns a new list, because
    building the Python list of ids in compiled code is the cheapest way to
    hand over a result of unknown length (an output array plus ``tolist()``
    costs about twice as much on short strings).

    Args:
        src: (n,) bytes, the text's bytes.
        table: (65536 + 3 * cells,) int32, the packed trie (see the module docstring).

    Returns:
        the token ids; when no token starts with the byte at position i
        (impossible for a vocabulary holding all 256 single bytes) the list
        ends with -(i + 1) instead.
    """
    n = len(src)
    out = []
    base0 = table[CELLS + BASE]
    i = 0
    while i < n:
        s = base0 + src[i]
        best_token = -1
        best_end = i
        if table[CELLS + 3 * s + CHECK] == 0:
            best_token = table[CELLS + 3 * s + TOKEN]
            best_end = i + 1
            j = i + 1
            s = table[LEVEL2 + src[i] * 256 + src[j]] if j < n else -1
            while s >= 0:
                j += 1
                token = table[CELLS + 3 * s + TOKEN]
                if token >= 0:
                    best_token = token
                    best_end = j
                if j == n:
                    break
                c = table[CELLS + 3 * s + BASE] + src[j]
                s = c if table[CELLS + 3 * c + CHECK] == s else -1
        if best_token < 0:
            out.append(-(i + 1))
            return out
        out.append(best_token)
        i = best_end
    return out
