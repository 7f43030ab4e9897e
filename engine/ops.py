"""The op layer, in MLX's own `mx.fast` pattern: the model calls semantic ops (attention input,
attention, gated MLP, linear); each op has an MLX composition and the kernel families that can
serve it. Which family serves a shape is asked of the family (its `op` names the op, its
`op_shape` reads a call's sizes as its shape, its `shape` refuses what it cannot serve); among
those that serve, the choice against MLX's op is made per bucket and kept.

Backends: `metal` (our generated kernels through mx.fast.metal_kernel, configs from the results
files), `emulator` (the same kernels on the CPU; slow, for verification) and `mlx` (MLX's
built-ins). Asked for explicitly, `metal` and `emulator` run ours wherever a family serves the
shape; with `auto` on a Mac ours runs only where the evidence says it is faster (Entry.evidence):
a Metal-measured results entry for the device and bucket with a speedup over MLX's built-in above
1, or a modelled one whose margin over MLX exceeds its family's held-out error on published
per-kernel measurements (kernels/timing/constants.yaml); otherwise MLX's op runs. Shapes no family serves always
run MLX's op: nothing a valid model contains raises. `report` says per op which kernel ran and why.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx

from metalforge import devices
from metalforge.engine.cpu_linear import CpuLinear
from metalforge.errors import MetalforgeError
from metalforge.kernels import backends
from metalforge.kernels.checks import check
from metalforge.kernels.families import FAMILIES, get as get_family
from metalforge.results import Entry, lookup


@dataclass(frozen=True)
class PlannedOp:
    """One op a model runs, with the sizes that pick its kernel (see base.Model.op_plan)."""

    op: str
    values: dict


def kernel_shapes(plan: list[PlannedOp]) -> dict[str, list[dict]]:
    """The shapes a plan's ops run, each given to the first family serving it (the tuner's targets)."""
    out: dict[str, list[dict]] = {}
    for p in plan:
        serving, _ = _serving(p.op, p.values)
        if serving:
            family, values, _ = serving[0]
            if values not in out.setdefault(family, []):
                out[family].append(values)
    return out


def serves(p: PlannedOp) -> bool:
    """Whether a family of ours serves a planned op's shape (else MLX's op or composition runs it)."""
    return bool(_serving(p.op, p.values)[0])


def _serving(op: str, values: dict) -> tuple[list[tuple[str, dict, object]], list[str]]:
    """(family, its shape values, its shape) of each family serving the call, in the op's order,
    and the other families' reasons for refusing it."""
    serving, refusals = [], []
    for fam in FAMILIES.values():   # the families serving the op (Family.op), in registry order
        v = fam.op_shape(values) if fam.op == op else None
        if v is None:
            continue
        try:
            serving.append((fam.name, v, fam.shape(v)))
        except MetalforgeError as e:
            refusals.append(str(e))
    return serving, refusals


@dataclass(frozen=True, eq=False)
class Decision:
    """Which kernel serves one op call's bucket: a family with its shape and config, or MLX's op."""

    family: str | None
    values: dict
    shape: object
    config: dict | None
    why: str

    @property
    def table_width(self) -> int:
        """Blocks a row of the block table holds where the kernel reads the KV pool through one
        (its shape's `max_blocks`), else 0: it reads one sequence's K/V, contiguous."""
        return getattr(self.shape, "max_blocks", 0)


