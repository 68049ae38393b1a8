import os
import sys

# `python -m pytest` puts the repository root on sys.path, where our top-level kernels/ and engine/ folders
# would shadow the packages of those names (transformers probes for `kernels`): keep the root off it.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run only in the interpreter, which triton picks when it is first imported
    # (tests/gpu modules, collected first, import it too).
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/") and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs on every run, but reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed})")  # captured; pytest shows it for a failing test
    yield seed
