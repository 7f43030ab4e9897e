"""The engine's kernel dispatch: every quantized linear layer and attention call goes through here.

Backends: `metal` (our generated kernels through mx.fast.metal_kernel, configs from the results
files), `emulator` (the same kernels on the CPU; slow, for verification) and `mlx` (MLX's
built-ins). Asked for explicitly, `metal` and `emulator` run ours wherever a family supports the
shape; with `auto` on a Mac ours runs only where the evidence says it is faster (Entry.evidence):
a Metal-measured results entry for the device and bucket with a speedup over MLX's built-in above
1, or a modelled one whose margin over MLX exceeds the model's held-out error on Apple
measurements (kernels/calibration.yaml); otherwise MLX's op runs. Shapes no family supports
always run MLX's op: nothing a valid model contains raises. `report` says per op which kernel ran
and why.
"""
from __future__ import annotations

import mlx.core as mx

from metalforge import devices
from metalforge.engine.cpu_linear import CpuLinear
from metalforge.engine.kv_pool import LayerKV
from metalforge.errors import MetalforgeError
from metalforge.kernels import backends
from metalforge.kernels.checks import check
from metalforge.kernels.families import get as get_family
from metalforge.results import Entry, lookup

QMV_MAX_ROWS = 8


class Kernels:
    def __init__(self, backend: str | None, device, results=None):
        self.backend = backends.resolve(backend, allow_mlx=True)
        # `auto` on a Mac: ours per op only where measured faster (see the module docstring)
        self.by_evidence = backends.requested(backend) == "auto" and self.backend == "metal"
        self.device = device            # a DeviceProfile or None (no tuned configs: family defaults)
        self.results = results
        self.report: dict[str, dict] = {}
        self._choices: dict = {}
        self.cpu_float32 = self.backend == "mlx" and not mx.metal.is_available()
        self.cpu_linear = CpuLinear() if self.cpu_float32 else None

    def _choose(self, family: str, values: dict, dtype: str):
        """(shape, config, why) to run ours, or (None, None, why) for MLX's op."""
        key = (family, tuple(sorted(values.items())), dtype)
        if key not in self._choices:
            self._choices[key] = self._decide(get_family(family), values, dtype)
        return self._choices[key]

    def _decide(self, fam, values: dict, dtype: str):
        try:
            shape = fam.shape(values)
        except MetalforgeError as e:   # a shape no kernel of ours serves: MLX's op serves it
            return None, None, f"MLX: {str(e).split(': ', 1)[-1]}"
        if self.device is None:
            config = fam.default_config()
            if check(fam, config, shape, dtype, devices.get("m1")):
                return None, None, "MLX: the family default cannot serve this shape (pass device=)"
            return shape, config, "ours: family default (no device profile)"
        choice = lookup(self.device, fam.name, shape, dtype, results=self.results)
        if not self.by_evidence:
            return shape, choice.config, f"ours ({self.backend} asked for): {choice.describe()}"
        if choice.entry is None:
            return None, None, f"MLX: no results entry for this bucket ({choice.describe()})"
        faster, words = Entry.of(choice.entry).evidence(fam.model_error())
        if not faster:
            return None, None, f"MLX: {words}"
        return shape, choice.config, f"ours: {words} ({choice.describe()})"

    def _record(self, op: str, **what) -> None:
        self.report.setdefault(op, what)

    def _ours(self, family: str, values: dict, dtype: str, inputs: dict, mlx_kernel: str, fallback):
        """Our kernel where the choice says so, else `fallback()` (MLX's op); recorded either way."""
        shape, config, why = self._choose(family, values, dtype)
        op = f"{family} {_short(values)}"
        if shape is None:
            self._record(op, kernel=mlx_kernel, why=why)
            return fallback()
        self._record(op, kernel=f"metalforge {family} ({self.backend})", config=config, why=why)
        return get_family(family).run(config, shape, dtype, inputs, backend=self.backend, device=self.device)

    # ---- linear layers ------------------------------------------------------------------------
    def linear(self, x: mx.array, w: dict, bits: int | None, group_size: int | None) -> mx.array:
        """x: (T, K) -> (T, N). `w` holds weight (and scales, biases when quantized) and bias."""
        if self.cpu_linear is not None:
            self._record("linear", kernel="MLX CPU: split across cores, dequantized for many rows (engine/cpu_linear.py)")
            y = self.cpu_linear(x, w, bits, group_size)
        elif "scales" not in w:
            self._record(f"linear {tuple(w['weight'].shape)}", kernel="mx matmul (unquantized weights)")
            y = x @ w["weight"].T
        else:
            def mlx_op():
                xs = x.astype(w["scales"].dtype)   # float32 on the CPU (see Model), else x unchanged
                return mx.quantized_matmul(xs, w["weight"], w["scales"], w["biases"], transpose=True,
                                           group_size=group_size, bits=bits).astype(x.dtype)
            if self.backend == "mlx":
                self._record("quantized linear", kernel="mx.quantized_matmul")
                y = mlx_op()
            else:
                family = "qmv" if x.shape[0] <= QMV_MAX_ROWS else "qmm"
                y = self._ours(family, dict(M=x.shape[0], N=w["weight"].shape[0], K=x.shape[1], bits=bits,
                                            group_size=group_size), _dtype_name(x.dtype),
                               {"x": x, "w": w["weight"], "scales": w["scales"], "biases": w["biases"]},
                               "mx.quantized_matmul", mlx_op)
        if "bias" in w:
            y = y + w["bias"]
        return y

    # ---- attention ----------------------------------------------------------------------------
    def decode_attention(self, q: mx.array, kv: LayerKV, scale: float) -> mx.array:
        """q: (B, Hq, 1, D) -> (B, Hq, 1, D) over each sequence's K/V in the pool (`kv`)."""
        def mlx_op():
            outs = []
            for b in range(q.shape[0]):
                k, v = kv.sequence(b)   # a view of the pool when the sequence is one run of blocks
                outs.append(mx.fast.scaled_dot_product_attention(q[b:b + 1], k, v, scale=scale))
            return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        mlx_kernel = "mx.fast.scaled_dot_product_attention (over the pool)"
        if self.backend == "mlx":
            self._record("decode attention", kernel=mlx_kernel)
            return mlx_op()
        B, Hq, _, D = q.shape
        shape = dict(B=B, Hq=Hq, D=D, **kv.paged_shape())
        return self._ours("decode_attention", shape, _dtype_name(q.dtype),
                          {"queries": q, **kv.paged(), "scale": mx.array(scale, dtype=mx.float32)},
                          mlx_kernel, mlx_op)

    def prefill_attention(self, q: mx.array, kv: LayerKV, scale: float) -> mx.array:
        """q: (1, Hq, L, D), the sequence's last L positions; causal over its whole K/V."""
        k, v = kv.sequence(0)
        L, LK = q.shape[2], k.shape[2]
        prefix = LK - L

        def mlx_op():
            mask = mx.arange(LK)[None, :] <= (mx.arange(L)[:, None] + prefix)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        mlx_kernel = "mx.fast.scaled_dot_product_attention (causal)"
        if self.backend == "mlx":
            self._record("prefill attention", kernel=mlx_kernel)
            return mlx_op()
        shape = dict(B=1, Hq=q.shape[1], Hkv=k.shape[1], L=L, D=q.shape[3], prefix=prefix)
        return self._ours("prefill_attention", shape, _dtype_name(q.dtype),
                          {"queries": q, "keys": k, "values": v, "scale": mx.array(scale, dtype=mx.float32)},
                          mlx_kernel, mlx_op)


def _dtype_name(dtype) -> str:
    return {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]


def _short(shape_values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape_values.items() if k not in ("num_blocks",))
