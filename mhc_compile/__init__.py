"""mhc_compile: rewrite any model's residual connections into DeepSeek's mHC.

>>> import mhc_compile as mhc
>>> model = mhc.mhc_compile(model, n_streams=4)
"""

from . import diagnostics
from .api import (
    DISABLE_ENV,
    CaptureError,
    ConversionError,
    NoResidualError,
    analyse,
    hyper_connected,
    inspect,
    is_converted,
    mhc_compile,
    mhc_parameters,
)
from .checkpoint import from_pretrained, load, read_state_dict, save
from .config import MHCConfig
from .errors import CheckpointError, MHCConfigError, MHCError
from .finetune import mark_trainable, peft_modules_to_save
from .initialization import init_parameters
from .layers import MHCConnection

__version__ = "0.1.0"

__all__ = [
    "mhc_compile",
    "hyper_connected",
    "inspect",
    "analyse",
    "is_converted",
    "mhc_parameters",
    "mark_trainable",
    "peft_modules_to_save",
    "init_parameters",
    "from_pretrained",
    "save",
    "load",
    "read_state_dict",
    "diagnostics",
    "MHCConfig",
    "MHCConnection",
    "MHCError",
    "MHCConfigError",
    "CheckpointError",
    "NoResidualError",
    "ConversionError",
    "CaptureError",
    "DISABLE_ENV",
]
