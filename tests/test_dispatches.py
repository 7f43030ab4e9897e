"""The dispatch counter on graphs counted by hand (what MLX on a Mac would launch)."""
import mlx.core as mx
import mlx.nn as nn
import pytest

from metalforge.engine import dispatches


def _leaf(*shape):
    a = mx.random.normal(shape)
    mx.eval(a)
    return a


def test_elementwise_chain_and_views():
    a, b = _leaf(4, 8), _leaf(4, 8)
    with dispatches.counting() as rec:
        c = (a + b) * 2.0            # Add, Multiply (the scalar is a leaf)
        d = c.reshape(8, 4)[:2]      # a view of a contiguous array, and a slice: no kernel
        e = mx.exp(d)                # Exp
    counts = dispatches.count(rec, e)
    assert counts.kernels == {"Add": 1, "Multiply": 1, "Exp": 1}
    assert counts.syncs == 0


def test_reshape_of_a_transpose_is_a_copy():
    a = _leaf(2, 3, 4, 5)
    with dispatches.counting() as rec:
        out = a.transpose(0, 2, 1, 3).reshape(2, 4, 15)
    assert dispatches.count(rec, out).kernels == {"Reshape (copy)": 1}


def test_a_transpose_moving_only_size_1_axes_is_a_view_and_keeps_the_values():
    a = _leaf(1, 4, 1, 5)
    with dispatches.counting() as rec:
        t = a.transpose(0, 2, 1, 3)           # (1, 1, 4, 5): the elements keep their order
        out = t.reshape(4, 5)
        moved = _leaf(2, 4, 1, 5).transpose(1, 0, 2, 3).reshape(8, 5)   # moves a size-2 axis: a copy
    assert dispatches.count(rec, out).kernels == {}
    assert mx.array_equal(out, a.reshape(4, 5)) and t.shape == (1, 1, 4, 5)
    assert dispatches.count(rec, moved).kernels == {"Reshape (copy)": 1}
    assert mx.array.transpose(a, 0, 2, 1, 3).shape == (1, 1, 4, 5)   # restored after the block


def test_fast_ops_and_custom_kernels_are_one_dispatch_each_and_their_inputs_are_counted():
    x, w = _leaf(1, 1, 64), _leaf(64)
    real_rms_norm = mx.fast.rms_norm
    with dispatches.counting() as rec:
        h = x * 2.0                                              # Multiply: feeds only the norm
        n = mx.fast.rms_norm(h, w, 1e-5)                         # one dispatch, however MLX composes it
        kernel = mx.fast.metal_kernel(name="mine", input_names=["inp"], output_names=["out"], source="")
        y = kernel(inputs=[n + 1.0], grid=(64, 1, 1), threadgroup=(64, 1, 1),   # Add, then our kernel
                   output_shapes=[(1, 1, 64)], output_dtypes=[mx.float16])[0]
        out = mx.sum(y)                                          # Sum
    counts = dispatches.count(rec, out)
    assert counts.kernels == {"Multiply": 1, "mx.fast.rms_norm": 1, "Add": 1, "metal_kernel:mine": 1, "Sum": 1}
    assert counts.total == 5
    assert mx.fast.rms_norm is real_rms_norm   # restored after the block


def test_compiled_functions_are_one_kernel_per_call():
    a = _leaf(16)
    with dispatches.counting() as rec:
        out = nn.silu(nn.silu(nn.silu(a)))   # mx.compile'd: one fused kernel a call, one primitive shared
    kernels = dispatches.count(rec, out).kernels
    assert sum(kernels.values()) == 3 and next(iter(kernels)).startswith("Compiled")


def test_host_syncs_are_counted():
    a = _leaf(3)
    with dispatches.counting() as rec:
        b = a + 1
        mx.eval(b)                  # 1
        b.item() if b.size == 1 else b.tolist()   # 1 (tolist)
        float(mx.max(b))            # 1 (float)
    counts = dispatches.count(rec, [])
    assert counts.host_syncs == {"eval": 1, "tolist": 1, "float": 1}
    assert mx.array.item.__name__ == "item"      # restored


