"""The `bench` command line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click
from tabulate import tabulate

from bench.errors import BenchError
from bench.locations import check_output_path, write_text_atomically

# Exit statuses, a fixed documented set (the failed-job count goes to the output, not the status).
EXIT_OK = 0
EXIT_JOBS_FAILED = 1  # some jobs failed; the others are stored
EXIT_BAD_INPUT = 2  # nothing was run or written
EXIT_TIME_LIMIT = 3  # --time-limit left jobs to run; none failed
EXIT_INTERRUPTED = 130  # Ctrl-C; every finished job is stored


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="robustness-bench")
def main():
    """robustness-bench: run adversarial-robustness suites and publish leaderboards."""


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    envvar="BENCH_CACHE_DIR",
    help="The cache folder: decoded datasets in it, trained models and evaluations under "
    "artifacts/ (env: BENCH_CACHE_DIR; default ~/.cache/robustness-bench).",
)


@main.command()
@click.argument("suite_file", type=click.Path(path_type=Path))
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    default=None,
    help="SQLite result store (default: the suite's [suite].store, else results/<name>.db).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default=None,
    help="Override the suite's device (auto: CUDA when available).",
)
@cache_dir_option
@click.option("--dry-run", is_flag=True, help="Print the jobs the suite expands to and exit.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: only on a terminal).")
@click.option(
    "--time-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="MINUTES",
    help="Start no job that would likely end past MINUTES from now (judged by the longest job "
    "so far; the first job always starts); run again to resume.",
)
@click.option(
    "--executor",
    type=click.Choice(["inprocess", "ray"]),
    default="inprocess",
    show_default=True,
    help="Run jobs one after another here, or as tasks on a Ray cluster (pip install "
    "'robustness-bench[ray]'; the cache folder must be one every node sees).",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="With --executor ray: the cluster to join ('auto': the running one); default: start a local cluster.",
)
@click.option(
    "--ray-retries",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="With --executor ray: how often a task whose worker died is run again.",
)
@click.option(
    "--rerun",
    type=click.Choice(["failed"]),
    default=None,
    help="'failed': run only the jobs whose stored result is a failure, not the ones never run "
    "(a plain run runs both).",
)
def run(suite_file, store, device, cache_dir, dry_run, progress, time_limit, executor, ray_address, ray_retries, rerun):
    """Run every job of SUITE_FILE that is not yet in the store.

    A suite expands into the cross product dataset x model x attack x defense x seed x
    bonafide size. Results are stored as each job ends, so an interrupted run resumes where it
    stopped. Exit status: 0 when every job succeeded, 1 when some failed (this wins over 3), 2
    for bad input (nothing is run or written), 3 when --time-limit left jobs to run, 130 when
    interrupted.
    """
    if cache_dir is not None:  # one root for everything, handed to the run (no environment is rewritten)
        try:
            cache_dir = Path(cache_dir).expanduser().resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop
            _fail(f"--cache-dir {cache_dir}: cannot use this cache folder ({exc}); check the symlinks on its path")
    _run(suite_file, store, device, cache_dir, dry_run, progress, time_limit, executor, ray_address, ray_retries, rerun)


def _run(
    suite_file, store, device, cache_dir, dry_run, progress, time_limit, executor, ray_address, ray_retries, rerun
):
    from bench.runner import check_suite, run_suite
    from bench.suite import load_suite

    suite = None
    try:
        registry = load_plugins()
        suite = load_suite(suite_file, registry)
        if dry_run:
            jobs = check_suite(suite, registry, device=device, cache_root=cache_dir)
            for i, job in enumerate(jobs, 1):
                click.echo(f"{i:4d}  {job.key}  {job.describe()}")
            click.echo(f"{len(jobs)} jobs; store: {store or suite.store_path}")
            return
        runner = None
        if executor == "ray":
            from bench.executors import RayExecutor, import_ray

            import_ray()
            check_absolute_dataset_roots(suite)
            runner = RayExecutor(address=ray_address, retries=ray_retries)
            runner.check_reachable()  # before the store is touched
        summary = run_suite(
            suite,
            registry,
            store_path=store,
            device=device,
            cache_root=cache_dir,
            show_progress=progress,
            echo=click.echo,
            executor=runner,
            only_failed=rerun == "failed",
            time_limit=None if time_limit is None else time_limit * 60,
        )
    except BenchError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        where = store or (suite.store_path if suite else "the store")
        click.echo(
            f"\ninterrupted: every finished job is stored in {where}; run the same command again to resume", err=True
        )
        sys.exit(EXIT_INTERRUPTED)
    left = f", {summary.left} left for the next run" if summary.left else ""
    click.echo(
        f"{summary.succeeded} succeeded, {len(summary.failed)} failed, {summary.skipped} already done"
        f"{left}; results in {summary.store_path}"
    )
    if summary.failed:
        sys.exit(EXIT_JOBS_FAILED)
    if summary.left:
        sys.exit(EXIT_TIME_LIMIT)


def check_absolute_dataset_roots(suite) -> None:
    """A remote worker may not share this working directory: relative dataset roots are refused."""
    for spec in suite.plugins["datasets"]:
        root = spec.options.get("root")
        if isinstance(root, str) and root and not Path(root).expanduser().is_absolute():
            raise BenchError(
                f"{suite.path}: dataset '{spec.label}': root {root!r} is relative; --executor ray "
                "needs an absolute path (every node must see it)"
            )


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--suite", default=None, help="Only this suite's results (a store may hold several).")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the markdown here (e.g. leaderboard/NAME.md) instead of printing it.",
)
@click.option(
    "--plots/--no-plots",
    default=True,
    help="With --output: write PNG figures into <output stem>-figures/ and link them.",
)
@click.option(
    "--all-runs", is_flag=True, help="Also show rows stored by earlier runs of the suite, before its options changed."
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["markdown", "json", "html"]),
    default="markdown",
    show_default=True,
    help="json: the same tables as data; html: a self-contained page (needs --output FILE.html) and an index.",
)
@click.option("--failures", is_flag=True, help="Print the failed jobs' whole tracebacks instead of the leaderboard.")
def report(store, suite, output, plots, all_runs, output_format, failures):
    """Render leaderboard markdown from a result STORE (opened read-only).

    Shows the jobs of the suite's latest run; a store holding several suites needs --suite.
    """
    from bench.report import failure_text, json_text, render_report, report_data

    if failures:
        try:
            click.echo(failure_text(store.expanduser(), suite, all_runs), nl=False)
        except BenchError as exc:
            _fail(str(exc))
        return

    if output_format == "html":
        _report_html(store.expanduser(), suite, output, plots, all_runs)
        return
    if output_format == "json":
        try:
            text = json_text(report_data(store.expanduser(), suite, all_runs))
            if output is not None:
                check_output_path(output.expanduser(), reads=[store.expanduser()])
                write_text_atomically(output.expanduser(), text)
        except BenchError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"--output {output}: cannot write there ({exc.strerror or exc})")
        click.echo(f"wrote {output}" if output is not None else text, nl=output is not None)
        return
    try:
        if output is not None:
            output = output.expanduser()
            if output.is_dir() or output.name in ("", ".", "..") or output.suffix.lower() != ".md":
                raise BenchError(f"--output {output}: expected a markdown file name such as leaderboard/NAME.md")
            check_output_path(output, reads=[store.expanduser()])
        plot_dir = output.parent / f"{output.stem}-figures" if (output is not None and plots) else None
        text = render_report(
            store.expanduser(),
            suite,
            plot_dir=plot_dir,
            plot_link_base=output.parent if output else None,
            all_runs=all_runs,
        )
        if output is not None:
            write_text_atomically(output, text)
    except BenchError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--output {output}: cannot write there ({exc.strerror or exc})")
    if output is None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {output}")


def _report_html(store: Path, suite, output, plots: bool, all_runs: bool) -> None:
    """`bench report --format html -o DIR/NAME.html`: the page, its figures in DIR/NAME-figures/,
    and DIR/index.html listing every page in DIR."""
    from bench.html import render_html, render_index
    from bench.report import report_data, table_figures

    if output is None or output.suffix.lower() != ".html":
        _fail("--format html needs --output FILE.html (the page links its figures, written beside it)")
    output = output.expanduser()
    try:
        check_output_path(output, reads=[store])
        data = report_data(store, suite, all_runs)
        figures = table_figures(store, suite, output.parent / f"{output.stem}-figures", all_runs) if plots else {}
        write_text_atomically(output, render_html(data, figures, output.parent))
        write_text_atomically(output.parent / "index.html", render_index(output.parent))
    except BenchError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--output {output}: cannot write there ({exc.strerror or exc})")
    click.echo(f"wrote {output} and {output.parent / 'index.html'}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--suite", default=None, help="Only this suite's results (a store may hold several).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["csv", "json", "parquet"]),
    default="csv",
    show_default=True,
    help="parquet needs pyarrow.",
)
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Write here instead of printing.")
@click.option("--analyses", is_flag=True, help="Export the analyses' rows instead of the jobs'.")
@click.option("--all-runs", is_flag=True, help="Also rows stored by earlier runs of the suite.")
def export(store, suite, output_format, output, analyses, all_runs):
    """Export a result STORE as one table: a row per job (or analysis), stable column names
    (documented in bench/export.py and the README)."""
    from bench.export import export_frame, write_export

    try:
        if output is not None:
            check_output_path(output.expanduser(), reads=[store.expanduser()])
        frame = export_frame(store.expanduser(), suite, analyses=analyses, all_runs=all_runs)
        text = write_export(frame, output_format, output.expanduser() if output else None)
    except BenchError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"--output {output}: cannot write there ({exc.strerror or exc})")
    if text is not None:
        click.echo(text, nl=False)
    else:
        click.echo(f"wrote {output} ({len(frame)} rows)")


@main.command()
@click.option("--options", "show_options", is_flag=True, help="Also list each plugin's options.")
@click.option(
    "--kind",
    type=click.Choice(["dataset", "model", "attack", "defense", "analysis"]),
    default=None,
    help="Only plugins of this kind.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of plugins, each with its options).")
@click.option(
    "--reload",
    is_flag=True,
    help="Load the plugins even if the cached catalog (plugins.json in the cache folder) is current.",
)
def plugins(show_options, kind, as_json, reload):
    """List every discovered plugin: kind, name, package, version, description.

    Answers from a catalog cached in the cache folder while no plugin package, plugin module or
    core file has changed since it was written; otherwise loads the plugins and rewrites it."""
    from bench.catalog import catalog

    found = catalog(reload=reload)
    chosen = [p for p in found["plugins"] if kind is None or p["kind"] == kind]
    if as_json:
        click.echo(json.dumps(chosen, indent=2))
    else:
        rows = [
            [p["kind"], p["name"], p["package"], p["version"], p.get("defender_data") or "", p["description"]]
            for p in chosen
        ]
        click.echo(tabulate(rows, headers=["kind", "name", "package", "version", "defender data", "description"]))
    if show_options and not as_json:
        for p in chosen:
            if not p["options"]:
                continue
            links = ", ".join(f"{label} {p[label]}" for label in ("paper", "code") if p[label])
            click.echo(f"\n{p['kind']} {p['name']}:" + (f" ({links})" if links else ""))
            for o in p["options"]:
                lower = "> " if o["min_exclusive"] else ">= "
                bounds = "".join(
                    [
                        f", {lower}{o['min']}" if o["min"] is not None else "",
                        f", <= {o['max']}" if o["max"] is not None else "",
                        ", one of " + ", ".join(repr(c) for c in o["choices"]) if o["choices"] else "",
                    ]
                )
                click.echo(f"  {o['name']} ({o['type']}, default {o['default']!r}{bounds}): {o['doc']}")
    if found["problems"]:
        click.echo("\nPlugins that failed to load:", err=True)
        for problem in found["problems"]:
            click.echo(f"  {problem['plugin']} ({problem['package']}): {problem['message']}", err=True)


@main.group()
def cache():
    """Inspect or clear the cache folder (--cache-dir / BENCH_CACHE_DIR)."""


def _cache_root(cache_dir) -> Path:
    from bench.locations import cache_root

    return Path(cache_dir).expanduser() if cache_dir else cache_root()


def _folder_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else ([path] if path.is_file() else [])
    return len(files), sum(p.stat().st_size for p in files)


@cache.command("info")
@cache_dir_option
def cache_info(cache_dir):
    """Where the cache is and what it holds, by kind."""
    root = _cache_root(cache_dir)
    click.echo(f"cache folder: {root}{'' if root.is_dir() else ' (does not exist yet)'}")
    rows = []
    for kind in ("models", "evaluations", "defended"):
        count, size = _folder_size(root / "artifacts" / kind)
        rows.append([f"artifacts/{kind}", len(list((root / "artifacts" / kind).glob("*.pt"))), f"{size / 1e6:.1f}"])
    from bench.locations import written_entries

    datasets = [root / name for name in sorted(written_entries(root) - {"artifacts"}) if (root / name).exists()]
    size = sum(_folder_size(p)[1] for p in datasets)
    rows.append(["datasets (decoded)", len(datasets), f"{size / 1e6:.1f}"])
    click.echo(tabulate(rows, headers=["kind", "entries", "MB"]))


@cache.command("clear")
@cache_dir_option
@click.option("--datasets", is_flag=True, help="Also remove decoded datasets (they are decoded again when needed).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(cache_dir, datasets, yes):
    """Remove trained models and cached evaluations (artifacts/), and with --datasets the decoded
    datasets; results in stores are never touched."""
    from bench.locations import written_entries

    root = _cache_root(cache_dir)
    written = written_entries(root)  # only what bench recorded writing here: never the user's own files
    targets = [root / "artifacts"] if "artifacts" in written and (root / "artifacts").exists() else []
    if datasets:
        targets += [root / name for name in sorted(written - {"artifacts"}) if (root / name).exists()]
    if not targets:
        click.echo(
            f"nothing to clear in {root}: bench removes only what it recorded writing there"
            + ("" if written else " (it has no record of writing anything)")
        )
        return
    click.echo("will remove:")
    for target in targets:
        click.echo(f"  {target} ({_folder_size(target)[1] / 1e6:.1f} MB)")
    if not yes:
        click.confirm("remove these?", abort=True)
    for target in targets:
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    click.echo(f"removed {len(targets)} item(s) from {root}")


@main.command()
@click.argument("store", type=click.Path(path_type=Path))
def migrate(store):
    """Add the metric descriptions (doc line, headline flag) that results stored by an older
    version lack, from the installed plugins; values are never changed."""
    from bench.migrate import migrate as migrate_store

    try:
        changed = migrate_store(store.expanduser())
    except BenchError as exc:
        _fail(str(exc))
    click.echo(f"{store}: {changed} row(s) updated")


def load_plugins():
    """The plugin registry (imported here, on first use: it loads torch)."""
    from bench.registry import load_plugins as load

    return load()


if __name__ == "__main__":
    main()
