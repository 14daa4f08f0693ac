"""Four simulated CPU devices, so the pmap and mesh (jit) paths run in every test session; a
temporary cache folder, so tests never write to the user's; and one persistent compilation
cache for the session and the processes its tests start, so that each program is compiled
once, not once per process."""

import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="selfcleanse_jax_compiled_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    _OWN_COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_COMPILATION_CACHE = None


@pytest.fixture(autouse=True, scope="session")
def _cache_in_a_temporary_folder(tmp_path_factory):
    """Preprocessed-slice caches written by tests go to a temporary folder, not the user's;
    the compilation cache this session made is removed at its end."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    yield
    if _OWN_COMPILATION_CACHE:
        shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)
