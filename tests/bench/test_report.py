from curvopt.bench.report import TABLE_COLUMNS, markdown_table, table_rows


def _document():
    ok = dict.fromkeys(
        ["m", "solver", "newton_rel_error", "top_eigenvalues", "matvec_time_s"], None
    ) | {
        "method": "kfac",
        "family": "kronecker",
        "ihvp_rel_error": 0.125,
        "newton_cosine": 0.5,
        "top_eig_rel_error": 0.25,
        "time_s": 0.002,
        "setup_time_s": 1.5,
        "peak_memory_bytes": 3 * 2**20,
        "peak_cuda_memory_bytes": None,
        "state_bytes": None,
        "error": None,
    }
    failed = dict(ok, method="mfac_m9", error="ValueError: m = 9 exceeds N")
    return {"results": [ok, failed]}


def test_table_rows_format_units_and_failures():
    ok, failed = table_rows(_document())
    assert ok == ["kfac", "1.25e-01", "0.5000", "2.50e-01", "2.000", "1.500", "3.00", "-"]
    assert failed[0] == "mfac_m9" and "failed: ValueError" in failed[1]
    assert len(failed) == len(TABLE_COLUMNS)


def test_markdown_table_has_header_separator_and_rows():
    lines = markdown_table(_document()).splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| method | IHVP rel. err")
    assert lines[2].startswith("| kfac | 1.25e-01 |")