class Kernels:
    def __init__(self, backend: str | None, device, results=None):
        self.backend = backends.resolve(backend, allow_mlx=True)
        # `auto` on a Mac: ours per op only where measured faster (see the module docstring)
        self.by_evidence = backends.requested(backend) == "auto" and self.backend == "metal"
        self.device = device            # a DeviceProfile or None (no tuned configs: family defaults)
        self.results = results
        self.report: dict[str, dict] = {}
        self._decisions: dict = {}
        self._reported: set = set()
        self.on_cpu = not mx.metal.is_available()
        self.cpu_float32 = self.backend == "mlx" and self.on_cpu
        self.cpu_linear = CpuLinear() if self.cpu_float32 else None

    def decide(self, op: str, values: dict, dtype: str) -> Decision:
        """Which kernel serves this call (decided once per op, sizes and dtype)."""
        key = (op, tuple(values.items()), dtype)
        if key not in self._decisions:
            self._decisions[key] = self._decide(op, values, dtype)
        return self._decisions[key]

    def _decide(self, op: str, values: dict, dtype: str) -> Decision:
        """Asked for explicitly, the first family serving the shape; by evidence, the serving
        family whose results entry shows the largest gain over MLX (measured before modelled),
        else MLX's op with the first family's reason."""
        serving, refusals = _serving(op, values)
        if not serving:   # a shape no kernel of ours serves: MLX's op serves it
            return Decision(None, values, None, None, "MLX: " + ("; ".join(refusals) or f"no kernel of ours for {op}"))
        if not self.by_evidence or self.device is None:
            return self._asked_for(*serving[0], dtype)
        judged = [self._by_evidence(*s, dtype) for s in serving]
        ours = [(rank, d) for rank, d in judged if d.family is not None]
        return max(ours, key=lambda t: t[0])[1] if ours else judged[0][1]

    def _asked_for(self, name: str, values: dict, shape, dtype: str) -> Decision:
        fam = get_family(name)
        if self.device is None:
            config = fam.default_config()
            if check(fam, config, shape, dtype, devices.get("m1")):
                return Decision(None, values, None, None, "MLX: the family default cannot serve this shape (pass device=)")
            return Decision(name, values, shape, config, "ours: family default (no device profile)")
        choice = lookup(self.device, name, shape, dtype, results=self.results)
        return Decision(name, values, shape, choice.config, f"ours ({self.backend} asked for): {choice.describe()}")

    def _by_evidence(self, name: str, values: dict, shape, dtype: str) -> tuple[tuple, Decision]:
        """(rank, decision) for one serving family: ours where its entry shows it faster."""
        fam = get_family(name)
        choice = lookup(self.device, name, shape, dtype, results=self.results)
        if choice.entry is None:
            return (), Decision(None, values, None, None, f"MLX: no results entry for this bucket ({choice.describe()})")
        entry = Entry.of(choice.entry)
        faster, words = entry.evidence(fam.model_error())
        if not faster:
            return (), Decision(None, values, None, None, f"MLX: {words}")
        return (entry.timer == "metal", entry.speedup), Decision(name, values, shape, choice.config,
                                                                 f"ours: {words} ({choice.describe()})")

    def _record(self, op: str, **what) -> None:
        self.report.setdefault(op, what)

    def _run(self, op: str, values: dict, dtype, inputs, mlx_kernel: str, mlx_op):
        """Our kernel where the decision says so, else `mlx_op()` (MLX's op); recorded either way.
        `inputs(decision)` gives our kernel's inputs."""
        name = _dtype_name(dtype)
        d = self.decide(op, values, name)
        if d not in self._reported:   # the report's words once per decision: no formatting per call
            self._reported.add(d)
            if d.family is None:
                self._record(f"{op} {_short(d.values)}", kernel=mlx_kernel, why=d.why)
            else:
                self._record(f"{d.family} {_short(d.values)}", kernel=f"metalforge {d.family} ({self.backend})",
                             config=d.config, why=d.why, family=d.family,
                             bucket=get_family(d.family).bucket_key(d.shape, name))
        if d.family is None:
            return mlx_op()
        return get_family(d.family).run(d.config, d.shape, name, inputs(d), backend=self.backend, device=self.device)

    # ---- linear -------------------------------------------------------------------------------
    def linear(self, x: mx.array, w: dict, bits: int | None, group_size: int | None, mode: str | None = None,
               residual: mx.array | None = None) -> mx.array:
        """x: (T, K) -> (T, N), plus `residual` (T, N) where given. `w` holds weight (and scales,
        biases when quantized) and bias; `mode` is mx.quantize's (affine, or a floating-point one
        such as mxfp4: MLX's op). With a residual, qmv's residual variant adds it in its epilogue
        where it serves the call; elsewhere the add follows the product."""
        if residual is not None:
            if self._ours(x, w, mode):
                values = dict(M=x.shape[0], N=w["weight"].shape[0], K=x.shape[1], bits=bits, group_size=group_size,
                              residual=1)
                inputs = lambda d: {"x": x, "w": w["weight"], "scales": w["scales"], "biases": w["biases"],
                                    "residual": residual}
                return self._run("linear", values, x.dtype, inputs, "quantized linear + add",
                                 lambda: residual + self.linear(x, w, bits, group_size, mode))
            return residual + self.linear(x, w, bits, group_size, mode)
        if self.cpu_linear is not None:
            self._record("linear", kernel="MLX CPU: split across cores, dequantized for many rows (engine/cpu_linear.py)")
            y = self.cpu_linear(x, w, bits, group_size, mode or "affine")
        elif "scales" not in w:
            self._record(f"linear {tuple(w['weight'].shape)}", kernel="mx matmul (unquantized weights)")
            y = x @ w["weight"].T
        else:
            def mlx_op():
                xs = x.astype(w["biases"].dtype) if "biases" in w else x   # float32 on the CPU (see Model)
                return mx.quantized_matmul(xs, w["weight"], w["scales"], w.get("biases"), transpose=True,
                                           group_size=group_size, bits=bits, mode=mode or "affine").astype(x.dtype)
            if self.backend == "mlx" or mode not in (None, "affine"):
                self._record(f"quantized linear ({mode or 'affine'})", kernel="mx.quantized_matmul")
                y = mlx_op()
            else:
                values = dict(M=x.shape[0], N=w["weight"].shape[0], K=x.shape[1], bits=bits, group_size=group_size)
                y = self._run("linear", values, x.dtype,
                              lambda d: {"x": x, "w": w["weight"], "scales": w["scales"], "biases": w["biases"]},
                              "mx.quantized_matmul", mlx_op)
        if "bias" in w:
            y = y + w["bias"]
        return y

    def _ours(self, x: mx.array, w: dict, mode: str | None, biased: bool = False) -> bool:
        """Whether a quantized projection may run a kernel of ours at all (the family decides the
        rest); `biased`: the kernel adds the projection's bias, if it has one."""
        return (self.backend != "mlx" and self.cpu_linear is None and "scales" in w and (biased or "bias" not in w)
                and mode in (None, "affine") and w["scales"].dtype == x.dtype)

    # ---- the attention block's ops -------------------------------------------------------------------
    def attention_input(self, h: mx.array, attn, step) -> tuple:
        """The residual stream h (tokens, hidden) -> q (1, Hq, tokens, D), k and v (1, Hkv,
        tokens, D), and k and v as one (2, Hkv, tokens, D) array where the kernel wrote them so
        (else None): norm, projections, biases, per-head norms and RoPE at each token's stored
        position. One norm_qkv dispatch where it serves (the block is the plain one, `attn.fused`,
        and the rows fit), else MLX's composition of our linears."""
        a = attn.args

        def composition():
            q, k, v = attn.project(attn.norm(h))
            q = q.reshape(1, -1, a.num_attention_heads, a.head_dim)
            k = k.reshape(1, -1, a.num_key_value_heads, a.head_dim)
            v = v.reshape(1, -1, a.num_key_value_heads, a.head_dim)
            if attn.q_norm is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = attn.rope(q.transpose(0, 2, 1, 3), step)
            k = attn.rope(k.transpose(0, 2, 1, 3), step)
            return q, k, v.transpose(0, 2, 1, 3), None
        projections = (attn.q_proj, attn.k_proj, attn.v_proj) if attn.fused else ()
        if not attn.fused or not all(self._ours(h, p.w, p.mode, biased=True) for p in projections):
            return composition()

        def inputs(d: Decision) -> dict:
            out = {"x": h, "norm": attn.norm.weight, "eps": _scalar(attn.norm.eps)}
            for m, p in zip("qkv", projections):
                out.update({"w_" + m: p.w["weight"], "scales_" + m: p.w["scales"], "biases_" + m: p.w["biases"]})
                if d.shape.bias:
                    out["bias_" + m] = p.w["bias"]
            if d.shape.qk_norm:
                out.update(q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight)
            rope = attn.rope
            return {**out, "positions": step.positions.reshape(-1),
                    "inv_freq": rope.frequencies_for(step.longest), "rope_scale": _scalar(rope.mscale)}
        values = dict(M=h.shape[0], **attn.fused)
        out = self._run("attention_input", values, h.dtype, inputs, "MLX composition (norm, q/k/v, RoPE)", composition)
        if isinstance(out, tuple):   # MLX's composition ran
            return out
        Hq, Hkv = a.num_attention_heads, a.num_key_value_heads
        kv = out[:, Hq:].reshape(2, Hkv, *out.shape[2:])   # k then v: the pool writes them as they lie
        return out[:, :Hq], out[:, Hq:Hq + Hkv], out[:, Hq + Hkv:], kv   # views of one (1, heads, tokens, D) array

    def attention(self, q: mx.array, kv, scale: float, **variant) -> mx.array:
        """q: (1, Hq, tokens, D) -> the same, causal over each sequence's K/V in the pool (`kv`),
        one call a group of the step: B sequences of as many new tokens L each (one token
        decoding, k+1 verifying k drafts, prompts of one length) as (B, Hq, L, D). `variant`:
        window, softcap, sinks (see _attention)."""
        outs = []
        for g in kv.groups():
            qg = q[:, :, g.group.tokens] if len(kv.step.groups) > 1 else q
            B, L = len(g.group.members), g.group.new
            if L == 1:   # (1, Hq, B, D) as B sequences of one token: views
                outs.append(self._attention(qg.transpose(2, 1, 0, 3), g, scale, **variant).transpose(2, 1, 0, 3))
            elif B > 1:   # (1, Hq, B * L, D) as B sequences of L tokens: the token axis split, a view
                per_sequence = mx.unflatten(qg, 2, (B, L)).squeeze(0).transpose(1, 0, 2, 3)
                out = self._attention(per_sequence, g, scale, **variant)
                outs.append(mx.flatten(out.transpose(1, 0, 2, 3), 1, 2)[None])
            else:
                outs.append(self._attention(qg, g, scale, **variant))
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)

    def _attention(self, q: mx.array, kv, scale: float, window: int | None = None, softcap: float | None = None,
                   sinks: mx.array | None = None) -> mx.array:
        """q: (B, Hq, L, D) -> the same, over one group's K/V: L new tokens of each of B
        sequences. `window`: each token attends to the latest `window` keys only (its own
        included); `softcap`: scores pass through softcap * tanh(score / softcap) (Gemma 2);
        `sinks`: a logit per head that joins the softmax's denominator (gpt-oss)."""
        B, Hq, L, D = q.shape
        window = window if window is not None and kv.longest > window else None   # a window the context fills
        sdpa = softcapped_attention(softcap) if softcap else mx.fast.scaled_dot_product_attention
        extra = {} if sinks is None else {"sinks": sinks.astype(q.dtype)}
        if B > 1:
            def mlx_op():   # several sequences: their K/V gathered, one call
                return kv.attend_batch(q, scale, window=window, sdpa=sdpa, **extra)
            mlx_kernel = "mx.fast.scaled_dot_product_attention (over the pool)"
        elif L == 1:
            def mlx_op():   # one sequence: its K/V a view of the pool when one run of blocks
                return kv.attend(q, 0, scale, window=window, sdpa=sdpa, **extra)
            mlx_kernel = "mx.fast.scaled_dot_product_attention (over the pool)"
        else:
            # MLX's causal mask by name (no mask array) where nothing else masks
            plain = window is None and not softcap and not kv.mlx_only and not kv.quantization

            def mlx_op():
                return kv.attend(q, 0, scale, "causal" if plain else kv.mask(window), sdpa=sdpa, **extra)
            mlx_kernel = "mx.fast.scaled_dot_product_attention (causal)"
        if softcap:
            mlx_kernel = "MLX composition (soft-capped scores)"
        elif kv.quantization and sinks is None and not kv.as_computed:
            mlx_kernel = "mx.quantized_matmul attention (quantized KV)"
        if self.backend == "mlx" or kv.mlx_only:   # a rotating pool window: see GroupKV.mlx_only
            self._record("decode attention" if L == 1 else "prefill attention", kernel=mlx_kernel)
            return mlx_op()
        values = dict(B=B, Hq=Hq, Hkv=kv.kv_heads, D=D, new=L, context=kv.longest, **kv.layout(),
                      **{k: v for k, v in (("window", window), ("softcap", softcap), ("sinks", sinks is not None)) if v})

        def inputs(d: Decision) -> dict:
            variant = {"scale": _scalar(scale, ndim=0)}
            if softcap:
                variant["softcap"] = _scalar(softcap, ndim=0)
            if sinks is not None:
                variant["sinks"] = extra["sinks"]
            if d.table_width:
                return {"queries": q, **kv.paged(d.table_width), **variant}
            k, v = kv.contiguous()
            return {"queries": q, "keys": k, "values": v, **variant}
        return self._run("attention", values, q.dtype, inputs, mlx_kernel, mlx_op)

    # ---- the MLP block -------------------------------------------------------------------------
    def gated_mlp(self, h: mx.array, mlp, residual: mx.array | None = None) -> mx.array:
        """The residual stream h -> down(act(gate(x)) * up(x)) (+ residual), x its norm: the
        input side one gate_up dispatch where it serves (the block is the plain one, `mlp.fused`,
        and the rows fit), else MLX's composition of our linears; down_proj takes the residual."""
        def composition():
            gate, up = mlp.gate_up(mlp.norm(h))
            return mlp.gated(gate, up).astype(mlp.dtype)
        projections = (mlp.gate_proj, mlp.up_proj) if mlp.fused else ()
        if mlp.fused and all(self._ours(h, p.w, p.mode) for p in projections):
            def inputs(d: Decision) -> dict:
                out = {"x": h, "norm": mlp.norm.weight, "eps": _scalar(mlp.norm.eps)}
                for m, p in zip(("gate", "up"), projections):
                    out.update({"w_" + m: p.w["weight"], "scales_" + m: p.w["scales"], "biases_" + m: p.w["biases"]})
                return out
            act = self._run("gated_mlp", dict(M=h.shape[0], **mlp.fused), h.dtype, inputs,
                            "MLX composition (norm, gate, up, activation)", composition)
        else:
            act = composition()
        return mlp.down_proj(act, residual=residual)

    # ---- mixture of experts --------------------------------------------------------------------
    def expert_linear(self, x: mx.array, w: dict, indices: mx.array, bits: int | None, group_size: int | None,
                      sorted_indices: bool = False, mode: str | None = None) -> mx.array:
        """x (T, 1, 1, K), (T, k, 1, K) or sorted (T*k, 1, K) through the experts `indices` (T,
        k) or (T*k,) of a stacked layer (experts, N, K): (..., 1, N), as mlx-lm's SwitchLinear.
        Quantized decode-sized calls are our gather_qmv's where the decision says so (one
        dispatch, expert ids read on the GPU); the rest MLX's gather_qmm / gather_mm."""
        if "scales" in w:
            def mlx_op():
                return mx.gather_qmm(x, w["weight"], w["scales"], w.get("biases"), rhs_indices=indices, transpose=True,
                                     group_size=group_size, bits=bits, mode=mode or "affine",
                                     sorted_indices=sorted_indices)
            if self.backend == "mlx" or sorted_indices or mode not in (None, "affine"):
                self._record("expert linear", kernel="mx.gather_qmm")
                y = mlx_op()
            else:
                (T, k), (E, N, _), K = indices.shape, w["weight"].shape, x.shape[-1]
                values = dict(M=T, N=N, K=K, experts=E, top_k=k, bits=bits, group_size=group_size)
                inputs = lambda d: {"x": mx.broadcast_to(x.reshape(T, -1, K), (T, k, K)).reshape(T * k, K),
                                    "w": w["weight"], "scales": w["scales"], "biases": w["biases"],
                                    "indices": indices.reshape(-1).astype(mx.uint32)}
                y = self._run("expert_linear", values, x.dtype, inputs, "mx.gather_qmm",
                              lambda: mlx_op().reshape(T * k, N)).reshape(T, k, 1, N)
        else:
            self._record("expert linear (unquantized)", kernel="mx.gather_mm")
            weight = w["weight"]
            if self.on_cpu and x.dtype != mx.float32:   # MLX's CPU gather_mm takes float32 only
                y = mx.gather_mm(x.astype(mx.float32), weight.astype(mx.float32).swapaxes(-1, -2),
                                 rhs_indices=indices, sorted_indices=sorted_indices).astype(x.dtype)
            else:
                y = mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        if "bias" in w:
            y = y + mx.expand_dims(w["bias"][indices], -2)
        return y


