"""mhc_compile: rewrite any model's residual connections into DeepSeek's mHC.

>>> import mhc_compile as mhc
>>> model = mhc.mhc_compile(model, n_streams=4)
"""

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
from .config import MHCConfig, MHCConfigError
from .layers import MHCConnection

__version__ = "0.1.0"

__all__ = [
    "mhc_compile",
    "hyper_connected",
    "inspect",
    "analyse",
    "is_converted",
    "mhc_parameters",
    "MHCConfig",
    "MHCConfigError",
    "MHCConnection",
    "NoResidualError",
    "ConversionError",
    "CaptureError",
    "DISABLE_ENV",
]
