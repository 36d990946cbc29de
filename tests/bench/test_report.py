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


def _plot_document():
    def rec(method, err, t, m=None):
        return {"method": method, "m": m, "ihvp_rel_error": err, "time_s": t, "error": None}

    results = [
        rec("hessian", 0.0, 1e-3),
        rec("ggn", 3e-15, 1.1e-3),
        rec("fisher", 0.1, 1e-3),
        rec("empirical_fisher", 0.1 * (1 + 1e-9), 1.2e-3),  # coincides with fisher
        rec("kfac", 0.2, 2e-4),
        rec("mfac_m8", 0.3, 1e-5, m=8),
        rec("mfac_m32", 0.25, 1.1e-5, m=32),
        dict(rec("mfac_m512", None, None, m=512), error="ValueError: m exceeds N"),
    ]
    return {
        "problem": {"name": "toy", "num_params": 10},
        "reference": {"curvature": "hessian"},
        "config": {"damping": 0.1},
        "results": results,
    }


def test_plot_keeps_exact_methods_apart_and_merges_coinciding_lines():
    import matplotlib.pyplot as plt

    from curvopt.bench.report import EXACT_FLOOR, plot_figure

    fig = plot_figure(_plot_document())
    try:
        left, right, strip = fig.axes
        left_labels = left.get_legend_handles_labels()[1]
        assert left_labels == ["M-FAC", "fisher = empirical_fisher", "kfac"]
        # the exact methods are not on the log error axis, so it spans only the approximations
        assert right.get_ylim()[0] > 1e3 * EXACT_FLOOR
        right_labels = right.get_legend_handles_labels()[1]
        assert set(right_labels) == {"fisher", "empirical_fisher", "kfac", "mfac_m8", "mfac_m32"}
        assert strip.get_legend_handles_labels()[1] == ["hessian", "ggn"]
        assert not right.texts and not left.texts  # names in legends, no overlapping labels
        shape = {c.get_label(): c.get_paths()[0].vertices.tobytes() for c in right.collections}
        assert shape["fisher"] != shape["empirical_fisher"]  # coinciding points differ in shape
        # one marker per method across both panels: no M-FAC size reuses another method's
        shapes = [
            c.get_paths()[0].vertices.tobytes() for c in right.collections + strip.collections
        ]
        assert len(shapes) == 7 and len(set(shapes)) == len(shapes)
    finally:
        plt.close(fig)


def test_plot_without_exact_methods_has_two_panels(tmp_path):
    from curvopt.bench.report import save_plots

    document = _plot_document()
    document["results"] = [r for r in document["results"] if r["method"] not in ("hessian", "ggn")]
    out = save_plots(document, tmp_path / "sub" / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def _printed(width):
    import io

    from rich.console import Console

    from curvopt.bench.report import print_table

    document = _document() | {
        "problem": dict(name="p", description="a", num_params=5, num_samples=7, loss_value=1),
        "config": dict(damping=1e-3),
        "reference": dict(kind="dense", curvature="hessian"),
    }
    document["results"][0]["method"] = "empirical_fisher"  # the longest method name
    buffer = io.StringIO()
    print_table(document, Console(file=buffer, width=width, color_system=None))
    return buffer.getvalue()


def test_table_at_80_columns_cuts_no_number():
    from curvopt.bench.report import column_groups

    ok = table_rows(_document())[0]
    text = _printed(80)
    assert "…" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
    for cell in ok[1:]:  # every value of the row appears whole
        assert f" {cell} " in text
    assert text.count("empirical_fisher") == len(column_groups(table_rows(_document()), 80)) >= 2
    assert "mfac_m9 failed: ValueError: m = 9 exceeds N" in text  # the error, whole


def test_table_on_a_wide_console_is_one_table():
    text = _printed(200)
    assert text.count("empirical_fisher") == 1 and "…" not in text
    assert "IHVP rel. err" in text and "state MiB" in text
