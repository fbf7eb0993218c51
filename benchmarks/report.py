"""Render a benchmark JSON as Markdown tables: ``python benchmarks/report.py [benchmarks/out/latest.json]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

try:
    from .common import fmt_table
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import fmt_table


def _pct(v):
    return None if v is None else f"{100 * v:+.1f}%"


def render(results: dict, header: bool = True, only_checks: bool = False) -> str:
    out: List[str] = []
    m = results.get("machine", {})
    if header:
        out.append(f"resnorm benchmarks, {results.get('date')}{' (quick)' if results.get('quick') else ''}: "
                   f"{m.get('cpu')}, {m.get('cpu_count')} cores, {results.get('threads')} torch threads, OMP_WAIT_POLICY={results.get('omp_wait_policy')}, "
                   f"Python {m.get('python')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
                   f"x-transformers {m.get('x_transformers')}; load average at start {m.get('load_avg_at_start')}")
    s = results.get("sections", {})
    if not only_checks:
        if "step" in s:
            r = s["step"]
            out.append(f"\n### (1) Train step, fp32, {r['config']['device']} (matmul peak {r['peak_gflops']:.1f} GFLOP/s)")
            rows = [dict(x, vs_hf=x.get("vs_hf"), vs_x=x.get("vs_x"),
                         mfu=None if x.get("mfu") is None else f"{100 * x['mfu']:.0f}%") for x in r["rows"]]
            out.append(fmt_table(rows, ["depth", "impl", "params", "step_ms", "iqr_over_median", "vs_hf", "vs_x",
                                        "gflops", "mfu"]))
            out.append(f"FLOPs: {r['flops_formula']}")
        if "probes" in s:
            r = s["probes"]
            st, lp = r["step"], r["loop"]
            out.append(f"\n### (2) Probe overhead at depth {st['depth']} ({st['groups']} per-layer groups)")
            out.append(fmt_table([
                dict(view="train step", on_ms=st["on_ms"], off_ms=st["off_ms"], overhead=_pct(st["overhead"]),
                     detail=f"probe.before_update(): {st['compute_per_layer_ms']:.2f} ms per-layer vs "
                            f"{st['compute_total_only_ms']:.2f} ms total-only, i.e. "
                            f"{_pct(st.get('direct_overhead'))} of the step (timed alone, less noisy)"),
                dict(view="real loop (train.train, W&B offline)", on_ms=lp["iter_on_ms"], off_ms=lp["iter_off_ms"],
                     overhead=_pct(lp["overhead"]),
                     detail=f"bookkeeping per step: {lp['bookkeeping_on_ms']:.1f} ms on vs "
                            f"{lp['bookkeeping_off_ms']:.1f} ms off"),
            ] + ([dict(view="real loop, shipped default sizes (d_model 64, seq 64)",
                       on_ms=r["loop_default_sizes"]["iter_on_ms"], off_ms=r["loop_default_sizes"]["iter_off_ms"],
                       overhead=_pct(r["loop_default_sizes"]["overhead"]),
                       detail=f"bookkeeping per step: {r['loop_default_sizes']['bookkeeping_on_ms']:.1f} ms on vs "
                              f"{r['loop_default_sizes']['bookkeeping_off_ms']:.1f} ms off")]
                 if "loop_default_sizes" in r else []), ["view", "on_ms", "off_ms", "overhead", "detail"]))
            if "activation" in r:
                a = r["activation"]
                out.append(f"activation/update probes (every {a['probe_every']} steps): one call "
                           f"{a['probe_call_ms']:.1f} ms vs a {a['step_ms']:.1f} ms step "
                           f"({a['per_call_ratio']:.2f}x a step), amortised {_pct(a['amortised_overhead'])}")
            for n in r.get("not_measured", []):
                out.append(f"not measured: {n}")
        if "compile" in s:
            out.append("\n### (4) torch.compile(model.loss), probes on")
            out.append(fmt_table([dict(r, max_rel_loss_diff=f"{r['max_rel_loss_diff']:.1e}") for r in s["compile"]["rows"]],
                                 ["depth", "compile_s", "eager_ms", "compiled_ms", "compiled_over_eager",
                                  "max_rel_loss_diff", "losses_match", "probes_report"]))
        if "speedups" in s:
            r = s["speedups"]
            out.append("\n### Speed-up prototypes (benchmarks/speedups.py), each vs the current code, same run")
            out.append(fmt_table(r["rows"], ["change", "depth", "before_ms", "after_ms", "after_over_before", "detail"]))
            wheres = {x["change"]: x["where"] for x in r["rows"] if x.get("where")}
            out.append("where: " + "; ".join(f"{k}: {v}" for k, v in wheres.items()))
        if "sweep" in s:
            r = s["sweep"]
            out.append("\n### (3) Process start-up (median wall of a fresh interpreter)")
            out.append(fmt_table(r["startup"], ["command", "median_s"]))
            g = r["grid"]
            out.append(f"\n### (3) Sweep: model.norm={g['norms']} depth={g['depths']} train.steps={g['steps']} "
                       f"(default launcher: {r.get('default_launcher')})")
            out.append(fmt_table([dict(x, status=x.get("status") or ",".join(x.get("statuses", [])))
                                  for x in r["sweeps"]],
                                 ["launcher", "status", "returncode", "n_jobs", "wall_s", "sum_job_wall_s",
                                  "outside_jobs_s"]))
            for x in r["sweeps"]:
                if x.get("jobs"):
                    out.append(f"{x['launcher']} jobs: " + "; ".join(
                        f"{j['run'].replace(',logger.mode=offline', '').replace(',train.steps=' + str(g['steps']), '')} "
                        f"{j['status']} {j['wall_s']:.0f} s" for j in x["jobs"] if j.get("wall_s") is not None))
        if "gpu" in s:
            r = s["gpu"]
            if r.get("skipped"):
                out.append(f"\n### (5) GPU: skipped: {r['skipped']}")
            else:
                out.append(f"\n### (5) GPU {r.get('gpu')}, bf16 autocast (bf16 matmul peak {r['peak_gflops']:.0f} GFLOP/s)")
                rows = [dict(x, mfu=None if x.get("mfu") is None else f"{100 * x['mfu']:.0f}%") for x in r["rows"]]
                out.append(fmt_table(rows, ["depth", "impl", "params", "step_ms", "vs_hf", "vs_x", "gflops", "mfu"]))
    checks = [dict(c, section=name) for name, sec in s.items() for c in sec.get("checks", [])]
    if checks:
        out.append("\n### Targets")
        out.append(fmt_table([dict(c, ok="yes" if c["ok"] else "NO") for c in checks], ["section", "target", "value", "ok"]))
    return "\n".join(out)


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "out" / "latest.json")
    print(render(json.loads(path.read_text())))
