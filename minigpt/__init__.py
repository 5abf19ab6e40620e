"""minigpt: a from-scratch, pure-PyTorch DistilGPT-2 that loads, fine-tunes and samples GPT-2 models.

Import what you need from its modules, e.g. `from minigpt.model import GPT`; this package file
imports nothing, so the command-line tools can answer `--help` before torch is loaded.
"""

__version__ = "0.1.0"
