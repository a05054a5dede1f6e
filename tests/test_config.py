"""MoEConfig validation: every invalid field is rejected at construction, naming the field and value."""

from __future__ import annotations

import pytest

from flashmoe_py import MoEConfig

BASE = dict(hidden_size=16, ffn_hidden_size=8, num_experts=8, top_k=2)


@pytest.mark.parametrize("changes, field", [
    (dict(top_k=9), "top_k"),                                    # top_k > E
    (dict(top_k=0), "top_k"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(ffn_hidden_size=-3), "ffn_hidden_size"),
    (dict(num_experts=2.0), "num_experts"),                      # not an int
    (dict(activation="swish"), "activation"),                    # unknown activation
    (dict(score_func="sparsemax"), "score_func"),                # unknown score function
    (dict(num_expert_groups=3), "num_expert_groups"),            # groups must divide E
    (dict(num_expert_groups=4, topk_groups=5), "topk_groups"),   # topk_groups > groups
    (dict(num_expert_groups=4, topk_groups=0), "topk_groups"),
    (dict(num_expert_groups=4, topk_groups=1, top_k=3), "top_k"),  # only 2 experts reachable
    (dict(capacity_factor=0.0), "capacity_factor"),              # capacity_factor <= 0
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(shared_ffn_hidden_size=32), "shared_ffn_hidden_size"),  # width without a shared expert
    (dict(shared_expert_gate=True), "shared_expert_gate"),        # gate without a shared expert
    (dict(renormalize="yes"), "renormalize"),
    (dict(activation="swiglu_oai", swiglu_limit=7.0), "swiglu_alpha"),          # a parameter missing
    (dict(activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=0.0), "swiglu_limit"),  # not > 0
    (dict(activation="swiglu_clamped", swiglu_limit=float("inf")), "swiglu_limit"),
    (dict(activation="swiglu_clamped", swiglu_limit=10.0, swiglu_alpha=1.0), "swiglu_alpha"),  # unused: refused
    (dict(activation="swiglu_softcap", swiglu_gate_softcap=4.0), "swiglu_up_softcap"),
    (dict(swiglu_limit=7.0), "swiglu_limit"),                                 # swiglu takes no parameter
    (dict(router_bias=1), "router_bias"),
])
def test_invalid_field_is_named(changes, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}="):
        MoEConfig(**{**BASE, **changes})


def test_activation_key_carries_the_parameters_exactly():
    oai = MoEConfig(**BASE, activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=7)
    assert oai.activation_key == "swiglu_oai:1.702:7.0" and oai.is_gated and oai.up_size == 16
    soft = MoEConfig(**BASE, activation="swiglu_softcap", swiglu_gate_softcap=0.1, swiglu_up_softcap=1 / 3)
    assert [float(v) for v in soft.activation_key.split(":")[1:]] == [0.1, 1 / 3]  # repr round-trips
    relu2 = MoEConfig(**BASE, activation="relu2")
    assert relu2.activation_key == "relu2" and not relu2.is_gated and relu2.up_size == 8
    from flashmoe_py.activations import parse_activation
    with pytest.raises(ValueError, match="takes 2 parameter"):
        parse_activation("swiglu_oai")  # the name alone never falls back to defaults


def test_derived_sizes():
    gated = MoEConfig(**BASE, num_shared_experts=2)
    assert (gated.up_size, gated.shared_hidden_size, gated.shared_up_size) == (16, 16, 32)
    plain = MoEConfig(**{**BASE, "activation": "gelu"}, num_shared_experts=1, shared_ffn_hidden_size=12)
    assert (plain.up_size, plain.shared_hidden_size, plain.shared_up_size) == (8, 12, 12)
    assert MoEConfig(**BASE).capacity(100) is None
    # C = ceil(1.25 * 10 * 2 / 8) = ceil(3.125) = 4
    assert MoEConfig(**BASE, capacity_factor=1.25).capacity(10) == 4
