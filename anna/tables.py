"""Values as text in ANNA-TF's comma-separated outputs (anna-test's test_stats.out, anna-infer's _infer.out):
one rule for ids and numbers, so that every output reads back exactly what was computed.
"""

import math
import re

import numpy as np


def format_star_id(value):
    """Star id as text that reads back exactly: integer form when integral (below 2**53), else float repr."""
    value = float(value)
    if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def value_rows(*blocks):
    """Text rows for float arrays side by side: row i holds row i of every block ((n,) or (n, k)), each value as
    the shortest text that reads back as the same float64 (Python's repr; 'nan' for NaN).  Whole blocks are
    converted at once (``tolist``), a third of the cost of converting value by value (benchmarks/, pack
    inference row)."""
    if not blocks or len(blocks[0]) == 0:
        return []
    lists = [np.asarray(block, dtype=np.float64).reshape(len(block), -1).tolist() for block in blocks]
    return [[repr(value) for part in parts for value in part] for parts in zip(*lists)]


def value_texts(*blocks):
    """Like :func:`value_rows`, but each row's values already joined by commas: one string per row, as the CSV
    writers put them on a line.  Joining here and writing whole lines halved the cost of anna-infer's output
    against a ``csv.writer`` row per spectrum (benchmarks/, survey-size inference)."""
    if not blocks or len(blocks[0]) == 0:
        return []
    lists = [np.asarray(block, dtype=np.float64).reshape(len(block), -1).tolist() for block in blocks]
    if len(lists) == 1:
        return [",".join(map(repr, row)) for row in lists[0]]
    return [",".join(map(repr, [value for part in parts for value in part])) for parts in zip(*lists)]


# a character that makes a CSV field need quotes (see csv_field)
_NEEDS_QUOTES = re.compile('[,"\r\n]')


def csv_field(text):
    """``text`` as one CSV field, quoted as Python's csv module quotes by default (QUOTE_MINIMAL): only when it
    holds a comma, a double quote or a line break (a carriage return too, which the module with line
    terminator "\\n" leaves bare), with its double quotes doubled."""
    if _NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def csv_rows(rows):
    """Each of ``rows`` (sequences of texts) as CSV fields (:func:`csv_field`) joined by commas.  One search of
    all the texts when none needs quotes (the usual case: star ids, file names), a fifth of the cost of a
    search per field."""
    if not _NEEDS_QUOTES.search("".join(text for row in rows for text in row)):
        return [",".join(row) for row in rows]
    return [",".join(csv_field(text) for text in row) for row in rows]
