"""Everything that crosses a link: data quantizers and vector compressors with exact bit counts."""
from qdata.codecs.base import (
    Compressor, EmptyState, Payload, Quantizer, TreeSpec, array_bits, flatten, pack_codes,
    payload_bits, unflatten, unpack_codes,
)
from qdata.codecs.compressors import (
    ErrorFeedbackState, PowerSGDState, error_feedback, fp16, fp32, powersgd, qsgd, qsgd_entropy_bits,
    randk, scaled_sign, terngrad, topk,
)
from qdata.codecs.transforms import CompressGradientsState, compress_gradients
from qdata.codecs.base import counter_bits
from qdata.codecs.quantizers import (
    QuantizerMeta, nearest_rounding, per_sample_range, stochastic_rounding, subtractive_dither,
)
