"""Values as CSV text (anna/tables.py): every number reads back as the float64 computed, and fields are quoted
as Python's csv module quotes them (and a carriage return too)."""

import csv
import io

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from anna.tables import csv_field, csv_rows, value_rows, value_texts


@given(st.text(max_size=12))
def test_csv_field_quotes_as_the_csv_module_does(text):
    written = io.StringIO()
    csv.writer(written, lineterminator="\n").writerow([text, "x"])
    line = f"{csv_field(text)},x\n"
    if "\r" not in text:  # a lone carriage return the module leaves bare (lineterminator "\n"); it is quoted here
        assert line == written.getvalue()
    assert next(csv.reader(io.StringIO(line, newline=""))) == [text, "x"]


@given(st.lists(st.tuples(st.text(max_size=6), st.text(alphabet="ab1,", max_size=4)), max_size=5))
def test_csv_rows_are_csv_fields_joined(rows):
    # the one search over a whole block must quote exactly what a search per field quotes
    assert csv_rows(rows) == [",".join(csv_field(text) for text in row) for row in rows]


def test_value_texts_are_value_rows_joined_and_read_back_exactly():
    rng = np.random.default_rng(2)
    labels = rng.normal(5000.0, 300.0, (50, 5)).astype(np.float32).astype(np.float64) * 1.0001
    sigmas = [rng.random((50, 5)) for _ in range(3)]
    labels[3, 2] = np.nan
    for blocks in ((labels,), (labels, *sigmas)):
        texts = value_texts(*blocks)
        assert texts == [",".join(row) for row in value_rows(*blocks)]
        back = np.array([[float(value) for value in text.split(",")] for text in texts])
        np.testing.assert_array_equal(back, np.concatenate(blocks, axis=1))
    assert value_texts(np.empty((0, 5))) == []
