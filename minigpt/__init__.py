"""minigpt: a from-scratch, pure-PyTorch DistilGPT-2 that loads, fine-tunes and samples GPT-2 models."""

from .config import GPTConfig
from .errors import MinigptError
from .model import GPT, KVCache

__all__ = ["GPT", "GPTConfig", "KVCache", "MinigptError"]
