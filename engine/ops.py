"""The engine's kernel dispatch: every quantized linear layer and attention call goes through here.

Backends: `metal` (our generated kernels through mx.fast.metal_kernel, configs from
tuner.lookup), `emulator` (the same kernels on the CPU; slow, for verification), and `mlx`
(MLX's built-ins). The report says which kernel and config each kind of op used.
"""
from __future__ import annotations

import mlx.core as mx

from metalforge import devices
from metalforge.errors import MetalforgeError
from metalforge.kernels import backends
from metalforge.kernels.checks import check
from metalforge.kernels.families import get as get_family
from metalforge.results import lookup

QMV_MAX_ROWS = 8


class Kernels:
    def __init__(self, backend: str, device, results=None):
        self.backend = backends.resolve(backend, allow_mlx=True)
        self.device = device            # a DeviceProfile or None (no tuned configs: family defaults)
        self.results = results
        self.report: dict[str, dict] = {}
        self._choices: dict = {}
        self.cpu_float32 = self.backend == "mlx" and not mx.metal.is_available()

    def _config(self, family: str, shape, dtype: str) -> tuple[dict, str]:
        key = (family, shape, dtype)
        if key not in self._choices:
            fam = get_family(family)
            if self.device is not None:
                choice = lookup(self.device, family, shape, dtype, results=self.results)
                self._choices[key] = (choice.config, choice.describe())
            else:
                config = fam.default_config()
                if check(fam, config, shape, dtype, devices.get("m1")):
                    raise MetalforgeError(f"{family}: the default config cannot serve {shape}; pass device=")
                self._choices[key] = (config, "family default (no device profile)")
        return self._choices[key]

    def _record(self, op: str, **what) -> None:
        self.report.setdefault(op, what)

    def _run(self, family: str, shape_values: dict, dtype: str, inputs: dict) -> mx.array:
        fam = get_family(family)
        shape = fam.shape(shape_values)
        config, source = self._config(family, shape, dtype)
        self._record(f"{family} {_short(shape_values)}", kernel=f"metalforge {family} ({self.backend})",
                     config=config, config_source=source)
        return fam.run(config, shape, dtype, inputs, backend=self.backend, device=self.device)

    # ---- linear layers ------------------------------------------------------------------------
    def linear(self, x: mx.array, w: dict, bits: int | None, group_size: int | None) -> mx.array:
        """x: (T, K) -> (T, N). `w` holds weight (and scales, biases when quantized) and bias."""
        if "scales" not in w:
            self._record(f"linear {tuple(w['weight'].shape)}", kernel="mx matmul (unquantized weights)")
            y = x @ w["weight"].T
        elif self.backend == "mlx":
            self._record("quantized linear", kernel="mx.quantized_matmul")
            xs = x.astype(w["scales"].dtype)   # float32 on the CPU (see Model), else x unchanged
            y = mx.quantized_matmul(xs, w["weight"], w["scales"], w["biases"], transpose=True,
                                    group_size=group_size, bits=bits).astype(x.dtype)
        else:
            family = "qmv" if x.shape[0] <= QMV_MAX_ROWS else "qmm"
            y = self._run(family, dict(M=x.shape[0], N=w["weight"].shape[0], K=x.shape[1], bits=bits,
                                       group_size=group_size), _dtype_name(x.dtype),
                          {"x": x, "w": w["weight"], "scales": w["scales"], "biases": w["biases"]})
        if "bias" in w:
            y = y + w["bias"]
        return y

    # ---- attention ----------------------------------------------------------------------------
    def decode_attention(self, q: mx.array, pool, layer: int, sids: list[int], lengths: list[int],
                         scale: float) -> mx.array:
        """q: (B, Hq, 1, D) -> (B, Hq, 1, D) over each sequence's first `lengths[b]` tokens."""
        if self.backend == "mlx":
            self._record("decode attention", kernel="mx.fast.scaled_dot_product_attention (gathered K/V)")
            outs = []
            for b, (sid, n) in enumerate(zip(sids, lengths)):
                k, v = pool.gather(layer, sid, n)
                outs.append(mx.fast.scaled_dot_product_attention(q[b:b + 1], k, v, scale=scale))
            return mx.concatenate(outs, axis=0)
        table, lens = pool.block_table(sids, lengths)
        keys, values = pool.paged(layer)
        B, Hq, _, D = q.shape
        shape = dict(B=B, Hq=Hq, Hkv=pool.kv_heads, S=pool.max_blocks * pool.block_size, D=D,
                     block_size=pool.block_size, num_blocks=pool.num_blocks)
        return self._run("decode_attention", shape, _dtype_name(q.dtype),
                         {"queries": q, "keys": keys, "values": values, "scale": mx.array(scale, dtype=mx.float32),
                          "block_table": table, "seq_lens": lens})

    def prefill_attention(self, q: mx.array, k: mx.array, v: mx.array, prefix: int, scale: float) -> mx.array:
        """q: (1, Hq, L, D); k, v: (1, Hkv, prefix + L, D); causal, queries at the end."""
        L, LK = q.shape[2], k.shape[2]
        if self.backend == "mlx":
            self._record("prefill attention", kernel="mx.fast.scaled_dot_product_attention (causal)")
            mask = mx.arange(LK)[None, :] <= (mx.arange(L)[:, None] + prefix)
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        shape = dict(B=1, Hq=q.shape[1], Hkv=k.shape[1], L=L, D=q.shape[3], prefix=prefix)
        return self._run("prefill_attention", shape, _dtype_name(q.dtype),
                         {"queries": q, "keys": k, "values": v, "scale": mx.array(scale, dtype=mx.float32)})


def _dtype_name(dtype) -> str:
    return {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]


def _short(shape_values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape_values.items() if k not in ("num_blocks",))
