"""Figures, report.md, the JSON sidecar, the 80-column console table and --quiet.

Sample CSVs are written with ResultsFile from the seed README's own numbers
(distilgpt2 on WikiText-2) and read back as --mode report would; the end-to-end
tests run main.main on a tiny model."""

import itertools
import json
import math
import random
import re

import numpy as np
import pytest

import main
from utils import metadata
from matplotlib.colors import to_rgb
from matplotlib.container import BarContainer, ErrorbarContainer
from reporting.figures import importance_figure, pair_heatmap, pareto_front, per_block_figure, tradeoff_figure
from reporting.markdown import report_markdown
from reporting.csvfile import ResultsFile, read_rows
from reporting.schema import COLUMNS, task_column
from reporting.tables import NOISE_NOTE, observations, sweep_table
from models.units import compact_label


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The seed README's distilgpt2 numbers: perplexity and latency (ms) with each block removed.
SEED_BASE = (39.29, 403.38)
SEED_SEQUENTIAL = {0: (12095.66, 460.28), 1: (81.45, 229.94), 2: (83.24, 248.60), 3: (69.57, 369.78),
                   4: (101.32, 297.44), 5: (410.44, 344.71)}
DISTILGPT2_PARAMS, BLOCK_PARAMS = 81_912_576, 7_087_872


def pct(value, reference):
    return (value - reference) / reference * 100


def sample_row(mode, removed, ppl, latency, n_blocks=6):
    params = DISTILGPT2_PARAMS - BLOCK_PARAMS * len(removed)
    return {"mode": mode, "model": "distilgpt2", "dataset": "wikitext-2-raw-v1", "removed_layers": list(removed),
            "num_removed": len(removed), "num_layers": n_blocks - len(removed), "perplexity": ppl,
            "ppl_change_pct": pct(ppl, SEED_BASE[0]), "params": params, "params_m": params / 1e6,
            "params_change_pct": pct(params, DISTILGPT2_PARAMS), "latency_ms": latency, "latency_iqr_ms": 1.5,
            "prefill_ms": 20.0, "tokens_per_s": 64_000 / latency if latency else None,
            "speed_change_pct": pct(latency, SEED_BASE[1]) if latency else None, "eval_tokens": 287_644,
            "device": "cpu", "dtype": "float32", "timestamp": "2026-11-29T05:00:00"}


def write_csv(path, rows):
    out = ResultsFile(str(path))
    out.start(COLUMNS)
    for r in rows:
        out.write(r)
    return read_rows(str(path))


def combinatorial_ppl(removed):
    """Perplexity that grows with each removed block, more for some blocks than others."""
    return SEED_BASE[0] * math.prod(SEED_SEQUENTIAL[b][0] / SEED_BASE[0] for b in removed) ** 0.5


@pytest.fixture
def sequential_rows(tmp_path):
    rows = [sample_row("sequential", [], *SEED_BASE)]
    rows += [sample_row("sequential", [b], ppl, ms) for b, (ppl, ms) in SEED_SEQUENTIAL.items()]
    return write_csv(tmp_path / "seq.csv", rows)


@pytest.fixture
def combinatorial_rows(tmp_path):
    rows = [sample_row("combinatorial", [], *SEED_BASE)]
    for k in (2, 3, 4, 5):
        for removed in itertools.combinations(range(6), k):
            latency = SEED_BASE[1] * (6 - k) / 6 + 3.0 * sum(removed)
            rows.append(sample_row("combinatorial", removed, combinatorial_ppl(removed), latency))
    rows[-1]["perplexity"] = math.inf  # a model too damaged to score
    return write_csv(tmp_path / "comb.csv", rows)


