"""Every experts class of the installed transformers, found by enumeration, through the "flashmoe" registry entry.

transformers marks a model's experts module with `@use_experts_implementation`; the registry then picks the
function that runs it. This test finds every such class in the installed transformers (the modeling files that
mention the decorator, then the classes whose forward is the decorator's dispatcher), builds each one small from
its family's own config class (sizes shrunk, every other setting, e.g. gpt-oss' alpha and limit, as the family
ships it), and checks that "flashmoe" (reference backend) gives the family's own eager output and gradients (of
the hidden states, the routing weights and every parameter), fp32, or refuses with UnsupportedHFModule naming
what it cannot express. A class in a later transformers release therefore shows up as a failure here (it runs
but differs, it cannot be built small, or it is refused without being listed in REFUSED) or as a listed refusal;
never as a silent pass. The README's table of families is this test's result.

Inputs are scaled so that the pre-activations cross the families' clamp limits (7 for gpt-oss, 10 for DeepSeek-V4)
and softcaps often: a gate that ignored them would differ here.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency: pip install -e .[test]")

import flashmoe_py.hf as fh  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402

H, INNER, E, T, K = 12, 5, 4, 9, 2  # hidden, intermediate, experts, tokens, top-k (2 INNER != H: a transposition shows)

# Refused on purpose, with the words the refusal must contain (and the README's "why").
REFUSED: dict = {}
# The activation each family maps to, where it is not plain swiglu (a change in the mapping shows here).
ACTIVATION = {
    "GptOssExperts": "swiglu_oai", "OpenAIPrivacyFilterExperts": "swiglu_oai", "MiniMaxM3VLExperts": "swiglu_oai",
    "DeepseekV4Experts": "swiglu_clamped", "Glm5NextTextExperts": "swiglu_clamped", "HYV4Experts": "swiglu_clamped",
    "HYV4VLExperts": "swiglu_clamped", "Inkling2Experts": "swiglu_softcap", "Inkling2LoopExperts": "swiglu_softcap",
    "NemotronHExperts": "relu2", "Gemma4TextExperts": "geglu_tanh", "DiffusionGemmaTextExperts": "geglu_tanh",
}

_MODELS = pathlib.Path(transformers.__file__).parent / "models"
MODULES = sorted(f"{p.parent.name}.{p.stem}" for p in _MODELS.glob("*/modeling_*.py")
                 if "use_experts_implementation" in p.read_text(encoding="utf-8"))


def _experts_classes(mod) -> list[type]:
    """Classes defined in `mod` whose forward is use_experts_implementation's dispatcher (decorated classes)."""
    from transformers.integrations import moe as hf_moe

    found = []
    for obj in vars(mod).values():
        if inspect.isclass(obj) and issubclass(obj, torch.nn.Module) and obj.__module__ == mod.__name__:
            fwd = obj.__dict__.get("forward")
            if fwd is not None and getattr(fwd, "__code__", None) is not None and \
                    fwd.__code__.co_filename == hf_moe.__file__:
                found.append(obj)
    return found


def _config_classes(mod, cls) -> list[type]:
    """Config classes the family defines, the experts' annotated one and text configs first."""
    from transformers import PretrainedConfig

    pool = list(vars(mod).values())
    try:
        pool += list(vars(importlib.import_module(mod.__name__.replace(".modeling_", ".configuration_"))).values())
    except ImportError:
        pass
    family = mod.__name__.rsplit(".", 1)[0]
    configs = list(dict.fromkeys(c for c in pool if inspect.isclass(c) and issubclass(c, PretrainedConfig)
                                 and c.__module__.startswith(family)))
    annotated = inspect.signature(cls.__init__).parameters.get("config")
    annotated = annotated.annotation if annotated is not None else None
    return sorted(configs, key=lambda c: (c is not annotated and c.__name__ != annotated, "Text" not in c.__name__))


_EXPERTS_COUNT = re.compile(r"num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts")


