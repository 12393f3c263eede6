"""genlab: generative models made real and hands-on on a CPU.

The small public API: `load_dataset`, `build`, `load`, `fit`, `train`, `sample`, `generate`, `chat`, `evaluate`,
`detect_watermark`.
"""

__version__ = "0.1.0"

from .api import build, chat, detect_watermark, evaluate, generate, load, load_dataset, sample, train
from .training.trainer import fit

__all__ = ["__version__", "build", "chat", "detect_watermark", "evaluate", "fit", "generate", "load", "load_dataset",
           "sample", "train"]
