"""Test-wide settings: offline hub, CPU, f32, a persistent compilation cache."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests check logic, not speed: XLA's optimisation passes cost more than the tiny programs they would speed
# up. Read by JAX at import, and inherited by the CLI runs the tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("FEDDAT_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "feddat_jax_xla")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
