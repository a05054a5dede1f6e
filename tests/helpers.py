"""Test inputs: random parameters in a well-conditioned range (never zeros) and their fp64 copies; one forward +
backward through a named backend, for the backend-vs-reference comparisons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import torch

from flashmoe_py import MoEConfig, MoEParams, moe

# The parameterised activations (and relu2 and the tanh gelus), with limits and caps that the unit-scale
# pre-activations of random_params cross often (the families' own values, 7 to 25, would leave the clamps idle here).
ACTIVATION_CONFIGS = {
    # gpt-oss: clamped swiglu with alpha, expert biases, a router bias.
    "swiglu_oai_router_bias": dict(hidden_size=12, ffn_hidden_size=10, num_experts=4, top_k=2,
                                   activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=0.9, bias=True,
                                   router_bias=True),
    # DeepSeek-V4: clamped silu gate, sigmoid scores, a shared expert with the same activation.
    "swiglu_clamped_shared": dict(hidden_size=11, ffn_hidden_size=6, num_experts=5, top_k=2, score_func="sigmoid",
                                  activation="swiglu_clamped", swiglu_limit=0.7, num_shared_experts=1),
    # Inkling2: softcapped gate and up, capacity that drops.
    "swiglu_softcap_capacity": dict(hidden_size=10, ffn_hidden_size=7, num_experts=4, top_k=2,
                                    activation="swiglu_softcap", swiglu_gate_softcap=1.3, swiglu_up_softcap=0.8,
                                    capacity_factor=1.0),
    # Nemotron-H: plain relu^2 with biases.
    "relu2_bias": dict(hidden_size=9, ffn_hidden_size=8, num_experts=4, top_k=2, activation="relu2", bias=True),
    # Gemma 4: the tanh-approximated gelu gate (it departs from the erf gelu by up to 5e-4 near |z| = 2.7, far
    # beyond the fp32 and fp64 tolerances), with a shared expert of the same activation; and its plain form.
    "geglu_tanh_shared": dict(hidden_size=10, ffn_hidden_size=6, num_experts=4, top_k=2, activation="geglu_tanh",
                              num_shared_experts=1),
    "gelu_tanh_bias": dict(hidden_size=9, ffn_hidden_size=7, num_experts=5, top_k=2, activation="gelu_tanh",
                           bias=True),
}


def random_params(cfg: MoEConfig, dtype=torch.float64, device="cpu", num_local_experts=None) -> dict:
    """Random tensors by DESIGN §3 names. The router is scaled up so scores are well separated (no
    accidental near-ties between fp32 and fp64 selection); the expert bias is O(score) so it matters."""
    h, i, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    el = e if num_local_experts is None else num_local_experts

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    p = {
        "router_weight": rnd(e, h, scale=2.0 / h ** 0.5),
        "w_up": rnd(el, h, cfg.up_size, scale=1.0 / h ** 0.5),
        "w_down": rnd(el, i, h, scale=1.0 / i ** 0.5),
    }
    if cfg.expert_bias:
        p["expert_bias"] = rnd(e, scale=0.1).float()
    if cfg.router_bias:
        p["router_bias"] = rnd(e, scale=1.0)
    if cfg.bias:
        p["b_up"] = rnd(el, cfg.up_size, scale=0.1)
        p["b_down"] = rnd(el, h, scale=0.1)
    if cfg.num_shared_experts:
        p["shared_w_up"] = rnd(h, cfg.shared_up_size, scale=1.0 / h ** 0.5)
        p["shared_w_down"] = rnd(cfg.shared_hidden_size, h, scale=1.0 / cfg.shared_hidden_size ** 0.5)
    if cfg.shared_expert_gate:
        p["shared_gate_weight"] = rnd(1, h, scale=1.0 / h ** 0.5)
    return p


def as_params(p: dict) -> MoEParams:
    return MoEParams.from_mapping(p)


def to_fp64_leaves(p: dict) -> dict:
    """Detached fp64 copies that require grad (expert_bias is a buffer: no grad)."""
    return {n: t.detach().double().requires_grad_(n != "expert_bias") for n, t in p.items()}


def random_inputs(cfg: MoEConfig, dtype, num_tokens: int, device="cpu") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(params by name in `dtype`, x [num_tokens, H] in `dtype`, upstream gradient [num_tokens, H] fp64)."""
    params = {n: t.to(device) for n, t in random_params(cfg, dtype).items()}
    x = torch.randn(num_tokens, cfg.hidden_size, dtype=torch.float64).to(device, dtype)
    upstream = torch.randn(num_tokens, cfg.hidden_size, dtype=torch.float64, device=device)
    return params, x, upstream


