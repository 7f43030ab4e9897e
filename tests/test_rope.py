"""RoPE with each scaling type mlx-lm configs use, against mlx-lm's own implementation."""
import mlx.core as mx
import numpy as np
import pytest

from metalforge.engine.models import rope

rope_utils = pytest.importorskip("mlx_lm.models.rope_utils")

D, THETA, MAX_POS = 64, 10000.0, 256
SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.0},
}


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("offset", [0, 37, 300])   # 300: past max_position_embeddings (dynamic NTK kicks in)
def test_rope_matches_mlx_lm(kind, offset):
    scaling = SCALINGS[kind]
    theirs = rope_utils.initialize_rope(D, THETA, False, scaling, MAX_POS)
    ours = rope.make(D, THETA, scaling, MAX_POS)
    x = mx.random.normal((1, 2, 5, D), key=mx.random.key(3))
    positions = mx.arange(offset, offset + 5)[None]
    np.testing.assert_allclose(np.array(ours(x, positions, offset + 5)), np.array(theirs(x, offset=offset)), rtol=2e-4, atol=2e-4)


def test_an_unknown_rope_type_is_one_line_naming_the_field():
    from metalforge.errors import MetalforgeError
    with pytest.raises(MetalforgeError, match=r"^config.json: rope_scaling.rope_type 'proportional' is not supported; "
                                              r"supported: default, dynamic, linear, llama3, longrope, su, yarn$"):
        rope.make(D, THETA, {"rope_type": "proportional", "factor": 2.0}, MAX_POS)
