"""transformers' MistralForCausalLM built from our pytree: the numerics reference of the parity tests."""

import transformers

from checkpoints.hf import hf_names
from mistral_fn.params import leaves_with_paths


def hf_model(config, params, attn="eager"):
    """A float32 `MistralForCausalLM` holding exactly `params` (mapped by name, no copies of logic)."""
    hf_config = transformers.MistralConfig(**config.to_hf())
    hf_config._attn_implementation = attn
    model = transformers.MistralForCausalLM(hf_config).eval()
    names = hf_names(config)
    state = {names[p]: t.detach().clone() for p, t in leaves_with_paths(params)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def hf_grads(model, config):
    """HF parameter grads as a `{pytree path: tensor}` dict."""
    by_name = dict(model.named_parameters())
    return {path: by_name[name].grad for path, name in hf_names(config).items()}
