"""Dataset cards generated from a release's manifest: the card of one export folder and the Hub card of a
published release (YAML ``configs`` with ``data_files``, license, tags, size category; stats, label
options, lineage and citations). Only manifest fields are used, and the manifest holds no secret."""

from __future__ import annotations

import json
from typing import Any

import yaml

__all__ = ["render_export_card", "render_hub_card", "size_category", "CITATIONS"]

CITATIONS: dict[str, str] = {
    "math-shepherd": """@inproceedings{wang2024mathshepherd,
  title={Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human Annotations},
  author={Wang, Peiyi and Li, Lei and Shao, Zhihong and Xu, R. X. and Dai, Damai and Li, Yifei and Chen, Deli and Wu, Y. and Sui, Zhifang},
  booktitle={ACL}, year={2024}}""",
    "omegaprm": """@article{luo2024omegaprm,
  title={Improve Mathematical Reasoning in Language Models by Automated Process Supervision},
  author={Luo, Liangchen and Liu, Yinxiao and Liu, Rosanne and others}, journal={arXiv:2406.06592}, year={2024}}""",
    "mcts": """@inproceedings{zhang2024restmcts,
  title={ReST-MCTS*: LLM Self-Training via Process Reward Guided Tree Search},
  author={Zhang, Dan and Zhoubian, Sining and Hu, Ziniu and Yue, Yisong and Dong, Yuxiao and Tang, Jie},
  booktitle={NeurIPS}, year={2024}}""",
    "step-dpo": """@article{lai2024stepdpo,
  title={Step-DPO: Step-wise Preference Optimization for Long-chain Reasoning of LLMs},
  author={Lai, Xin and Tian, Zhuotao and Chen, Yukang and Yang, Senqiao and Peng, Xiangru and Jia, Jiaya},
  journal={arXiv:2406.18629}, year={2024}}""",
    "rstar-ppm": """@article{guan2025rstarmath,
  title={rStar-Math: Small LLMs Can Master Math Reasoning with Self-Evolved Deep Thinking},
  author={Guan, Xinyu and Zhang, Li Lyna and Liu, Yifei and others}, journal={arXiv:2501.04519}, year={2025}}""",
    "prm800k": """@article{lightman2023lets,
  title={Let's Verify Step by Step}, author={Lightman, Hunter and Kosaraju, Vineet and Burda, Yura and others},
  journal={arXiv:2305.20050}, year={2023}}""",
    "trl": """@misc{vonwerra2022trl,
  title={TRL: Transformer Reinforcement Learning}, author={von Werra, Leandro and others},
  howpublished={\\url{https://github.com/huggingface/trl}}, year={2020}}""",
}


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` bucket for ``rows``."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, name in bounds:
        if rows < bound:
            return name
    return "n>1B"


def _lineage(manifest: dict[str, Any]) -> str:
    keys = ("dataset", "version", "parent_version", "content_hash", "created_at", "seed", "code_version", "policy", "algorithm", "build_key")
    lines = [f"- {k}: `{manifest.get(k)}`" for k in keys if k in manifest]
    cfg = manifest.get("config")
    if cfg is not None:
        lines.append("\n<details><summary>build config</summary>\n\n```json\n"
                     + json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n```\n</details>")
    return "\n".join(lines)


def _stats(manifest: dict[str, Any]) -> str:
    rows = "\n".join(f"| {t} | {n} |" for t, n in (manifest.get("row_counts") or {}).items())
    return "| table | rows |\n|---|---|\n" + rows


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def render_export_card(manifest: dict[str, Any], record: dict[str, Any]) -> str:
    """README.md of one export folder: the release it came from and the export's options."""
    ds, v = manifest.get("dataset"), manifest.get("version")
    meta = {"configs": [{"config_name": record["config_name"], "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]}
    warn = "".join(f"\n> **Warning:** {w}\n" for w in record.get("warnings", []))
    return (
        _front_matter(meta)
        + f"\n# {ds} v{v} — `{record['format']}` export\n\n{record['rows']} rows.{warn}\n\n"
        + "## Export options\n\n```yaml\n" + yaml.safe_dump(record["options"], sort_keys=True) + "```\n\n"
        + "## Release\n\n" + _stats(manifest) + "\n\n" + _lineage(manifest) + "\n"
    )


def render_hub_card(
    manifest: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    repo_id: str,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
) -> str:
    """README.md of a published release: one Hub config per export under ``<config_name>/``."""
    ds, v = manifest.get("dataset"), manifest.get("version")
    total = max([r["rows"] for r in records] + [sum((manifest.get("row_counts") or {}).values())] or [0])
    algorithm = manifest.get("algorithm") or (manifest.get("config") or {}).get("search", {}).get("algorithm")
    meta: dict[str, Any] = {
        "license": license,
        "pretty_name": f"{ds} v{v}",
        "tags": sorted(set(["stepforge", "process-reward-model", "step-level", "synthetic"] + (tags or []) + ([algorithm] if algorithm else []))),
        "task_categories": ["text-generation"],
        "size_categories": [size_category(total)],
        "configs": [
            {"config_name": r["config_name"], "data_files": [{"split": "train", "path": f"{r['config_name']}/train-*.parquet"}],
             **({"default": True} if i == 0 else {})}
            for i, r in enumerate(records)
        ],
    }
    sections = [f"# {ds} v{v}\n\nStep-level dataset built with stepforge; version `v{v}` of `{repo_id}` "
                f"(git tag `v{v}`).\n\n```python\nfrom datasets import load_dataset\n"
                + "".join(f"{r['config_name']} = load_dataset({repo_id!r}, {r['config_name']!r}, revision=\"v{v}\")\n" for r in records)
                + "```"]
    sections.append("## Stats\n\n" + _stats(manifest))
    stats = manifest.get("stats") or {}
    if stats.get("steps"):
        sections[-1] += f"\n\nLabel balance at the default threshold (c > 0): {stats.get('steps_positive', 0)}/{stats['steps']} positive steps."
    opts = ["## Configs and label options", "| config | format | rows | options |", "|---|---|---|---|"]
    for r in records:
        opts.append(f"| `{r['config_name']}` | {r['format']} | {r['rows']} | `{json.dumps(r['options'], sort_keys=True)}` |")
    for r in records:
        for w in r.get("warnings", []):
            opts.append(f"\n> **{r['config_name']}:** {w}")
    sections.append("\n".join(opts))
    sections.append("## Lineage\n\n" + _lineage(manifest))
    cites = [CITATIONS[k] for k in dict.fromkeys([algorithm or "", *[r["format"] for r in records], "trl"]) if k in CITATIONS]
    sections.append("## Citations\n\n```bibtex\n" + "\n\n".join(cites) + "\n```")
    return _front_matter(meta) + "\n" + "\n\n".join(sections) + "\n"
