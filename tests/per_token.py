"""An independent per-token float64 MoE (DESIGN §2), written from the spec with Python loops.

It shares no code with flashmoe_py: selection, tie-breaking and capacity are done with Python's
`sorted` on explicit keys, so a vectorisation mistake in the package cannot hide in here too.
Differentiable by autograd (fp64 tensors throughout), so it also gives reference gradients.
"""

from __future__ import annotations

import math

import torch


def _act(cfg, v: torch.Tensor) -> torch.Tensor:
    """cfg.activation on v [2I] (gated: gate then up) or [I], from the formulas of DESIGN §2.5 and the families'
    definitions, with cfg's parameters read as data (nothing shared with flashmoe_py.activations)."""
    name = cfg.activation

    def sigmoid(a):
        return 1.0 / (1.0 + torch.exp(-a))

    def silu(a):
        return a * sigmoid(a)

    def gelu(a):
        return 0.5 * a * (1.0 + torch.erf(a / math.sqrt(2.0)))

    def gelu_tanh(a):
        return 0.5 * a * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))

    def below(a, hi):  # min(a, hi); the gradient passes where a <= hi, as through a clamp
        return torch.where(a > hi, torch.full_like(a, hi), a)

    def within(a, lim):  # clamp(a, -lim, lim)
        return below(-below(-a, lim), lim)

    if name == "relu2":
        return torch.clamp(v, min=0.0) ** 2
    if name not in ("swiglu", "geglu", "geglu_tanh", "swiglu_oai", "swiglu_clamped", "swiglu_softcap"):
        return {"gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu, "relu": lambda a: torch.clamp(a, min=0.0)}[name](v)
    half = v.shape[-1] // 2
    gate, up = v[..., :half], v[..., half:]
    if name == "swiglu_oai":  # gpt-oss
        g, lim = below(gate, cfg.swiglu_limit), cfg.swiglu_limit
        return (within(up, lim) + 1.0) * g * sigmoid(cfg.swiglu_alpha * g)
    if name == "swiglu_clamped":  # DeepSeek-V4
        return silu(below(gate, cfg.swiglu_limit)) * within(up, cfg.swiglu_limit)
    if name == "swiglu_softcap":  # Inkling2
        cg, cu = cfg.swiglu_gate_softcap, cfg.swiglu_up_softcap
        return cg * torch.tanh(gate / cg) * sigmoid(gate) * cu * torch.tanh(up / cu)
    return {"swiglu": silu, "geglu": gelu, "geglu_tanh": gelu_tanh}[name](gate) * up


def _expert(x_t, p, e, cfg):
    pre = x_t @ p["w_up"][e]
    if p.get("b_up") is not None:
        pre = pre + p["b_up"][e]
    y = _act(cfg, pre) @ p["w_down"][e]
    if p.get("b_down") is not None:
        y = y + p["b_down"][e]
    return y


def per_token_moe(x: torch.Tensor, p: dict, cfg, routing=None) -> dict:
    """x [T, H] fp64, p: dict of fp64 tensors by DESIGN §3 names; cfg: a MoEConfig (read as data).

    routing: optional (ids, weights) lists of lists to skip the router. Returns a dict with
    out [T, H], ids (list of lists), weights (list of lists of 0-d tensors), kept (list of lists), lb, z.
    """
    T = x.shape[0]
    E, k = cfg.num_experts, cfg.top_k
    logits, scores, ids, weights = [], [], [], []
    for t in range(T):
        if routing is not None:
            ids.append(list(routing[0][t]))
            weights.append([routing[1][t][j] for j in range(k)])
            continue
        lg = torch.stack([x[t] @ p["router_weight"][e] + (p["router_bias"][e] if cfg.router_bias else 0.0)
                          for e in range(E)])
        sc = torch.softmax(lg, 0) if cfg.score_func == "softmax" else 1.0 / (1.0 + torch.exp(-lg))
        sel = [float(sc[e].detach()) + (float(p["expert_bias"][e]) if cfg.expert_bias else 0.0) for e in range(E)]
        allowed = list(range(E))
        if cfg.num_expert_groups > 1:
            size = E // cfg.num_expert_groups
            gscore = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2])
                      for g in range(cfg.num_expert_groups)]
            best = sorted(range(cfg.num_expert_groups), key=lambda g: (-gscore[g], g))[:cfg.topk_groups]
            allowed = [e for e in range(E) if e // size in best]
        chosen = sorted(allowed, key=lambda e: (-sel[e], e))[:k]
        w = [sc[e] for e in chosen]
        if cfg.renormalize:
            total = sum(w)
            w = [wi / total for wi in w]
        w = [wi * cfg.routed_scaling_factor for wi in w]
        logits.append(lg)
        scores.append(sc)
        ids.append(chosen)
        weights.append(w)

    kept = [[True] * k for _ in range(T)]
    if cfg.capacity_factor is not None:
        cap = math.ceil(cfg.capacity_factor * T * k / E)
        for e in range(E):
            assigned = [(t, j) for t in range(T) for j in range(k) if ids[t][j] == e]
            assigned.sort(key=lambda tj: (-float(weights[tj[0]][tj[1]].detach()), tj[0]))
            for t, j in assigned[cap:]:
                kept[t][j] = False

    outs = []
    for t in range(T):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(k):
            if kept[t][j]:
                acc = acc + weights[t][j] * _expert(x[t], p, ids[t][j], cfg)
        if cfg.num_shared_experts > 0:
            sh = _act(cfg, x[t] @ p["shared_w_up"]) @ p["shared_w_down"]
            if cfg.shared_expert_gate:
                sh = sh / (1.0 + torch.exp(-(x[t] @ p["shared_gate_weight"][0])))
            acc = acc + sh
        outs.append(acc)
    out = torch.stack(outs) if outs else torch.zeros(0, x.shape[1], dtype=torch.float64)

    lb = z = torch.zeros((), dtype=torch.float64)
    if scores:
        frac = [sum(row.count(e) for row in ids) / (T * k) for e in range(E)]
        mean_score = [sum(scores[t][e] for t in range(T)) / T for e in range(E)]
        lb = E * sum(frac[e] * mean_score[e] for e in range(E))
        z = sum(torch.logsumexp(lg, 0) ** 2 for lg in logits) / T
    return {"out": out, "ids": ids, "weights": weights, "kept": kept, "lb": lb, "z": z}
