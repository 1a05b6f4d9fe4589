"""The ``edgebuild`` command line: thin click commands over library functions."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from edgebuild.errors import handle_cli_errors
from edgebuild.options import click_options
from edgebuild.signals import stop_cleanly
from edgerun.errors import DebugAnywhereGroup


@click.group(cls=DebugAnywhereGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logs (before or after the command).")
@click.version_option(package_name="edgebuild")
def main(debug: bool) -> None:
    """Pack trained PyTorch/ONNX models into small, fast, validated ONNX bundles for edge targets.

    Start with `edgebuild pack --target x86` (packs the embedded digits example) and serve the
    bundle with `edgerun serve dist/digits-x86`.
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="edgebuild: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.argument("model", required=False)
@click_options
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="recipe.toml configuring prune -> distill -> export -> quantize; flags given here override it.",
)
@handle_cli_errors
def pack(config_path, **params):
    """Pack MODEL into a validated bundle for a target; prints the bundle path last on stdout.

    MODEL is package.module:callable (returns an nn.Module), a torch.export .pt2 file, or an .onnx
    file. Without MODEL the embedded digits example is packed with its real data.

    Exit codes: 0 ok, 2 bad usage/input (nothing written), 3 accuracy budget not met (report written, no bundle),
    1 edgerun on this host would refuse the bundle (or an unexpected error: the line says so); stopped by a signal
    (SIGINT, SIGTERM, SIGHUP): temporary files removed, no bundle, 128 + the signal (130, 143, 129).
    """
    from click.core import ParameterSource

    from edgebuild.pack import pack as run_pack
    from edgebuild.progress import Stopwatch
    from edgebuild.quiet import library_log_lines
    from edgebuild.recipe import load_recipe, merge, pack_options

    ctx = click.get_current_context()
    explicit = {k: v for k, v in params.items() if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    settings = merge(params, load_recipe(config_path) if config_path else {}, explicit)
    if settings.get("sign_key"):
        settings["sign_key"] = Path(settings["sign_key"]).read_bytes()
    options = pack_options(settings, recipe_path=str(config_path) if config_path else None)
    elapsed = Stopwatch()
    with stop_cleanly("edgebuild", "temporary files removed, no bundle written"), library_log_lines() as said:
        try:
            result = run_pack(options)
        finally:
            # What the libraries logged outside the per-candidate captures (export, validation, serve check).
            if said.messages:
                click.echo(f"edgebuild: {said.line('other steps')}", err=True)
    v = result.manifest.validation
    assert v is not None  # pack always records its validation
    speedup = result.manifest.benchmark["speedup_vs_fp32"]
    slower = " (SLOWER than FP32 on this host)" if speedup is not None and speedup < 1 else ""
    click.echo(
        f"edgebuild: {result.chosen.name}: {v.metric} {v.packed:.4f} (reference {v.reference:.4f}, drop {v.drop:+.4f}); "
        f"speed-up vs FP32 {speedup}×{slower}, size {result.chosen.size_bytes / 1024:.1f} KiB",
        err=True,
    )
    click.echo(f"edgebuild: done in {elapsed}", err=True)
    click.echo(str(result.bundle))


@main.command()
@handle_cli_errors
def targets():
    """List the built-in target profiles."""
    from edgebuild.targets import builtin_target_names, load_target

    for target_name in builtin_target_names():
        profile = load_target(target_name)
        click.echo(f"{profile.name:<10} {profile.description}")


@main.command("inspect")
@click.argument("model", required=False)
@click.option("--weights", help="State dict for a module:callable model.")
@click.option("--input-shape", help="Example input shape, e.g. 1,3,224,224 (default: from the model).")
@click.option("--top", type=int, default=20, show_default=True, help="Rows of the per-layer table (most MACs first).")
@click.option("--no-latency", is_flag=True, help="Skip the ONNX export and the ORT FP32 timing.")
@click.option("--bench-seconds", type=float, default=1.0, show_default=True, help="Time spent timing the model.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of tables.")
@handle_cli_errors
def inspect_command(model, weights, input_shape, top, no_latency, bench_seconds, as_json):
    """MACs/FLOPs and parameters (total and per layer, via ptflops), activation memory, ORT FP32 latency."""
    import json

    from edgebuild.inspection import format_report, inspect_model
    from edgebuild.sources import parse_shape

    report = inspect_model(
        model,
        weights=weights,
        input_shape=parse_shape(input_shape) if input_shape else None,
        measure_latency=not no_latency,
        bench_seconds=bench_seconds,
    )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report, top=top))


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--val-data", help="Labelled validation DATA: adds an accuracy column.")
@click.option("--val-samples", type=int, default=1000, show_default=True, help="Validation samples used at most.")
@click.option(
    "--input-shape", help="Example input shape for models that do not declare one (default: from --val-data)."
)
@click.option(
    "--preprocess",
    help="How an image folder becomes tensors, as for pack: imagenet, unit, none or FILE.toml (default: RGB, stretch, x1/255).",
)
@click.option(
    "--sort-by", type=click.Choice(["latency", "macs", "params", "accuracy"]), default="latency", show_default=True
)
@click.option("--bench-seconds", type=float, default=1.0, show_default=True, help="Time spent timing each model.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@handle_cli_errors
def compare(models, val_data, val_samples, input_shape, preprocess, sort_by, bench_seconds, as_json):
    """Rank architectures by MACs, params, measured ORT FP32 latency and (with --val-data) accuracy."""
    import json

    from edgebuild.inspection import compare_models, format_comparison
    from edgebuild.sources import parse_shape

    reports = compare_models(
        list(models),
        val_data=val_data,
        val_samples=val_samples,
        sort_by=sort_by,
        bench_seconds=bench_seconds,
        input_shape=parse_shape(input_shape) if input_shape else None,
        preprocess=preprocess,
    )
    if as_json:
        click.echo(json.dumps([{k: v for k, v in r.to_dict().items() if k != "layers"} for r in reports], indent=2))
    else:
        click.echo(format_comparison(reports))


@main.command()
@click.argument("location")
@click.option("--threads", type=int, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--bench-seconds", type=float, default=1.0, show_default=True, help="Time spent timing each model.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@handle_cli_errors
def bench(location, threads, bench_seconds, as_json):
    """Time a BUNDLE's models (every variant) or a MODEL (ORT FP32) on this host, batch 1.

    On the device, `edgerun bench BUNDLE` measures with the device's own providers.
    """
    import json

    from edgebuild.benchmark import bench_bundle

    if Path(location).is_dir() or location.endswith((".tar.gz", ".tgz")):
        rows = bench_bundle(location, threads=threads, max_seconds=bench_seconds)
    else:
        from edgebuild.inspection import inspect_model

        report = inspect_model(location, bench_seconds=bench_seconds, threads=threads)
        rows = [{"path": location, "precision": "fp32", **(report.latency or {})}]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<50} {'precision':<12} {'p50 ms':>9} {'p90 ms':>9} {'recorded p50':>13}")
    for row in rows:
        recorded = row.get("recorded_p50_ms")
        click.echo(
            f"{row['path']:<50} {row['precision']:<12} {row['p50_ms']:>9.3f} {row['p90_ms']:>9.3f} "
            f"{(f'{recorded:.3f}' if recorded is not None else '–'):>13}"
        )


@main.command("profile")
@click.argument("location")
@click.option("--variant", help="Bundle variant to profile next to FP32 (path or name; default: model.onnx).")
@click.option("--top", type=int, default=15, show_default=True, help="Rows of the per-op-type and per-node tables.")
@click.option("--batch", "batches", help="Comma-separated batch sizes (default: 1 and 8, edgerun's largest batch).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Profiled runs (median).")
@click.option("--threads", type=int, help="Intra-op threads (default: ONNX Runtime's choice).")
@click.option("--weights", help="State dict for a module:callable MODEL.")
@click.option("--input-shape", help="Example input shape for a MODEL that does not declare one.")
@click.option("--json", "as_json", is_flag=True, help="Print the full profile as JSON instead of Markdown.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Also draw the op types as a bar chart.")
@handle_cli_errors
def profile_command(location, variant, top, batches, runs, threads, weights, input_shape, as_json, png):
    """Where the time goes in a BUNDLE (FP32 next to the chosen variant) or a MODEL (its ONNX export and
    eager PyTorch): ONNX Runtime's per-node profile, per op type, with the shares in Conv/MatMul, in float
    and in Quantize/DequantizeLinear."""
    import json

    from edgebuild.profile import profile_location
    from edgebuild.profile_format import format_markdown, write_chart
    from edgebuild.sources import parse_shape

    report = profile_location(
        location,
        variant=variant,
        batches=list(parse_shape(batches)) if batches else None,
        runs=runs,
        threads=threads,
        weights=weights,
        input_shape=parse_shape(input_shape) if input_shape else None,
    )
    if png is not None:
        write_chart(report, png, top=min(top, 12))
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else format_markdown(report, top=top))


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="ed25519 private key, PEM (openssl genpkey -algorithm ed25519 -out key.pem).",
)
@handle_cli_errors
def sign(bundle, key):
    """Sign BUNDLE's manifest (which lists every file's sha256) with an ed25519 key.

    Serve with `edgerun serve BUNDLE --trusted-key pub.pem` to refuse unsigned or altered bundles.
    """
    from edgebuild.bundle import sign_bundle

    sign_bundle(bundle, key.read_bytes())
    click.echo(str(bundle))


def _register_commands() -> None:
    """Commands that live next to the library code they drive."""
    from edgebuild.deploy import deploy

    main.add_command(deploy)


_register_commands()


if __name__ == "__main__":
    main()
