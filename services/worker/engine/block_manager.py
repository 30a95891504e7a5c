"""Owner of the paged KV cache's blocks: hands them to sequences and takes them back."""

from __future__ import annotations

from collections import deque

from services.worker.engine.sequence import Sequence


class BlockManager:
    """Fixed pool of `num_blocks` KV blocks of `block_size` tokens each (no prefix sharing)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks seq needs to hold its computed tokens plus `num_new_tokens` more."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to cover `num_new_tokens` more tokens."""
        needed = self.blocks_needed(seq, num_new_tokens)
        assert needed <= len(self._free), "allocate without can_allocate"
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        """Cache slot of token `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
