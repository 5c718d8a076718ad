"""Everything that crosses a link: data quantizers and vector compressors with exact bit counts."""
from qdata.codecs.base import (
    Compressor, EmptyState, Payload, Quantizer, TreeSpec, array_bits, flatten, pack_codes,
    payload_bits, unflatten, unpack_codes,
)
