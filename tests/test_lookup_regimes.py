"""The lookup never borrows a bucket tuned against one kind of MLX kernel for a shape where MLX
runs another (results/lookup.py, Family.mlx_regime): a prompt's bucket is no evidence for a
decode row, and the families' regimes split where MLX's own dispatch does."""
import pytest

from metalforge import devices, results
from metalforge.errors import MetalforgeError
from metalforge.kernels import mlx_dispatch
from metalforge.kernels.families import get as family

QMM = dict(N=896, K=896, bits=4, group_size=64)
PREFILL = dict(B=1, Hq=14, Hkv=2, D=64)
CASES = (("qmm", "M", QMM, {"BM": 16, "BN": 16}), ("prefill_attention", "L", PREFILL, {"BQ": 64, "BK": 16}))


@pytest.mark.parametrize("name,rows,fields,config", CASES)
def test_a_prompt_bucket_lends_its_config_to_prompts_only(tmp_path, name, rows, fields, config):
    """One bucket at 128 rows (query tokens) in the file: a shape past MLX's vector kernels'
    8 borrows it as the nearest; one of 8 or fewer gets the family default, the bucket's config
    and its ratio against MLX's matrix kernel being no evidence where MLX runs a vector kernel."""
    fam = family(name)
    path = tmp_path / "m1.yaml"
    shape = {**fields, rows: 128}
    results.save_entries(path, "m1", [(name, fam.bucket_key(shape, "float16"),
                                       {"shape": shape, "dtype": "float16", "config": config, "time_s": 1e-5,
                                        "timer": "model", "baseline_s": 3e-5, "model_error": 0.2})])

    def look(n):
        return results.lookup("m1", name, {**fields, rows: n}, "float16", results=path, shipped=False)
    for n in (9, 16, 512):
        choice = look(n)
        assert choice.source == "nearest" and choice.config == fam.config(config), n
    for n in (1, 2, 8):
        choice = look(n)
        assert choice.source == "default" and choice.entry is None, n


def test_prefill_attentions_regimes_split_where_mlx_stops_running_steel_attention():
    """MLX's steel attention refuses 8 queries or fewer (its vector kernels run them) and takes 9:
    the family's "vector" regime is exactly the lengths steel attention refuses."""
    fam, m1 = family("prefill_attention"), devices.get("m1")
    for L in (1, 8, 9, 64):
        try:
            mlx_dispatch.prefill_attention_dispatch(1, 14, 2, L, 64, "float16", m1)
            steel = True
        except MetalforgeError:
            steel = False
        assert (fam.mlx_regime(fam.shape({**PREFILL, "L": L})) == "matrix") == steel, L
