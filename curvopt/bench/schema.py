"""The JSON output of ``curvopt bench``: a documented, versioned schema.

Top level (an object)::

    {
      "schema": "curvopt.bench",          # constant
      "schema_version": 1,                # bumped on any incompatible change
      "curvopt_version": "0.1.0",
      "created": "2026-01-01T00:00:00+00:00",
      "problem": {...},                   # PROBLEM_FIELDS
      "config": {...},                    # CONFIG_FIELDS
      "reference": {...},                 # REFERENCE_FIELDS
      "environment": {...},               # ENVIRONMENT_FIELDS
      "results": [ {...}, ... ]           # one record per method, RECORD_FIELDS
    }

Every record of ``results`` has exactly the keys of :data:`RECORD_FIELDS` (``null`` where a metric
does not apply or the method failed; then ``error`` holds the reason). Version 1 promises that these
keys keep their names, meanings and units; new keys may only come with a new version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SCHEMA_NAME = "curvopt.bench"
SCHEMA_VERSION = 1

#: Record key -> (JSON type(s), meaning). Units: seconds and bytes.
RECORD_FIELDS: dict[str, tuple[tuple[str, ...], str]] = {
    "method": (("string",), "method name, e.g. 'ggn', 'kfac', 'mfac_m64'"),
    "family": (("string",), "'exact', 'diagonal', 'kronecker' or 'low-rank'"),
    "m": (("integer", "null"), "number of gradients (M-FAC only)"),
    "solver": (("string", "null"), "how the damped inverse is applied"),
    "ihvp_rel_error": (
        ("number", "null"),
        "mean over probe vectors v of ||(Ã+λI)⁻¹v − (A+λI)⁻¹v|| / ||(A+λI)⁻¹v||",
    ),
    "newton_rel_error": (("number", "null"), "the same relative error for v = the gradient g"),
    "newton_cosine": (
        ("number", "null"),
        "cosine of (Ã+λI)⁻¹g with the exact Newton step (A+λI)⁻¹g",
    ),
    "top_eigenvalues": (("array", "null"), "the k largest eigenvalues of the undamped Ã"),
    "top_eig_rel_error": (
        ("number", "null"),
        "||λ̃₁..ₖ − λ₁..ₖ|| / ||λ₁..ₖ|| against the reference",
    ),
    "time_s": (
        ("number", "null"),
        "median wall time of one damped IHVP on one vector, seconds (timeit-style)",
    ),
    "matvec_time_s": (("number", "null"), "median wall time of one undamped product Ãv, seconds"),
    "setup_time_s": (("number", "null"), "wall time of the setup (operators, factors, gradients)"),
    "peak_memory_bytes": (
        ("integer", "null"),
        "peak resident-set increase during setup and products (sampled; null where unmeasurable)",
    ),
    "peak_cuda_memory_bytes": (("integer", "null"), "peak CUDA allocation increase; null off CUDA"),
    "state_bytes": (("integer", "null"), "bytes of tensors the approximation keeps"),
    "error": (("string", "null"), "why the method failed or was skipped; null on success"),
}

PROBLEM_FIELDS = (
    "name",
    "description",
    "num_params",
    "num_samples",
    "loss",
    "dtype",
    "device",
    "loss_value",
)
CONFIG_FIELDS = (
    "methods",
    "damping",
    "relative_damping",
    "reference",
    "max_dense_dim",
    "num_probes",
    "top_k",
    "repeats",
    "seed",
)
REFERENCE_FIELDS = ("curvature", "kind", "top_eigenvalues", "min_eigenvalue", "setup_time_s")
ENVIRONMENT_FIELDS = ("python", "torch", "platform", "num_threads", "cpu_memory_measure")
TOP_LEVEL_FIELDS = (
    "schema",
    "schema_version",
    "curvopt_version",
    "created",
    "problem",
    "config",
    "reference",
    "environment",
    "results",
)

_PY_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "array": (list,),
    "null": (type(None),),
}


def _check_keys(obj: Any, expected: tuple[str, ...] | dict, where: str) -> None:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} must be an object, got {type(obj).__name__}")
    want, have = set(expected), set(obj)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(f"{where}: missing keys {missing}, unexpected keys {extra}")


def validate_record(record: Mapping[str, Any], where: str = "record") -> None:
    """Check one ``results`` record against :data:`RECORD_FIELDS` (keys and JSON types).

    Raises:
        ValueError: On missing or extra keys or a value of the wrong type.
    """
    _check_keys(record, RECORD_FIELDS, where)
    for key, (types, _) in RECORD_FIELDS.items():
        value = record[key]
        ok = any(
            isinstance(value, _PY_TYPES[t])
            and not (t in ("integer", "number") and isinstance(value, bool))
            for t in types
        )
        if not ok:
            raise ValueError(f"{where}.{key} must be {' or '.join(types)}, got {value!r}")


def validate(document: Mapping[str, Any]) -> None:
    """Check a whole ``curvopt bench`` JSON document (as loaded by ``json.load``).

    Raises:
        ValueError: If the document does not follow schema version :data:`SCHEMA_VERSION`.
    """
    _check_keys(document, TOP_LEVEL_FIELDS, "document")
    if document["schema"] != SCHEMA_NAME:
        raise ValueError(f"schema must be {SCHEMA_NAME!r}, got {document['schema']!r}")
    if document["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"schema_version {document['schema_version']!r} is not the supported {SCHEMA_VERSION}"
        )
    _check_keys(document["problem"], PROBLEM_FIELDS, "problem")
    _check_keys(document["config"], CONFIG_FIELDS, "config")
    _check_keys(document["reference"], REFERENCE_FIELDS, "reference")
    _check_keys(document["environment"], ENVIRONMENT_FIELDS, "environment")
    if not isinstance(document["results"], list):
        raise ValueError("results must be a list of records")
    for i, record in enumerate(document["results"]):
        validate_record(record, f"results[{i}]")
