"""Numba kernels of the byte trie behind the RWKV World tokenizer.

The trie is stored as flat arrays (compressed sparse rows): node 0 is the root;
the children of node ``u`` are the edges ``child_start[u] .. child_start[u+1]``,
sorted by byte, so a lookup is a binary search over at most 256 bytes.
``node_token[u]`` is the id of the token spelled by the path to ``u``, or -1.

Encoding is greedy longest match from left to right, exactly what the reference
``TRIE_TOKENIZER.encodeBytes`` does: from the current position walk down the
trie as far as the input allows, emit the deepest token seen, continue after it.
"""

from numba import njit


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
    prev_start, prev_end = 0, 0
    for k in range(offsets.shape[0] - 1):
        start, end = offsets[k], offsets[k + 1]
        lcp = 0
        while (lcp < end - start and lcp < prev_end - prev_start
               and blob[start + lcp] == blob[prev_start + lcp]):
            lcp += 1
        nodes += end - start - lcp
        prev_start, prev_end = start, end
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
    prev_start, prev_end = 0, 0
    for k in range(offsets.shape[0] - 1):
        start, end = offsets[k], offsets[k + 1]
        lcp = 0
        while (lcp < end - start and lcp < prev_end - prev_start
               and blob[start + lcp] == blob[prev_start + lcp]):
            lcp += 1
        for d in range(lcp, end - start):
            edge_parent[n_nodes - 1] = path[d]
            edge_byte[n_nodes - 1] = blob[start + d]
            path[d + 1] = n_nodes
            n_nodes += 1
        node_token[path[end - start]] = ids[k]
        prev_start, prev_end = start, end


@njit(cache=True)
def _child(child_start, child_byte, child_node, node, b):
    """Child of `node` along byte `b`, or -1 (binary search over its sorted edges)."""
    lo, hi = child_start[node], child_start[node + 1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if child_byte[mid] < b:
            lo = mid + 1
        else:
            hi = mid
    if lo < child_start[node + 1] and child_byte[lo] == b:
        return child_node[lo]
    return -1


@njit(cache=True)
def fill_first_levels(child_start, child_byte, child_node, level1, level2):
    """Dense lookup tables for the first two bytes, where nodes have the most children.

    Args:
        child_start, child_byte, child_node: the trie (see encode_longest_match).
        level1: (256,) int32, written: node after byte b0, or -1.
        level2: (65536,) int32, written: node after bytes b0, b1 at index b0 * 256 + b1, or -1.
    """
    level1[:] = -1
    level2[:] = -1
    for e in range(child_start[0], child_start[1]):
        u = child_node[e]
        b0 = child_byte[e]
        level1[b0] = u
        for f in range(child_start[u], child_start[u + 1]):
            level2[b0 * 256 + child_byte[f]] = child_node[f]


@njit(cache=True)
def encode_longest_match(src, child_start, child_byte, child_node, node_token, level1, level2, out):
    """Greedy longest-match tokenization of a byte string.

    Args:
        src: (n,) uint8, the text's bytes.
        child_start: (nodes + 1,) int64, first edge of each node.
        child_byte: (edges,) uint8, byte of each edge, sorted within a node.
        child_node: (edges,) int32, node each edge leads to.
        node_token: (nodes,) int32, token ending at each node, or -1.
        level1: (256,) int32, node after one byte, or -1 (see fill_first_levels).
        level2: (65536,) int32, node after two bytes, or -1.
        out: (n,) int32, written: the token ids (never more than n).

    Returns:
        the number of tokens written, or -(i + 1) when no token starts with
        the byte at position i (impossible for a vocabulary holding all 256
        single bytes).
    """
    n = src.shape[0]
    i = 0
    k = 0
    while i < n:
        best_token = -1
        best_end = i
        node = level1[src[i]]
        j = i + 1
        if node >= 0:
            if node_token[node] >= 0:
                best_token = node_token[node]
                best_end = j
            if j < n:
                node = level2[src[i] * 256 + src[j]]
                j += 1
                if node >= 0 and node_token[node] >= 0:
                    best_token = node_token[node]
                    best_end = j
            else:
                node = -1
        while node >= 0 and j < n:
            node = _child(child_start, child_byte, child_node, node, src[j])
            if node < 0:
                break
            j += 1
            if node_token[node] >= 0:
                best_token = node_token[node]
                best_end = j
        if best_token < 0:
            return -(i + 1)
        out[k] = best_token
        k += 1
        i = best_end
    return k
