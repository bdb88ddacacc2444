"""MiniCPM-1 configuration (test remote code; openbmb/MiniCPM-1B-sft-bf16 / MiniCPM-2B-sft-bf16 layout).

MiniCPM-1 is a Llama decoder plus three "muP" scalars, the keys llama.cpp's converter reads
(conversion/minicpm.py, MiniCPMModel.set_gguf_parameters):

- `scale_emb`:      input embeddings are multiplied by it           -> GGUF minicpm.embedding_scale
- `scale_depth`:    each residual branch is multiplied by
                    scale_depth / sqrt(num_hidden_layers)           -> minicpm.residual_scale
- `dim_model_base`: the final hidden state is divided by
                    hidden_size / dim_model_base before lm_head     -> minicpm.logit_scale

Real values: scale_emb 12, scale_depth 1.4, dim_model_base 256 (hidden 1536 / 2304), tied embeddings.
Written for transformers 5 (configs are dataclasses: fields are declared, not set in __init__).
"""

from transformers.models.llama.configuration_llama import LlamaConfig


class MiniCPMConfig(LlamaConfig):
    model_type = "minicpm"

    scale_emb: float = 1.0
    dim_model_base: int = 1
    scale_depth: float = 1.0
    tie_word_embeddings: bool = True  # MiniCPM-1 checkpoints carry no lm_head.weight
