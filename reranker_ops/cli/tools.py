"""``bench`` and ``compare``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import JsonOpt, ModelOpt, ModelsDirOpt, console, err_console, handled, settings_from
from ..errors import ConfigError
from .base import app


@app.command()
@handled
def bench(
    url: Annotated[Optional[str], typer.Option("--url", help="Base URL of a /rerank endpoint (default: ours).")] = None,
    workload: Annotated[str, typer.Option("--workload", help="tiny, rag, mixed, short, long or wide (8 passages past the model's window).")] = "tiny",
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", help="Clients in the closed loop.")] = 1,
    duration: Annotated[Optional[float], typer.Option("--duration", "-z", help="Seconds to run.")] = None,
    requests: Annotated[Optional[int], typer.Option("--requests", "-n", help="Requests to send (instead of --duration).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same requests.")] = 0,
    warmup: Annotated[int, typer.Option("--warmup", help="Requests sent before measuring.")] = 2,
    timeout: Annotated[float, typer.Option("--timeout", help="Client timeout per request (s).")] = 120.0,
    model_name: Annotated[
        Optional[str], typer.Option("--model-name", help="Send this 'model' field (infinity_emb needs it).")
    ] = None,
    ceiling: Annotated[
        bool, typer.Option("--ceiling", help="Also score the same kind of pairs in-process, at most --concurrency "
                                             "requests a call: served / ceiling.")
    ] = False,
    ceiling_only: Annotated[bool, typer.Option("--ceiling-only", help="Only the in-process ceiling.")] = False,
    blocks: Annotated[int, typer.Option(
        "--blocks", help="With --ceiling and --duration: served and in-process measured in this many alternating "
                         "pairs of blocks, so both meet the same machine (1: served, then the ceiling).")] = 3,
    paired: Annotated[bool, typer.Option(
        "--paired", help="One client; each request is also scored in-process right before or after it: what the "
                         "server adds to a lone request, as the median of paired differences (a model on disk is needed).")] = False,
    client: Annotated[str, typer.Option(
        "--client", help="The HTTP client: stdlib (each client one kept-alive connection, HTTP/1.1 over the "
                         "standard library's socket: the lightest, so the figures are the server's) or httpx (what an httpx-based client sees on top).")] = "stdlib",
    mixed: Annotated[bool, typer.Option(
        "--mixed", help="Fairness: short requests (c=2) alone, long ones (100 x 1000 chars, c=2) alone, then both; "
                        "--duration is each phase's length. Exit 1 if a target is missed.")] = False,
    model: ModelOpt = None,
    models_dir: ModelsDirOpt = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="A file holding the bearer key to send (default: RERANKER_API_KEY; a key is never"
                               " an argument, which any user could read in the process list).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load-test a /rerank endpoint (ours or infinity_emb's) and compare with the in-process ceiling."""
    from ..bench import WORKLOADS, run_load
    from ..ceiling import run_ceiling

    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r}", f"choose one of {', '.join(WORKLOADS)}")
    if client not in ("stdlib", "httpx"):
        raise ConfigError(f"unknown client {client!r}", "choose stdlib or httpx")
    if concurrency < 1:
        raise ConfigError("--concurrency must be at least 1", "give a positive number of clients")
    settings = settings_from(model=model, models_dir=models_dir)
    if duration is None and requests is None:
        duration = 10.0
    from ..addresses import base_url

    target = url or base_url(settings.host, settings.port)
    key = read_key_file(api_key_file) if api_key_file else (
        settings.api_key.get_secret_value() if settings.api_key else None)
    if not ceiling_only:
        from ..bench import check_reachable

        check_reachable(target, min(timeout, 5.0))
    if mixed:
        from ..bench import run_mixed
        with err_console.status(f"mixed load on {target}: three phases of {duration:g}s"):
            report = run_mixed(target, seconds=duration or 60.0, timeout=timeout, api_key=key, seed=seed)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _mixed_table(report)
        raise typer.Exit(0 if report["met"] else 1)
    if paired:
        from ..ceiling import run_paired
        from ..models.store import find_variant
        with err_console.status(f"{workload}: served by {target} and in-process, alternately"):
            report = run_paired(target, find_variant(settings), workload=workload, seconds=duration or 10.0,
                                seed=seed, threads=settings.threads, timeout=timeout, warmup=warmup, api_key=key,
                                client=client)
        if as_json:
            print(json.dumps({"paired": report}, indent=2))
        else:
            console.print(f"{report['pairs_measured']} requests: served p50 {report['served_p50_ms']} ms, in-process "
                          f"p50 {report['inprocess_p50_ms']} ms; the server adds {report['added_ms']['p50']} ms "
                          f"(p25 {report['added_ms']['p25']}, p75 {report['added_ms']['p75']}); "
                          f"{report['failed']} failed; scores differ by at most {report['max_score_difference']:.2g}")
        raise typer.Exit(1 if report["failed"] or not report["pairs_measured"] else 0)
    if blocks < 1:
        raise ConfigError("--blocks must be at least 1", "give a positive number of blocks")
    if ceiling and not ceiling_only and not requests and blocks > 1:
        from ..ceiling import run_interleaved
        from ..models.store import find_variant

        variant = find_variant(settings)
        with err_console.status(f"{workload} c={concurrency}: served by {target} and in-process, {blocks} blocks each"):
            out = run_interleaved(target, variant, workload=workload, concurrency=concurrency,
                                  seconds=duration or 10.0, blocks=blocks, seed=seed, threads=settings.threads,
                                  token_budget=settings.token_budget, attention_budget=settings.attention_budget,
                                  batch_requests=settings.max_batch_requests, timeout=timeout, warmup=warmup,
                                  model_name=model_name, api_key=key, client=client)
        out["served"]["url"] = target
        if as_json:
            print(json.dumps(out, indent=2))
            return
        _bench_table(out)
        return
    out: dict = {}
    if not ceiling_only:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True, disable=as_json) as bar:
            task = bar.add_task(f"{workload} c={concurrency} → {target}", total=requests)
            res = run_load(target, workload=workload, concurrency=concurrency, duration=None if requests else duration,
                           requests=requests, seed=seed, timeout=timeout, warmup=warmup, model_name=model_name,
                           api_key=key, on_progress=lambda n: bar.update(task, completed=n), client=client)
        out["served"] = res.summary()
        out["served"]["url"] = target
    if ceiling or ceiling_only:
        from ..models.store import find_variant

        variant = find_variant(settings)
        with err_console.status(f"in-process ceiling on {variant}"):
            out["ceiling"] = run_ceiling(variant, workload=workload, seconds=max(4.0, min(30.0, duration or 10.0)),
                                         seed=seed + 1, threads=settings.threads, token_budget=settings.token_budget,
                                         attention_budget=settings.attention_budget,
                                         batch_requests=settings.max_batch_requests if ceiling_only
                                         else max(1, min(settings.max_batch_requests, concurrency)))
        if "served" in out:
            from ..ceiling import served_over_ceiling

            out["ratios"] = served_over_ceiling(out["served"], out["ceiling"])
    if as_json:
        print(json.dumps(out, indent=2))
        return
    _bench_table(out)


