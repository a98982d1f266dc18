"""Fixtures shared by the WireGuard system tests."""

from __future__ import annotations

from typing import Iterator

import pytest

from .wgutil import Lab


@pytest.fixture
def lab(make_netns, tmp_path) -> Iterator[Lab]:
    """A :class:`~tests.system.wgutil.Lab` whose nodes are all closed afterwards, even on failure."""
    lab = Lab(make_netns, tmp_path)
    try:
        yield lab
    finally:
        lab.close()
