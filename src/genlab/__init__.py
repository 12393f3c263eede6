"""genlab: generative models made real and hands-on on a CPU.

The small public API: `load_dataset`, `build`, `load`, `fit`, `train`, `sample`, `generate`, `evaluate`.
"""

__version__ = "0.1.0"

from .api import build, evaluate, generate, load, load_dataset, sample, train  # noqa: E402
from .training.trainer import fit  # noqa: E402

__all__ = ["build", "evaluate", "fit", "generate", "load", "load_dataset", "sample", "train", "__version__"]
