"""Benchmark: TIES merge of two fine-tunes into their base, graftline vs mergekit 0.1.5.

    nice -n 10 .venv/bin/python benchmarks/merge_speed.py [--mergekit /work/mk-venv/bin/mergekit-yaml]

For each size (~20M, ~170M, ~500M parameters; Llama configs, random init, fine-tunes = base + noise,
fp32 safetensors folders under --workdir), both tools merge the SAME YAML, each in its own child process,
--repeat times (default 3) in turn; the median wall seconds and the largest peak RSS of the command itself
(wait4's rusage, taken by a small launcher) are recorded, then the two outputs are compared tensor by
tensor. Writes benchmarks/results/merge_speed.json and merge_speed.png.
mergekit must live in its own venv (it pins versions graftline does not share): pass its
`mergekit-yaml` with --mergekit or $MERGEKIT_YAML.

The comparison counts every element where the outputs differ at all (|a - b| > 0 in fp32, no tolerance:
both tools compute TIES in fp32 here, in the same order of operations, so anything else is a real
difference) and asks whether each one is a threshold tie: an entry whose |delta| equals the k-th largest
|delta| of its fine-tune's tensor, k = max(1, int(density * n)), when more than k entries reach it. Which
of the tied entries survive the trim is arbitrary (graftline keeps the lowest indices; mergekit's unstable
argsort keeps whichever it sorts first), so a difference there is not an error.
`max_abs_diff_outside_ties` shows whether everything else agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from graft.checkpoint import CheckpointReader, write_checkpoint  # noqa: E402 (after the sys.path line)
from graft.merge.sparsify import kth_largest_abs  # noqa: E402
from provenance import provenance  # noqa: E402

DEFAULT_MERGEKIT = os.environ.get("MERGEKIT_YAML", "/work/mk-venv/bin/mergekit-yaml")
SIZES = {  # name: (vocab, hidden, intermediate, layers, heads)
    "20m": (8000, 512, 1376, 4, 8),
    "170m": (36000, 768, 3072, 12, 12),
    "500m": (32000, 1280, 3584, 21, 20),
}
TIES = {"merge_method": "ties", "parameters": {"normalize": True},
        "models": [{"parameters": {"weight": 1.0, "density": 0.5}}, {"parameters": {"weight": 0.8, "density": 0.6}}]}
COMPARISON = ("differing_elements: elements where |graftline - mergekit| > 0 (fp32, no tolerance). A difference is a "
              "threshold tie when, at that coordinate, a fine-tune's |ft - base| (fp32) equals the k-th largest of its "
              "tensor, k = max(1, int(density * n)), and more than k entries of that tensor reach it: which tied entries "
              "survive the trim is arbitrary (graftline keeps the lowest indices, mergekit's unstable argsort any). "
              "differing_elements_outside_ties and max_abs_diff_outside_ties are over the other differing elements "
              "(0 and 0.0 if none). Each tool runs --repeat times per size, interleaved with the other; *_wall_s is the median "
              "of its runs (*_wall_s_runs), peak RSS the largest. speedup = mergekit_wall_s / graftline_wall_s (medians); "
              "speedup_worst = mergekit's fastest run / graftline's slowest.")


def llama_config(vocab: int, hidden: int, inter: int, layers: int, heads: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{m}.weight"] = (h, h)
        out |= {f"{p}mlp.gate_proj.weight": (i, h), f"{p}mlp.up_proj.weight": (i, h), f"{p}mlp.down_proj.weight": (h, i),
                f"{p}input_layernorm.weight": (h,), f"{p}post_attention_layernorm.weight": (h,)}
    return out | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def _tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    base = torch.randn(shape, generator=g).mul_(0.02) if len(shape) > 1 else torch.ones(shape)
    if seed:  # a "fine-tune": base plus its own noise
        g.manual_seed(zlib.crc32(name.encode()) + 1000003 * seed)
        base.add_(torch.randn(shape, generator=g), alpha=0.002)
    return base


def build_models(root: Path, cfg: dict) -> dict[str, Path]:
    """base, ft1, ft2 as fp32 safetensors folders (streamed; never a whole model in memory)."""
    folders = {}
    spec = shapes(cfg)
    for seed, name in enumerate(("base", "ft1", "ft2")):
        folder = root / name
        if not (folder / "config.json").is_file():
            write_checkpoint(folder, ((k, _tensor(k, s, seed)) for k, s in spec.items()), max_shard_bytes=1024**3)
            (folder / "config.json").write_text(json.dumps(cfg, indent=1))
        folders[name] = folder
    return folders


# Runs the command as ITS child and reports that grandchild's rusage. A child forked straight from this
# script would report this script's own resident set as its peak (Linux keeps the pre-exec high-water
# mark in ru_maxrss: measured, a 1 GB parent made `import torch` read 1223 MB instead of 221 MB); this
# launcher imports nothing heavy, so the command's peak RSS is its own.
LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); _, status, usage = os.wait4(p.pid, 0); "
            "print(usage.ru_maxrss, file=sys.stderr); sys.exit(os.waitstatus_to_exitcode(status))")


def timed_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd`; return (wall seconds, peak RSS in MB of that command alone)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], stdout=fh, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    *messages, peak = proc.stderr.strip().splitlines() or ["?"]
    with open(log, "a") as fh:
        fh.write("\n".join(messages))
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return wall, int(peak) / 1024  # ru_maxrss is in KiB on Linux


@dataclass(frozen=True)
class Agreement:
    """How two merges of the same inputs differ, and how much of it threshold ties explain."""

    differing: int = 0  # elements with |a - b| > 0
    outside_ties: int = 0  # of those, elements no fine-tune has at its trim threshold
    max_abs_diff: float = 0.0
    max_abs_diff_outside_ties: float = 0.0

    @property
    def all_ties(self) -> bool:
        """True when every differing element is a threshold tie (or nothing differs)."""
        return self.outside_ties == 0

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.differing + other.differing, self.outside_ties + other.outside_ties,
                         max(self.max_abs_diff, other.max_abs_diff),
                         max(self.max_abs_diff_outside_ties, other.max_abs_diff_outside_ties))


def threshold_ties(base: torch.Tensor, finetunes: Sequence[torch.Tensor], densities: Sequence[float]) -> torch.Tensor:
    """Mask of the coordinates where some fine-tune's |ft - base| (fp32) ties at its trim threshold.

    The threshold is the k-th largest |delta| of the tensor, k = max(1, int(density * n)) (mergekit's
    rule). Exactly k entries survive the trim, so when more than k entries reach the threshold the
    tool's tie rule alone decides which of those at it survive: those are the entries marked. A threshold
    reached by exactly k entries is no tie (every tool keeps them all), nor is a density outside (0, 1)
    (all or nothing survives).
    """
    base = base.float()
    n = base.numel()
    tied = torch.zeros(base.shape, dtype=torch.bool)
    for ft, density in zip(finetunes, densities, strict=True):
        if not 0 < density < 1 or n == 0:
            continue
        mag = ft.float().sub(base).abs_()
        k = max(1, int(density * n))
        threshold, reached = kth_largest_abs(mag.view(-1), k)
        if reached > k:
            tied |= mag == threshold
    return tied


def compare_tensor(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor, finetunes: Sequence[torch.Tensor],
                   densities: Sequence[float]) -> Agreement:
    """Compare two TIES merges `a`, `b` of `finetunes` onto `base`, element by element (exact, in fp32)."""
    diff = a.float().sub(b.float()).abs_()
    differ = (diff > 0) | diff.isnan()
    if not bool(differ.any()):
        return Agreement()
    outside = differ & ~threshold_ties(base, finetunes, densities)
    n_outside = int(outside.count_nonzero())
    return Agreement(int(differ.count_nonzero()), n_outside, float(diff.max()),
                     float(diff[outside].max()) if n_outside else 0.0)


def compare_outputs(a: Path, b: Path, base: Path, finetunes: Sequence[Path], densities: Sequence[float]) -> Agreement:
    """`compare_tensor` over every tensor of two merged folders, one tensor name at a time (never a whole model)."""
    ra, rb, rbase = CheckpointReader(a), CheckpointReader(b), CheckpointReader(base)
    rfts = [CheckpointReader(f) for f in finetunes]
    names = ra.keys()
    if set(names) != set(rb.keys()):
        raise SystemExit(f"outputs differ in tensor names: {sorted(set(names) ^ set(rb.keys()))[:5]}")
    total = Agreement()
    for k in names:
        ta, tb = ra.get(k), rb.get(k)
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):  # the inputs are read only where something differs
            total += compare_tensor(ta, tb, rbase.get(k), [r.get(k) for r in rfts], densities)
    return total


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} CPUs shared with other jobs (load average at the end: {load}), {mem:.0f} GiB RAM, "
            f"{platform.system()}, torch {torch.__version__}, CPU only")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["params"] / 1e6 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "wall_s", "wall time (s)"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        for tool, marker in (("graftline", "o"), ("mergekit", "s")):
            ax.plot(x, [r[f"{tool}_{key}"] for r in rows], marker=marker, label=tool)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TIES merge of two fp32 fine-tunes into their base (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="mergekit-yaml of a mergekit 0.1.5 venv ($MERGEKIT_YAML)")
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/graft_merge_bench"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the generated models and outputs")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each tool per size, interleaved; the median is reported")
    args = ap.parse_args(argv)
    started = time.time()
    mergekit = Path(args.mergekit)
    if not (mergekit.is_file() and os.access(mergekit, os.X_OK)):
        print(f"mergekit is absent: no executable mergekit-yaml at {mergekit}. Install it in a separate venv:\n"
              "  python3 -m venv /work/mk-venv && /work/mk-venv/bin/pip install torch==2.13.0 && "
              "/work/mk-venv/bin/pip install mergekit==0.1.5\nthen pass --mergekit PATH or set MERGEKIT_YAML.", file=sys.stderr)
        return 2
    rows = []
    for size in args.sizes.split(","):
        cfg = llama_config(*SIZES[size])
        params = sum(int(torch.Size(s).numel()) for s in shapes(cfg).values())
        root = args.workdir / size
        print(f"[{size}] {params / 1e6:.1f}M params: building models under {root}", flush=True)
        m = build_models(root, cfg)
        ties = dict(TIES, base_model=str(m["base"]), models=[
            {"model": str(m["ft1"]), **TIES["models"][0]}, {"model": str(m["ft2"]), **TIES["models"][1]}])
        config = root / "ties.yaml"
        config.write_text(yaml.safe_dump(ties, sort_keys=False))
        outs = {t: root / f"out_{t}" for t in ("graftline", "mergekit")}
        commands = {"graftline": [sys.executable, "-m", "pipelines.cli", "merge", str(config), str(outs["graftline"])],
                    "mergekit": [str(mergekit), str(config), str(outs["mergekit"])]}
        runs: dict[str, list[tuple[float, float]]] = {t: [] for t in commands}
        for attempt in range(1, args.repeat + 1):  # interleaved, so a slow spell of a shared machine hits both tools
            for tool, cmd in commands.items():
                shutil.rmtree(outs[tool], ignore_errors=True)
                wall, rss = timed_child(cmd, root / f"{tool}.log")
                runs[tool].append((wall, rss))
                print(f"[{size}] {tool:9s} run {attempt}/{args.repeat}: {wall:.1f} s, {rss:.0f} MB", flush=True)
        g_wall, k_wall = (statistics.median(w for w, _ in runs[t]) for t in ("graftline", "mergekit"))
        g_rss, k_rss = (max(r for _, r in runs[t]) for t in ("graftline", "mergekit"))
        agree = compare_outputs(outs["graftline"], outs["mergekit"], m["base"], [m["ft1"], m["ft2"]],
                                [float(e["parameters"]["density"]) for e in TIES["models"]])
        print(f"[{size}] max |graftline - mergekit| = {agree.max_abs_diff:.3g}; {agree.differing} elements differ, "
              f"{agree.outside_ties} of them not threshold ties (max |diff| there {agree.max_abs_diff_outside_ties:.3g})",
              flush=True)
        rows.append({"params": params, "graftline_wall_s": round(g_wall, 2), "graftline_peak_rss_mb": round(g_rss, 1),
                     "mergekit_wall_s": round(k_wall, 2), "mergekit_peak_rss_mb": round(k_rss, 1),
                     "graftline_wall_s_runs": [round(w, 2) for w, _ in runs["graftline"]],
                     "mergekit_wall_s_runs": [round(w, 2) for w, _ in runs["mergekit"]],
                     "speedup": round(k_wall / g_wall, 2),
                     "speedup_worst": round(min(w for w, _ in runs["mergekit"]) / max(w for w, _ in runs["graftline"]), 2),
                     "max_abs_diff": agree.max_abs_diff,
                     "differing_elements": agree.differing, "all_differences_are_threshold_ties": agree.all_ties,
                     "differing_elements_outside_ties": agree.outside_ties,
                     "max_abs_diff_outside_ties": agree.max_abs_diff_outside_ties})
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    prov = provenance([0], started, None if argv is None else [sys.argv[0], *argv])
    result = {"provenance": prov, "machine": machine(), "comparison": COMPARISON, "rows": rows}
    (args.results / "merge_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.results / "merge_speed.png")
    print(f"wrote {args.results / 'merge_speed.json'} and merge_speed.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
