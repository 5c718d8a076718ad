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

# Built on the contract above (imported last). The transform code and the two ANS coders are not
# re-exported: their functions share their modules' names, which a re-export would shadow.
from qdata.codecs.refine import RefineState, refined_cache  # noqa: E402

__all__ = [
    # the contract
    "Payload", "Quantizer", "Compressor", "EmptyState", "TreeSpec", "payload_bits", "array_bits",
    "pack_codes", "unpack_codes", "flatten", "unflatten", "counter_bits",
    # data codecs with state: the quantizer adapter, labels, side by side, the learner cache, streams
    "DataCodec", "from_quantizer", "joint", "class_labels", "real_targets", "learner_cache", "CacheState",
    "CachedPayload", "Stream", "StreamMeta", "stream_bits", "read_stream", "refined_cache", "RefineState",
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