def test_evaluated_work_is_not_counted_again():
    a = _leaf(8)
    with dispatches.counting() as rec:
        b = mx.exp(a)
        mx.eval(b)                  # b is now a leaf
        c = b + 1
    assert dispatches.count(rec, c).kernels == {"Add": 1}


def test_write_section_replaces_only_its_own_section(tmp_path):
    from metalforge.files import write_section
    doc = tmp_path / "b.md"
    doc.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    write_section(doc, "A", "## A\n\nnew a\n")
    write_section(doc, "C", "## C\n\nc\n")
    assert doc.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nkeep b\n\n## C\n\nc\n"


@pytest.mark.parametrize("backend", ["metal", "mlx"])
def test_a_forward_pass_makes_no_host_synchronisation(tmp_path, backend):
    """Decode and prefill passes on the paths a Mac takes (our kernels; MLX's ops) read nothing
    back to the host while the graph is built: the generation loop's pipelining depends on it."""
    from metalforge import engine
    from metalforge.testing import write_model
    folder = write_model(tmp_path / "m", quantized=(4, 64), dtype=mx.float16)
    with dispatches.metal_available():
        e = engine.load(folder, backend=backend, device="m3-max-40", kv_tokens=256)
    sid = e.add_sequence()
    prefill = dispatches.engine_pass(e, {sid: list(range(2, 40))})
    decode = dispatches.engine_pass(e, {sid: [5]})
    assert prefill.syncs == 0 and decode.syncs == 0, (prefill.host_syncs, decode.host_syncs)
    ours = sum(n for k, n in decode.kernels.items() if k.startswith("metal_kernel:"))
    assert (ours > 0) == (backend == "metal")


@pytest.mark.parametrize("backend", ["metal", "mlx"])
def test_rope_is_one_fast_rope_for_q_and_one_for_k_per_layer(tmp_path, backend):
    """A prompt, one decode token, and three sequences decoding at different positions (one call
    with an offset each): per layer two mx.fast.rope (or, on the Metal path for up to 8 rows, the
    rotation inside norm_qkv) and none of the elementwise rotation's kernels (cos, sin, the
    halves' products and concatenation)."""
    from metalforge import engine
    from metalforge.testing import write_model
    folder = write_model(tmp_path / "m", quantized=(4, 64), dtype=mx.float16, layers=2)
    with dispatches.metal_available():
        e = engine.load(folder, backend=backend, device="m3-max-40", kv_tokens=512)
    sids = [e.add_sequence() for _ in range(3)]
    for sid, n in zip(sids, (5, 17, 40)):
        dispatches.engine_pass(e, {sid: list(range(2, 2 + n))})
    for tokens in ({sids[0]: list(range(3, 20))}, {sids[1]: [5]}, {sid: [6] for sid in sids}):
        full, outside = (dispatches.engine_pass(e, tokens, layers=flag) for flag in (True, False))
        kinds = dispatches.per_layer(full, outside, 2)
        fused = sum(n for k, n in kinds.items() if k.startswith("metal_kernel:mf_norm_qkv"))
        assert (kinds["mx.fast.rope"], fused) in ((2, 0), (0, 1)), kinds   # or rotated in norm_qkv's epilogue
        assert fused == (backend == "metal" and len(tokens[next(iter(tokens))]) <= 8), kinds
        assert not {"Cos", "Sin"} & set(kinds), kinds
        assert kinds.get("Concatenate", 0) <= 1, kinds   # K and V stacked for their one write; the rotation adds none


def test_dequantize_is_one_dispatch_as_on_metal():
    """mx.dequantize is one kernel on Metal (the CPU composes it from shifts and masks): one
    dispatch, its gathered inputs counted, and restored after the block."""
    w = _leaf(8, 64)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(wq, scales, biases)
    real = mx.dequantize
    rows = mx.array([1, 3])
    with dispatches.counting() as rec:
        out = mx.dequantize(wq[rows], scales[rows], biases[rows], group_size=64, bits=4)
    assert out.shape == (2, 64)
    assert dispatches.count(rec, out).kernels == {"Gather": 3, "Dequantize": 1}
    assert mx.dequantize is real
