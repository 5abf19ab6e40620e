"""Opaque products: a function torch.compile calls as one op instead of tracing into it.

torch.compile cannot look into a weight packed by FBGEMM (a C++ object), and for some layouts its
own code is slower than the eager kernel. Such a product is registered here under an integer key
and, inside a compiled graph, called through the op `minigpt::opaque_product`, so the graph
around it (FBGEMM's activation digits, the rest of the model) is still compiled whole
(`minigpt/compiled_decoding.py`). Eager code calls the product directly. FBGEMM's ops themselves
are called through `call_packed`, which spares them torch's override check on the packed object.

The op is defined with `torch.library.Library` and a plain Python kernel rather than the
`torch.library.custom_op` decorator, whose wrapper adds ~3 us a call (hot; a decoding step of
distilgpt2 makes up to 25 such calls): measured on the AMD EPYC with AVX-512 BF16, 6-7 against
3.6-3.8 us a call, and compiled int8 decoding 5.76 against 5.59 ms a token (interleaved runs).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch
import torch.nn as nn

_OPAQUE_PRODUCTS: dict[int, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {}
_OPAQUE_KEYS = itertools.count()


def register_opaque_product(owner: object, product: Callable[[torch.Tensor], torch.Tensor], out_features: int) -> int:
    """Register `product` (x (..., in) -> (..., out_features), same dtype) under a key that
    `opaque_product` takes; the entry goes when `owner` is garbage-collected (so `product` must not
    hold a strong reference to `owner`)."""
    key = next(_OPAQUE_KEYS)
    _OPAQUE_PRODUCTS[key] = (product, out_features)
    weakref.finalize(owner, _OPAQUE_PRODUCTS.pop, key, None)
    return key


def call_packed(op: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """`op(*args)` where one argument is a weight packed by FBGEMM (a C++ object, not a tensor).

    Why torch functions are switched off for the call: torch asks every argument of an op called
    from Python for a `__torch_function__` override, and on the packed object that lookup fails
    through a C++ exception, ~10 us a call, as long as a small layer's product. Measured on the AMD
    EPYC with AVX-512 BF16 (FBGEMM int8, two rows, hot): 16 x 64 16.0 -> 6.7 us, 2304 x 768 36.8 ->
    26.8 us. The arguments are plain tensors, so no override is skipped.
    """
    with torch._C.DisableTorchFunction():
        return op(*args)


def _run_product(x: torch.Tensor, key: int) -> torch.Tensor:
    """The registered product `key` of `x` (..., in). The result is made contiguous, as the graph
    expects (a layout may return a strided view, e.g. the LM head's rows padded for speed)."""
    return _OPAQUE_PRODUCTS[key][0](x).contiguous()


def _product_shape(x: torch.Tensor, key: int) -> torch.Tensor:
    """What torch.compile traces instead of running the product: an empty result of its shape."""
    return x.new_empty(*x.shape[:-1], _OPAQUE_PRODUCTS[key][1])


_LIBRARY = torch.library.Library("minigpt", "DEF")  # (kept alive: dropping it unregisters the op)
_LIBRARY.define("opaque_product(Tensor x, int key) -> Tensor")
_LIBRARY.impl("opaque_product", _run_product, "CompositeExplicitAutograd")  # every device
torch.library.register_fake("minigpt::opaque_product", _product_shape, lib=_LIBRARY)

opaque_product: Callable[[torch.Tensor, int], torch.Tensor] = torch.ops.minigpt.opaque_product.default
"""opaque_product(x, key): the registered product `key` of `x` (..., in), as one op that
torch.compile does not trace into."""


class OpaqueLayer(nn.Module):
    """`layer` (x (..., in) -> (..., out_features)) called as one `opaque_product` in a compiled
    graph, so torch.compile does not trace into it."""

    def __init__(self, layer: nn.Module, out_features: int) -> None:
        super().__init__()
        ref = weakref.ref(layer)  # (the registry must not keep the layer alive)
        self.key = register_opaque_product(layer, lambda x: ref()(x), out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return opaque_product(x, self.key)
