"""Everything that crosses a link: data quantizers and vector compressors with exact bit counts."""
from qdata.codecs.cache import CacheState, CachedPayload, learner_cache
from qdata.codecs.compressors import (
    ErrorFeedbackState, PowerSGDState, error_feedback, fp16, fp32, powersgd, qsgd, qsgd_entropy_bits,
    randk, scaled_sign, terngrad, topk,
)
from qdata.codecs.data_codec import DataCodec, from_quantizer, joint
from qdata.codecs.labels import class_labels, real_targets
from qdata.codecs.ledger import Bits, add_totals, host_per_entry, host_total
from qdata.codecs.packing import pack_codes, unpack_codes
from qdata.codecs.payloads import Compressor, EmptyState, Payload, Quantizer, array_bits, payload_bits
from qdata.codecs.quantizers import (
    QuantizerMeta, nearest_rounding, per_sample_range, stochastic_rounding, subtractive_dither,
)
from qdata.codecs.randomness import counter_bits
from qdata.codecs.streams import Stream, StreamMeta, read_stream, stream_bits
from qdata.codecs.transforms import CompressGradientsState, compress_gradients
from qdata.codecs.trees import TreeSpec, flatten, unflatten

# Codecs built on the contract above (transform_codes imports it from this package): last.
from qdata.codecs.coefficient_ans import coefficient_ans  # noqa: E402
from qdata.codecs.context_ans import context_ans  # noqa: E402
from qdata.codecs.refine import RefineState, refined_cache  # noqa: E402
from qdata.codecs.transform_codec import transform_codec  # noqa: E402

__all__ = [
    # the contract
    "Payload", "Quantizer", "Compressor", "EmptyState", "TreeSpec", "payload_bits", "array_bits",
    "pack_codes", "unpack_codes", "flatten", "unflatten", "counter_bits",
    # data codecs with state: the quantizer adapter, labels, side by side, the learner cache, streams
    "DataCodec", "from_quantizer", "joint", "class_labels", "real_targets", "learner_cache", "CacheState",
    "CachedPayload", "Stream", "StreamMeta", "stream_bits", "read_stream", "refined_cache", "RefineState",
    # codes far below n B: transform codes, and the adaptive ANS coders of pixel and coefficient codes
    "transform_codec", "context_ans", "coefficient_ans",
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