def _mixed_table(r: dict) -> None:
    t = Table(title="short requests beside long ones")
    for col in ("", "short p50 ms", "short p95 ms", "short failed", "long pairs/s"):
        t.add_column(col)
    t.add_row("alone", str(r["short_alone"]["latency_ms"]["p50"]), str(r["short_alone"]["latency_ms"]["p95"]),
              str(r["short_alone"]["requests"] - r["short_alone"]["ok"]), str(r["long_alone"]["pairs_per_s"]))
    t.add_row("together", str(r["short_mixed"]["latency_ms"]["p50"]), str(r["short_mixed"]["latency_ms"]["p95"]),
              str(r["short_failed"]), str(r["long_mixed"]["pairs_per_s"]))
    console.print(t)
    console.print(f"short p95 together / alone: {r['short_p95_ratio']} (target <= {r['targets']['short_p95_ratio_max']});"
                  f" long pairs/s together / alone: {r['long_pairs_ratio']} (target >= {r['targets']['long_pairs_ratio_min']})"
                  f" — {'[green]met[/]' if r['met'] else '[red]MISSED[/]'}")


def _bench_table(out: dict) -> None:
    t = Table(title="rerankctl bench")
    t.add_column("")
    t.add_column("value", justify="right")
    if "served" in out:
        s = out["served"]
        t.add_row("endpoint", s["url"])
        t.add_row("workload · concurrency", f"{s['workload']} · {s['concurrency']}")
        t.add_row("requests (ok / sent)", f"{s['ok']} / {s['requests']} in {s['seconds']:.1f}s")
        t.add_row("requests/s", f"{s['requests_per_s']:.2f}")
        t.add_row("pairs/s", f"{s['pairs_per_s']:.2f}")
        t.add_row("tokens/s", f"{s['tokens_per_s']:.0f}")
        lat = s["latency_ms"]
        t.add_row("latency p50 / p95 / p99 / max", f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f} / {lat['max']:.1f} ms")
        t.add_row("status codes", ", ".join(f"{k}×{v}" for k, v in s["codes"].items()) or "—")
        t.add_row("errors", ", ".join(f"{k}×{v}" for k, v in s["errors"].items()) or "none")
    if "ceiling" in out:
        c = out["ceiling"]
        t.add_row("ceiling: batched pairs/s", f"{c['batched']['pairs_per_s']:.2f}")
        t.add_row("ceiling: batched requests/s", f"{c['batched']['requests_per_s']:.2f}")
        t.add_row("ceiling: single-request p50", f"{c['single']['latency_ms_p50']:.1f} ms")
    if "ratios" in out:
        r = out["ratios"]
        t.add_row("served / ceiling (pairs/s)", f"{r['served_pairs_per_s_over_batched_ceiling']:.2f}")
        t.add_row("served / ceiling (requests/s)", f"{r['served_requests_per_s_over_batched_ceiling']:.2f}")
        t.add_row("served p50 − in-process p50", f"{r['served_p50_minus_inprocess_ms']:+.1f} ms")
    for i, b in enumerate(out.get("blocks", []), 1):
        t.add_row(f"block {i} ({b['first']} first): pairs/s served / ceiling",
                  f"{b['served_pairs_per_s']:.2f} / {b['ceiling_pairs_per_s']:.2f} = {b['ratio']:.2f}")
    console.print(t)