def forward_backward(backend: str, cfg: MoEConfig, params: dict, x: torch.Tensor, upstream: torch.Tensor, **routing):
    """Forward + backward of sum(out * upstream) + aux_loss on fresh leaves; returns (MoEOutput, grad x,
    grads by parameter name; expert_bias, a buffer, has none)."""
    p = {n: t.detach().clone().requires_grad_(n != "expert_bias") for n, t in params.items()}
    xg = x.detach().clone().requires_grad_()
    result = moe(xg, p, cfg, backend=backend, **routing)
    ((result.out.double() * upstream).sum() + result.aux_loss.double()).backward()
    return result, xg.grad, {n: t.grad for n, t in p.items() if n != "expert_bias"}


def compare_to_reference(backend: str, cfg: MoEConfig, dtype, params: dict, x: torch.Tensor, upstream: torch.Tensor,
                         tol=None, **routing):
    """Forward + backward through `backend` and through the reference on the same inputs: the same experts
    chosen and kept, the same counts and drops, and output, aux loss and every gradient within `tol` (default:
    `dtype`'s tolerance). Returns the backend's MoEOutput for further checks."""
    from tests.tolerances import assert_close

    tol = tol or dtype
    got, gx, gp = forward_backward(backend, cfg, params, x, upstream, **routing)
    ref, rx, rp = forward_backward("reference", cfg, params, x, upstream, **routing)
    assert got.backend == backend
    assert got.out.dtype == x.dtype and got.out.shape == x.shape
    assert torch.equal(got.routing.topk_ids, ref.routing.topk_ids), "chosen experts differ"
    assert torch.equal(got.routing.kept, ref.routing.kept), "capacity kept different assignments"
    assert torch.equal(got.stats.tokens_per_expert.cpu(), ref.stats.tokens_per_expert.cpu())
    assert int(got.stats.dropped) == int(ref.stats.dropped)
    assert_close(got.out, ref.out, tol, "out")
    assert_close(got.aux_loss, ref.aux_loss, tol, "aux_loss")
    assert_close(gx, rx, tol, "grad x")
    for n in rp:
        if rp[n] is None:  # caller-supplied routing: the router gets no gradient in either path
            assert gp[n] is None, f"unexpected gradient for {n}"
            continue
        assert gp[n] is not None, f"no gradient for {n}"
        assert_close(gp[n], rp[n], tol, f"grad {n}")
    return got


def run_ranks(cmd: list, env: dict, cwd, out, world: int, timeout_s: float, seed: int) -> dict:
    """Run one launch of a multi-rank worker (cmd, in its own session) and collect what each rank wrote to
    out/rank<r>.json -> {"ranks": [per-rank results], "seed": seed}, or {"failure": why, with the log's tail}
    when the launch timed out (every process of it killed) or a rank wrote nothing; with the launch's exit code
    and the tail of its log ("returncode", "log")."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds only the ranks this launch started
        log, _ = proc.communicate()
        return {"failure": f"launch timed out after {timeout_s} s (seed={seed})\n{log[-4000:]}"}
    ranks = []
    for r in range(world):
        path = Path(out) / f"rank{r}.json"
        if not path.exists():
            return {"failure": f"rank {r} wrote no results, exit code {proc.returncode} (seed={seed})\n{log[-4000:]}"}
        ranks.append(json.loads(path.read_text()))
    return {"ranks": ranks, "seed": seed, "returncode": proc.returncode, "log": log[-4000:]}


def token_rank_hits(ids: torch.Tensor, num_local: int, world: int) -> torch.Tensor:
    """[T, W] bool: token t has a (kept) expert on rank d; ids [T, k] global experts, -1 for a dropped one."""
    owners = torch.where(ids >= 0, ids // num_local, -1)
    return (owners.unsqueeze(2) == torch.arange(world, device=ids.device)).any(1)


def fused_wire_bytes(routed_ids: list, num_local: int, rank: int, hidden: int, itemsize: int) -> int:
    """The exact bytes the fused kernel's rank `rank` puts, from every rank's ids [T_r, k] (-1 where dropped): one
    row per (token, other rank) with a kept expert there and a routing record (weight: 8 bytes for fp64 layers, else
    4; + an int32 code) per such assignment; one partial-sum row back per (other rank's token, this rank); one
    8-byte signal per (peer, local expert) record packet out and one per peer back."""
    world = len(routed_ids)
    hits = [token_rank_hits(ids, num_local, world) for ids in routed_ids]
    rows_out = int(hits[rank].sum()) - int(hits[rank][:, rank].sum())
    mine = routed_ids[rank]
    records = int(((mine >= 0) & (mine // num_local != rank)).sum())
    rows_back = sum(int(h[:, rank].sum()) for i, h in enumerate(hits) if i != rank)
    record = (8 if itemsize == 8 else 4) + 4
    return (rows_out + rows_back) * hidden * itemsize + records * record + (world - 1) * (num_local + 1) * 8
