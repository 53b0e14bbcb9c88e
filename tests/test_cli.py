"""The command line's contract: checked options, one error line, results on stdout, pure JSON, replayable runs.

Runs the real typer app through CliRunner (stdout and stderr kept apart) on the shared tiny parts cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import cli
from pipeline.io import read_json

runner = CliRunner()

TINY = ["--epochs", "2", "--probe-epochs", "1", "--codebook-epochs", "1", "--batch-size", "16", "--device", "cpu"]


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


def assert_one_error_line(result, *fragments: str) -> str:
    """Exit 2, nothing on stdout, and stderr is exactly one `error: ...` line holding every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(parts_store, tmp_path_factory) -> dict:
    """A run trained through the CLI with --json, kept with the result it printed."""
    run = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", parts_store["cache"], "--codebook", parts_store["codebook"], "--out", run,
                    *TINY, "--head-lr", "0.05", "--tau", "0.2", "--json")
    assert result.exit_code == 0, result.output
    return {**parts_store, "run": run, "result": result}


# --- options are checked before any work, each in one line ------------------------------------------------------

@pytest.mark.parametrize("option, value, rule", [
    ("--tau", "nan", "> 0"), ("--tau", "0", "> 0"), ("--tau", "inf", "> 0"),
    ("--head-lr", "nan", ">= 0"), ("--head-lr", "-1", "a negative rate"), ("--probe-lr", "-0.1", "a negative rate"),
    ("--codebook-lr", "-1e-3", "a negative rate"), ("--codes-lr", "-1", "a negative rate"),
    ("--l1", "-1", ">= 0"), ("--mixup", "-1", ">= 0"), ("--warmup-epochs", "-5", ">= 0"),
    ("--weight-decay", "nan", ">= 0"), ("--dict-weight", "-1", ">= 0"),
    ("--label-smoothing", "2", "[0, 1)"), ("--label-smoothing", "1", "[0, 1)"), ("--label-smoothing", "-0.1", "[0, 1)"),
    ("--val-fraction", "0", "(0, 1)"), ("--val-fraction", "1", "(0, 1)"), ("--val-fraction", "nan", "(0, 1)"),
    ("--l1-ratio", "0", "(0, 1]"), ("--l1-ratio", "1.5", "(0, 1]"), ("--l1-ratio", "nan", "(0, 1]"),
    ("--refit-memory", "lots", "auto or all"), ("--refit-memory", "-2GB", "auto or all"),
    ("--projection-dim", "-1", "greater than or equal to 0"), ("--projection-lr", "-1", "a negative rate"),
    ("--projection-learns", "coarse", "choose fine or all"),
])
def test_train_refuses_bad_numbers_in_one_line(tmp_path, option, value, rule) -> None:
    result = invoke("train", tmp_path / "missing.zarr", "--codebook", tmp_path / "cb.safetensors",
                    "--out", tmp_path / "run", option, value)
    assert_one_error_line(result, option, rule, "train --help")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, rule", [("--l1-ratio", "0", "(0, 1]"), ("--refit-memory", "2 potatoes", "auto or all")])
def test_sweep_refuses_a_bad_sparsity_option_in_one_line(tmp_path, option, value, rule) -> None:
    result = invoke("sweep", tmp_path / "missing.zarr", "-c", tmp_path / "cb.safetensors", "--out", tmp_path / "s",
                    option, value)
    assert_one_error_line(result, option, rule, "sweep --help")


def test_val_fraction_zero_says_why_it_is_refused(tmp_path) -> None:
    result = invoke("train", tmp_path / "c.zarr", "-c", tmp_path / "cb", "--out", tmp_path / "r", "--val-fraction", "0")
    assert "best epoch" in assert_one_error_line(result)


