"""Exports of a release to training formats, one module per format with its options model beside it.

``run_export`` reads a release, runs one exporter, writes ``<out>/data/train-00000.parquet`` (plus
``<out>/train.jsonl`` for JSONL formats; both streamed batch by batch into the store, see
``storage.exports.write``), ``<out>/README.md`` (the release card with the export's options)
and ``<out>/export.json``, and records the options beside the release (``<dataset>/_exports/v<N>/<format>.json``,
outside the immutable version folder) so the published card can list them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

import pyarrow as pa
from pydantic import BaseModel, ValidationError

from storage.dedup import BenchmarkIndex, DecontamConfig, DedupConfig, decontaminate, dedup
from storage.errors import ConfigError
from storage.exports import lean_proofs, math_shepherd, prm800k, rstar_ppm, step_dpo, trl_dpo, trl_prm
from storage.exports.base import ExportBatch, ExportResult, ExportStream, ReleaseData, load_release
from storage.exports.stream import stream_export
from storage.exports.write import write_stream
from storage.objectstore import ObjectStore, open_store

__all__ = ["EXPORTERS", "Exporter", "parse_options", "run_export", "export_records", "ExportResult", "ReleaseData"]


@dataclass(frozen=True)
class Exporter:
    name: str
    options: type[BaseModel]
    fn: Callable[[ReleaseData, Any], ExportResult]
    jsonl: bool = False
    # Exporters that run batch by batch: ``stream(data, options, presort)``; ``fn`` is then its collected form.
    stream: Callable[[ReleaseData, Any, bool], ExportStream] | None = None

    @property
    def config_name(self) -> str:
        """Hub config name (``trl-prm`` → ``trl_prm``)."""
        return self.name.replace("-", "_")


EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter(trl_prm.NAME, trl_prm.TRLPRMOptions, trl_prm.export, stream=trl_prm.stream),
        Exporter(trl_dpo.NAME, trl_dpo.TRLDPOOptions, trl_dpo.export, stream=trl_dpo.stream),
        Exporter(step_dpo.NAME, step_dpo.StepDPOOptions, step_dpo.export, stream=step_dpo.stream),
        Exporter(math_shepherd.NAME, math_shepherd.MathShepherdOptions, math_shepherd.export, stream=math_shepherd.stream),
        Exporter(prm800k.NAME, prm800k.PRM800KOptions, prm800k.export, jsonl=True, stream=prm800k.stream),
        Exporter(rstar_ppm.NAME, rstar_ppm.RStarPPMOptions, rstar_ppm.export, stream=rstar_ppm.stream),
        # Releases of `stepforge mustard` (their `mustard` table); any other release exports no rows.
        Exporter(lean_proofs.PROOFS, lean_proofs.LeanProofsOptions, lean_proofs.export_proofs),
        Exporter(lean_proofs.REVISION_DPO, lean_proofs.LeanRevisionDPOOptions, lean_proofs.export_revision_dpo),
    )
}


def get_exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS:
        raise ConfigError(f"`format` must be one of {sorted(EXPORTERS)}, got {fmt!r}.", field="format", value=fmt)
    return EXPORTERS[fmt]


def parse_options(fmt: str, options: dict[str, Any] | BaseModel | None = None) -> BaseModel:
    """Validate ``options`` for ``fmt``; errors name the option (``trl-prm.threshold``)."""
    exporter = get_exporter(fmt)
    if isinstance(options, exporter.options):
        return options
    try:
        return exporter.options.model_validate(options or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"`{fmt}.{loc}`: {err['msg']} (got {err.get('input')!r}).", field=f"{fmt}.{loc}", value=err.get("input")) from None


def _annex_key(dataset: str, version: int, fmt: str) -> str:
    return f"{dataset}/_exports/v{version}/{fmt}.json"


def export_records(store: ObjectStore, dataset: str, version: int) -> list[dict[str, Any]]:
    """The export records of a release (latest per format), for cards and publishing."""
    out = []
    for key in store.list(f"{dataset}/_exports/v{version}/"):
        if key.endswith(".json"):
            out.append(json.loads(store.read_bytes(key)))
    return sorted(out, key=lambda r: r["format"])


def filter_release(data: ReleaseData, dedup_cfg: DedupConfig | None,
                   decontam_cfg: DecontamConfig | None) -> tuple[ReleaseData, dict[str, Any] | None]:
    """The release without its contaminated and duplicate problems (and their steps, nodes and pairs), and
    the report of what was dropped, why and what it matched; ``(data, None)`` when neither filter is on. The
    problems table is read whole (the filters compare every question with every other); the rest is not."""
    dedup_on = dedup_cfg is not None and dedup_cfg.enabled
    decontam_on = decontam_cfg is not None and bool(decontam_cfg.benchmarks)
    if not dedup_on and not decontam_on:
        return data, None
    problems = data.table("problems")
    items = list(zip(problems["problem_id"].to_pylist(), problems["question"].to_pylist()))
    dropped = []
    if decontam_on:
        kept, out = decontaminate(items, BenchmarkIndex(decontam_cfg))
        dropped += out
        items = [it for it in items if it[0] in set(kept)]
    if dedup_on:
        kept, out = dedup(items, dedup_cfg)
        dropped += out
        items = [it for it in items if it[0] in set(kept)]
    # A view, not filtered copies: the other tables are filtered as the export reads them (in batches for
    # the streaming exports), so a filtered export streams like an unfiltered one.
    view = data.only(pa.array([pid for pid, _ in items], pa.string()))
    by_reason: dict[str, int] = {}
    for d in dropped:
        by_reason[d.reason] = by_reason.get(d.reason, 0) + 1
    report = {"dedup": dedup_cfg.model_dump() if dedup_on else None,
              "decontaminate": decontam_cfg.model_dump() if decontam_on else None,
              "problems_dropped": len(dropped), "by_reason": dict(sorted(by_reason.items())),
              "records": [d.as_dict() for d in dropped[:1000]]}
    return view, report


def _whole(result: ExportResult, jsonl: bool) -> Iterator[ExportBatch]:
    """A whole-table exporter's result as a stream, so every export is written by the same code."""
    lines = None
    if jsonl and result.jsonl is not None:
        lines = pa.array([json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in result.jsonl], pa.string())
    yield ExportBatch(result.table.combine_chunks().to_batches()[0] if result.table.num_rows else
                      pa.RecordBatch.from_pylist([], schema=result.table.schema), lines)
    return result.stats, result.warnings


