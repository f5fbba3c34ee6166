"""mambacpp: Mamba selective state-space models on the CPU, from Python.

The numpy-level API (no torch needed):

- ``Mamba1``, ``Mamba2``, ``Mamba3``, ``MHA``: one mixer layer (mamba_ssm's ``Mamba`` /
  ``Mamba2`` / ``Mamba3`` / ``MHA``): ``forward``, ``backward``, ``step``; parameters as numpy
  views (``params``, ``grads``).
- ``GatedMLP`` (mamba_ssm), ``SS2D`` / ``VSSBlock`` (VMamba), ``BiMamba`` (Vim): ``forward``,
  ``backward`` (no decode state); ``STBlock``: the spatio-temporal block (``step`` per time
  step).
- ``LM``: a whole language model loaded from a folder (``LM.load``), ``forward``, ``step``,
  ``generate``.
- ``Tokenizer``: the GPT-NeoX byte-level BPE of a ``tokenizer.json``.
- ``load_safetensors`` / ``save_safetensors``, ``set_num_threads`` / ``num_threads``,
  ``keep_freed_memory`` (opt-in allocator policy for training loops), ``set_tensor_cache_limit`` /
  ``tensor_cache_limit`` / ``tensor_cache_bytes`` / ``clear_tensor_cache`` (the C++ library's
  bounded cache of its freed arrays' memory).

``mambacpp.torch`` holds the PyTorch drop-in modules (``Mamba``, ``Mamba2``, ``Mamba3``, ``MHA``,
``GatedMLP``, ``SS2D``, ``VSSBlock``, ``BiMamba``, ``STBlock``, ``MambaLMHeadModel``). Arrays are float32; C++ errors on bad input raise ``ValueError`` with the
library's message, other failures ``RuntimeError``. Kernels run with the GIL released.
"""

from ._core import (  # noqa: F401
    LM,
    MHA,
    SS2D,
    BiMamba,
    BiMambaSaved,
    GatedMLP,
    GatedMLPSaved,
    LMState,
    Mamba1,
    Mamba1Saved,
    Mamba1State,
    Mamba2,
    Mamba2Saved,
    Mamba2State,
    Mamba3,
    Mamba3Saved,
    Mamba3State,
    MHASaved,
    MHAState,
    SS2DSaved,
    STBlock,
    STBlockSaved,
    STBlockState,
    VSSBlock,
    VSSBlockSaved,
    Tokenizer,
    __version__,
    clear_tensor_cache,
    keep_freed_memory,
    load_safetensors,
    num_threads,
    save_safetensors,
    set_num_threads,
    set_tensor_cache_limit,
    tensor_cache_bytes,
    tensor_cache_limit,
)

__all__ = [
    "LM",
    "LMState",
    "Mamba1",
    "Mamba2",
    "Mamba3",
    "MHA",
    "GatedMLP",
    "SS2D",
    "VSSBlock",
    "BiMamba",
    "STBlock",
    "Tokenizer",
    "__version__",
    "keep_freed_memory",
    "load_safetensors",
    "num_threads",
    "save_safetensors",
    "set_num_threads",
    "set_tensor_cache_limit",
    "tensor_cache_bytes",
    "tensor_cache_limit",
    "clear_tensor_cache",
]
