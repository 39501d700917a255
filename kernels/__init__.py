from .attention import attention_reference, flash_attention
from .cross_entropy import (fused_linear_cross_entropy, fused_linear_logprobs, linear_cross_entropy_reference,
                            linear_logprobs_reference)