@pytest.mark.parametrize("command", [
    ["train", "C.zarr", "-c", "cb", "--out", "r"], ["evaluate", "RUN"], ["predict", "RUN", "x.jpg"],
    ["prune", "RUN", "--out", "r2"], ["gallery", "RUN", "--out", "g"], ["explain", "RUN", "x.jpg", "--out", "e"],
    ["extract", "DATA", "-b", "resnet18", "--out", "c.zarr"], ["codebook", "C.zarr", "-k", "4", "--out", "cb"],
])
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "auto:0", "CPU"])
def test_every_command_refuses_an_unknown_device_in_one_line(tmp_path, command, device) -> None:
    result = runner.invoke(cli.app, [*command, "--device", device])
    assert_one_error_line(result, f"--device '{device}'", "auto, cpu, cuda or cuda:N")


def test_every_device_option_defaults_to_auto() -> None:
    group = cli.typer.main.get_command(cli.app)
    defaults = {name: next(p.default for p in command.params if p.name == "device")
                for name, command in group.commands.items() if any(p.name == "device" for p in command.params)}
    assert set(defaults) == {"codebook", "extract", "train", "sweep", "evaluate", "predict", "prune", "gallery", "explain"}
    assert set(defaults.values()) == {"auto"}


def test_prune_refuses_a_usage_fraction_out_of_range(tmp_path) -> None:
    result = invoke("prune", tmp_path / "run", "--out", tmp_path / "r2", "--min-usage", "nan")
    assert_one_error_line(result, "--min-usage", "[0, 1]")


def test_usage_errors_are_one_line_too(tmp_path) -> None:
    assert_one_error_line(invoke("train", tmp_path / "c.zarr", "--out", tmp_path / "r"), "--codebook")
    assert_one_error_line(invoke("train", tmp_path / "c.zarr", "-c", "cb", "--out", "r", "--batch-size", "0"),
                          "--batch-size")
    assert_one_error_line(invoke("evaluate", tmp_path, "--no-such-option"), "--no-such-option")
    assert_one_error_line(invoke("trian"), "trian", "train")


def test_help_lists_commands_in_pipeline_order() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ") and len(line.split()) > 1]
    positions = [listed.index(name) if name in listed else -1 for name in cli.PIPELINE_ORDER]
    assert -1 not in positions and positions == sorted(positions), positions


# --- results on stdout, pure JSON with --json; notes and progress on stderr -------------------------------------

def test_train_json_is_pure_json_on_stdout(cli_run) -> None:
    result = cli_run["result"]
    report = json.loads(result.stdout)  # nothing else on stdout: progress and notes went to stderr
    assert report["path"] == str(cli_run["run"]) and report["resumed"] is False
    assert 0 <= report["val_top1"]["head"] <= 1 and report["k"] == 16


def test_evaluate_json_is_pure_json_and_tables_go_to_stdout(cli_run) -> None:
    as_json = invoke("evaluate", cli_run["run"], "--device", "cpu", "--json")
    assert as_json.exit_code == 0, as_json.output
    scores = json.loads(as_json.stdout)
    assert 0 <= scores["top1"] <= 1 and scores["n"] > 0
    as_table = invoke("evaluate", cli_run["run"], "--device", "cpu")
    assert as_table.exit_code == 0 and "ProtoQuant top-1" in as_table.stdout
    assert f"{scores['top1']:.4f}" in as_table.stdout


def test_codebook_prints_the_result_on_stdout_and_the_hint_on_stderr(parts_store, tmp_path) -> None:
    out = tmp_path / "cb.safetensors"
    result = invoke("codebook", parts_store["cache"], "-k", "8", "--out", out, "--device", "cpu", "--sample", "400")
    assert result.exit_code == 0, result.output
    assert "8 codes" in result.stdout and "Next:" not in result.stdout
    assert "Next: protoquant train" in result.stderr and out.is_file()


def test_codebook_k_above_the_caches_patches_says_lower_k_not_raise_sample(parts_store, tmp_path) -> None:
    result = invoke("codebook", parts_store["cache"], "-k", "100000", "--out", tmp_path / "cb", "--device", "cpu")
    line = assert_one_error_line(result, "-k 100000", "lower -k")
    assert "raise --sample" not in line
    below_sample = invoke("codebook", parts_store["cache"], "-k", "40", "--sample", "20", "--out", tmp_path / "cb")
    assert_one_error_line(below_sample, "raise --sample")


