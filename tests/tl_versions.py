"""Markers for tests of one TransformerLens version's own classes.

TransformerLens 4 removed ``HookedTransformer`` and ``HookedEncoder``; this library runs its presets
on :class:`~subroutine_circuits.models.native.NativeTransformer` there, and Hugging Face BERT
folders on ``TransformerBridge``. A test of 3.x's ``HookedEncoder`` itself (or one that compares
with 3.x's ``HookedTransformer``) is marked ``tl3_only``; the 4.x run of ``.ci/run`` reports
these as skipped, with this reason.
"""

from __future__ import annotations

import pytest

from subroutine_circuits.models.versions import tl_major

tl3_only = pytest.mark.skipif(
    tl_major() >= 4,
    reason="tests a TransformerLens 3.x class (HookedEncoder / HookedTransformer) that 4.x removed",
)
