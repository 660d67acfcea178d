"""tfds builders writing array_record (no TensorFlow needed) for the synthetic and real FedDAT data.

Start with `load_clients`; `DataFormatError` is what a missing or malformed real-data file raises.
"""
from feddat_jax.data.builders.formats import DataFormatError
from feddat_jax.data.builders.loading import REAL_BENCHMARKS, load_clients