def table_after(markdown, heading):
    """The cells of the first markdown table below ``heading``."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return cells[0], cells[2:]


def money(value, sign=False):
    return f"{value:+,.2f}" if sign else f"{value:,.2f}"


# ---- report.md ---------------------------------------------------------------------------

def test_report_has_the_seed_sequential_table(sequential_rows):
    markdown = report_markdown(sequential_rows, first_header="Layer Removed")
    headers, body = table_after(markdown, "## Sequential Layer Pruning")
    assert headers == ["Layer Removed", "Layers", "Perplexity (↓)", "Speed (ms) ↓", "Parameters (M)",
                       "PPL Change (%)", "Speed Change (%)"]
    assert body[0] == ["None", "6", "39.29", "403.38", "81.91", "+0.00", "+0.00"]
    for (block, (ppl, ms)), cells in zip(SEED_SEQUENTIAL.items(), body[1:]):
        assert cells == [str(block), "5", money(ppl), money(ms), "74.82", money(pct(ppl, SEED_BASE[0]), True),
                         money(pct(ms, SEED_BASE[1]), True)]
    assert body[1][2] == "12,095.66"
    observations = markdown.split("## Key Observations", 1)[1]
    assert "Most harmful: removing block 0" in observations
    assert "Fastest: removing block 1 (229.94 ms" in observations


def test_report_has_the_seed_random_table(tmp_path):
    rows = write_csv(tmp_path / "random.csv", [sample_row("random", [], 39.29, 459.66),
                                               sample_row("random", [1, 3, 4], 1511.92, 281.38)])
    markdown = report_markdown(rows)
    headers, body = table_after(markdown, "## Random Layer Removal")
    assert headers == ["Metric", "Original Model", "Pruned Model", "Change (%)"]
    assert body == [["Perplexity", "39.29", "1,511.92", money(pct(1511.92, 39.29), True)],
                    ["Inference Speed (ms)", "459.66", "281.38", money(pct(281.38, 459.66), True)],
                    ["Parameters (M)", "81.91", "60.65", money(pct(60.650960, 81.912576), True)],
                    ["Layers", "6", "3", "-50.00"]]
    assert "Removed blocks: 1, 3, 4." in markdown


def test_report_lists_the_best_set_per_depth(combinatorial_rows):
    _, body = table_after(report_markdown(combinatorial_rows), "## Best configuration per number of removed blocks")
    for cells in body:
        k = int(cells[0])
        best = min((r for r in combinatorial_rows if len(r["removed_layers"]) == k), key=lambda r: r["perplexity"])
        assert cells[1] == ", ".join(map(str, best["removed_layers"]))
        assert cells[2] == money(best["perplexity"])
    assert [int(c[0]) for c in body] == [2, 3, 4, 5]


def test_report_counts_sublayers_when_a_row_removes_one_alone():
    rows = [sample_row("combinatorial", [], *SEED_BASE)]
    for units, ppl in ((["attn1"], 40.0), (["mlp2"], 41.0), (["block3"], 45.0), (["attn1", "mlp2"], 42.0)):
        row = sample_row("combinatorial", [int(u[5:]) for u in units if u.startswith("block")], ppl, 90.0)
        rows.append({**row, "removed_units": units})
    header, body = table_after(report_markdown(rows),
                               "## Best configuration per number of removed sublayers (a block counts two)")
    assert header[0] == "Sublayers Removed"
    assert [(c[0], c[1], c[2]) for c in body] == [("1", "attn1", "40.00"), ("2", "attn1, mlp2", "42.00")]


# ---- figures: their data are the CSV's rows ---------------------------------------------

def bar_tops(ax):
    return {round(p.get_x() + p.get_width() / 2): p.get_y() + p.get_height() for p in ax.patches}


def test_per_block_figure_plots_each_rows_change(sequential_rows):
    fig = per_block_figure(sequential_rows)
    ppl_ax, speed_ax = fig.axes
    assert ppl_ax.get_yscale() == "log"
    singles = {r["removed_layers"][0]: r for r in sequential_rows if r["removed_layers"]}
    assert bar_tops(ppl_ax) == pytest.approx({b: 1 + r["ppl_change_pct"] / 100 for b, r in singles.items()})
    assert bar_tops(ppl_ax)[0] == pytest.approx(12095.66 / 39.29)
    assert bar_tops(speed_ax) == pytest.approx({b: r["speed_change_pct"] for b, r in singles.items()})


def test_per_block_figure_draws_each_speed_change_with_its_interval(sequential_rows):
    singles = [r for r in sequential_rows if r["removed_layers"]]
    for r in singles:  # block 3 is timed within the noise (its interval holds 0), the others beyond it
        c = r["speed_change_pct"]
        assert abs(c) > 1
        r["speed_change_low_pct"], r["speed_change_high_pct"] = (-abs(c), abs(c)) if r["removed_layers"] == [3] else (
            c - 0.5, c + 1)
    speed_ax = per_block_figure(sequential_rows).axes[1]
    [bars] = [c for c in speed_ax.containers if isinstance(c, BarContainer)]
    [errors] = [c for c in speed_ax.containers if isinstance(c, ErrorbarContainer)]
    segments = errors.lines[2][0].get_segments()
    assert [(s[0][0], s[0][1], s[1][1]) for s in segments] == pytest.approx(
        [(r["removed_layers"][0], r["speed_change_low_pct"], r["speed_change_high_pct"]) for r in singles])
    pale = {round(bar.get_x() + bar.get_width() / 2) for bar in bars if bar.get_facecolor()[:3] == to_rgb("#d5d8dc")}
    assert pale == {3}
    assert "within the noise" in speed_ax.get_title()


def test_per_block_figure_without_latency_has_one_panel(sequential_rows):
    for r in sequential_rows:
        r["latency_ms"] = r["speed_change_pct"] = None
    assert len(per_block_figure(sequential_rows).axes) == 1


def test_tradeoff_figure_plots_every_configuration_and_labels_the_frontier(combinatorial_rows):
    fig = tradeoff_figure(combinatorial_rows)
    finite = [r for r in combinatorial_rows if math.isfinite(r["perplexity"])]
    assert "1 with infinite perplexity not shown" in fig._suptitle.get_text()
    for ax, key in zip(fig.axes, ["num_layers", "latency_ms"]):
        pruned, base = ax.collections[0].get_offsets(), ax.collections[1].get_offsets()
        assert sorted(map(tuple, pruned.tolist())) == sorted((r[key], r["perplexity"]) for r in finite[1:])
        assert base.tolist() == [[finite[0][key], finite[0]["perplexity"]]]
        # the frontier: configurations no other one beats on both axes, found by brute force
        dominated = lambda r: any(o[key] <= r[key] and o["perplexity"] <= r["perplexity"] and
                                  (o[key], o["perplexity"]) != (r[key], r["perplexity"]) for o in finite)
        expected = sorted((r[key], r["perplexity"]) for r in finite if not dominated(r))
        line = ax.lines[0]
        assert list(zip(line.get_xdata(), line.get_ydata())) == pytest.approx(expected)
        assert sorted(t.get_text() for t in ax.texts) == sorted(
            compact_label(r["removed_layers"]) if r["removed_layers"] else "none" for r in finite if not dominated(r))


def test_compact_labels_show_runs_as_ranges():
    assert [compact_label(r) for r in ([0, 1, 2, 5], [1, 3], [0, 1, 3, 4], [])] == ["0-2,5", "1,3", "0,1,3,4", "None"]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    points = [(rng.randint(0, 9), rng.randint(0, 9)) for _ in range(60)]
    front = {points[i] for i in pareto_front(points)}
    expected = {p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)}
    assert front == expected


def test_pair_heatmap_cells_are_the_pair_perplexities(combinatorial_rows):
    image = pair_heatmap(combinatorial_rows).axes[0].images[0].get_array()
    expected = np.full((6, 6), np.nan)
    for r in combinatorial_rows:
        if len(r["removed_layers"]) == 2:
            i, j = r["removed_layers"]
            expected[i, j] = expected[j, i] = r["perplexity"]
    np.testing.assert_array_equal(np.ma.filled(image.astype(float), np.nan), expected)


def test_importance_figure_draws_the_scores_the_choosing_modes_write(model_dir, text_file, tmp_path, sequential_rows):
    assert importance_figure(sequential_rows) is None  # no scores: no figure
    code = main.main(["--mode", "importance", "--metric", "bi", "--num-remove", "1", "--model", str(model_dir),
                      "--dataset", str(text_file), "--max-tokens", "200", "--calib-tokens", "300", "--no-speed",
                      "--plot", "--quiet", "--output-dir", str(tmp_path / "imp")])
    assert code == 0
    [path] = (tmp_path / "imp").glob("*.csv")
    assert list((tmp_path / "imp").glob("*_importance.png"))
    chosen = read_rows(str(path))[-1]
    written = {json.loads(k)[0]: v for k, v in json.loads(chosen["scores"]).items()}
    fig = importance_figure(read_rows(str(path)))
    assert [ax.get_title() for ax in fig.axes] == ["bi"]
    assert bar_tops(fig.axes[0]) == pytest.approx(written)
    # compare's single-removal rows carry every one-pass score of their block, keyed by metric
    compare_rows = [{"removed_layers": [b], "metric": "bi,single",
                     "scores": json.dumps({"bi": 0.1 * b, "angular": 0.2 * b})} for b in range(3)]
    fig = importance_figure(compare_rows)
    assert [ax.get_title() for ax in fig.axes] == ["bi", "angular"]  # registry order
    assert bar_tops(fig.axes[1]) == pytest.approx({b: 0.2 * b for b in range(3)})
    # with --unit sublayer, the single-unit rows are attentions and MLPs, drawn in block order and named
    unit_rows = [{"removed_layers": [], "removed_units": [u], "metric": "bi,single",
                  "scores": json.dumps({"bi": score})} for u, score in (("mlp1", 0.4), ("attn0", 0.1), ("mlp0", 0.3))]
    fig = importance_figure(unit_rows)
    [ax] = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["attn0", "mlp0", "mlp1"]
    assert bar_tops(ax) == pytest.approx({0: 0.1, 1: 0.3, 2: 0.4})
    assert "unit importance scores" in fig._suptitle.get_text()


def test_tasks_figure_plots_every_row_the_baseline_in_black(tmp_path):
    from reporting.figures import tasks_figure

    rows = [{"removed_layers": removed, "removed_units": units, "perplexity": ppl, "model": "m",
             task_column("mc", "acc"): acc, task_column("mc", "acc_stderr"): 0.01}
            for removed, units, ppl, acc in (([], [], 10.0, 0.5), ([1], ["block1"], 12.0, 0.45),
                                             ([], ["attn2"], 11.0, 0.48))]
    accuracy_ax, ppl_ax = tasks_figure(rows).axes
    bars = ppl_ax.patches
    assert [b.get_height() for b in bars] == [10.0, 12.0, 11.0]
    assert [to_rgb(b.get_facecolor()[:3]) == to_rgb("black") for b in bars] == [True, False, False]
    assert ppl_ax.get_xlabel() == "removed units"
    [errors] = [c for c in accuracy_ax.containers if isinstance(c, ErrorbarContainer)]
    assert list(errors.lines[0].get_ydata()) == pytest.approx([50.0, 45.0, 48.0])


def test_console_table_fits_80_columns():
    deep = [sample_row("random", [], 17.5, 1234.5, n_blocks=48),
            sample_row("random", list(range(0, 48, 2)), 3_456_789.25, 98_765.43, n_blocks=48)]
    deep[1]["ppl_change_pct"] = 123_456_789.0
    table = sweep_table(deep)
    assert max(len(line) for line in table.splitlines()) <= 80
    cells = table.splitlines()[3].split()
    assert cells[0].startswith("0,2,4,6") and cells[0].endswith("..")  # cut to fit; the CSV has it whole
    assert cells[2:4] == ["3,456,789", "98,765.43"] and cells[-2] == "+1.23e+08"


def test_console_sequential_table_keeps_the_seed_numbers(sequential_rows):
    lines = sweep_table(sequential_rows).splitlines()
    assert max(map(len, lines)) <= 80
    assert lines[3].split() == ["0", "5", "12,095.66", "460.28", "74.82", money(pct(12095.66, 39.29), True),
                                money(pct(460.28, 403.38), True)]


# ---- end to end on a tiny model -----------------------------------------------------------

@pytest.fixture
def tiny(model_dir, text_file):
    """The shared tiny model and text, on few tokens: these tests are about the outputs."""
    return ["--model", str(model_dir), "--dataset", str(text_file), "--max-tokens", "160", "--max-length", "64",
            "--stride", "32"]


SPEED = ["--speed-runs", "1", "--speed-warmup", "0", "--gen-tokens", "2"]


def outputs(folder, suffix):
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000


def test_plot_writes_figures_report_and_sidecar_and_report_mode_remakes_them(tiny, tmp_path):
    assert main.main(["--mode", "combinatorial", "--min-remove", "1", "--max-remove", "2", *tiny, "--no-speed", "--plot",
                      "--output-dir", str(tmp_path), "--quiet"]) == 0
    [csv_path] = outputs(tmp_path, ".csv")
    stem = csv_path.with_suffix("")
    figures = outputs(tmp_path, ".png")
    assert [p.name for p in figures] == sorted(f"{stem.name}_{k}.png" for k in ("per-block", "pairs", "tradeoff"))
    for png in figures:
        assert_png(png)
    report = (tmp_path / f"{stem.name}_report.md").read_text(encoding="utf-8")
    rows = read_rows(str(csv_path))
    _, body = table_after(report, "## Combinatorial Layer Pruning")
    assert [c[2] for c in body] == [money(r["perplexity"]) for r in rows]
    assert f"({stem.name}_pairs.png)" in report

    meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["config"]["mode"] == "combinatorial" and meta["config"]["output"]["plot"] is True
    assert meta["started"] < meta["finished"]
    assert meta["libraries"]["torch"] and meta["libraries"]["transformers"] and meta["device_name"]
    assert meta["dtype"] == "float32" and "work" in meta
    assert meta["configurations_evaluated"] == len(rows) == 1 + 4 + 6
    assert meta["tokens_evaluated"] == sum(r["eval_tokens"] for r in rows)
    assert meta["stream_tokens"] == rows[0]["eval_tokens"] + 1  # every token but the first is scored
    assert meta["kit"]["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["kit"]["commit"])

    # --mode report makes the same report again from the CSV alone
    for path in [*figures, tmp_path / f"{stem.name}_report.md"]:
        path.unlink()
    assert main.main(["--mode", "report", "--input", str(csv_path), "--quiet"]) == 0
    assert outputs(tmp_path, ".png") == figures
    assert (tmp_path / f"{stem.name}_report.md").read_text(encoding="utf-8") == report


@pytest.mark.parametrize("mode", [["sequential"], ["custom", "--remove", "1", "--save-model"]])
def test_quiet_prints_only_output_paths(tiny, tmp_path, capfd, mode):
    if mode[-1] == "--save-model":
        mode = [*mode, str(tmp_path / "pruned")]
    assert main.main(["--mode", *mode, *tiny, *SPEED, "--save_results", "--output-dir", str(tmp_path),
                      "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert out == ""
    written = [line.split(" written to ")[1] for line in err.splitlines()]
    assert sorted(written) == sorted(str(p) for p in tmp_path.iterdir())


def test_without_quiet_the_tables_are_printed(tiny, capfd):
    assert main.main(["--mode", "sequential", *tiny, "--no-speed"]) == 0
    out, err = capfd.readouterr()
    assert "Key observations" in out and max(map(len, out.splitlines())) <= 80
    assert "Evaluating" in err


def test_resumed_file_keeps_the_earlier_runs_metadata(tiny, tmp_path):
    assert main.main(["--mode", "sequential", *tiny, "--no-speed", "--save_results", "--output-dir",
                      str(tmp_path), "--quiet"]) == 0
    [csv_path] = outputs(tmp_path, ".csv")
    first = json.loads(csv_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert main.main(["--mode", "sequential", *tiny, "--no-speed", "--resume", str(csv_path), "--quiet"]) == 0
    second = json.loads(csv_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert second["configurations_evaluated"] == 0 and second["config"]["output"]["resume"] == str(csv_path)
    assert second["previous_runs"] == [first]


def test_git_commit_is_none_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "KIT_ROOT", str(tmp_path))
    assert metadata.git_state() == {"commit": None, "dirty": None}


def exit_status(argv):
    try:
        return main.main(argv)
    except SystemExit as exc:  # argparse-level errors
        return exc.code


@pytest.mark.parametrize("argv, message", [
    (["--mode", "report"], "--mode report needs --input"),
    (["--mode", "report", "--input", "missing.csv"], "does not exist"),
    (["--mode", "baseline", "--input", "x.csv"], "--input is only used by --mode report"),
])
def test_report_mode_bad_input_is_one_line(argv, message, capsys):
    assert exit_status(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_report_mode_rejects_an_empty_csv(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("mode,removed_layers,num_layers,perplexity\n", encoding="utf-8")
    assert main.main(["--mode", "report", "--input", str(path)]) == 2
    assert "has no rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [path]


def test_an_interrupted_sweep_says_what_it_kept_and_how_to_continue(tiny, tmp_path, monkeypatch, capsys):
    import runner.evaluate

    real = runner.evaluate.measure_all

    def crash_after_baseline(model, ids, prompt_ids, removals, settings):
        for removed in removals:
            if removed:
                raise KeyboardInterrupt
            yield from real(model, ids, prompt_ids, [removed], settings)

    monkeypatch.setattr(runner.evaluate, "measure_all", crash_after_baseline)
    code = main.main(["--mode", "sequential", *tiny, "--no-speed", "--save_results", "--output-dir", str(tmp_path),
                      "--quiet"])
    [csv_path] = outputs(tmp_path, ".csv")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130
    assert err == [f"interrupted: 1 rows in {csv_path}; continue with --resume {csv_path}"]
    meta = json.loads(csv_path.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["interrupted"] is True and meta["finished"] is not None
    assert meta["configurations_evaluated"] == len(read_rows(str(csv_path))) == 1


def test_report_of_a_minimal_csv_computes_its_changes_against_its_baseline(tmp_path):
    path = tmp_path / "by-hand.csv"
    path.write_text("removed_layers,num_layers,perplexity\n[],6,39.29\n[3],5,69.57\n[0],5,12095.0\n")
    assert main.main(["--mode", "report", "--input", str(path)]) == 0
    report = (tmp_path / "by-hand_report.md").read_text()
    assert "+77.07" in report  # 69.57 / 39.29 - 1
    assert "Least harmful: removing block 3" in report


def timed_against_baseline(row, baseline_ms, low, high):
    """A row as the kit writes it: its speed change against the baseline runs interleaved with its own."""
    return {**row, "baseline_latency_ms": baseline_ms, "speed_change_pct": pct(row["latency_ms"], baseline_ms),
            "speed_change_low_pct": low, "speed_change_high_pct": high}


def test_speed_ups_within_the_noise_are_marked_and_none_is_called_fastest(tmp_path):
    # the incident: 742 ms against the baseline row's 1561 ms looked 52% faster; against the baseline runs
    # interleaved with its own it is -2.4%, and the runs cannot tell that from no change
    rows = write_csv(tmp_path / "seq.csv", [
        sample_row("sequential", [], 39.29, 1561.0),
        timed_against_baseline(sample_row("sequential", [3], 69.57, 742.0), 760.0, -41.0, 35.0),
        timed_against_baseline(sample_row("sequential", [1], 81.45, 1500.0), 1510.0, -3.0, 2.0)])
    table = sweep_table(rows)
    assert "~-2.37" in table and "~-0.66" in table and table.endswith(NOISE_NOTE)
    assert "Fastest: none measurably faster than the baseline" in "\n".join(observations(rows))
    markdown = report_markdown(rows)
    headers, body = table_after(markdown, "## Sequential Layer Pruning")
    assert headers[-2:] == ["Speed Change (%)", "Speed Change 95% Interval"]
    assert body[1][-2:] == ["~-2.37", "-41.00% to +35.00%"] and body[0][-1] == "-"
    assert NOISE_NOTE in markdown and "Fastest: none measurably faster" in markdown


def test_fastest_is_the_largest_speed_up_beyond_the_noise(tmp_path):
    rows = write_csv(tmp_path / "seq.csv", [
        sample_row("sequential", [], 39.29, 400.0),
        timed_against_baseline(sample_row("sequential", [3], 69.57, 200.0), 400.0, -80.0, 10.0),  # noise
        timed_against_baseline(sample_row("sequential", [1], 81.45, 330.0), 400.0, -20.0, -15.0),
        timed_against_baseline(sample_row("sequential", [2], 83.24, 360.0), 400.0, -12.0, -8.0)])
    assert ("Fastest: removing block 1 (-17.50% against the baseline runs interleaved with its own, "
            "95% interval -20.00% to -15.00%)") in observations(rows)
    table = sweep_table(rows)
    assert "~-50.00" in table and " -17.50" in table and "~-17.50" not in table


def test_random_table_marks_a_speed_change_within_the_noise(tmp_path):
    rows = write_csv(tmp_path / "random.csv", [
        sample_row("random", [], 39.29, 459.66),
        timed_against_baseline(sample_row("random", [1, 3, 4], 1511.92, 281.38), 290.0, -9.0, 4.0)])
    _, body = table_after(report_markdown(rows), "## Random Layer Removal")
    assert body[1] == ["Inference Speed (ms)", "459.66", "281.38", "~" + money(pct(281.38, 290.0), True)]
    assert "Speed change 95% interval: -9.00% to +4.00%." in report_markdown(rows)


def test_observations_rank_only_sets_of_one_size_and_do_not_call_an_improvement_harmful():
    from reporting.tables import observations

    def row(removed, ppl, change):
        return {"removed_layers": removed, "perplexity": ppl, "ppl_change_pct": change}

    base = row([], 10.0, 0.0)
    greedy = [base, row([5], 9.9, -1.0), row([5, 2], 9.95, -0.5)]  # a greedy run's steps, both below baseline
    (note,) = observations(greedy)
    assert note.startswith("Below the baseline's perplexity of the sets of 2 units: removing blocks 2, 5 (PPL 9.95")
    sweep = [base, row([1], 9.9, -1.0), row([2], 9.8, -2.0)]
    assert observations(sweep)[0].startswith("Highest perplexity (every one lowered it): removing block 1")
    assert observations(sweep)[1].startswith("Least harmful: removing block 2")
    harmful = [base, row([1], 12.0, 20.0), row([2], 11.0, 10.0)]
    assert observations(harmful)[0].startswith("Most harmful: removing block 1")
