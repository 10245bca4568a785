import os
import sys

# Nothing in the test-suite may reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# xdist runs one process per core and each uses torch's threads: with OpenMP's default (active) wait policy a waiting
# thread spins on the core its partner needs, several times slower than either thread alone (benchmarks/README.md).
# It must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a test whose Trainer ran with bf16=True would leave mixed precision on
    for the next test's Accelerator in the same xdist worker. Reset it after every test that loaded accelerate (the
    reset transformers' own tests use)."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def _one_thread_where_marked(request):
    """Tests marked ``one_thread`` run on one torch thread: bitwise comparisons need the same kernels in both runs,
    and tiny models on a shared machine run fastest without OpenMP oversubscription. Autouse, so it applies before
    any fixture the test requests builds a model."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
