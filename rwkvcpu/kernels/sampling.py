"""Numba kernel for the sampler: a one-pass histogram of the logits.

Top-p and top-k need the most probable tokens in order, but sorting 65536
logits for every generated token costs milliseconds. Grouping the logits into
narrow buckets by their distance below the largest one, with each bucket's
token count and probability mass, locates any cut in one O(V) pass; only the
tokens of the one bucket where the cut falls need sorting
(rwkvcpu/sampling.py: kept_tokens).
"""

import math

from numba import njit


@njit(cache=True)
def logit_histogram(logits, top, width, bucket, count, mass):
    """Bucket every token by how far its logit lies below the top one.

    bucket[i] = min(B - 1, floor((top - logits[i]) / width)); tokens at -inf
    (banned) go to the last bucket with no mass.

    Args:
        logits: (V,) float64, finite or -inf; top = max(logits), finite.
        top: the largest logit.
        width: bucket width in nats (logit units).
        bucket: (V,) int32, written: each token's bucket.
        count: (B,) int64, written: tokens per bucket.
        mass: (B,) float64, written: sum of exp(logit - top) per bucket.

    Returns:
        the total mass, sum of exp(logits - top).
    """
    nb = count.shape[0]
    for b in range(nb):
        count[b] = 0
        mass[b] = 0.0
    total = 0.0
    for i in range(logits.shape[0]):
        d = top - logits[i]
        if d < (nb - 1) * width:
            b = int(d / width)
        else:
            b = nb - 1
        e = math.exp(-d)
        bucket[i] = b
        count[b] += 1
        mass[b] += e
        total += e
    return total


@njit(cache=True)
def mask_logits(logits, bitmask):
    """Set to -inf every logit whose bit in `bitmask` is 0 (the tokens a constraint forbids).

    Bit i of the mask is bit (i % 32) of word i // 32, as llguidance writes it;
    whole words of allowed (-1) or forbidden (0) tokens are handled at once.

    Args:
        logits: (V,) float32 or float64, changed in place.
        bitmask: (ceil(V / 32),) int32; bits past V are ignored.
    """
    V = logits.shape[0]
    for w in range(bitmask.shape[0]):
        word = bitmask[w]
        if word == -1:
            continue
        start = w * 32
        stop = min(start + 32, V)
        if word == 0:
            for i in range(start, stop):
                logits[i] = -math.inf
        else:
            for i in range(start, stop):
                if not (word >> (i - start)) & 1:
                    logits[i] = -math.inf
