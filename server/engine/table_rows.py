"""Which row of the device block-table tensor holds which sequence's block table, kept
across steps, so a step copies only the blocks the device does not have yet: usually none,
one when a sequence crosses into a new block. Pure Python, no tensors.

A table is identified by its list object (``Sequence.block_table``): the block manager
only appends to a table while a sequence holds it and gives it a new list when it frees
the blocks, so "same object, at least as long" means "the device row is a prefix of it".
"""

from __future__ import annotations

from collections import OrderedDict


class TableRows:
    """``num_rows`` rows of ``[num_rows, max_blocks]`` block tables on the device.

    ``place`` gives each table of a step a row, keeping the row it had (least recently
    used rows of tables not in the step are taken for new ones), and lists the entries to
    write: ``(row * max_blocks + column, block id)``."""

    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.num_rows, self.max_blocks = num_rows, max_blocks
        self._row_of: dict[int, int] = {}  # id(table) -> row
        self._tables: list[list[int] | None] = [None] * num_rows  # held: ids stay unique
        self._written = [0] * num_rows  # leading entries of the row the device holds
        self._recent: OrderedDict[int, None] = OrderedDict((r, None) for r in range(num_rows))

    def reset(self) -> None:
        """Forget every row (the device tensor's contents are no longer trusted)."""
        self.__init__(self.num_rows, self.max_blocks)

    def place(self, tables: list[list[int]], used: list[int]
              ) -> tuple[list[int], list[int], list[int]]:
        """Rows for ``tables`` (each needing its first ``used[i]`` blocks on the device),
        and the flat indices and block ids to write. ``ValueError`` when there are more
        tables than rows or a table needs more than ``max_blocks`` blocks."""
        if len(tables) > self.num_rows:
            raise ValueError(f"{len(tables)} sequences exceed the {self.num_rows} block-table "
                             f"rows (max_num_seqs)")
        if max(used, default=0) > self.max_blocks:
            raise ValueError(f"a context of {max(used)} blocks exceeds the {self.max_blocks} "
                             f"blocks of max_model_len")
        rows: list[int] = []
        index: list[int] = []
        values: list[int] = []
        # rows of the step's tables that the device holds are never taken for its new ones
        taken = {row for t in tables if (row := self._row_of.get(id(t))) is not None}
        for table, n in zip(tables, used):
            row = self._row(table, taken)
            start = self._written[row]
            if start < n:
                base = row * self.max_blocks
                index += range(base + start, base + n)
                values += table[start:n]
                self._written[row] = n
            rows.append(row)
        return rows, index, values

    def _row(self, table: list[int], taken: set[int]) -> int:
        row = self._row_of.get(id(table))
        if row is None:
            row = next(r for r in self._recent if r not in taken)
            old = self._tables[row]
            if old is not None:
                del self._row_of[id(old)]
            self._row_of[id(table)] = row
            self._tables[row], self._written[row] = table, 0
            taken.add(row)
        elif len(table) < self._written[row]:
            self._written[row] = 0  # cut short (against the contract): rewrite the row
        self._recent.move_to_end(row)
        return row
