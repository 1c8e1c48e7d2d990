"""Block tables kept across steps (server/batch.py ``BlockTables``): only new blocks are copied, and a
replaced table (freed, preempted, re-attached to a cached prefix) is never mistaken for the old one."""

from __future__ import annotations

import numpy as np

from server.batch import BlockTables
from server.scheduler import ScheduledChunk


def chunk(rid: str, table: list[list[int]]) -> ScheduledChunk:
    return ScheduledChunk(rid, [1], 0, table, None, True)


def test_tables_grow_by_appended_blocks() -> None:
    tables = BlockTables(2)
    a = [[3], [4]]
    (t,) = tables.step([chunk("a", a)])
    assert t.tolist() == [[3], [4]]
    a[0].append(7)
    a[1].append(8)
    (t,) = tables.step([chunk("a", a)])
    assert t.tolist() == [[3, 7], [4, 8]]
    for i in range(5):  # grows past its capacity
        a[0].append(10 + i)
        a[1].append(20 + i)
    (t,) = tables.step([chunk("a", a)])
    assert t.tolist() == [[3, 7, 10, 11, 12, 13, 14], [4, 8, 20, 21, 22, 23, 24]]
    assert t.dtype == np.int32


def test_a_replaced_table_is_rebuilt() -> None:
    tables = BlockTables(1)
    tables.step([chunk("a", [[1, 2, 3]])])
    (t,) = tables.step([chunk("a", [[9]])])  # preempted and readmitted: a new list object
    assert t.tolist() == [[9]]
    same_len = [[5, 6, 7]]
    tables.step([chunk("a", same_len)])
    (t,) = tables.step([chunk("a", [[5, 6, 8]])])  # equal length, other object: not the old prefix
    assert t.tolist() == [[5, 6, 8]]


def test_requests_not_in_the_step_are_forgotten() -> None:
    tables = BlockTables(1)
    a, b = [[1]], [[2]]
    tables.step([chunk("a", a), chunk("b", b)])
    tables.step([chunk("b", b)])
    a[0][0] = 42  # would be stale if "a" had been kept
    (t,) = tables.step([chunk("a", a)])
    assert t.tolist() == [[42]]
