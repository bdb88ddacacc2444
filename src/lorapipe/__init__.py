"""lorapipe: chat dialogues -> LoRA fine-tune -> merged model -> GGUF, as one DVC graph."""

__version__ = "0.1.0"
