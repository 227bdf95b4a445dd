"""The prover side of the RFC 9162 tree: roots and proofs from perfect subtree hashes.

``node(level, idx)`` returns the hash of the perfect subtree covering leaves
``[idx * 2**level, (idx + 1) * 2**level)`` (level 0: leaf hashes). Every proof here is
checked by the matching function of ``ledger.offline_verify``; ``Frontier`` is the
append side, reporting the perfect nodes each append completes so they can be stored.
Functions raise ValueError for sizes or ranges outside the tree, and pass on whatever
``node`` raises (LookupError for a missing node, by convention).
"""

from __future__ import annotations

from collections.abc import Callable

from ledger.offline_verify import EMPTY_ROOT, node_hash

Node = Callable[[int, int], bytes]


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def subtree_hash(node: Node, start: int, end: int) -> bytes:
    """MTH of leaves ``[start, end)``, a subtree of the RFC 9162 shape: ``start`` is a
    multiple of the largest power of two not above ``end - start`` (or ``end`` is the
    tree's size); O(log n) calls of ``node``."""
    n = end - start
    if n <= 0:
        raise ValueError("empty subtree")
    if n & (n - 1) == 0 and start % n == 0:
        return node(n.bit_length() - 1, start // n)
    k = _split(n)
    return node_hash(subtree_hash(node, start, start + k), subtree_hash(node, start + k, end))


def root(node: Node, size: int) -> bytes:
    """The root of the tree of ``size`` leaves (SHA-256 of nothing when empty)."""
    if size < 0:
        raise ValueError("negative tree size")
    return EMPTY_ROOT if size == 0 else subtree_hash(node, 0, size)


def inclusion_proof(node: Node, index: int, size: int) -> list[bytes]:
    """RFC 9162 §2.1.3.1 path of leaf ``index`` (0-based) in the tree of ``size``."""
    if not 0 <= index < size:
        raise ValueError("index outside the tree")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = _split(end - start)
        if m < k:
            path.append(subtree_hash(node, start + k, end))
            end = start + k
        else:
            path.append(subtree_hash(node, start, start + k))
            start, m = start + k, m - k
    path.reverse()
    return path


def consistency_proof(node: Node, size1: int, size2: int) -> list[bytes]:
    """RFC 9162 §2.1.4.1 proof that the tree of ``size2`` extends that of ``size1``."""
    if not 0 <= size1 <= size2:
        raise ValueError("sizes out of order")
    if size1 == 0 or size1 == size2:
        return []
    out: list[bytes] = []

    def sub(m: int, start: int, end: int, whole: bool) -> None:
        n = end - start
        if m == n:
            if not whole:
                out.append(subtree_hash(node, start, end))
            return
        k = _split(n)
        if m <= k:
            sub(m, start, start + k, whole)
            out.append(subtree_hash(node, start + k, end))
        else:
            sub(m - k, start + k, end, False)
            out.append(subtree_hash(node, start, start + k))

    sub(size1, 0, size2, True)
    return out


def range_proof(node: Node, size: int, start: int, end: int) -> list[bytes]:
    """The hashes ``offline_verify.range_root`` needs besides leaves ``[start, end)``."""
    if not 0 <= start < end <= size:
        raise ValueError("range outside the tree")
    out: list[bytes] = []

    def walk(lo: int, hi: int) -> None:
        if hi <= start or lo >= end:
            out.append(subtree_hash(node, lo, hi))
            return
        if start <= lo and hi <= end:
            return
        k = _split(hi - lo)
        walk(lo, lo + k)
        walk(lo + k, hi)

    walk(0, size)
    return out


class Frontier:
    """The right edge of a tree of ``size`` leaves: one perfect subtree hash per set bit
    of ``size``, the largest (leftmost) first. O(log n) memory."""

    __slots__ = ("nodes", "size")

    def __init__(self) -> None:
        self.size = 0
        self.nodes: list[bytes] = []

    @classmethod
    def from_nodes(cls, size: int, node: Node) -> Frontier:
        """Rebuild the frontier of a tree of ``size`` leaves from its stored perfect
        nodes: one ``node`` call per set bit of ``size``."""
        if size < 0:
            raise ValueError("negative tree size")
        f, start = cls(), 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                f.nodes.append(node(level, start >> level))
                start += 1 << level
        f.size = size
        return f

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add a leaf hash. Returns the perfect nodes this completes as ``(level, index,
        hash)``, the leaf itself ``(0, size, leaf)`` first; O(1) hashing amortised."""
        index, digest, level = self.size, leaf, 0
        done = [(0, index, leaf)]
        while index & 1:
            digest = node_hash(self.nodes.pop(), digest)
            level, index = level + 1, index >> 1
            done.append((level, index, digest))
        self.nodes.append(digest)
        self.size += 1
        return done

    def root(self) -> bytes:
        """The root of the tree (SHA-256 of nothing when empty)."""
        if not self.nodes:
            return EMPTY_ROOT
        digest = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            digest = node_hash(left, digest)
        return digest


__all__ = [
    "Frontier",
    "consistency_proof",
    "inclusion_proof",
    "range_proof",
    "root",
    "subtree_hash",
]
