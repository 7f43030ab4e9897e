"""qmm's layout and split-K: padded tile rows (no bank conflict on fragment reads), 16-byte
staging, split-K with a reduction pass and half operand fragments, against MLX."""
import pytest

from metalforge.kernels import check
from metalforge.kernels import get_family as family
from metalforge.kernels.family import fragment_bank_ways

from test_families_emulated import verify


def test_unpadded_rows_conflict_and_padded_rows_do_not():
    """Hand-checked: half rows of BK=32 are 64 bytes, so fragment rows 0 and 2 (128 bytes apart)
    start in the same bank: 4 words a bank where 1 would do. 16 bytes of padding shift each row
    by 4 banks: rows 0-7 start at banks 0, 20, 8, 28, 16, 4, 24, 12."""
    assert fragment_bank_ways(64, 2, transposed=False) == 4
    assert fragment_bank_ways(64, 2, transposed=True) == 4
    assert fragment_bank_ways(64 + 16, 2, transposed=False) == 1
    assert fragment_bank_ways(64 + 16, 2, transposed=True) == 1


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_valid_qmm_config_reads_fragments_without_bank_conflicts(dtype):
    fam = family("qmm")
    shape = fam.shape(dict(M=512, N=4096, K=4096, bits=4, group_size=64))
    seen = set()
    for config in fam.space():
        if check(fam, config, shape, dtype, "m3-max-40"):
            continue
        row = fam.tile_row_bytes(config, dtype)
        size = 4 if config["stage"] == "float" or dtype == "float32" else 2
        seen.add(row)
        assert fragment_bank_ways(row, size, False) == 1 and fragment_bank_ways(row, size, True) == 1, config
    assert len(seen) >= 4   # BK 16 to 128 (and fp32 staging) all checked


def test_mlx_split_k_rule_as_its_host_code_picks_it():
    """qmm_splitk: ~512 threadgroups of 32 x 32 tiles. M=16, N=512: 16 tiles, 512 / 16 = 32
    slices of K=14336 (each 448 values: whole 64-value groups); M=512, N=4096: 2,048 tiles, none."""
    from metalforge.kernels import mlx_dispatch
    few = mlx_dispatch.qmm_dispatch(16, 512, 14336, 4, 64, "float16", "m3-max-40")
    assert few.launches[0].function == "affine_qmm_t_splitk" and few.launches[0].grid[2] == 32
    many = mlx_dispatch.qmm_dispatch(512, 4096, 4096, 4, 64, "float16", "m3-max-40")
    assert [l.function for l in many.launches] == ["affine_qmm_t"]


@pytest.mark.parametrize("split_k", [2, 8, 32])
def test_split_k_sums_its_slices_to_the_reference(split_k):
    config = dict(BM=16, BN=16, BK=16, WM=1, WN=2, split_k=split_k, operands="input")
    shape = dict(M=9, N=40, K=512, bits=4, group_size=32)
    assert verify("qmm", shape, "float16", configs=[family("qmm").config(config)]) == 1


def test_half_operands_need_half_tiles():
    problems = check("qmm", {"operands": "input"}, dict(M=64, N=64, K=256, bits=4, group_size=64), "bfloat16", "m1")
    assert [str(p) for p in problems] == ["operands=input takes half tiles as half fragments (float16 inputs "
                                          "staged as input; bfloat fragments need an M3 or later)"]
