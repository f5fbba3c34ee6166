"""mambacpp: Mamba selective state-space models on the CPU, from Python.

The numpy-level API (no torch needed):

- ``Mamba1``, ``Mamba2``: one mixer layer (mamba_ssm's ``Mamba`` / ``Mamba2``): ``forward``,
  ``backward``, ``step``; parameters as numpy views (``params``, ``grads``).
- ``LM``: a whole language model loaded from a folder (``LM.load``), ``forward``, ``step``,
  ``generate``.
- ``Tokenizer``: the GPT-NeoX byte-level BPE of a ``tokenizer.json``.
- ``load_safetensors`` / ``save_safetensors``, ``set_num_threads`` / ``num_threads``.

``mambacpp.torch`` holds the PyTorch drop-in modules (``Mamba``, ``Mamba2``,
``MambaLMHeadModel``). Arrays are float32; C++ errors on bad input raise ``ValueError`` with the
library's message, other failures ``RuntimeError``. Kernels run with the GIL released.
"""

from ._core import (  # noqa: F401
    LM,
    LMState,
    Mamba1,
    Mamba1Saved,
    Mamba1State,
    Mamba2,
    Mamba2Saved,
    Mamba2State,
    Tokenizer,
    __version__,
    load_safetensors,
    num_threads,
    save_safetensors,
    set_num_threads,
)

__all__ = [
    "LM",
    "LMState",
    "Mamba1",
    "Mamba2",
    "Tokenizer",
    "__version__",
    "load_safetensors",
    "num_threads",
    "save_safetensors",
    "set_num_threads",
]
