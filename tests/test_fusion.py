"""The fusion pass (allreduce_rms.compile) on CPU with gloo, 2 ranks.

Graphs are captured the way Inductor sees them (Dynamo -> AOT autograd with Inductor's
decompositions) but without Inductor's code generation, so `fuse` can be checked directly and
cheaply; one test then runs the pass inside a real Inductor compile.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from allreduce_rms.launch import run_ranks

EPS = 1e-6
Q, KV, HEAD = 32, 16, 16  # this rank's q and k widths (2 q heads, 1 kv head of 16)
HIDDEN = 48  # this rank's shard of the hidden row
FUSED = {"allreduce_rms.rms_norm.default", "allreduce_rms.qk_norm.default"}
COLLECTIVES = {"_c10d_functional.all_reduce.default", "c10d.allreduce_.default"}


# ------------------------------------------------------------------------- the models, unfused
def unfused_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm of a sharded row as a model writes it without this library: local sum of squares
    -> all-reduce -> normalize."""
    xf = x.float()
    var = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(var)
    return (xf * torch.rsqrt(var / (x.shape[-1] * dist.get_world_size()) + EPS) * weight.float()).to(x.dtype)


def unfused_qk_norm(qkv: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """MiniMax-style QK-norm over all heads: both local mean squares in one all-reduce."""
    world = dist.get_world_size()
    q, k, v = qkv.split([Q, KV, KV], dim=-1)
    qf, kf = q.float(), k.float()
    stats = torch.cat([qf.pow(2).mean(-1, keepdim=True), kf.pow(2).mean(-1, keepdim=True)], dim=-1)
    dist.all_reduce(stats)
    q_var, k_var = (stats / world).chunk(2, dim=-1)
    q = (qf * torch.rsqrt(q_var + EPS) * q_w).to(qkv.dtype)
    k = (kf * torch.rsqrt(k_var + EPS) * k_w).to(qkv.dtype)
    return q, k, v


def attention_block(x: torch.Tensor, w_norm: torch.Tensor, w_qkv: torch.Tensor, q_w: torch.Tensor,
                    k_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """A small TP attention block written the unfused way (x: this rank's hidden shard)."""
    h = unfused_rms_norm(x, w_norm)
    q, k, v = unfused_qk_norm(h @ w_qkv, q_w, k_w)
    # attention of this rank's heads (GQA: both q heads share the kv head)
    tokens = x.shape[0]
    qh = q.view(tokens, Q // HEAD, HEAD).transpose(0, 1)
    kh = k.view(tokens, 1, HEAD).transpose(0, 1)
    vh = v.view(tokens, 1, HEAD).transpose(0, 1)
    attn = torch.softmax((qh @ kh.transpose(1, 2)).float() / HEAD ** 0.5, dim=-1).to(x.dtype) @ vh
    return attn.transpose(0, 1).reshape(tokens, Q), q, k


def norms(x: torch.Tensor, w_norm: torch.Tensor, qkv: torch.Tensor, q_w: torch.Tensor,
          k_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The two norms of attention_block alone: a cheap Inductor compile, as nothing but the
    fused ops is left to generate code for."""
    q, k, _ = unfused_qk_norm(qkv, q_w, k_w)
    return unfused_rms_norm(x, w_norm), q, k


def more_patterns(x32: torch.Tensor, qkv: torch.Tensor, w32: torch.Tensor, q_w: torch.Tensor,
                  k_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Other spellings the pass fuses: float32 input with x*x and mean; q/k as qkv[..., a:b]
    slices, each with its own all-reduce of a sum (two rms_norm nodes), cast to float twice."""
    world = dist.get_world_size()
    var = (x32 * x32).mean(-1, keepdim=True)
    dist.all_reduce(var)
    y = x32 * torch.rsqrt(var / world + EPS) * w32
    outs = [y]
    for lo, hi, w in ((0, Q, q_w), (Q, Q + KV, k_w)):
        part = qkv[..., lo:hi]
        s = part.float().pow(2).sum(-1, keepdim=True)  # .float() written twice: two casts of part
        dist.all_reduce(s)
        outs.append((part.float() * torch.rsqrt(s / ((hi - lo) * world) + EPS) * w.float()).to(qkv.dtype))
    return tuple(outs)


def near_misses(x: torch.Tensor, w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Each is one step away from the pattern; none may be fused."""
    world = dist.get_world_size()
    width = x.shape[-1] * world
    xf = x.float()
    outs = []
    for reduce in ("amax", "sum_no_square"):
        s = xf.pow(2).amax(-1, keepdim=True) if reduce == "amax" else xf.abs().sum(-1, keepdim=True)
        dist.all_reduce(s)
        outs.append((xf * torch.rsqrt(s / width + EPS) * w.float()).to(x.dtype))
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s)
    outs.append((xf * torch.rsqrt(s / x.shape[-1] + EPS) * w.float()).to(x.dtype))  # local width
    s = xf.pow(2).sum(-1, keepdim=True)  # no all-reduce: a plain local RMSNorm
    outs.append((xf * torch.rsqrt(s / width + EPS) * w.float()).to(x.dtype))
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s)
    outs.append((xf * torch.rsqrt(s / width + EPS)).to(x.dtype) * w)  # cast before the weight
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s)
    outs.append((xf * torch.rsqrt(s / width + EPS) * w.float()).to(x.dtype))
    outs.append(s)  # the statistic is also an output: fusing would lose it
    return tuple(outs)


EPS_Q = 1e-5  # spellings(): the 3-D norm's eps
EPS_2 = 1e-3  # spellings(): the second norm's eps


def spellings(x3: torch.Tensor, w: torch.Tensor, qkv3: torch.Tensor, q_w: torch.Tensor, k_w: torch.Tensor,
              x2: torch.Tensor, w2: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Spellings the pattern matcher must also fuse: 3-D inputs, ``rsqrt(..) * x`` and ``w * y``,
    k's statistic first in the cat, the division after the split, the statistics taken back
    by slices, and three norms with three eps (each fused node keeps its own)."""
    world = dist.get_world_size()
    xf = x3.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    dist.all_reduce(var)
    y = (w.float() * (torch.rsqrt(var / world + EPS_Q) * xf)).to(x3.dtype)
    q, k = qkv3[..., :Q].float(), qkv3[..., Q:Q + KV].float()
    stats = torch.cat([(k * k).sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True)], dim=-1)
    dist.all_reduce(stats)
    k_var, q_var = stats[..., 0:1] / (KV * world), stats[..., 1:] / (Q * world)
    q_out = (q * torch.rsqrt(q_var + EPS) * q_w).to(qkv3.dtype)
    k_out = (torch.rsqrt(k_var + EPS) * k * k_w).to(qkv3.dtype)
    xf2 = x2.float()
    var2 = xf2.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(var2)
    z = (xf2 * torch.rsqrt(var2 / (x2.shape[-1] * world) + EPS_2) * w2).to(x2.dtype)
    return y, q_out, k_out, z


def more_near_misses(x: torch.Tensor, w: torch.Tensor, qkv: torch.Tensor, q_w: torch.Tensor,
                     k_w: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """More one-step-away forms; none may be fused."""
    world = dist.get_world_size()
    width = x.shape[-1] * world
    xf = x.float()
    outs = []
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s)
    r = torch.rsqrt(s / width + EPS)
    outs += [(xf * r * w.float()).to(x.dtype), r]  # an intermediate (rsqrt) is also an output
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s)
    outs.append((xf * torch.rsqrt(torch.add(s / width, EPS, alpha=2.0)) * w.float()).to(x.dtype))  # add's alpha
    s = xf.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)  # not a sum
    outs.append((xf * torch.rsqrt(s / width + EPS) * w.float()).to(x.dtype))
    # QK with another eps for k than for q: qk_norm has one eps
    q, k, _ = qkv.split([Q, KV, KV], dim=-1)
    qf, kf = q.float(), k.float()
    stats = torch.cat([qf.pow(2).mean(-1, keepdim=True), kf.pow(2).mean(-1, keepdim=True)], dim=-1)
    dist.all_reduce(stats)
    q_var, k_var = (stats / world).chunk(2, dim=-1)
    outs.append((qf * torch.rsqrt(q_var + EPS) * q_w).to(qkv.dtype))
    outs.append((kf * torch.rsqrt(k_var + EPS_2) * k_w).to(qkv.dtype))
    return tuple(outs)


# ------------------------------------------------------------------------- helpers (in the ranks)
def capture(fn: Callable[..., Any], *args: torch.Tensor) -> Tuple[torch.fx.GraphModule, Callable[..., Any]]:
    """Trace fn as Inductor would see it (dynamic token count); return its aten graph and a
    callable that runs the graph's current code (so a later fuse() takes effect)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    graphs: List[torch.fx.GraphModule] = []

    def compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        graphs.append(gm)
        return lambda *a: gm(*a)

    for a in args:
        if a.dim() == 2 and a.shape[0] == args[0].shape[0]:
            torch._dynamo.mark_dynamic(a, 0)
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=compiler,
                                                                        decompositions=select_decomp_table()))
    compiled(*args)
    assert len(graphs) == 1
    return graphs[0], compiled


def targets(gm: torch.fx.GraphModule) -> List[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def max_rel_err(got: Tuple[torch.Tensor, ...], want: Tuple[torch.Tensor, ...]) -> float:
    return max(((g.double() - w.double()).norm() / w.double().norm()).item() for g, w in zip(got, want))


def _inputs(rank: int, tokens: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    bf = torch.bfloat16
    return {
        "x": torch.randn(tokens, HIDDEN, generator=g).to(bf),
        "w_norm": (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(bf),
        "w_qkv": (torch.randn(HIDDEN, Q + 2 * KV, generator=g) / HIDDEN ** 0.5).to(bf),
        "q_w": 1 + 0.1 * torch.randn(Q, generator=g),
        "k_w": 1 + 0.1 * torch.randn(KV, generator=g),
        "x32": torch.randn(tokens, HIDDEN, generator=g),
        "qkv": torch.randn(tokens, Q + 2 * KV, generator=g).to(bf),
    }


def _block_args(i: Dict[str, torch.Tensor]) -> tuple:
    return i["x"], i["w_norm"], i["w_qkv"], i["q_w"], i["k_w"]


def _norms_args(i: Dict[str, torch.Tensor]) -> tuple:
    return i["x"], i["w_norm"], i["qkv"], i["q_w"], i["k_w"]


def _more_args(i: Dict[str, torch.Tensor]) -> tuple:
    return i["x32"], i["qkv"], i["x32"][0, :].clone().abs() + 0.5, i["q_w"].to(torch.bfloat16), i["k_w"]


# ------------------------------------------------------------------------- workers
def _fuse_worker(rank: int, world: int) -> Dict[str, Any]:
    import allreduce_rms
    from allreduce_rms.compile import fuse

    ws = allreduce_rms.Workspace()
    result: Dict[str, Any] = {}
    with torch.no_grad():
        for name, fn, make_args in (("block", attention_block, _block_args), ("more", more_patterns, _more_args)):
            args = make_args(_inputs(rank, 6))
            gm, run = capture(fn, *args)
            before = run(*args)
            result[f"{name}_replaced"] = fuse(gm, ws)
            after = run(*args)
            fresh = make_args(_inputs(rank, 9))  # another token count, same graph
            result[f"{name}_targets"] = targets(gm)
            result[f"{name}_err"] = max(max_rel_err(after, before), max_rel_err(run(*fresh), fn(*fresh)))

        # near misses: nothing replaced, the graph and its results unchanged
        i = _inputs(rank, 6)
        gm, run = capture(near_misses, i["x"], i["w_norm"])
        code, before = gm.code, run(i["x"], i["w_norm"])
        result["miss_replaced"] = fuse(gm, ws)
        result["miss_unchanged"] = gm.code == code
        result["miss_err"] = max_rel_err(run(i["x"], i["w_norm"]), before)

        # dist.all_reduce traced by make_fx: c10d.allreduce_ in the graph
        from torch.fx.experimental.proxy_tensor import make_fx

        args = _block_args(_inputs(rank, 6))
        gm = make_fx(attention_block, tracing_mode="fake")(*args)
        result["make_fx_replaced"] = fuse(gm)  # no workspaces given: workspace_for(group) (collective)
        result["make_fx_targets"] = targets(gm)
        result["make_fx_err"] = max_rel_err(gm(*args), attention_block(*args))
    return result


def test_fuse_replaces_unfused_patterns_and_keeps_results() -> None:
    for r in run_ranks(_fuse_worker, 2):
        assert r["block_replaced"] == 2  # one rms_norm, one qk_norm
        assert r["more_replaced"] == 3  # one rms_norm (float32), two rms_norm on qkv slices
        for name in ("block", "more", "make_fx"):
            found = set(r[f"{name}_targets"])
            assert FUSED & found and not COLLECTIVES & found, (name, found)
        assert r["block_targets"].count("allreduce_rms.qk_norm.default") == 1
        assert r["more_targets"].count("allreduce_rms.rms_norm.default") == 3
        assert r["block_err"] <= 1e-2 and r["more_err"] <= 1e-2  # bf16 outputs, fp32 math either way
        assert r["make_fx_replaced"] == 2 and r["make_fx_err"] <= 1e-2
        assert r["miss_replaced"] == 0 and r["miss_unchanged"] and r["miss_err"] == 0.0


def _inductor_worker(rank: int, world: int) -> Dict[str, Any]:
    import allreduce_rms
    from allreduce_rms.compile import inductor_pass

    torch._inductor.config.compile_threads = 1
    ws = allreduce_rms.Workspace()
    seen: List[List[str]] = []

    def record(graph: torch.fx.Graph) -> None:  # runs after the fusion pass
        seen.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    args = _norms_args(_inputs(rank, 6))
    torch._dynamo.mark_dynamic(args[0], 0)
    torch._dynamo.mark_dynamic(args[2], 0)
    compiled = torch.compile(norms, fullgraph=True)
    with torch.no_grad(), inductor_pass(ws) as fusion:
        torch._inductor.config.post_grad_custom_post_pass = [fusion, record]
        got = compiled(*args)
    with torch.no_grad():
        fresh = _norms_args(_inputs(rank, 10))
        err = max(max_rel_err(got, norms(*args)), max_rel_err(compiled(*fresh), norms(*fresh)))
    return {"replaced": fusion.replaced, "targets": seen[0] if seen else [], "err": err,
            "restored": torch._inductor.config.post_grad_custom_post_pass is None}


def test_inductor_post_grad_pass_fuses_the_norms() -> None:
    for r in run_ranks(_inductor_worker, 2):
        assert r["replaced"] == 2
        assert {"allreduce_rms.rms_norm.default", "allreduce_rms.qk_norm.default"} <= set(r["targets"])
        assert not COLLECTIVES & set(r["targets"])
        assert r["err"] <= 1e-2  # bf16 outputs, eager unfused vs compiled fused (fp32 math in both)
        assert r["restored"]


def _spelling_args(i: Dict[str, torch.Tensor]) -> tuple:
    tokens = i["x"].shape[0]
    return (i["x"].view(2, tokens // 2, HIDDEN), i["w_norm"], i["qkv"].view(2, tokens // 2, Q + 2 * KV), i["q_w"],
            i["k_w"], i["x32"].to(torch.float16), i["w_norm"].float())


def _eps_of(gm: torch.fx.GraphModule) -> Dict[str, List[float]]:
    """The eps argument of each fused node, by op."""
    found: Dict[str, List[float]] = {}
    for n in gm.graph.nodes:
        if str(n.target) in FUSED:
            eps = n.args[2] if n.target is torch.ops.allreduce_rms.rms_norm.default else n.args[5]
            found.setdefault(str(n.target), []).append(float(eps))
    return found


def _pattern_matcher_worker(rank: int, world: int) -> Dict[str, Any]:
    import allreduce_rms
    from allreduce_rms.compile import FusionPass, fuse
    from allreduce_rms.workspace import lookup
    from torch._inductor.pattern_matcher import PatternMatcherPass
    from torch.fx.experimental.proxy_tensor import make_fx

    ws = allreduce_rms.Workspace()
    result: Dict[str, Any] = {}
    with torch.no_grad():
        # other spellings, 3-D inputs, one eps per norm
        args = _spelling_args(_inputs(rank, 6))
        gm, run = capture(spellings, *args)
        before = run(*args)
        result["spell_replaced"] = fuse(gm, ws)
        result["spell_targets"] = targets(gm)
        result["spell_eps"] = _eps_of(gm)
        fresh = _spelling_args(_inputs(rank, 10))
        result["spell_err"] = max(max_rel_err(run(*args), before), max_rel_err(run(*fresh), spellings(*fresh)))

        # more near misses, through Dynamo (functional collectives) and make_fx (c10d.allreduce_)
        i = _inputs(rank, 6)
        miss_args = (i["x"], i["w_norm"], i["qkv"], i["q_w"], i["k_w"])
        gm, run = capture(more_near_misses, *miss_args)
        code, before = gm.code, run(*miss_args)
        result["miss_replaced"] = fuse(gm, ws)
        result["miss_unchanged"] = gm.code == code
        result["miss_err"] = max_rel_err(run(*miss_args), before)
        gm = make_fx(near_misses, tracing_mode="fake")(i["x"], i["w_norm"])
        code = gm.code
        result["miss_make_fx_replaced"] = fuse(gm, ws)
        result["miss_make_fx_unchanged"] = gm.code == code

        # a one-rank group inside the two-rank world: world size 1 in the divisor, its own workspace
        groups = [dist.new_group([r]) for r in range(world)]
        mine = groups[rank]

        def rms_one_rank(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            var = xf.pow(2).sum(-1, keepdim=True)
            dist.all_reduce(var, group=mine)
            return (xf * torch.rsqrt(var / x.shape[-1] + EPS) * w.float()).to(x.dtype)

        gm, run = capture(rms_one_rank, i["x"], i["w_norm"])
        result["one_replaced"] = fuse(gm, ws)  # ws is the world's: the pass takes workspace_for(mine)
        fused = [n for n in gm.graph.nodes if str(n.target) in FUSED]
        result["one_world"] = [lookup(n.args[3]).world_size for n in fused]
        result["one_err"] = max_rel_err((run(i["x"], i["w_norm"]),), (rms_one_rank(i["x"], i["w_norm"]),))

        # the PatternMatcherPass itself, as another pass manager would run it on a graph
        fusion = FusionPass(ws)
        args = _block_args(i)
        gm, run = capture(attention_block, *args)
        result["pm_is_pass"] = isinstance(fusion.patterns, PatternMatcherPass)
        result["pm_replaced"] = fusion.patterns.apply(gm.graph)
        gm.recompile()
        result["pm_counted"] = fusion.replaced
        result["pm_targets"] = targets(gm)
        result["pm_err"] = max_rel_err(run(*args), attention_block(*args))
    return result


def test_pattern_matcher_spellings_near_misses_one_rank_groups() -> None:
    for r in run_ranks(_pattern_matcher_worker, 2):
        assert r["spell_replaced"] == 3, r  # rms_norm on 3-D x, qk_norm on 3-D qkv, rms_norm with EPS_2
        assert sorted(r["spell_eps"]["allreduce_rms.rms_norm.default"]) == [EPS_Q, EPS_2]
        assert r["spell_eps"]["allreduce_rms.qk_norm.default"] == [EPS]
        assert not COLLECTIVES & set(r["spell_targets"])
        assert r["spell_err"] <= 1e-2  # bf16/fp16 outputs, fp32 math either way
        assert r["miss_replaced"] == 0 and r["miss_unchanged"] and r["miss_err"] == 0.0
        assert r["miss_make_fx_replaced"] == 0 and r["miss_make_fx_unchanged"]
        assert r["one_replaced"] == 1 and r["one_world"] == [1]
        assert r["one_err"] <= 1e-2
        assert r["pm_is_pass"] and r["pm_replaced"] == 2 and r["pm_counted"] == 2
        assert r["pm_targets"].count("allreduce_rms.qk_norm.default") == 1 and not COLLECTIVES & set(r["pm_targets"])
        assert r["pm_err"] <= 1e-2


# ------------------------------------------------------------------------- one process
def test_install_keeps_other_passes_and_disables_graph_cache() -> None:
    from torch._inductor import config

    from allreduce_rms.compile import FusionPass, install_inductor_pass, uninstall_inductor_pass

    def other(graph: torch.fx.Graph) -> None:
        pass

    with config.patch(post_grad_custom_post_pass=other):
        first = install_inductor_pass()
        assert config.post_grad_custom_post_pass == [other, first]
        second = install_inductor_pass()  # replaces the first, keeps the other
        assert config.post_grad_custom_post_pass == [other, second]
        assert isinstance(second, FusionPass) and second.uuid() is None
        uninstall_inductor_pass()
        assert config.post_grad_custom_post_pass is other


def test_graph_without_collectives_is_untouched() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    from allreduce_rms.compile import fuse

    def local_rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS) * w).to(x.dtype)

    gm = make_fx(local_rms, tracing_mode="fake")(torch.randn(4, 8, dtype=torch.bfloat16), torch.ones(8))
    code = gm.code
    assert fuse(gm) == 0 and gm.code == code


def test_any_of_tries_alternatives_and_leaves_no_binding_behind() -> None:
    from torch._inductor.pattern_matcher import CallFunction, KeywordArg
    from torch.fx.experimental.proxy_tensor import make_fx

    from allreduce_rms.compile import AnyOf

    aten = torch.ops.aten

    def f(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.rsqrt(a + 1.0) * b

    gm = make_fx(f, tracing_mode="fake")(torch.randn(3), torch.randn(3))
    out = [n for n in gm.graph.nodes if n.target is aten.mul.Tensor][0]
    x = KeywordArg("x")
    scaled = CallFunction(aten.rsqrt.default, CallFunction(aten.add.Tensor, KeywordArg("s"), 1.0))
    # the first alternative binds x to the rsqrt node, then fails on b: that binding must go
    either = AnyOf(CallFunction(aten.mul.Tensor, x, scaled), CallFunction(aten.mul.Tensor, scaled, x), name="prod")
    m = either.match(out)
    assert m and m.kwargs["x"].name == "b_1" and m.kwargs["s"].name == "a_1" and m.kwargs["prod"] is out
    assert not AnyOf(CallFunction(aten.mul.Tensor, x, x)).match(out)
