"""The model's hyperparameters: nanoGPT's GPTConfig, field for field, plus what imported GPT-2 models need."""

from dataclasses import dataclass


@dataclass
class GPTConfig:
    """nanoGPT's GPTConfig, field for field."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # Beyond nanoGPT, for imported Hugging Face GPT-2 models: HF uses the tanh GELU ("gelu_new").
    activation: str = "gelu"  # "gelu" (exact erf, nanoGPT) or "gelu_new" (tanh approximation, HF GPT-2)
    layer_norm_epsilon: float = 1e-5

    @property
    def gelu_approximate(self) -> str:
        return {"gelu": "none", "gelu_new": "tanh"}[self.activation]
