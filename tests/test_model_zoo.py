"""The fast subset of the model-library sweep (tests/model_zoo.py; `make models` runs every case).

torchvision and timm are not in .venv (they break transformers' imports
there; see tests/model_zoo.py): `make test` runs this file a second time in
.venv-models, where they are, and here it is skipped.
"""

import importlib.util

import pytest

if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torchvision") is None:
    pytest.skip("the model sweep runs in .venv-models (make test-models)", allow_module_level=True)

import model_zoo  # noqa: E402

# Before timm: its import imports torchvision, which needs the op schemas this defines.
model_zoo.import_torchvision()

FAST = [model_zoo.find_case(name) for name in model_zoo.FAST]
#: Cases that cannot be captured whole and must say so with a callback.
NEEDS_FALLBACK = {"torch.nn/Transformer (causal tgt_mask)", "own/data-dependent branch in a submodule",
                  "own/.item() loop count"}


@pytest.mark.parametrize("case", FAST, ids=[c.name for c in FAST])
def test_model_matches_torch(case):
    record = model_zoo.check(case)
    assert record["status"].startswith("pass"), record
    if case.name in NEEDS_FALLBACK:
        assert record["callbacks"] > 0, record
    else:
        assert record["callbacks"] == 0, f"{case.name} needed {record['callbacks']} callbacks: {record['fallback']}"


def test_the_fast_subset_spans_the_libraries():
    libraries = {c.name.split("/")[0] for c in FAST}
    assert {"torchvision", "timm", "torch.nn", "own"} <= libraries, libraries
