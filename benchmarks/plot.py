"""Chart dora_fx's speedups from the JSON that bench_layer.py and bench_model.py write.

    python benchmarks/plot.py [--layer benchmarks/results/layer.json] [--model benchmarks/results/model.json]
                              [--out benchmarks/results/speedups.png]

One panel per JSON file found: for each measured cell, dora_fx's speedup over PEFT eager and over PEFT +
Inductor (norm recomputed every call), plus, for the forward, over eager with the norm cached (dora_fx's
eval default). A dashed line marks 1x; a black tick marks the target where the issue sets one.
Needs only matplotlib and the JSON (no torch, no GPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERIES = (  # (label, contender, baseline)
    ("vs PEFT eager", "dora_fx", "eager"),
    ("vs PEFT + Inductor", "dora_fx", "inductor"),
    ("norm cached, vs PEFT eager", "dora_fx_cached", "eager"),
)


def layer_bars(payload: dict) -> tuple[list[str], dict, dict]:
    """Labels, ``{series: [speedup | None]}`` and ``{(series, index): target}`` of the layer benchmark."""
    targets = {(t["mode"], t["d"], t["r"], t["tokens"]): t for t in payload.get("targets", [])}
    labels, values, marks = [], {s[0]: [] for s in SERIES}, {}
    for i, cell in enumerate(payload["cells"]):
        labels.append(f"d={cell['d']} r={cell['r']}\n{cell['tokens']} tok {cell['mode']}")
        _add(values, cell["contenders"])
        target = targets.get((cell["mode"], cell["d"], cell["r"], cell["tokens"]))
        if target:
            marks[(SERIES[0][0], i)], marks[(SERIES[1][0], i)] = target["vs_eager"], target["vs_inductor"]
    return labels, values, marks


def model_bars(payload: dict) -> tuple[list[str], dict, dict]:
    """The same for the model benchmark: one group per (rank, mode)."""
    targets = payload.get("targets", {})
    groups: dict[tuple, dict] = {}
    for row in payload["rows"]:
        groups.setdefault((row["r"], row["mode"]), {})[row["contender"]] = row
    labels, values, marks = [], {s[0]: [] for s in SERIES}, {}
    for i, ((r, mode), rows) in enumerate(groups.items()):
        labels.append(f"r={r}\n{mode}")
        _add(values, rows)
        if r == targets.get("r") and mode in targets:
            marks[(SERIES[0][0], i)] = targets[mode]["vs_eager"]
            marks[(SERIES[1][0], i)] = targets[mode]["vs_inductor"]
    return labels, values, marks


def _add(values: dict, results: dict) -> None:
    for label, contender, baseline in SERIES:
        ok = contender in results and baseline in results
        values[label].append(results[baseline]["ms"] / results[contender]["ms"] if ok else None)


def draw(ax, title: str, labels: list[str], values: dict, marks: dict) -> None:
    width = 0.8 / len(SERIES)
    for k, (label, series) in enumerate(values.items()):
        xs = [i + (k - (len(SERIES) - 1) / 2) * width for i in range(len(labels))]
        heights = [v if v is not None else 0.0 for v in series]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v is not None else "" for v in series], fontsize=6, padding=1)
        for i, x in enumerate(xs):
            if (label, i) in marks:
                ax.hlines(marks[(label, i)], x - width / 2, x + width / 2, colors="black", linewidth=2)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("speedup of dora_fx (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def _title(kind: str, payload: dict) -> str:
    env = payload["env"]
    return f"{kind}: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['date'][:10]} (black: target)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="benchmarks/results/layer.json")
    parser.add_argument("--model", default="benchmarks/results/model.json")
    parser.add_argument("--out", default="benchmarks/results/speedups.png")
    args = parser.parse_args(argv)
    panels = []
    sources = (("One DoRA Linear", args.layer, layer_bars), ("Llama-shaped stack", args.model, model_bars))
    for kind, path, bars in sources:
        if pathlib.Path(path).exists():
            payload = json.loads(pathlib.Path(path).read_text())
            panels.append((_title(kind, payload), *bars(payload)))
    if not panels:
        raise SystemExit(f"neither {args.layer} nor {args.model} exists")
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.1 * max(len(p[1]) for p in panels)), 4 * len(panels)),
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        draw(ax, *panel)
    fig.tight_layout()
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
