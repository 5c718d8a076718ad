"""Compatibility: the names ``qdata.codecs.base`` used to define, re-exported from their own modules.

New code imports from the module that does the job: :mod:`qdata.codecs.payloads` (payloads, bits,
codec shapes), :mod:`qdata.codecs.trees` (flattening), :mod:`qdata.codecs.packing` (bit packing),
:mod:`qdata.codecs.randomness` (counter-based random words), :mod:`qdata.codecs.compile_options`
(XLA:CPU options) and :mod:`qdata.checks` (argument checks). This module defines nothing.
"""

from qdata.checks import check_bits, check_finite, check_fraction, check_int, check_range, is_concrete
from qdata.codecs.compile_options import codec_compiler_options, codec_jit
from qdata.codecs.packing import (
    code_dtype, flags_fuse, index_width, pack_codes, packed_size, unpack_codes, word_packable,
)
from qdata.codecs.payloads import Compressor, EmptyState, Payload, Quantizer, array_bits, payload_bits
from qdata.codecs.randomness import counter_bits
from qdata.codecs.trees import TreeSpec, flatten, tree_spec, unflatten

__all__ = [
    "Payload", "Quantizer", "Compressor", "EmptyState", "array_bits", "payload_bits",
    "TreeSpec", "tree_spec", "flatten", "unflatten",
    "code_dtype", "word_packable", "flags_fuse", "packed_size", "pack_codes", "unpack_codes", "index_width",
    "counter_bits", "codec_compiler_options", "codec_jit",
    "check_bits", "check_int", "check_range", "check_fraction", "is_concrete", "check_finite",
]
