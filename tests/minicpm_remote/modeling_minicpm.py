"""MiniCPM-1 as remote code (`trust_remote_code=True`), small and readable, for tests.

Architecturally MiniCPM-1 (openbmb/MiniCPM-1B/2B, `MiniCPMForCausalLM`) is Llama -- RMSNorm,
rotate-half rotary embeddings, optional GQA, SiLU gated MLP, Llama tensor names -- with three
differences, and only those are written here; everything else is transformers' Llama code:

1. input embeddings are multiplied by `scale_emb` (only when computed from input_ids, as in
   MiniCPM's own code);
2. both residual branches of every layer are multiplied by `scale_depth / sqrt(num_hidden_layers)`;
3. the final (normed) hidden state is divided by `hidden_size / dim_model_base` before the lm_head,
   which is tied to the input embeddings.

That is exactly what llama.cpp runs for `general.architecture == "minicpm"` (the Granite graph with
embedding_scale, residual_scale and 1/logit_scale). Because the modules and their names are Llama's,
peft LoRA (q/k/v/o/gate/up/down_proj), packed rows (position_ids restarting at 0, no attention
mask), a boolean `logits_to_keep` mask, generate() and gradient checkpointing work as for Llama.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple

from .configuration_minicpm import MiniCPMConfig


class MiniCPMDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: MiniCPMConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.residual_scale = config.scale_depth / math.sqrt(config.num_hidden_layers)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states * self.residual_scale  # MiniCPM: scaled residual branch

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states * self.residual_scale  # MiniCPM: scaled residual branch


class MiniCPMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MiniCPMConfig
    config: MiniCPMConfig
    _no_split_modules = ["MiniCPMDecoderLayer"]
    _can_record_outputs = {"hidden_states": MiniCPMDecoderLayer, "attentions": LlamaAttention}


class MiniCPMModel(MiniCPMPreTrainedModel):
    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MiniCPMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.config.scale_emb  # MiniCPM: scaled embeddings
        # The rest (cache, causal / packed-sequence mask, rotary, layers, final norm) is Llama's forward.
        return LlamaModel.forward(self, inputs_embeds=inputs_embeds, **kwargs)


class MiniCPMForCausalLM(MiniCPMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniCPMConfig):
        super().__init__(config)
        self.model = MiniCPMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        # MiniCPM: the hidden state is divided by hidden_size / dim_model_base before the (tied) head.
        logits = self.lm_head(hidden_states / (self.config.hidden_size / self.config.dim_model_base))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["MiniCPMForCausalLM", "MiniCPMModel", "MiniCPMPreTrainedModel"]