def softcapped_attention(cap: float):
    """Attention with soft-capped scores, composed as mlx-lm's Gemma 2 does (MLX's fused op has
    no soft-cap): scaled q k^T, cap * tanh(s / cap), masked, softmax in float32, times v."""
    def sdpa(q, k, v, scale, mask=None):
        B, Hq, L, D = q.shape
        Hkv = k.shape[1]
        q = (q * scale).reshape(B, Hkv, Hq // Hkv, L, D)
        scores = q @ mx.expand_dims(k, 2).swapaxes(-1, -2)
        scores = mx.tanh(scores / cap) * cap
        if mask is not None:   # (L, S), or (B, 1, L, S) given a KV-head group axis
            scores = mx.where(mask if mask.ndim < 4 else mx.expand_dims(mask, 2), scores,
                              mx.array(mx.finfo(scores.dtype).min, scores.dtype))
        out = mx.softmax(scores, axis=-1, precise=True) @ mx.expand_dims(v, 2)
        return out.reshape(B, Hq, L, D)
    return sdpa


@functools.lru_cache(maxsize=None)
def _scalar(value: float, ndim: int = 1) -> mx.array:
    """A float32 scalar input of a kernel: data, not a dispatch; made once per value, not once per
    layer and step (arrays are immutable, so calls share it). One value (1,) where the kernel
    indexes it (a norm's eps, RoPE's scale), 0-d where it takes it by reference (attention's scale
    and soft-cap: metal_kernel passes a 0-d input as `const constant float&`)."""
    return mx.array([value] if ndim else value, dtype=mx.float32)


def _dtype_name(dtype) -> str:
    return {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]


def _short(shape_values: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape_values.items() if k not in ("num_blocks",))