def _shrink(config):
    """The config with every size the experts read set small (lists of per-layer sizes too)."""
    for name, value in list(vars(config).items()):
        if _EXPERTS_COUNT.fullmatch(name):
            new = E
        elif "intermediate_size" in name:
            new = INNER
        elif name in ("hidden_size", "moe_hidden_size") or (name == "moe_latent_size" and value is not None):
            new = H
        else:
            continue
        if isinstance(value, (list, tuple)):
            setattr(config, name, type(value)(new for _ in value))
        elif value is None or (isinstance(value, int) and not isinstance(value, bool)):
            setattr(config, name, new)
    return config


def _build_small(mod, cls) -> torch.nn.Module:
    errors = []
    for config_cls in _config_classes(mod, cls):
        try:
            config = _shrink(config_cls())
            kwargs = {"intermediate_size": INNER} if "intermediate_size" in inspect.signature(cls.__init__).parameters \
                else {}
            with torch.device("meta"):
                probe = cls(config, **kwargs)
            dims = [d for p in probe.parameters() for d in p.shape]
            if not dims or max(dims) > 4 * H:
                errors.append(f"{config_cls.__name__}: not small ({dims})")
                continue
            module = cls(config, **kwargs)
        except Exception as err:  # the next config class may fit
            errors.append(f"{config_cls.__name__}: {type(err).__name__}: {str(err)[:120]}")
            continue
        return module.float()
    pytest.fail(f"{cls.__name__}: cannot build it small from its family's config classes "
                f"(extend _shrink / _build_small): {'; '.join(errors) or 'no config class'}")


def _init(module) -> None:
    """Weights scaled to unit-variance outputs per unit input; biases and norm weights O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 3:
                fan_in = p.shape[1] if module.is_transposed else p.shape[2]
                p.normal_(0.0, fan_in ** -0.5)
            else:
                p.normal_(0.0, 0.5)


def _hidden(module) -> int:
    up = module.gate_up_proj if module.has_gate else module.up_proj
    return up.shape[1] if module.is_transposed else up.shape[2]


def _run(module, impl: str, x, ids, w):
    module.config._experts_implementation = impl
    module.zero_grad(set_to_none=True)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = module(xi, ids, wi)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return y.detach(), xi.grad, wi.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("module_name", MODULES)
def test_experts_class_runs_exactly_or_is_refused(module_name, seed):
    fh.register(backend="reference")
    mod = importlib.import_module(f"transformers.models.{module_name}")
    classes = _experts_classes(mod)
    assert classes, f"{module_name} mentions use_experts_implementation but defines no decorated experts class"
    for cls in classes:
        name = cls.__name__
        module = _build_small(mod, cls)
        _init(module)
        x = torch.randn(T, _hidden(module)) * 6.0  # pre-activations of std ~6: past gpt-oss' limit 7 often
        ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
        w = torch.rand(T, K) + 0.1
        want = _run(module, "eager", x, ids, w)
        try:
            got = _run(module, "flashmoe", x, ids, w)
        except fh.UnsupportedHFModule as err:
            assert name in REFUSED, f"{name} refused but not listed in REFUSED (and the README): {err}"
            assert REFUSED[name] in str(err), f"{name}: refusal does not say {REFUSED[name]!r}: {err}"
            continue
        assert name not in REFUSED, f"{name} now runs: take it off REFUSED (and the README)"
        layout = module.__dict__["_flashmoe_cache"]["layout"][1]
        assert layout.activation == ACTIVATION.get(name, "swiglu"), \
            f"{name}: mapped to {layout.activation} {layout.activation_fields}"
        (y, dx, dw, dp), (y_ref, dx_ref, dw_ref, dp_ref) = got, want
        assert_close(y, y_ref, torch.float32, f"{name} output")
        assert_close(dx, dx_ref, torch.float32, f"{name} d hidden_states")
        assert_close(dw, dw_ref, torch.float32, f"{name} d top_k_weights")
        for pname, g in dp_ref.items():
            assert dp[pname] is not None, f"{name}: no gradient reached {pname}"
            assert_close(dp[pname], g, torch.float32, f"{name} d {pname}")
