"""Each defect the kernel review found, pinned by a test that failed before its fix."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge.kernels import get_family as family

from test_families_emulated import verify


def test_paged_decode_reads_no_block_table_entry_past_the_last_block(monkeypatch):
    """With prefetch and 4 keys per step, the step after the last one used to index the block
    table one past the sequence's row before testing that its keys are inside (checked mode
    reported it when the sequence fills its blocks)."""
    monkeypatch.setenv("METALFORGE_EMULATOR_CHECKED", "1")
    config = dict(threads=64, keys_per_step=4, splits=1, share_kv=True, load_width=1, prefetch=True)
    assert verify("decode_attention", dict(B=1, Hq=4, Hkv=2, S=64, D=64, block_size=16), "float16",
                  configs=[config]) == 1
