"""Tiny random causal LMs of many decoder families, built from their configs (offline, seconds)."""

from __future__ import annotations

import torch

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family_specs() -> dict[str, tuple[str, str, dict]]:
    """name -> (config class, model class, config kwargs), all classes from transformers."""
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 8}),
        "qwen3_5": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
                    {**SMALL, "head_dim": 8, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
                     "linear_num_key_heads": 2, "linear_num_value_heads": 4, "layer_types":
                     ["linear_attention", "full_attention"]}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   {**SMALL, "head_dim": 8, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   {**SMALL, "head_dim": 8, "final_logit_softcapping": 4.0}),
        "cohere": ("CohereConfig", "CohereForCausalLM", {**SMALL, "logit_scale": 0.3}),
        "granite": ("GraniteConfig", "GraniteForCausalLM", {**SMALL, "logits_scaling": 4.0}),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, bos_token_id=1, eos_token_id=2,
                      embd_pdrop=0.0, attn_pdrop=0.0)),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     {**SMALL, "hidden_dropout": 0.0, "attention_dropout": 0.0}),
        "phi": ("PhiConfig", "PhiForCausalLM", {**SMALL, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
        "opt": ("OPTConfig", "OPTForCausalLM",
                dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
                     "router_aux_loss_coef": 0.02}),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", SMALL),
        "mamba": ("MambaConfig", "MambaForCausalLM",
                  dict(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2,
                       conv_kernel=4, pad_token_id=0, use_mambapy=True)),
    }


FAMILIES = sorted(_family_specs())


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random model of ``family`` with a wide logit scale (margins spread out), in eval mode."""
    import transformers

    config_name, model_name, kwargs = _family_specs()[family]
    config = getattr(transformers, config_name)(**kwargs)
    if family == "mixtral":
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel (the float64 references)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    head = model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            head.weight.mul_(10.0)
    return model
