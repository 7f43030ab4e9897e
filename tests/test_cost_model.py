"""What ships the defaults: the cost model's orderings, the proxy shapes verification runs on, and
the shipped results files themselves."""
import dataclasses
import pytest

from metalforge import devices, results
from metalforge.kernels import check
from metalforge.kernels.families import get as family

# Llama-3-8B-sized shapes (what most users decode with), and a bigger version of each
SHAPES = {
    "qmv": (dict(M=1, N=4096, K=4096, bits=4, group_size=64), {"N": 14336}),
    "qmm": (dict(M=128, N=4096, K=4096, bits=4, group_size=64), {"M": 512}),
    "decode_attention": (dict(B=1, Hq=32, Hkv=8, S=1024, D=128), {"S": 4096}),
    "prefill_attention": (dict(B=1, Hq=32, Hkv=8, L=256, D=128), {"L": 1024}),
    # Qwen3-30B-A3B's expert layers: 128 experts of 768, 8 a token
    "gather_qmv": (dict(M=1, N=768, K=2048, experts=128, top_k=8, bits=4, group_size=64), {"M": 4}),
    # Qwen2-0.5B's fused decode layer: its MLP's input side and its attention input (biased)
    "gate_up": (dict(M=1, N=4864, K=896, bits=4, group_size=64), {"N": 9728}),
    "norm_qkv": (dict(M=1, K=896, Hq=14, Hkv=2, D=64, bits=4, group_size=64, bias=1), {"K": 1792}),
}


def valid_configs(name, shape, device):
    fam = family(name)
    return [c for c in fam.space() if not check(fam, c, shape, "float16", device)]


def spread(configs, n=40):
    """About n configs spread over the list (counting a config's work at a model's size takes ms)."""
    return configs[::max(1, len(configs) // n)]


@pytest.mark.parametrize("name", list(SHAPES))
def test_more_bandwidth_is_never_slower(name):
    fam = family(name)
    shape = fam.shape(SHAPES[name][0])
    slow = devices.get("m3-pro")
    fast = dataclasses.replace(slow, memory_bandwidth_gbs=2 * slow.memory_bandwidth_gbs)
    for config in spread(valid_configs(name, shape, slow)):
        assert fam.modelled_seconds(config, shape, "float16", fast) <= \
            fam.modelled_seconds(config, shape, "float16", slow), config


@pytest.mark.parametrize("name", list(SHAPES))
def test_more_work_is_never_faster(name):
    fam = family(name)
    small, grow = SHAPES[name]
    shape, bigger = fam.shape(small), fam.shape({**small, **grow})
    device = devices.get("m2-max")
    for config in spread(valid_configs(name, shape, device)):
        if check(fam, config, bigger, "float16", device):
            continue
        assert fam.modelled_seconds(config, bigger, "float16", device) >= \
            fam.modelled_seconds(config, shape, "float16", device), config


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_modelled_best_config_is_valid_on_every_device(name):
    """Ranked as the tuner ranks (invalid configs last, never priced), the best of a spread of
    the space is valid on every device."""
    fam = family(name)
    shape = fam.shape(SHAPES[name][0])
    candidates = spread(list(fam.space()), 400)
    for device in devices.profiles().values():
        assert valid_configs(name, shape, device)

        def rank(c):
            invalid = bool(check(fam, c, shape, "float16", device))
            return invalid, 0.0 if invalid else fam.modelled_seconds(c, shape, "float16", device)
        best = min(candidates, key=rank)
        assert not check(fam, best, shape, "float16", device), "an invalid config is never the choice"


@pytest.mark.parametrize("name", ["qmv", "qmm", "decode_attention", "prefill_attention"])
def test_proxy_shapes_keep_the_structure_and_the_tails(name):
    fam = family(name)
    shape = fam.shape({**SHAPES[name][0], **({"S": 4100} if name == "decode_attention" else {}),
                       **({"L": 1000, "prefix": 300} if name == "prefill_attention" else {})})
    proxy = fam.proxy_shape(shape)
    for field in dataclasses.fields(shape):
        assert getattr(proxy, field.name) <= getattr(shape, field.name) or field.name == "num_blocks"
    if name in ("qmv", "qmm"):
        assert (proxy.bits, proxy.group_size, proxy.M) == (shape.bits, shape.group_size, shape.M)
        assert proxy.K % shape.group_size == 0 and proxy.N * proxy.K < shape.N * shape.K
    else:
        assert (proxy.D, proxy.Hq // proxy.Hkv) == (shape.D, shape.Hq // shape.Hkv), "head dim and GQA ratio kept"
    if name == "decode_attention":
        assert proxy.S % 256 == shape.S % 256 and proxy.S < shape.S, "the tail of the sequence survives"
    if name == "prefill_attention":
        assert proxy.L % 64 == shape.L % 64 and proxy.prefix % 32 == shape.prefix % 32
    small = fam.shape(_small(name))
    assert fam.proxy_shape(small) == small, "a small shape is verified as it is"


def _small(name):
    return {"qmv": dict(M=1, N=96, K=256, bits=4, group_size=64), "qmm": dict(M=8, N=64, K=256, bits=4, group_size=64),
            "decode_attention": dict(B=1, Hq=4, Hkv=2, S=100, D=64),
            "prefill_attention": dict(B=1, Hq=2, Hkv=1, L=40, D=64)}[name]


def test_shipped_defaults_are_valid_for_their_device_and_bucket():
    checked = 0
    for name in devices.profiles():
        device = devices.get(name)
        for fam_name, entries in results.load(results.shipped_path(name))["entries"].items():
            fam = family(fam_name)
            for key, e in entries.items():
                shape = fam.shape(e["shape"])
                assert fam.bucket_key(shape, e["dtype"]) == key
                assert not check(fam, fam.config(e["config"]), shape, e["dtype"], device), (name, key)
                assert e["timer"] == "model", "shipped defaults are modelled, and say so"
                checked += 1
    assert checked >= 17 * 4
