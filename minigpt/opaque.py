"""Opaque products: a function torch.compile calls as one op instead of tracing into it.

torch.compile cannot look into a weight packed by FBGEMM (a C++ object), and for some layouts its
own code is slower than the eager kernel. Such a product is registered here under an integer key
and, inside a compiled graph, called through the custom op `minigpt::opaque_product`, so the graph
around it (FBGEMM's activation digits, the rest of the model) is still compiled whole
(`minigpt/compiled_decoding.py`). Eager code calls the product directly.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable

import torch

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


@torch.library.custom_op("minigpt::opaque_product", mutates_args=())
def opaque_product(x: torch.Tensor, key: int) -> torch.Tensor:
    """The registered product `key` of `x` (..., in), as one op torch.compile does not trace into.
    The result is made contiguous, as the graph expects (a layout may return a strided view, e.g.
    the LM head's rows padded for speed)."""
    return _OPAQUE_PRODUCTS[key][0](x).contiguous()


@opaque_product.register_fake
def _opaque_product_shape(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _OPAQUE_PRODUCTS[key][1])
