"""Everything that crosses a link: data quantizers and vector compressors with exact bit counts."""
from qdata.codecs.packing import pack_codes, unpack_codes
from qdata.codecs.payloads import Compressor, EmptyState, Payload, Quantizer, array_bits, payload_bits
from qdata.codecs.randomness import counter_bits
from qdata.codecs.trees import TreeSpec, flatten, unflatten
from qdata.codecs.compressors import (
    ErrorFeedbackState, PowerSGDState, error_feedback, fp16, fp32, powersgd, qsgd, qsgd_entropy_bits,
    randk, scaled_sign, terngrad, topk,
)
from qdata.codecs.ledger import Bits, add_totals, host_per_entry, host_total
from qdata.codecs.quantizers import (
    QuantizerMeta, nearest_rounding, per_sample_range, stochastic_rounding, subtractive_dither,
)
from qdata.codecs.transforms import CompressGradientsState, compress_gradients

__all__ = [
    # the contract
    "Payload", "Quantizer", "Compressor", "EmptyState", "TreeSpec", "payload_bits", "array_bits",
    "pack_codes", "unpack_codes", "flatten", "unflatten", "counter_bits",
    # the ledger: exact bit counts
    "Bits", "host_total", "host_per_entry", "add_totals",
    # data quantizers
    "stochastic_rounding", "nearest_rounding", "subtractive_dither", "per_sample_range", "QuantizerMeta",
    # vector compressors
    "fp32", "fp16", "randk", "topk", "qsgd", "qsgd_entropy_bits", "terngrad", "scaled_sign", "powersgd",
    "PowerSGDState", "error_feedback", "ErrorFeedbackState",
    # optax
    "compress_gradients", "CompressGradientsState",
]