# --- train --config replays a run --------------------------------------------------------------------------------

def test_train_config_replays_a_run_and_explicit_options_win(cli_run, tmp_path) -> None:
    first = read_json(cli_run["run"] / "config.json", "config")
    replay = tmp_path / "replay"
    result = invoke("train", "--config", cli_run["run"] / "config.json", "--out", replay, "--tau", "0.3", "--json")
    assert result.exit_code == 0, result.output
    second = read_json(replay / "config.json", "config")
    expected = {**first["settings"], "tau": 0.3}
    assert second["settings"] == expected
    assert second["settings"]["head_lr"] == 0.05 and second["settings"]["epochs"] == 2  # replayed, not the defaults
    assert second["cache"]["fingerprint"] == first["cache"]["fingerprint"]
    assert second["codebook"]["path"] == first["codebook"]["path"]


def test_a_run_older_than_a_setting_replays_with_what_it_did_without_it(cli_run, tmp_path) -> None:
    from cli import recorded_train_options

    old = read_json(cli_run["run"] / "config.json", "config")
    for newer in ("anchor", "sparsity_rule"):  # settings this session added: an older run recorded neither
        del old["settings"][newer]
    (tmp_path / "old.json").write_text(json.dumps(old))
    options = recorded_train_options(tmp_path / "old.json")
    assert options["anchor"] == 0.0 and options["sparsity_rule"] == "accuracy"  # not today's defaults 1.0, deviance
    assert options["head_lr"] == 0.05  # what it did record is kept


def test_train_config_refuses_what_is_not_a_train_config(tmp_path) -> None:
    (tmp_path / "other.json").write_text(json.dumps({"command": "prune"}))
    result = invoke("train", "--config", tmp_path / "other.json", "--out", tmp_path / "r")
    assert_one_error_line(result, "--config", "not the config.json of a `protoquant train` run")
    (tmp_path / "broken.json").write_text("garbage {{{")
    assert_one_error_line(invoke("train", "--config", tmp_path / "broken.json", "--out", tmp_path / "r"), "broken.json")


# --- messages that point the right way ---------------------------------------------------------------------------

def test_info_on_a_run_says_it_is_a_run(cli_run) -> None:
    result = invoke("info", cli_run["run"])
    assert result.exit_code == 0, result.output
    assert "is a run" in result.stdout and "protoquant evaluate" in result.stderr
    assert "extract" not in result.output
    summary = json.loads(invoke("info", cli_run["run"], "--json").stdout)
    assert summary["kind"] == "run" and summary["k"] == 16 and summary["cache"] == str(Path(cli_run["cache"]).resolve())
    # train's defaults: a projection to 128 dimensions, here at most the cache's 96, then the push
    assert summary["projection_dim"] == 96 and summary["pushed"] is True and summary["grounding"] > 1 - 1e-5
    assert ("through a 96-dimensional projection; pushed: every code is a training patch; grounding "
            f"{summary['grounding']:.3f}") in result.stdout


def test_an_error_message_with_brackets_is_printed_verbatim() -> None:
    import io

    from rich.console import Console

    sink = io.StringIO()
    cli.console = Console(file=sink, width=40)
    try:
        cli.print_error("[bold]x[/] y " + "long " * 20)
    finally:
        cli.console = Console(stderr=True)
    assert sink.getvalue().count("\n") == 1 and sink.getvalue().startswith("error: [bold]x[/] y long")


def test_extract_of_an_unknown_layout_points_at_data_not_a_missing_option(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = invoke("extract", tmp_path / "empty", "-b", "resnet18", "--out", tmp_path / "c.zarr", "--device", "cpu")
    line = assert_one_error_line(result, "cannot tell the layout", "DATA")
    assert "--kind" not in line  # extract has no --kind
    assert not (tmp_path / "c.zarr").exists()