def read_key_file(path: Path) -> str:
    """A key from a file (its first line, stripped): keys stay out of argv and the process list."""
    try:
        key = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key file {path}: {getattr(exc, 'strerror', None) or exc}",
                          "give a readable file whose first line is the key") from None
    if not key:
        raise ConfigError(f"the key file {path} is empty", "put the key on its first line")
    return key


@app.command()
@handled
def compare(
    url_a: Annotated[str, typer.Argument(help="Base URL of endpoint A (for example ours).")],
    url_b: Annotated[str, typer.Argument(help="Base URL of endpoint B (for example infinity_emb's).")],
    queries: Annotated[
        Optional[Path], typer.Option("--queries", help='JSONL of {"query", "documents": [...]}; default: built-in set.')
    ] = None,
    api_a: Annotated[str, typer.Option("--api-a", help="rerank (/rerank) or cohere (/v1/rerank).")] = "rerank",
    api_b: Annotated[str, typer.Option("--api-b", help="rerank (/rerank) or cohere (/v1/rerank).")] = "rerank",
    top_k: Annotated[int, typer.Option("--top-k", help="k of the top-k overlap.")] = 3,
    timeout: Annotated[float, typer.Option("--timeout", help="Per request (s).")] = 60.0,
    api_key_file_a: Annotated[Optional[Path], typer.Option(
        "--api-key-file-a", help="A file holding the bearer key for A (default: RERANKER_API_KEY).")] = None,
    api_key_file_b: Annotated[Optional[Path], typer.Option(
        "--api-key-file-b", help="A file holding the bearer key for B.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Send the same queries to two rerank endpoints; agreement and latency side by side."""
    from ..compare import compare as do_compare
    from ..compare import load_queries

    for name, api in (("--api-a", api_a), ("--api-b", api_b)):
        if api not in ("rerank", "cohere"):
            raise ConfigError(f"{name} must be rerank or cohere, not {api!r}", "rerank = /rerank, cohere = /v1/rerank")
    items = load_queries(queries)
    settings = settings_from()
    key_a = read_key_file(api_key_file_a) if api_key_file_a else (
        settings.api_key.get_secret_value() if settings.api_key else None)
    key_b = read_key_file(api_key_file_b) if api_key_file_b else None
    with err_console.status(f"comparing {len(items)} queries"):
        out = do_compare(url_a, url_b, items, api_a=api_a, api_b=api_b, top_k=top_k, timeout=timeout,  # type: ignore[arg-type]
                         api_key_a=key_a, api_key_b=key_b)
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return
    t = Table(title=f"A = {url_a}   B = {url_b}")
    for col in ("query", "docs", "Spearman", f"top-{top_k} overlap", "top-1", "ms A", "ms B"):
        t.add_column(col)
    for r in out["per_query"]:
        t.add_row(r["query"][:40], str(r["documents"]), f"{r['spearman']:.3f}" if "spearman" in r else "—",
                  f"{r['top_k_overlap']:.2f}" if "top_k_overlap" in r else "—",
                  ("yes" if r["top1_agrees"] else "NO") if "top1_agrees" in r else "—",
                  f"{r['latency_ms_a']:.0f}" + (" ERR" if "error_a" in r else ""),
                  f"{r['latency_ms_b']:.0f}" + (" ERR" if "error_b" in r else ""))
    console.print(t)
    if out["compared"]:
        console.print(f"mean Spearman {out['mean_spearman']:.3f} (min {out['min_spearman']:.3f}) · "
                      f"top-{top_k} overlap {out['mean_top_k_overlap']:.0%} · top-1 agreement {out['top1_agreement']:.0%}")
    la, lb = out["latency_ms"]["a"], out["latency_ms"]["b"]
    console.print(f"latency p50/p95: A {la['p50']:.0f}/{la['p95']:.0f} ms · B {lb['p50']:.0f}/{lb['p95']:.0f} ms · "
                  f"errors A {out['errors']['a']} · B {out['errors']['b']}")
