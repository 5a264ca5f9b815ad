"""The kernels' tests run on the built extension, or skip where this CPU cannot build it."""

import pytest

from moshi_core.kernels import build as cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    if not cpu_kernels.supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C: the kernels are not built here")
    built = cpu_kernels.kernels()
    assert built is not None, "the kernels failed to build (see the warning logged)"
    return built
