"""Fixtures shared by the test modules: the two dtypes and a seeded
generator. The float64 references, tolerances and layout helpers are in
_reference.py."""
import zlib

import numpy as np
import pytest
from _reference import DTYPE_IDS, DTYPES


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    """Each floating-point dtype fastgrad computes in."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per
    test and per parameter set."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
