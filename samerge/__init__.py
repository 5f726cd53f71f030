"""samerge: Saliency-Aware Model Merging and the data-free merge baselines, streamed tensor by tensor.

    import samerge
    merged = samerge.merge(base, experts, method="ties", density=0.2)
    samerge.available_methods()
"""

from samerge.engine import merge
from samerge.errors import CheckpointError, SamergeError, SamergeWarning
from samerge.lora import merge_lora_api as merge_lora
from samerge.methods import available_methods
from samerge.saliency import saliency

__version__ = "0.1.0"

__all__ = ["CheckpointError", "SamergeError", "SamergeWarning", "__version__", "available_methods", "merge", "merge_lora", "saliency"]