def _stream(exporter: Exporter, data: ReleaseData, opts: BaseModel, presort: bool) -> ExportStream:
    if exporter.stream is not None:
        return exporter.stream(data, opts, presort)
    result = exporter.fn(data, opts)
    return ExportStream(result.table.schema, _whole(result, exporter.jsonl), exporter.name, jsonl=exporter.jsonl)


def run_export(
    store: ObjectStore,
    dataset: str,
    version: int,
    fmt: str,
    out: str | ObjectStore,
    options: dict[str, Any] | BaseModel | None = None,
    *,
    data: ReleaseData | None = None,
    dedup: DedupConfig | None = None,
    decontaminate: DecontamConfig | None = None,
) -> dict[str, Any]:
    """Export ``dataset@v<version>`` as ``fmt`` to ``out`` (a folder or s3:// URI, or an open store).

    ``dedup`` / ``decontaminate`` first leave out duplicate problems and problems found in benchmark files,
    with everything they touch; what was dropped is listed in ``export.json`` (``filters``)."""
    exporter = get_exporter(fmt)
    opts = parse_options(fmt, options)
    data = data or load_release(store, dataset, version)
    data, filters = filter_release(data, dedup, decontaminate)
    out_store = open_store(out) if isinstance(out, str) else out
    parquet_key = "data/train-00000.parquet"
    streams: list[ExportStream] = []

    def write(presort: bool) -> Any:
        streams.append(_stream(exporter, data, opts, presort))
        return write_stream(out_store, streams[-1], parquet_key, "train.jsonl" if exporter.jsonl else None)

    written, stats, warned = stream_export(write)
    record = {
        "format": fmt,
        "config_name": exporter.config_name,
        "options": json.loads(opts.model_dump_json()),
        "release": {"dataset": dataset, "version": version, "content_hash": data.manifest.get("content_hash")},
        "rows": written[parquet_key].rows,
        "columns": [{"name": f.name, "type": str(f.type)} for f in streams[-1].schema],  # a list: order matters
        "stats": stats,
        "warnings": warned,
        "filters": filters,
        "files": {key: f.record() for key, f in written.items()},
        "out": out_store.root,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    from storage.card import render_export_card

    out_store.write_bytes("README.md", render_export_card(data.manifest, record).encode())
    out_store.write_bytes("export.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    store.write_bytes(_annex_key(dataset, version, fmt), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record
