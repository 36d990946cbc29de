import json

import pytest
import torch
from bench_tiny_problem import tiny_problem

from curvopt.bench import SCHEMA_VERSION, DenseApproximation, run_benchmark, validate
from curvopt.bench.schema import RECORD_FIELDS, TOP_LEVEL_FIELDS

# Frozen copy of schema version 1: changing a key must come with a new schema version.
V1_RECORD_KEYS = [
    "method",
    "family",
    "m",
    "solver",
    "ihvp_rel_error",
    "newton_rel_error",
    "newton_cosine",
    "top_eigenvalues",
    "top_eig_rel_error",
    "time_s",
    "matvec_time_s",
    "setup_time_s",
    "peak_memory_bytes",
    "peak_cuda_memory_bytes",
    "state_bytes",
    "error",
]
V1_TOP_LEVEL = [
    "schema",
    "schema_version",
    "curvopt_version",
    "created",
    "problem",
    "config",
    "reference",
    "environment",
    "results",
]


@pytest.fixture(scope="module")
def base_document():
    problem = tiny_problem()
    d = problem.num_params
    A = torch.diag(torch.linspace(0.1, 2.0, d, dtype=torch.float64))
    result = run_benchmark(
        problem,
        [
            DenseApproximation(A, name="exact"),
            DenseApproximation(
                torch.eye(d, dtype=torch.float64), name="identity", family="diagonal"
            ),
            DenseApproximation(torch.eye(2), name="broken"),
        ],
        reference=DenseApproximation(A, name="A"),
        damping=1e-2,
        repeats=1,
    )
    return json.dumps(result.to_dict())  # through real JSON text


@pytest.fixture
def document(base_document):
    return json.loads(base_document)


def test_schema_version_1_is_frozen():
    assert SCHEMA_VERSION == 1
    assert list(RECORD_FIELDS) == V1_RECORD_KEYS
    assert list(TOP_LEVEL_FIELDS) == V1_TOP_LEVEL


def test_document_round_trips_and_validates(document):
    validate(document)
    assert document["schema"] == "curvopt.bench" and document["schema_version"] == 1
    assert [r["method"] for r in document["results"]] == ["exact", "identity", "broken"]
    for r in document["results"]:
        assert list(r) == V1_RECORD_KEYS
    ok = document["results"][0]
    assert isinstance(ok["ihvp_rel_error"], float) and isinstance(ok["time_s"], float)
    assert ok["peak_memory_bytes"] is None or isinstance(ok["peak_memory_bytes"], int)
    broken = document["results"][2]
    assert broken["error"] and broken["ihvp_rel_error"] is None
    assert document["config"]["damping"] == 1e-2
    assert document["reference"]["kind"] == "dense"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda doc: doc["results"][0].pop("time_s"), "missing keys"),
        (lambda doc: doc["results"][0].update(extra=1), "unexpected keys"),
        (lambda doc: doc["results"][0].update(ihvp_rel_error="small"), "ihvp_rel_error"),
        (lambda doc: doc["results"][0].update(m=True), "m must be"),
        (lambda doc: doc.update(schema_version=2), "schema_version"),
        (lambda doc: doc.pop("results"), "missing keys"),
        (lambda doc: doc["config"].pop("damping"), "config"),
    ],
)
def test_validate_rejects_changed_documents(document, mutate, message):
    mutate(document)
    with pytest.raises(ValueError, match=message):
        validate(document)
