"""Values as text in ANNA-TF's comma-separated outputs (anna-test's test_stats.out, anna-infer's _infer.out):
one rule for ids and numbers, so that every output reads back exactly what was computed.
"""

import math


def format_star_id(value):
    """Star id as text that reads back exactly: integer form when integral (below 2**53), else float repr."""
    value = float(value)
    if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def format_value(value):
    """Full-precision text of a float64 (shortest round-trip repr; 'nan' for NaN)."""
    return repr(float(value))
